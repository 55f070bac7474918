"""flax_eprop: online e-prop for recurrent spiking networks written in Flax."""

from flax_eprop import surrogates as surrogates
from flax_eprop.cells import ALIF as ALIF
from flax_eprop.cells import LI as LI
from flax_eprop.cells import LIF as LIF
from flax_eprop.cells import ALIFState as ALIFState
from flax_eprop.cells import LIFState as LIFState
from flax_eprop.cells import LIState as LIState
from flax_eprop.cells import SpikingCell as SpikingCell
from flax_eprop.online import CARRY as CARRY
from flax_eprop.online import ELIGIBILITY as ELIGIBILITY
from flax_eprop.online import FEEDBACK as FEEDBACK
from flax_eprop.online import LOSSES as LOSSES
from flax_eprop.online import METRICS as METRICS
from flax_eprop.online import OnlineGrad as OnlineGrad
from flax_eprop.online import RandomFeedback as RandomFeedback
from flax_eprop.online import TraceTooLargeError as TraceTooLargeError
from flax_eprop.online import bptt_value_and_grad as bptt_value_and_grad
from flax_eprop.online import describe_traces as describe_traces
from flax_eprop.online import gradient_mode as gradient_mode
from flax_eprop.online import online_update as online_update
from flax_eprop.online import online_value_and_grad as online_value_and_grad
from flax_eprop.online import reset_state as reset_state
from flax_eprop.online import rest_state as rest_state
from flax_eprop.sparse import NonLocalError as NonLocalError
from flax_eprop.sparse import sparse_jacfwd as sparse_jacfwd

__version__ = '0.1.0.dev0'

__all__ = [
  'ALIF',
  'ALIFState',
  'CARRY',
  'ELIGIBILITY',
  'FEEDBACK',
  'LI',
  'LIF',
  'LIFState',
  'LIState',
  'LOSSES',
  'METRICS',
  'NonLocalError',
  'OnlineGrad',
  'RandomFeedback',
  'TraceTooLargeError',
  'SpikingCell',
  'bptt_value_and_grad',
  'describe_traces',
  'gradient_mode',
  'online_update',
  'online_value_and_grad',
  'reset_state',
  'rest_state',
  'sparse_jacfwd',
  'surrogates',
]
