"""The training functions: the loss over time and sequences as pytrees.

References: `jax.grad` of the same loss written by hand through a plain
``nn.RNN`` model (`online_models.rnn_value_and_grad`'s model), and the same
functions on an equivalent array input.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from online_models import (
  F64,
  IN,
  Net,
  assert_all_nonzero,
  assert_spiking,
  cross_entropy,
  data,
  lif,
  split_variables,
)

import flax_eprop as fe

BATCH, TIME = 3, 11
LENGTHS = np.array([11, 6, 9])  # valid steps per sequence, padding at the end


@functools.cache
def models():
  return Net((lif(F64),), param_dtype=F64, trace_dtype=F64), Net(
    (lif(F64),), mode='rnn', param_dtype=F64
  )


def mean_over_time_reference(rnn, params, xs, labels, mask):
  """``sum_b (1 / T_b) sum_{t < T_b} CE(out[b, t], y[b, t]) / B`` by BPTT."""

  def loss(p):
    out, inter = rnn.apply({'params': p}, xs, capture_intermediates=True)
    ce = jax.vmap(jax.vmap(cross_entropy))(out, labels)
    per_seq = jnp.sum(jnp.where(mask, ce, 0), axis=1) / mask.sum(1)
    return jnp.mean(per_seq), inter['intermediates']['RNN_0']['__call__'][0]

  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.slow
@pytest.mark.parametrize('chunk', [4, TIME])
def test_mean_over_time_equals_hand_written_bptt(x64, chunk):
  online, rnn = models()
  k_data, k_init = jax.random.split(jax.random.key(3))
  xs, labels = data(k_data, BATCH, TIME, IN, dtype=F64)
  mask = jnp.arange(TIME)[None] < jnp.asarray(LENGTHS)[:, None]
  params, state = split_variables(online.init(k_init, xs))
  (ref_loss, spikes), ref_grads = mean_over_time_reference(
    rnn, params, xs, labels, mask
  )
  assert_spiking(spikes)
  assert_all_nonzero(ref_grads)
  f = fe.online_value_and_grad(
    online.apply, cross_entropy, chunk, time_reduction='mean'
  )
  (loss, _), grads, _ = jax.jit(f)(params, state, xs, labels, mask)
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads, ref_grads)
  bptt = fe.bptt_value_and_grad(
    online.apply, cross_entropy, time_reduction='mean'
  )
  (loss, _), grads, _ = jax.jit(bptt)(params, state, xs, labels, mask)
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads, ref_grads)


def test_bad_time_reduction():
  online, _ = models()
  match = r"time_reduction: expected 'sum' or 'mean', got 'max'"
  with pytest.raises(ValueError, match=match):
    fe.online_value_and_grad(online.apply, cross_entropy, time_reduction='max')
  with pytest.raises(ValueError, match=match):
    fe.bptt_value_and_grad(online.apply, cross_entropy, time_reduction='max')
  with pytest.raises(ValueError, match=match):
    fe.online_update(online.apply, cross_entropy, None, time_reduction='max')


class TwoInputs(nn.Module):
  """The `Net` of ``models()`` on a dict of two input halves."""

  @nn.compact
  def __call__(self, xs, mask=None):
    joined = jnp.concatenate([xs['a'], xs['b']], axis=-1)
    return Net((lif(F64),), param_dtype=F64, trace_dtype=F64, name='net')(
      joined, mask
    )


def test_pytree_inputs(x64):
  online, _ = models()
  k_data, k_init = jax.random.split(jax.random.key(4))
  xs, labels = data(k_data, BATCH, TIME, IN, dtype=F64)
  params, state = split_variables(online.init(k_init, xs))
  f = fe.online_value_and_grad(online.apply, cross_entropy, TIME)
  (loss, _), grads, new_state = f(params, state, xs, labels)
  tree = {'a': xs[..., :3], 'b': xs[..., 3:]}
  two = TwoInputs()
  g = fe.online_value_and_grad(two.apply, cross_entropy, TIME)
  (loss2, _), grads2, new_state2 = g(
    {'net': params}, {c: {'net': v} for c, v in state.items()}, tree, labels
  )
  assert_trees_close(loss2, loss)
  assert_trees_close(grads2, {'net': grads})
  assert_trees_close(new_state2, {c: {'net': v} for c, v in new_state.items()})


@pytest.mark.parametrize(('time', 'traces'), [(8, 1), (10, 2)])
def test_model_traced_once_per_chunk_shape(x64, time, traces):
  """One trace for the scanned chunks, one for a shorter last chunk."""
  online, _ = models()
  xs, labels = data(jax.random.key(0), 2, time, IN, dtype=F64)
  variables = jax.eval_shape(online.init, jax.random.key(1), xs)
  params, state = split_variables(variables)
  calls = []

  def apply(*args, **kwargs):
    calls.append(1)
    return online.apply(*args, **kwargs)

  f = fe.online_value_and_grad(apply, cross_entropy, chunk=4)
  jax.eval_shape(f, params, state, xs, labels)
  assert len(calls) == traces
