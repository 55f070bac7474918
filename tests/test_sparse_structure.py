"""The structure pass: which carry leaves are derived (need no trace)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import flax_eprop as fe
from flax_eprop.sparse.structure import make_plan


def plan_of(cell, batch=(2,), n_in=3):
  x = jnp.ones((*batch, n_in))
  carry = cell.initialize_carry(jax.random.key(0), x.shape)
  params = cell.init(jax.random.key(1), carry, x)['params']
  step = lambda p, c, x: cell.apply({'params': p}, c, x)
  return make_plan(step, params, carry, x)


@pytest.mark.parametrize(
  'cell, core, derived',
  [
    (fe.LIF(4), (0,), (1,)),  # z_t = H(v_t - thr)
    (fe.LIF(4, recurrent=True, reset='zero'), (0,), (1,)),
    (fe.ALIF(4), (0, 1), (2,)),  # z_t = H(v_t - thr - beta a_t)
    (fe.ALIF(4, detach_reset=False, learn_tau_adapt=True), (0, 1), (2,)),
    (fe.LIF(4, refractory=2), (0, 1, 2), ()),  # z_t also reads r_{t-1}
    (fe.LI(3), (0,), ()),
  ],
  ids=['lif', 'lif_zero_reset', 'alif', 'alif_learnable', 'refractory', 'li'],
)
def test_derived_leaves_of_builtin_cells(cell, core, derived):
  plan = plan_of(cell)
  assert (plan.core, plan.derived) == (core, derived)


class ChainedState(nn.Module):
  """``w_t`` reads ``v_t``: core leaves that read each other's new value
  would make the probes total derivatives, so nothing is derived."""

  @nn.compact
  def __call__(self, carry, x):
    v, w, z = carry
    v = 0.9 * v + nn.Dense(4, name='input')(x) - jax.lax.stop_gradient(z)
    w = 0.5 * w + v
    z = fe.surrogates.triangle(v + w - 1.0)
    return (v, w, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    zeros = jnp.zeros((*input_shape[:-1], 4))
    return zeros, zeros, zeros


class ThresholdParam(nn.Module):
  """``z_t`` reads a learnable threshold: not a function of ``v_t`` alone."""

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    threshold = self.param('threshold', nn.initializers.ones, (4,))
    v = 0.9 * v + nn.Dense(4, name='input')(x) - jax.lax.stop_gradient(z)
    z = fe.surrogates.triangle(v - threshold[None])
    return (v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    zeros = jnp.zeros((*input_shape[:-1], 4))
    return zeros, zeros


@pytest.mark.parametrize('cell', [ChainedState(), ThresholdParam()])
def test_nothing_derived_when_not_a_pure_function_of_core_leaves(cell):
  plan = plan_of(cell)
  assert plan.derived == () and plan.core == tuple(range(plan.num_carry))


def test_stored_traces_have_only_core_rows(key):
  layer = fe.OnlineGrad(fe.ALIF(5))
  traces = layer.init(key, jnp.ones((2, 4, 3)))['eligibility']
  assert jax.tree.map(jnp.shape, traces) == {
    # K' = 2 core rows (v, a): v is presynaptic (batch, 1, in), a keeps a
    # per-synapse trace (batch, 1, in, features)
    'synapses': {
      'input/kernel': (2, 1, 3, 5),
      'recurrent/kernel': (2, 1, 5, 5),
    },
    'presynaptic': {'input/kernel': (2, 1, 3), 'recurrent/kernel': (2, 1, 5)},
    'derived': (2, 1, 2, 5),  # dz/d(v, a): (batch, Kd, K', F)
  }
