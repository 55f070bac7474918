"""The state of `OnlineGrad`: rest state, running from rest, resets.

References: ``nn.RNN`` of the same cell and params (which starts from the
cell's ``initialize_carry``), and the cell's own ``initialize_carry``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from online_models import IN, STATE, Net, alif, assert_spiking, data

import flax_eprop as fe

F32 = jnp.float32
# A cell whose rest state is not zero: v starts half-way to threshold.
RESTLESS = functools.partial(
  alif(F32), carry_init=nn.initializers.constant(0.5)
)


@functools.cache
def models():
  online = Net((RESTLESS,), trace_dtype=F32)
  return online, Net((RESTLESS,), mode='rnn')


@pytest.mark.slow
def test_apply_without_state_runs_from_rest_at_any_batch():
  online, rnn = models()
  params = online.init(jax.random.key(0), jnp.ones((3, 4, IN)))['params']
  xs, _ = data(jax.random.key(1), 7, 9, IN)  # another batch size
  ys = jax.jit(online.apply)({'params': params}, xs)
  expected, inter = rnn.apply(
    {'params': params}, xs, capture_intermediates=True
  )
  assert_spiking(inter['intermediates']['RNN_0']['__call__'][0], low=0.005)
  assert_trees_close(ys, expected)


def test_rest_state_is_init_state_and_runs_no_chunk():
  online, _ = models()
  xs = jnp.ones((5, 4, IN))
  variables = online.init(jax.random.key(0), xs)
  params = variables['params']
  state = fe.rest_state(online.apply, params, jnp.ones((5, 1, IN)))
  assert sorted(state) == sorted(STATE)
  assert_trees_close(state, {c: variables[c] for c in STATE}, rtol=0, atol=0)
  # the carry at rest is the cell's initialize_carry, the traces zero
  cell = RESTLESS()
  rest = cell.initialize_carry(jax.random.key(0), (5, IN))
  layer = state[fe.CARRY]['OnlineGrad_0']
  assert_trees_close(layer['state'], rest, rtol=0, atol=0)
  assert_trees_close(layer['rest'], rest, rtol=0, atol=0)
  assert all(not np.any(t) for t in jax.tree.leaves(state[fe.ELIGIBILITY]))
  # several batch axes
  other = fe.rest_state(online.apply, params, jnp.ones((2, 3, 1, IN)))
  assert {a.shape[:2] for a in jax.tree.leaves(other)} == {(2, 3)}
  # rest_state runs no chunk: no loop in its program; init runs the chunk
  # forward once (a plain scan, as nn.RNN, for the output it returns) and
  # computes no traces (its state stays at rest)
  jaxpr = str(jax.make_jaxpr(lambda: fe.rest_state(online.apply, params, xs))())
  assert 'scan' not in jaxpr and 'while' not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda: online.init(jax.random.key(0), xs))())
  assert jaxpr.count('scan[') == 1 and 'while' not in jaxpr


@pytest.mark.slow
def test_reset_state_restores_initialize_carry():
  online, _ = models()
  xs, _ = data(jax.random.key(1), 3, 8, IN)
  variables = online.init(jax.random.key(0), xs)
  params, rest = variables['params'], {c: variables[c] for c in STATE}
  apply = jax.jit(functools.partial(online.apply, mutable=list(STATE)))
  _, mid = apply({'params': params, **rest}, xs)
  assert not np.allclose(
    mid[fe.CARRY]['OnlineGrad_0']['state'].v,
    rest[fe.CARRY]['OnlineGrad_0']['state'].v,
  )
  assert_trees_close(fe.reset_state(mid), rest, rtol=0, atol=0)
  rows = jnp.array([True, False, True])
  partial = fe.reset_state(mid, where=rows)
  for got, at_rest, kept in zip(*map(jax.tree.leaves, (partial, rest, mid))):
    np.testing.assert_array_equal(got[rows], at_rest[rows])
    np.testing.assert_array_equal(got[1], kept[1])


def test_state_passed_but_not_mutable_is_refused():
  online, _ = models()
  xs = jnp.ones((2, 4, IN))
  variables = online.init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match="'carry' collection must be mutable"):
    online.apply(variables, xs)
  with pytest.raises(ValueError, match="no 'carry' collection was passed"):
    online.apply({'params': variables['params']}, xs, mutable=list(STATE))


class FeedbackNet(nn.Module):
  @nn.compact
  def __call__(self, xs):
    zs = fe.OnlineGrad(fe.LIF(4))(xs)
    return fe.RandomFeedback(nn.Dense(2))(zs)


def test_rest_state_leaves_other_collections_out():
  net = FeedbackNet()
  variables = net.init(jax.random.key(0), jnp.ones((2, 3, IN)))
  state = fe.rest_state(net.apply, variables['params'], jnp.ones((5, 1, IN)))
  assert sorted(state) == sorted(STATE)
  assert state[fe.CARRY]['OnlineGrad_0']['state'].v.shape == (5, 4)
