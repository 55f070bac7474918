"""OnlineGrad(mode='exact'): RTRL equals full BPTT, for any cell."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import assert_trees_close

import flax_eprop as fe

F64 = jnp.float64
STATE = ['carry', 'eligibility']


def alif(name=None):
  return fe.ALIF(
    5,
    learn_tau_mem=True,
    use_bias=True,
    param_dtype=F64,
    kernel_init=nn.initializers.normal(6.0),
    recurrent_kernel_init=nn.initializers.normal(3.0),
    name=name,
  )


class MeanField(nn.Module):
  """A neuron-mixing cell (e-prop rejects it): v is pulled to its mean."""

  features: int = 5

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    current = nn.Dense(
      self.features,
      param_dtype=F64,
      kernel_init=nn.initializers.normal(6.0),
      name='input',
    )(x)
    v = 0.9 * v + 0.1 * current - 0.2 * (v - v.mean(-1, keepdims=True))
    v = v - jax.lax.stop_gradient(z)
    z = fe.surrogates.triangle(v - 1.0)
    return (v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    shape = input_shape[:-1] + (self.features,)
    return jnp.zeros(shape, F64), jnp.zeros(shape, F64)

  @property
  def num_feature_axes(self):
    return 1


class Net(nn.Module):
  make_cell: object
  online: bool

  @nn.compact
  def __call__(self, xs, mask=None):
    cell = self.make_cell()
    if self.online:
      zs = fe.OnlineGrad(cell, mode='exact', trace_dtype=F64)(xs, mask=mask)
    else:
      zs = nn.RNN(cell)(xs)
    return nn.Dense(3, param_dtype=F64)(zs), zs


def setup(key, make_cell, time=12, batch=3):
  k_x, k_y, k_init = jax.random.split(key, 3)
  xs = jax.random.bernoulli(k_x, 0.3, (batch, time, 4)).astype(F64)
  labels = jax.random.randint(k_y, (batch, time), 0, 3)
  online = Net(make_cell, online=True)
  variables = online.init(k_init, xs)
  params = variables.pop('params')
  return xs, labels, online, params, variables


def loss_of(model, params, state, xs, labels, mask=None):
  """Per-step cross-entropy summed over valid steps (and the spikes)."""
  variables = {'params': params, **state}
  kwargs = {'mutable': STATE} if state else {}
  if mask is not None:
    kwargs['mask'] = mask
  out = model.apply(variables, xs, **kwargs)
  (logits, zs), new_state = out if state else (out, {})
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[
    ..., 0
  ]
  valid = jnp.ones(ce.shape, bool) if mask is None else mask
  return jnp.sum(jnp.where(valid, ce, 0)), (zs, new_state)


@pytest.mark.parametrize('make_cell', [alif, MeanField], ids=['alif', 'mean'])
def test_exact_mode_equals_full_bptt(key, x64, make_cell):
  xs, labels, online, params, state = setup(key, make_cell)
  grad = jax.grad(loss_of, argnums=1, has_aux=True)
  online_grads, (zs, _) = grad(online, params, state, xs, labels)
  reference = Net(make_cell, online=False)
  ref_grads, (ref_zs, _) = grad(reference, params, {}, xs, labels)
  assert 0.02 < float(zs.mean()) < 0.6, 'the test network must spike'
  assert_trees_close(zs, ref_zs)
  assert_trees_close(online_grads, ref_grads)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads))


def test_eprop_rejects_what_exact_accepts(key, x64):
  xs = jnp.ones((2, 3, 4), F64)
  layer = fe.OnlineGrad(MeanField())
  with pytest.raises(fe.NonLocalError, match='reduce_sum'):
    layer.init(key, xs)


@pytest.mark.slow  # the chunk loop is shared: test_chunk_invariance is fast
def test_exact_mode_is_chunk_invariant(key, x64):
  xs, labels, online, params, state = setup(key, alif, time=20)
  grad = jax.grad(loss_of, argnums=1, has_aux=True)
  whole, (_, end_whole) = grad(online, params, state, xs, labels)
  total, current = None, state
  for a, b in [(0, 7), (7, 20)]:
    g, (_, current) = grad(online, params, current, xs[:, a:b], labels[:, a:b])
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  assert_trees_close(total, whole, rtol=1e-12, atol=1e-14)
  assert_trees_close(current, end_whole, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_exact_mode_padding_changes_nothing(key, x64):
  xs, labels, online, params, state = setup(key, alif, batch=1)
  pad = jnp.zeros((1, 4, 4), F64)
  padded = jnp.concatenate([xs, pad], axis=1)
  padded_labels = jnp.concatenate([labels, labels[:, :4]], axis=1)
  mask = jnp.arange(padded.shape[1])[None] < xs.shape[1]
  grad = jax.grad(loss_of, argnums=1, has_aux=True)
  g_pad, (_, s_pad) = grad(online, params, state, padded, padded_labels, mask)
  g, (_, s) = grad(online, params, state, xs, labels)
  assert_trees_close(g_pad, g)
  assert_trees_close(s_pad, s)


def test_bad_mode_is_rejected(key):
  with pytest.raises(ValueError, match="mode must be 'eprop' or 'exact'"):
    fe.OnlineGrad(fe.LIF(3), mode='rtrl').init(key, jnp.ones((2, 3, 4)))


class CosCell(nn.Module):
  """A cell with one ``cos`` per step: counts how often a step is run."""

  features: int = 3

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    v = 0.9 * v + nn.Dense(self.features, name='input')(x) + 0.1 * jnp.cos(v)
    v = v - jax.lax.stop_gradient(z)
    z = fe.surrogates.triangle(v - 1.0)
    return (v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    zeros = jnp.zeros(input_shape[:-1] + (self.features,))
    return zeros, zeros


def test_exact_mode_runs_each_step_once(key):
  layer = fe.OnlineGrad(CosCell(), mode='exact')
  xs = jnp.ones((2, 4, 3))
  variables = layer.init(key, xs)
  apply = lambda v: layer.apply(v, xs, mutable=STATE)
  jaxpr = str(jax.make_jaxpr(apply)(variables))
  assert jaxpr.count(' cos ') == 1, jaxpr
