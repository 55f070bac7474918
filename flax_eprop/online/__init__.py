"""Online learning: the `OnlineGrad` Linen module and its training loops.

The package reads like the design (DESIGN.md section 3):

* `module`: `OnlineGrad` (the Linen module, where ``nn.RNN`` would go) and
  `gradient_mode`;
* `rnn_api`: ``nn.RNN``'s call interface for `OnlineGrad` (``seq_lengths``,
  ``reverse``, ``initial_carry``, the ``nn.scan`` options) and the cells
  e-prop refuses;
* `state`: the layers' state (collections ``'carry'`` and
  ``'eligibility'``): `rest_state`, `reset_state`;
* `lifted`: the core lifted transform (`flax.core.lift.pack`) that runs one
  chunk of a cell with a custom VJP, or makes its rest state;
* `engine`: the chunk-gradient contract `ChunkEngine` (``init_traces``,
  ``forward``, ``backward``) and the two engines behind it, with their
  trace layouts;
* `eprop` and `rtrl`: the math of the two engines, compressed e-prop traces
  updated once per chunk and dense real-time recurrent learning (with its
  memory check, `TraceTooLargeError`);
* `training`: sequence losses and gradients fed chunk by chunk
  (`online_value_and_grad`, `online_update`) and the BPTT reference
  (`bptt_value_and_grad`);
* `feedback`: learning-signal options (`RandomFeedback`);
* `filtered`: learning through a leaky readout (``OnlineGrad``'s
  ``readout_decay``: Bellec's filtered eligibility traces).
"""

from flax_eprop.online.describe import describe_traces as describe_traces
from flax_eprop.online.feedback import FEEDBACK as FEEDBACK
from flax_eprop.online.feedback import RandomFeedback as RandomFeedback
from flax_eprop.online.module import CARRY as CARRY
from flax_eprop.online.module import ELIGIBILITY as ELIGIBILITY
from flax_eprop.online.module import LOSSES as LOSSES
from flax_eprop.online.module import METRICS as METRICS
from flax_eprop.online.module import OnlineGrad as OnlineGrad
from flax_eprop.online.module import gradient_mode as gradient_mode
from flax_eprop.online.rtrl import TraceTooLargeError as TraceTooLargeError
from flax_eprop.online.state import reset_state as reset_state
from flax_eprop.online.state import rest_state as rest_state
from flax_eprop.online.training import (
  bptt_value_and_grad as bptt_value_and_grad,
)
from flax_eprop.online.training import online_update as online_update
from flax_eprop.online.training import (
  online_value_and_grad as online_value_and_grad,
)

__all__ = [
  'CARRY',
  'ELIGIBILITY',
  'FEEDBACK',
  'LOSSES',
  'METRICS',
  'OnlineGrad',
  'RandomFeedback',
  'TraceTooLargeError',
  'bptt_value_and_grad',
  'describe_traces',
  'gradient_mode',
  'online_update',
  'online_value_and_grad',
  'reset_state',
  'rest_state',
]
