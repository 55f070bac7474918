"""Models, data and the training steps the scaling benchmark compares.

One model per cell kind: a recurrent spiking layer (``fe.OnlineGrad`` of
``fe.LIF``, ``fe.ALIF`` or the current-based `CubaLIF` below) and a
``Dense`` readout applied at every step, trained with a per-step
cross-entropy. Every method returns a function of ``(params, state, xs,
ys)`` whose outputs (loss, gradients and, where the method has one, the
advanced state) are all returned, so XLA cannot drop any of the work
(a training loop keeps them all).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_eprop as fe

KINDS = ('lif', 'alif', 'cuba')
CLASSES = 10
sg = jax.lax.stop_gradient


class CubaState(NamedTuple):
  """Carry of `CubaLIF`: synaptic current, potential, spikes."""

  i: jax.Array
  v: jax.Array
  z: jax.Array


class CubaLIF(nn.RNNCellBase):
  """Current-based LIF, written as a user would write a new neuron::

  i_t = kappa i_{t-1} + x_t @ W_in + z_{t-1} @ W_rec
  v_t = alpha v_{t-1} + (1 - alpha) i_t - sg(z_{t-1})
  z_t = H(v_t - 1)        (triangle surrogate)
  """

  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  tau_syn: float = 5.0
  tau_mem: float = 20.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: CubaState, x):
    kappa = math.exp(-1.0 / self.tau_syn)
    alpha = math.exp(-1.0 / self.tau_mem)
    dense = lambda name, init: nn.Dense(
      self.features,
      use_bias=False,
      kernel_init=init,
      param_dtype=self.param_dtype,
      name=name,
    )
    i = kappa * carry.i + dense('input', self.kernel_init)(x)
    i = i + dense('recurrent', nn.initializers.lecun_normal())(carry.z)
    v = alpha * carry.v + (1 - alpha) * i - sg(carry.z)
    z = fe.surrogates.triangle(v - 1.0)
    return CubaState(i, v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    zeros = jnp.zeros((*input_shape[:-1], self.features), self.param_dtype)
    return CubaState(zeros, zeros, zeros)

  @property
  def num_feature_axes(self):
    return 1


def make_cell(kind: str, features: int, in_features: int, dtype) -> nn.Module:
  """A recurrent cell that spikes on Bernoulli inputs (the input kernel is
  ``normal(20 / sqrt(in))``: the default initializer leaves it silent)."""
  init = nn.initializers.normal(20.0 / math.sqrt(in_features))
  kw = dict(kernel_init=init, param_dtype=dtype, name='cell')
  if kind == 'lif':
    return fe.LIF(features, recurrent=True, **kw)
  if kind == 'alif':
    return fe.ALIF(features, **kw)
  if kind == 'cuba':
    return CubaLIF(features, **kw)
  raise ValueError(f'kind: expected one of {KINDS}, got {kind!r}.')


class Net(nn.Module):
  """``OnlineGrad(cell)`` and a ``Dense`` readout at every step."""

  cell: nn.Module
  mode: str = 'eprop'
  trace_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, mask=None):
    layer = fe.OnlineGrad(
      self.cell, mode=self.mode, trace_dtype=self.trace_dtype, name='rnn'
    )
    h = layer(xs, mask=mask)
    dtype = self.trace_dtype
    return nn.Dense(CLASSES, param_dtype=dtype, name='readout')(h)


def cross_entropy(logits, label):
  """Loss of one example at one step."""
  return -jnp.take_along_axis(
    jax.nn.log_softmax(logits), label[..., None], axis=-1
  )[..., 0]


class Problem(NamedTuple):
  """A model and a batch: ``xs: (batch, time, in)``, ``ys: (batch, time)``."""

  kind: str
  net: Net
  params: dict
  state: dict
  xs: jax.Array
  ys: jax.Array


def problem(
  kind, features, in_features, batch, time, *, mode='eprop', seed=0,
  dtype=jnp.float32,
):  # fmt: skip
  """Builds the model and a random batch (Bernoulli(0.1) input spikes);
  parameters, state, inputs and traces in ``dtype``."""
  k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
  xs = jax.random.bernoulli(k_x, 0.1, (batch, time, in_features))
  xs = xs.astype(dtype)
  ys = jax.random.randint(k_y, (batch, time), 0, CLASSES)
  cell = make_cell(kind, features, in_features, dtype)
  net = Net(cell, mode=mode, trace_dtype=dtype)
  variables = jax.jit(net.init)(k_init, xs[:, :1])
  params = variables.pop('params')
  return Problem(kind, net, params, dict(variables), xs, ys)


def eprop_step(p: Problem, chunk: int) -> Callable:
  """`fe.online_value_and_grad`: loss, gradient and the advanced state."""
  return fe.online_value_and_grad(p.net.apply, cross_entropy, chunk)


def sequence_step(p: Problem) -> Callable:
  """e-prop of a whole sequence from rest in one call: ``jax.grad`` of the
  loss of ``apply`` without a state (no start term, no final traces)."""

  def loss(params, xs, ys):
    logits = p.net.apply({'params': params}, xs)
    return jnp.sum(cross_entropy(logits, ys)) / xs.shape[0]

  grad = jax.value_and_grad(loss)

  def step(params, state, xs, ys):
    del state  # from rest, nothing kept
    return grad(params, xs, ys)

  return step


def bptt_step(p: Problem) -> Callable:
  """The library's reference, `fe.bptt_value_and_grad`."""
  return fe.bptt_value_and_grad(p.net.apply, cross_entropy)


def _scan_cell(cell, cell_params, xs):
  """Spikes ``(time, batch, features)`` of ``cell`` over ``xs: (batch, time,
  in)`` from its initial carry."""
  carry = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)

  def body(c, x):
    return cell.apply({'params': cell_params}, c, x)

  return jax.lax.scan(body, carry, jnp.swapaxes(xs, 0, 1))[1]


def user_bptt_step(p: Problem) -> Callable:
  """BPTT as a user writes it: ``jax.grad`` through ``lax.scan`` of the
  cell's ``apply`` and the readout (no library code on the time axis)."""

  def loss(params, xs, ys):
    zs = _scan_cell(p.net.cell, params['cell'], xs)
    readout = params['readout']
    logits = zs @ readout['kernel'] + readout['bias'][None, None]
    per_step = cross_entropy(logits, jnp.swapaxes(ys, 0, 1))
    return jnp.sum(per_step) / xs.shape[0]

  grad = jax.value_and_grad(loss)

  def step(params, state, xs, ys):
    del state  # a user's BPTT starts every sequence from rest
    return grad(params, xs, ys)

  return step


def spike_rate(p: Problem) -> float:
  """Mean spikes per neuron and step of the layer on the batch."""
  zs = jax.jit(_scan_cell, static_argnums=0)(p.net.cell, p.params['cell'], p.xs)
  return float(jnp.mean(zs))
