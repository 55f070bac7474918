"""Neuron cells: one time step of LIF, ALIF and LI, and their base class.

Every cell is a Flax ``nn.RNNCellBase``: ``__call__(carry, x) -> (new_carry,
y)`` for one time step, so ``nn.RNN(cell)`` runs a sequence. The math is
DESIGN.md section 2 (``sg`` = ``jax.lax.stop_gradient``)::

  alpha = exp(-dt / tau_mem)        rho = exp(-dt / tau_adapt)
  I_t   = x_t @ W_in (+ b) + z_{t-1} @ W_rec      # W_rec if recurrent; diag 0
  v_t   = alpha * v_{t-1} + (1 - alpha) * I_t - threshold * sg(z_{t-1})
  a_t   = rho * a_{t-1} + z_{t-1}                 # ALIF only
  A_t   = threshold + beta * a_t                  # LIF: A_t = threshold
  z_t   = spike_fn((v_t - A_t) / threshold)

Times are in milliseconds: ``dt`` (default 1) and every time constant.
(:mod:`flax_eprop.data` bins in seconds; its ``dt_ms`` takes the cells' ``dt``.)

Steps are plain elementwise ``jnp`` code around two matmuls: no Python
control flow on array values, no random numbers, no reductions over the
neuron axis. The e-prop transform reads the step's jaxpr and relies on it.
"""

from flax_eprop.cells.base import SpikingCell as SpikingCell
from flax_eprop.cells.neurons import ALIF as ALIF
from flax_eprop.cells.neurons import LI as LI
from flax_eprop.cells.neurons import LIF as LIF
from flax_eprop.cells.neurons import ALIFState as ALIFState
from flax_eprop.cells.neurons import LIFState as LIFState
from flax_eprop.cells.neurons import LIState as LIState

__all__ = [
  'ALIF',
  'ALIFState',
  'LI',
  'LIF',
  'LIFState',
  'LIState',
  'SpikingCell',
]
