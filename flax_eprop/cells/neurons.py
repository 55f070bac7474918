"""LIF, ALIF and LI cells, exactly the math of DESIGN.md section 2."""

import numbers
from collections.abc import Callable
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp

from flax_eprop import surrogates
from flax_eprop.cells.base import Array, SpikingCell, _fail

__all__ = ['ALIF', 'ALIFState', 'LI', 'LIF', 'LIFState', 'LIState']

sg = jax.lax.stop_gradient


class LIFState(NamedTuple):
  """Carry of :class:`LIF`; every array is ``(*batch, features)``.

  Attributes:
    v: membrane potential ``v_t``.
    z: spikes ``z_t`` (0. or 1.).
    r: steps left in the refractory period; ``None`` unless
      ``refractory > 0``.
  """

  v: Array
  z: Array
  r: Array | None = None


class ALIFState(NamedTuple):
  """Carry of :class:`ALIF`; every array is ``(*batch, features)``.

  Attributes:
    v: membrane potential ``v_t``.
    a: threshold adaptation ``a_t``.
    z: spikes ``z_t`` (0. or 1.).
    r: steps left in the refractory period; ``None`` unless
      ``refractory > 0``.
  """

  v: Array
  a: Array
  z: Array
  r: Array | None = None


class LIState(NamedTuple):
  """Carry of :class:`LI`: the potential ``v: (*batch, features)``."""

  v: Array


class LIF(SpikingCell):
  """Leaky integrate-and-fire neuron, one time step.

  With ``alpha = exp(-dt / tau_mem)`` and ``sg`` the stop-gradient::

    I_t = x_t @ W_in (+ b) (+ z_{t-1} @ W_rec)      # diag(W_rec) = 0
    v_t = alpha * v_{t-1} + (1 - alpha) * I_t - threshold * sg(z_{t-1})
    z_t = spike_fn((v_t - threshold) / threshold)

  so the surrogate derivative is ``psi_t = dz_t/dv_t = sigma'(x) /
  threshold``; the default triangle gives ``0.3 * max(0, 1 - |v_t -
  threshold| / threshold) / threshold``. ``reset='zero'`` replaces the
  subtraction by ``v_t = alpha * v_{t-1} * (1 - sg(z_{t-1})) + (1 - alpha) *
  I_t``; ``detach_reset=False`` drops the ``sg``. With ``refractory = n >
  0`` a neuron that spiked at ``t`` cannot spike at ``t+1 .. t+n`` (``z`` is
  masked to 0, without gradient; ``v`` keeps integrating), tracked by the
  counter ``r_t = n * z_t + (1 - z_t) * max(r_{t-1} - 1, 0)``.

  Parameters: ``input/kernel: (in_features, features)``, ``input/bias:
  (features,)`` if ``use_bias``, ``recurrent/kernel: (features, features)``
  if ``recurrent``, ``tau_mem: (features,)`` if ``learn_tau_mem``.

  Attributes:
    features: number of neurons.
    tau_mem: membrane time constant (ms), or the initial value when
      ``learn_tau_mem``.
    threshold: firing threshold (> 0).
    recurrent: add recurrent synapses ``W_rec`` (default False: feed-forward).
    reset: ``'subtract'`` (default) or ``'zero'``.
    detach_reset: stop the gradient through the reset (default True).
    refractory: refractory period in steps (0: none).
    learn_tau_mem: make ``tau_mem`` a per-neuron parameter.
    spike_fn: surrogate spike function of ``(v - A) / threshold``; see
      :mod:`flax_eprop.surrogates`.

  The remaining fields (``use_bias``, ``dt``, initializers, ``dtype``,
  ``param_dtype``) are those of :class:`SpikingCell`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> cell = fe.LIF(3)
    >>> x = jnp.ones((2, 5))  # (*batch, in_features)
    >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
    >>> params = cell.init(jax.random.key(1), carry, x)
    >>> carry, z = cell.apply(params, carry, x)
    >>> carry.v.shape, z.shape
    ((2, 3), (2, 3))
  """

  State: ClassVar[type] = LIFState

  tau_mem: float = 20.0
  threshold: float = 1.0
  recurrent: bool = False
  reset: Literal['subtract', 'zero'] = 'subtract'
  detach_reset: bool = True
  refractory: int = 0
  learn_tau_mem: bool = False
  spike_fn: Callable[[Array], Array] = surrogates.triangle

  def validate(self) -> None:
    super().validate()
    self.check_positive('tau_mem', 'threshold')
    if self.reset not in ('subtract', 'zero'):
      _fail(self, 'reset', self.reset, "'subtract' or 'zero'")
    refractory = self.refractory
    if not isinstance(refractory, numbers.Integral) or refractory < 0:
      _fail(self, 'refractory', refractory, 'an integer >= 0 (steps)')

  def state_fields(self) -> tuple[str, ...]:
    fields = super().state_fields()
    return fields + ('r',) if self.refractory else fields

  def step(self, state: LIFState, x: Array) -> tuple[LIFState, Array]:
    current = self.synaptic_input(x, state.z if self.recurrent else None)
    alpha = self.decay('tau_mem', self.tau_mem, self.learn_tau_mem, state.v)
    v = self.membrane(state.v, state.z, alpha, current)
    z, r = self.fire(v, self.threshold, state.r)
    return LIFState(v, z, r), z

  def membrane(self, v: Array, z: Array, alpha, current: Array) -> Array:
    """``v_t`` from ``v_{t-1}``, ``z_{t-1}``, the decay and ``I_t``."""
    z_reset = sg(z) if self.detach_reset else z
    if self.reset == 'subtract':
      return alpha * v + (1 - alpha) * current - self.threshold * z_reset
    return alpha * v * (1 - z_reset) + (1 - alpha) * current

  def fire(self, v: Array, adaptive_threshold, r: Array | None):
    """``z_t = spike_fn((v_t - A_t) / threshold)`` and the refractory count.

    Returns:
      ``(z_t, r_t)``; ``r_t`` is None when ``refractory == 0``.
    """
    z = self.spike_fn((v - adaptive_threshold) / self.threshold)
    if not self.refractory:
      return z, None
    z = z * (r <= 0).astype(z.dtype)
    r = sg(self.refractory * z + (1 - z) * jnp.maximum(r - 1, 0))
    return z, r


class ALIF(LIF):
  """Adaptive LIF neuron (Bellec et al. 2018, 2020), one time step.

  :class:`LIF` with a threshold that rises after each spike::

    I_t = x_t @ W_in (+ b) (+ z_{t-1} @ W_rec)      # diag(W_rec) = 0
    v_t = alpha * v_{t-1} + (1 - alpha) * I_t - threshold * sg(z_{t-1})
    a_t = rho * a_{t-1} + z_{t-1}
    A_t = threshold + beta * a_t
    z_t = spike_fn((v_t - A_t) / threshold)

  with ``alpha = exp(-dt / tau_mem)``, ``rho = exp(-dt / tau_adapt)``. The
  adaptation path ``z_{t-1} -> a_t`` keeps its gradient. ``a_t`` is not
  normalised by ``1 - rho``: the LSNN form ``a_t = rho a + (1 - rho) z``
  with strength ``b`` is ``beta = b * (1 - rho)`` here. Reset, refractory
  period and the other fields are as in :class:`LIF`.

  Unlike :class:`LIF`, ``recurrent`` defaults to True (Bellec's LSNN).

  Attributes:
    tau_adapt: adaptation time constant (ms; default 200), or the initial
      value when ``learn_tau_adapt``.
    beta: adaptation strength (default 0.07). For the normalised LSNN form
      with strength ``b``, use ``beta = b * (1 - rho)``.
    learn_tau_adapt: make ``tau_adapt`` a per-neuron parameter
      ``tau_adapt: (features,)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> rnn = nn.RNN(fe.ALIF(16))
    >>> xs = jnp.ones((4, 50, 8))  # (batch, time, in_features)
    >>> params = rnn.init(jax.random.key(0), xs)
    >>> sorted(params['params']['cell'])
    ['input', 'recurrent']
    >>> rnn.apply(params, xs).shape
    (4, 50, 16)
  """

  State: ClassVar[type] = ALIFState

  recurrent: bool = True
  tau_adapt: float = 200.0
  beta: float = 0.07
  learn_tau_adapt: bool = False

  def validate(self) -> None:
    super().validate()
    self.check_positive('tau_adapt')
    if not isinstance(self.beta, numbers.Real):
      _fail(self, 'beta', self.beta, 'a real number')

  def step(self, state: ALIFState, x: Array) -> tuple[ALIFState, Array]:
    current = self.synaptic_input(x, state.z if self.recurrent else None)
    alpha = self.decay('tau_mem', self.tau_mem, self.learn_tau_mem, state.v)
    rho = self.decay('tau_adapt', self.tau_adapt, self.learn_tau_adapt, state.a)
    v = self.membrane(state.v, state.z, alpha, current)
    a = rho * state.a + state.z
    z, r = self.fire(v, self.threshold + self.beta * a, state.r)
    return ALIFState(v, a, z, r), z


class LI(SpikingCell):
  """Leaky integrator (non-spiking), e.g. a readout; one time step.

  With ``kappa = exp(-dt / tau_mem)``, two forms (``form``)::

    'scaled' (default):  v_t = kappa * v_{t-1} + (1 - kappa) * (x_t @ W_in (+ b))
    'bellec':            v_t = kappa * v_{t-1} + x_t @ W_in (+ b)
    y_t = v_t

  ``'scaled'`` is a low-pass filter of ``x @ W_in + b`` (gain 1 for a
  constant input): input and bias are multiplied by ``1 - kappa`` (0.39 at
  ``dt = 10``, ``tau_mem = 20``; 0.05 at ``dt = 1``), so its weights see
  ``1 - kappa`` of the gradient and need a larger init or learning rate to
  learn at the usual rate. ``'bellec'`` is the readout of Bellec et al.
  (2020), ``y_t = kappa y_{t-1} + W z_t + b``: unscaled input and bias (the
  bias accumulates to ``b / (1 - kappa)`` over time), so a leaky readout
  learns like a ``Dense`` one. The parameters are the same in both forms.

  Parameters: ``input/kernel: (in_features, features)``, ``input/bias`` if
  ``use_bias``, ``tau_mem: (features,)`` if ``learn_tau_mem``.

  Attributes:
    tau_mem: time constant (ms; default 20), or the initial value when
      ``learn_tau_mem``.
    learn_tau_mem: make ``tau_mem`` a per-neuron parameter.
    form: ``'scaled'`` (default) or ``'bellec'``, as above.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> readout = nn.RNN(fe.LI(2, use_bias=True, form='bellec'))
    >>> zs = jnp.zeros((3, 7, 16))
    >>> params = readout.init(jax.random.key(0), zs)
    >>> readout.apply(params, zs).shape
    (3, 7, 2)
  """

  State: ClassVar[type] = LIState

  tau_mem: float = 20.0
  learn_tau_mem: bool = False
  form: Literal['scaled', 'bellec'] = 'scaled'

  def validate(self) -> None:
    super().validate()
    self.check_positive('tau_mem')
    if self.form not in ('scaled', 'bellec'):
      _fail(self, 'form', self.form, "'scaled' or 'bellec'")

  def step(self, state: LIState, x: Array) -> tuple[LIState, Array]:
    kappa = self.decay('tau_mem', self.tau_mem, self.learn_tau_mem, state.v)
    current = self.synaptic_input(x)
    if self.form == 'scaled':
      current = (1 - kappa) * current
    v = kappa * state.v + current
    return LIState(v), v
