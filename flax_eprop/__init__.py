"""flax_eprop: online e-prop for recurrent spiking networks written in Flax."""

from flax_eprop import surrogates as surrogates
from flax_eprop.cells import ALIF as ALIF
from flax_eprop.cells import LI as LI
from flax_eprop.cells import LIF as LIF
from flax_eprop.cells import ALIFState as ALIFState
from flax_eprop.cells import LIFState as LIFState
from flax_eprop.cells import LIState as LIState
from flax_eprop.cells import SpikingCell as SpikingCell

__version__ = '0.1.0.dev0'

__all__ = [
  'ALIF',
  'ALIFState',
  'LI',
  'LIF',
  'LIFState',
  'LIState',
  'SpikingCell',
  'surrogates',
]
