"""The base class of neuron cells and the synapses they share."""

import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

__all__ = ['SpikingCell']

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
default_kernel_init = nn.initializers.lecun_normal()


class _Recurrent(nn.Module):
  """``z @ (kernel * (1 - eye))``: recurrent synapses without self-loops."""

  features: int
  kernel_init: Initializer
  dtype: Dtype | None
  param_dtype: Dtype

  @nn.compact
  def __call__(self, z: Array) -> Array:
    shape = (self.features, self.features)
    kernel = self.param('kernel', self.kernel_init, shape, self.param_dtype)
    z, kernel = promote_dtype(z, kernel, dtype=self.dtype)
    off_diagonal = (1 - np.eye(self.features)).astype(kernel.dtype)
    contract = (((z.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(z, kernel * off_diagonal, contract)


def _fail(cell, field, value, expected):
  raise ValueError(
    f'{type(cell).__name__}: {field}={value!r} is invalid; expected {expected}.'
  )


class SpikingCell(nn.RNNCellBase):
  """Base class of neuron cells: write a neuron as one ``step``.

  A subclass sets ``State`` (a ``NamedTuple`` of state names, each
  ``(*batch, features)``) and implements ``step(state, x) -> (new_state,
  y)`` with plain elementwise ``jnp`` code; the base class supplies
  ``__call__`` (input checks, dtype promotion, the carry kept in its dtype),
  ``initialize_carry``, ``num_feature_axes`` and two helpers:
  ``synaptic_input(x, z)`` creates the synapses ``input`` and ``recurrent``
  with the parameter names the e-prop transform expects, and ``decay(name,
  tau, learnable, like)`` gives ``exp(-dt / tau)``, fixed or learnable per
  neuron. Override ``validate`` (call ``super().validate()``) to check
  fields at construction, and ``state_fields`` if some ``State`` fields are
  optional.

  Attributes:
    features: number of neurons.
    use_bias: add a bias ``b: (features,)`` to the input current.
    dt: time step in milliseconds (default 1), the unit of every time
      constant (``tau_mem``, ``tau_adapt``). Binned data from
      :mod:`flax_eprop.data` (seconds) matches with ``data.load(...,
      dt_ms=dt)``.
    kernel_init: initializer of ``input/kernel: (in_features, features)``.
    recurrent_kernel_init: initializer of ``recurrent/kernel``.
    bias_init: initializer of ``input/bias``.
    carry_init: initializer of every carry leaf (default zeros).
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: dtype of parameters and of the carry.

  Examples:
    A current-based LIF neuron with a synaptic current ``i``:

    >>> import math, typing, jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> class CubaState(typing.NamedTuple):
    ...   i: jax.Array
    ...   v: jax.Array
    ...   z: jax.Array
    >>> class CubaLIF(fe.SpikingCell):
    ...   State = CubaState
    ...   tau_syn: float = 5.
    ...   tau_mem: float = 20.
    ...   def step(self, s, x):
    ...     i = math.exp(-self.dt / self.tau_syn) * s.i + self.synaptic_input(x)
    ...     alpha = self.decay('tau_mem', self.tau_mem, False, s.v)
    ...     v = alpha * s.v + (1 - alpha) * i - jax.lax.stop_gradient(s.z)
    ...     z = fe.surrogates.triangle(v - 1.)
    ...     return CubaState(i, v, z), z
    >>> rnn = nn.RNN(CubaLIF(4))
    >>> xs = jnp.ones((2, 10, 3))  # (batch, time, in_features)
    >>> params = rnn.init(jax.random.key(0), xs)
    >>> rnn.apply(params, xs).shape
    (2, 10, 4)
  """

  features: int
  use_bias: bool = False
  dt: float = 1.0
  kernel_init: Initializer = default_kernel_init
  recurrent_kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  carry_init: Initializer = nn.initializers.zeros_init()
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  State: ClassVar[type]

  def __post_init__(self):
    self.validate()
    super().__post_init__()

  def validate(self) -> None:
    """Checks the fields; raises ``ValueError`` naming the bad one."""
    if not isinstance(self.features, numbers.Integral) or self.features < 1:
      _fail(self, 'features', self.features, 'a positive integer')
    self.check_positive('dt')

  def check_positive(self, *fields: str) -> None:
    """Raises ``ValueError`` unless every named field is a number > 0."""
    for field in fields:
      value = getattr(self, field)
      if not isinstance(value, numbers.Real) or not value > 0:
        _fail(self, field, value, 'a positive number')

  def state_fields(self) -> tuple[str, ...]:
    """Names of the ``State`` fields that hold arrays (others are None)."""
    return tuple(
      f for f in self.State._fields if f not in self.State._field_defaults
    )

  @nn.nowrap
  def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]):
    """Initial carry: ``carry_init`` of ``input_shape[:-1] + (features,)``.

    Args:
      rng: a PRNG key (``None``: a fixed key; zeros ignore it).
      input_shape: shape of one step's input, ``(*batch, in_features)``.

    Returns:
      A ``State`` whose arrays are ``(*batch, features)`` in
      ``param_dtype``.
    """
    if len(input_shape) < 1:
      _fail(self, 'input_shape', input_shape, '(*batch, in_features)')
    shape = tuple(input_shape[:-1]) + (self.features,)
    fields = self.state_fields()
    rng = jax.random.key(0) if rng is None else rng
    keys = jax.random.split(rng, len(fields))
    leaves = [self.carry_init(k, shape, self.param_dtype) for k in keys]
    return self.State(**dict(zip(fields, leaves, strict=True)))

  @property
  def num_feature_axes(self) -> int:
    return 1

  @nn.compact
  def __call__(self, carry, x: Array) -> tuple[Any, Array]:
    """One time step.

    Args:
      carry: a ``State`` of ``(*batch, features)`` arrays.
      x: (*batch, in_features) floating input.

    Returns:
      ``(new_carry, y)``: the new state, kept in the carry's dtypes, and
      the output ``y: (*batch, features)``.
    """
    self.check_input(carry, x)
    leaves, treedef = jax.tree.flatten(carry)
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(x, *leaves, self.param_dtype)
    x, *promoted = promote_dtype(x, *leaves, dtype=dtype)
    state = jax.tree.unflatten(treedef, promoted)
    new_state, y = self.step(state, x)
    new_carry = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, carry)
    return new_carry, y.astype(leaves[0].dtype)

  def step(self, state, x: Array) -> tuple[Any, Array]:
    """The neuron's dynamics: ``(state, x) -> (new_state, y)``."""
    raise NotImplementedError(f'{type(self).__name__} must implement step')

  def check_input(self, carry, x: Array) -> None:
    """Static checks of ``x`` and ``carry``; run at trace time."""
    name = type(self).__name__
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(
        f'{name}: input x must be floating, got dtype {jnp.result_type(x)}; '
        'cast it, e.g. x.astype(jnp.float32).'
      )
    shape = jnp.shape(x)
    if len(shape) < 1:
      raise ValueError(
        f'{name}: input x must have shape (*batch, in_features), got a '
        'scalar; add a feature axis.'
      )
    expected = shape[:-1] + (self.features,)
    for path, leaf in jax.tree_util.tree_leaves_with_path(carry):
      leaf_name = f'carry{jax.tree_util.keystr(path)}'
      if jnp.shape(leaf) != expected:
        raise ValueError(
          f'{name}: {leaf_name} has shape {jnp.shape(leaf)}, expected '
          f'{expected} = x.shape[:-1] + (features,) for x of shape {shape}; '
          'build it with cell.initialize_carry(rng, x.shape).'
        )
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise TypeError(f'{name}: {leaf_name} must be floating.')
    kernel = self.variables.get('params', {}).get('input', {}).get('kernel')
    if kernel is not None and nn.meta.unbox(kernel).shape[0] != shape[-1]:
      raise ValueError(
        f'{name}: input x has {shape[-1]} features but the stored '
        f'input/kernel expects {nn.meta.unbox(kernel).shape[0]}; pass x of '
        f'shape (*batch, {nn.meta.unbox(kernel).shape[0]}).'
      )

  def synaptic_input(self, x: Array, z: Array | None = None) -> Array:
    """``I_t = x @ W_in (+ b) (+ z @ W_rec)``, ``diag(W_rec)`` masked to 0.

    Args:
      x: (*batch, in_features) input of this step.
      z: (*batch, features) previous spikes, or ``None``: no recurrence.

    Returns:
      (*batch, features) input current.
    """
    current = nn.Dense(
      self.features,
      use_bias=self.use_bias,
      kernel_init=self.kernel_init,
      bias_init=self.bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='input',
    )(x)
    if z is None:
      return current
    recurrent = _Recurrent(
      self.features,
      self.recurrent_kernel_init,
      self.dtype,
      self.param_dtype,
      name='recurrent',
    )
    return current + recurrent(z)

  def decay(self, name: str, tau: float, learnable: bool, like: Array):
    """Decay factor ``exp(-dt / tau)`` (``dt`` and ``tau`` in ms).

    Args:
      name: parameter name, used when ``learnable``.
      tau: the time constant (ms), or the initial value of the parameter
        ``name: (features,)`` when ``learnable``.
      learnable: make ``tau`` a per-neuron parameter.
      like: (*batch, features) array whose shape and dtype to match.

    Returns:
      A Python float, or when ``learnable`` an array shaped like ``like``.
    """
    if not learnable:
      return math.exp(-self.dt / tau)
    init = nn.initializers.constant(tau)
    tau = self.param(name, init, (self.features,), self.param_dtype)
    tau, _ = promote_dtype(tau, like, dtype=self.dtype)
    return jnp.broadcast_to(jnp.exp(-self.dt / tau), like.shape)
