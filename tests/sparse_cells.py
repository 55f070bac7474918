"""Cells and helpers for the sparse-transform tests (not a test module).

The custom cells here are written only for the tests, the way a user would
write a new neuron: Flax Linen modules whose synapses are ``nn.Dense``
layers. A recurrent synapse is always a submodule named ``recurrent``, so
`reference_step` can stop the gradient of its input (the e-prop oracle of
DESIGN.md section 2).
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_eprop as fe

RECURRENT = 'recurrent'
sg = jax.lax.stop_gradient


def zero_state(input_shape, features: int, leaves: int) -> tuple:
  """``leaves`` zero carry leaves ``(*batch, features)`` for
  ``initialize_carry(rng, input_shape)``."""
  return (jnp.zeros((*input_shape[:-1], features)),) * leaves


def _stop_recurrent_input(next_fun, args, kwargs, context):
  """Method interceptor: ``sg`` on the input of every ``recurrent`` synapse."""
  if context.module.name == RECURRENT and context.method_name == '__call__':
    args = sg(args)
  return next_fun(*args, **kwargs)


def reference_step(cell: nn.Module, mode: str):
  """The step `jax.jacfwd` is compared against.

  ``mode='eprop'``: the recurrent input ``z_{t-1}`` of every synapse named
  ``recurrent`` is wrapped in `jax.lax.stop_gradient`; ``'exact'``: the
  plain step.
  """

  def step(params, carry, x):
    if mode == 'exact':
      return cell.apply(params, carry, x)
    with nn.intercept_methods(_stop_recurrent_input):
      return cell.apply(params, carry, x)

  return step


# (a) Current-based LIF: a synaptic current state, K = 3 carry leaves.


class CubaState(NamedTuple):
  i: jax.Array
  v: jax.Array
  z: jax.Array


class CubaLIF(nn.RNNCellBase):
  """``i_t = kappa i + x W_in + z W_rec``; ``v_t = alpha v + (1-alpha) i_t
  - sg(z)``; ``z_t = H(v_t - 1)`` (triangle surrogate).

  ``output``: ``'z'`` the spike, ``'v'`` the potential (both the new value
  of a carry leaf), or ``'smooth'`` ``z * softplus(v)`` (no carry leaf's).
  ``spike_current``: the spike reads ``v_t + spike_current * i_t`` (two new
  values, one reading the other: the spike cannot be derived).
  ``detach_reset=False``: the reset ``- z_{t-1}`` keeps its derivative
  (then the spike's trace enters the others').
  """

  features: int
  recurrent: bool = True
  tau_syn: float = 5.0
  tau_mem: float = 10.0
  output: str = 'z'
  spike_current: float = 0.0
  detach_reset: bool = True

  @nn.compact
  def __call__(self, carry: CubaState, x):
    kappa = math.exp(-1.0 / self.tau_syn)
    alpha = math.exp(-1.0 / self.tau_mem)
    i = kappa * carry.i + nn.Dense(self.features, name='input')(x)
    if self.recurrent:
      rec = nn.Dense(self.features, use_bias=False, name=RECURRENT)
      i = i + rec(carry.z)
    reset = sg(carry.z) if self.detach_reset else carry.z
    v = alpha * carry.v + (1 - alpha) * i - reset
    drive = v + self.spike_current * i if self.spike_current else v
    z = fe.surrogates.triangle(drive - 1.0)
    outputs = {'z': z, 'v': v, 'smooth': z * jax.nn.softplus(v)}
    return CubaState(i, v, z), outputs[self.output]

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return CubaState(*zero_state(input_shape, self.features, 3))

  @property
  def num_feature_axes(self):
    return 1


# (b) LIF with a learnable per-neuron tau_mem and a bias.


class TauState(NamedTuple):
  v: jax.Array
  z: jax.Array


class TauLIF(nn.RNNCellBase):
  """``alpha = exp(-1 / tau)``, ``tau: (features,)`` and ``bias:
  (features,)`` learnable; reset not detached (a neuron-local path)."""

  features: int
  recurrent: bool = False

  @nn.compact
  def __call__(self, carry: TauState, x):
    tau = self.param('tau_mem', nn.initializers.uniform(10.0), (self.features,))
    bias = self.param('bias', nn.initializers.normal(0.5), (self.features,))
    per_neuron = lambda p: p.reshape((1,) * (x.ndim - 1) + p.shape)
    current = nn.Dense(self.features, use_bias=False, name='input')(x)
    current = current + per_neuron(bias)
    if self.recurrent:
      rec = nn.Dense(self.features, use_bias=False, name=RECURRENT)
      current = current + rec(carry.z)
    alpha = per_neuron(jnp.exp(-1.0 / (tau + 5.0)))
    v = alpha * carry.v + (1 - alpha) * current - carry.z
    z = fe.surrogates.triangle(v - 1.0)
    return TauState(v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return TauState(*zero_state(input_shape, self.features, 2))

  @property
  def num_feature_axes(self):
    return 1


# (c) jnp.where, a nested jax.jit helper and a scalar parameter.


@jax.jit
def _leak(v, z, alpha):
  """Nested jit: leak, then reset to zero where the neuron spiked."""
  return jnp.where(sg(z) > 0, 0.0, alpha * v)


class WhereLIF(nn.RNNCellBase):
  """Reset to zero with ``jnp.where`` inside a nested ``jax.jit``; the
  input current is soft-clipped with ``jax.nn.soft_sign``, the voltage
  clipped at 3 with ``jnp.where``; a learnable scalar ``gain``."""

  features: int
  recurrent: bool = True

  @nn.compact
  def __call__(self, carry: TauState, x):
    gain = self.param('gain', nn.initializers.constant(1.5), ())
    current = nn.Dense(self.features, name='input')(x)
    if self.recurrent:
      rec = nn.Dense(self.features, use_bias=False, name=RECURRENT)
      current = current + rec(carry.z)
    v = _leak(carry.v, carry.z, 0.9) + 0.1 * gain * jax.nn.soft_sign(current)
    v = jnp.where(v > 3.0, 3.0, v)
    z = fe.surrogates.fast_sigmoid(v - 1.0)
    return TauState(v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return TauState(*zero_state(input_shape, self.features, 2))

  @property
  def num_feature_axes(self):
    return 1


# (d) A user-defined custom_jvp surrogate (Gaussian pseudo-derivative).


@jax.custom_jvp
def gauss_spike(x):
  return (x > 0).astype(x.dtype)


@gauss_spike.defjvp
def _gauss_spike_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return gauss_spike(x), jnp.exp(-0.5 * jnp.square(x / 0.4)) * x_dot


class GaussALIF(nn.Module):
  """A plain ``nn.Module`` adaptive cell with the ``gauss_spike``
  surrogate: ``a_t = 0.9 a + z``, ``z_t = H((v_t - 1 - 0.2 a_t) / 1)``."""

  features: int

  @nn.compact
  def __call__(self, carry, x):
    v, a, z = carry
    current = nn.Dense(self.features, name='input')(x)
    current = current + nn.Dense(self.features, name=RECURRENT)(z)
    v = 0.8 * v + 0.2 * current - sg(z)
    a = 0.9 * a + z
    z = gauss_spike(v - 1.0 - 0.2 * a)
    return (v, a, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return zero_state(input_shape, self.features, 3)


# (f) Compartments on a new (non-neuron) axis: stack, mix, split, reduce.


class TwoCompartmentState(NamedTuple):
  d: jax.Array  # dendrite
  v: jax.Array  # soma
  z: jax.Array


# Compartment coupling (row: to, column: from): a constant acting on the
# compartment axis only, so each neuron stays on its own.
COUPLING = jnp.array([[0.8, 0.1], [0.15, 0.85]])


class TwoCompartmentLIF(nn.RNNCellBase):
  """Input on the dendrite, spikes from the soma: ``jnp.stack`` of the
  compartments, an ``einsum`` with a constant over the compartment axis,
  indexing and a reduction over that axis."""

  features: int

  @nn.compact
  def __call__(self, carry: TwoCompartmentState, x):
    s = jnp.stack([carry.d, carry.v], axis=-2)  # (*batch, 2, features)
    s = jnp.einsum('ck,...kn->...cn', COUPLING, s)
    d = s[..., 0, :] + 0.2 * nn.Dense(self.features, name='input')(x)
    v = s[..., 1, :] - sg(carry.z)
    z = fe.surrogates.arctan(v - 1.0)
    total = jnp.stack([d, v]).sum(0)
    return TwoCompartmentState(d, v, z), z * jax.nn.softplus(total)

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return TwoCompartmentState(*zero_state(input_shape, self.features, 3))

  @property
  def num_feature_axes(self):
    return 1


# Realistic states.


def _draw(name, key, shape):
  if name == 'z':
    return jax.random.bernoulli(key, 0.4, shape).astype(jnp.float64)
  if name == 'v':  # near the threshold 1: surrogates are non-zero
    v = jax.random.uniform(key, shape, jnp.float64, 0.4, 1.6)
    return v.at[..., 0].set(1.5)  # neuron 0 is about to spike
  if name == 'r':  # refractory counter: 0, 1 or 2 steps left
    return jax.random.randint(key, shape, 0, 3).astype(jnp.float64)
  if name == 'a':
    return jax.random.uniform(key, shape, jnp.float64, 0.0, 2.0)
  return jax.random.normal(key, shape, jnp.float64)


def random_carry(cell, key, x_shape):
  """A float64 carry with voltages near threshold and random 0/1 spikes.

  Leaves are recognised by name (``v``, ``a``, ``z``, ``r``, others
  normal); a plain tuple is ``(v, z)`` or ``(v, a, z)``. Neuron 0 has
  ``v = 1.5, z = 0`` so that a spiking cell fires somewhere.
  """
  carry = cell.initialize_carry(jax.random.key(0), x_shape)
  plain = {2: ('v', 'z'), 3: ('v', 'a', 'z')}.get(len(carry))
  names = getattr(carry, '_fields', plain)
  keys = jax.random.split(key, len(names))
  leaves = {
    n: None if leaf is None else _draw(n, k, jnp.shape(leaf))
    for n, k, leaf in zip(names, keys, carry, strict=True)
  }
  if 'z' in leaves and 'v' in leaves:
    leaves['z'] = leaves['z'].at[..., 0].set(0.0)
  if hasattr(carry, '_fields'):
    return type(carry)(**leaves)
  return tuple(leaves.values())


def setup(cell, key, x_shape):
  """``(params, carry, x)`` in float64 for ``cell``, states realistic."""
  k_param, k_carry, k_x = jax.random.split(key, 3)
  x = jax.random.normal(k_x, x_shape, jnp.float64)
  carry = random_carry(cell, k_carry, x_shape)
  params = cell.init(k_param, carry, x)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
  return params, carry, x
