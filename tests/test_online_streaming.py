"""OnlineGrad on streams: chunking, resets, masking, trace dtype, updates.

DESIGN.md section 4, rung 3: a sequence split into chunks with the state
kept gives the result of one chunk. The references are the same model run
another way (uncut, unpadded, one example at a time), or an optimizer step
written out by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close
from online_models import (
  F32,
  F64,
  IN,
  STATE,
  Net,
  alif,
  assert_all_nonzero,
  assert_spiking,
  cross_entropy,
  data,
  init_fn,
  online_fn,
  split_variables,
  stacked,
  toy_task,
)

import flax_eprop as fe

BATCH, TIME = 3, 20
TIGHT = {'rtol': 1e-12, 'atol': 1e-14}


def alif_net(dtype=F64):
  return Net((alif(dtype),), trace_dtype=dtype, param_dtype=dtype)


def setup(model, batch=BATCH, time=TIME, seed=0):
  k_data, k_init = jax.random.split(jax.random.key(seed))
  xs, labels = data(k_data, batch, time, IN, dtype=model.param_dtype)
  params, state = split_variables(init_fn(model)(k_init, xs))
  return params, state, xs, labels


def feed(model, params, state, xs, labels, cuts, reset_at=()):
  """Feeds ``xs`` in calls cut at ``cuts`` (one call per piece, its own
  chunk), keeping the state, or resetting it before a cut in ``reset_at``.

  Returns ``(loss, grads, state, spikes)`` summed over the calls.
  """
  bounds = [0, *cuts, xs.shape[1]]
  loss, grads, spikes = 0.0, None, 0.0
  for start, stop in zip(bounds[:-1], bounds[1:]):
    if start in reset_at:
      state = fe.reset_state(state)
    f = online_fn(model, stop - start)
    (piece_loss, aux), g, state = f(
      params, state, xs[:, start:stop], labels[:, start:stop]
    )
    loss = loss + piece_loss
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    spikes += sum(float(a['output_sum']) for a in aux['output_sum'].values())
  return loss, grads, state, spikes


@pytest.mark.parametrize(
  'cuts',
  [(7,), pytest.param(tuple(range(1, TIME)), marks=pytest.mark.slow)],
  ids=['one-cut', 'every-step'],
)
def test_chunk_invariance(x64, cuts):
  model = alif_net()
  params, state, xs, labels = setup(model)
  whole = feed(model, params, state, xs, labels, cuts=())
  assert whole[3] > 0.02 * BATCH * TIME * 6  # the layer spikes
  loss, grads, final, _ = feed(model, params, state, xs, labels, cuts)
  assert_trees_close(loss, whole[0], **TIGHT)
  assert_trees_close(grads, whole[1], **TIGHT)
  assert_trees_close(final, whole[2], **TIGHT)
  # the traces are part of the state and are not all zero
  traces = jax.tree.leaves(whole[2][fe.ELIGIBILITY])
  assert all(np.abs(t).max() > 0 for t in traces)


def test_reset_between_chunks_differs(x64):
  model = alif_net()
  params, state, xs, labels = setup(model)
  kept = feed(model, params, state, xs, labels, cuts=(7,))
  reset = feed(model, params, state, xs, labels, cuts=(7,), reset_at=(7,))
  assert abs(float(kept[0]) - float(reset[0])) > 1e-6
  w = lambda g: g['cell0']['input']['kernel']
  assert np.abs(w(kept[1]) - w(reset[1])).max() > 1e-6
  # the reset run's second piece is a fresh run of the second piece
  fresh = feed(model, params, state, xs[:, 7:], labels[:, 7:], cuts=())
  assert_trees_close(reset[2], fresh[2], **TIGHT)


def test_reset_state_rows(x64):
  model = alif_net()
  params, state, xs, labels = setup(model)
  _, _, mid, _ = feed(model, params, state, xs[:, :7], labels[:, :7], ())
  rows = jnp.array([True, False, True])
  partial = fe.reset_state(mid, where=rows)
  for collection in STATE:
    for after, before in zip(
      jax.tree.leaves(partial[collection]), jax.tree.leaves(mid[collection])
    ):
      np.testing.assert_array_equal(after[1], before[1])
      np.testing.assert_array_equal(after[rows], 0)
  assert any(np.abs(leaf[rows]).max() > 0 for leaf in jax.tree.leaves(mid))
  # other collections pass through unchanged
  assert fe.reset_state({**mid, 'other': 1})['other'] == 1
  # continuing: reset rows behave as a fresh start, the others continue
  rest = lambda s: feed(model, params, s, xs[:, 7:], labels[:, 7:], ())[2]
  continued, fresh, mixed = rest(mid), rest(state), rest(partial)
  for m, c, f in zip(*map(jax.tree.leaves, (mixed, continued, fresh))):
    assert_trees_close(m[1], c[1], **TIGHT)
    assert_trees_close(m[rows], f[rows], **TIGHT)


@pytest.mark.slow
def test_masked_steps_change_nothing(x64):
  """A padded batch == its examples run unpadded, one at a time."""
  model = alif_net()
  params, state, xs, labels = setup(model, time=12)
  garbage, _ = data(jax.random.key(7), BATCH, 12, IN, rate=0.5, dtype=F64)
  valid = np.zeros((BATCH, 12), bool)
  valid[0, :8] = True  # padded at the end
  valid[1, 4:] = True  # padded at the start
  valid[2, 2:10] = True  # padded at both ends
  mask = jnp.asarray(valid)
  padded = jnp.where(mask[..., None], xs, garbage)
  f = online_fn(model, 5)
  (loss, aux), grads, final = f(params, state, padded, labels, mask)
  assert int(aux['steps']) == valid.sum()
  losses, grad_sum, finals = 0.0, None, []
  for i in range(BATCH):
    steps = np.flatnonzero(valid[i])
    x_i, y_i = xs[i : i + 1, steps], labels[i : i + 1, steps]
    state_i = jax.tree.map(lambda a, i=i: a[i : i + 1], state)  # zeros
    (loss_i, aux_i), g_i, final_i = online_fn(model, 5)(
      params, state_i, x_i, y_i
    )
    assert float(aux_i['output_sum']['OnlineGrad_0']['output_sum']) > 0
    losses += loss_i
    grad_sum = g_i if grad_sum is None else jax.tree.map(jnp.add, grad_sum, g_i)
    finals.append(final_i)
  assert_trees_close(loss, losses / BATCH)
  assert_trees_close(grads, jax.tree.map(lambda g: g / BATCH, grad_sum))
  for i, final_i in enumerate(finals):
    row = jax.tree.map(lambda a, i=i: a[i : i + 1], final)
    assert_trees_close(row, final_i)


@functools.cache
def layer_fns(layer):
  return jax.jit(layer.init), jax.jit(
    functools.partial(layer.apply, mutable=list(STATE))
  )


def test_masked_steps_output_zeros():
  init, apply = layer_fns(fe.OnlineGrad(alif(F32)()))
  xs, _ = data(jax.random.key(0), 2, 6, IN)
  mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
  ys, _ = apply(init(jax.random.key(1), xs), xs, mask=mask)
  assert_spiking(ys[0], high=1.0)
  np.testing.assert_array_equal(ys[1, 3:], 0)


def test_time_major_is_transposed():
  init, apply = layer_fns(fe.OnlineGrad(alif(F32)()))
  xs, _ = data(jax.random.key(0), 2, 6, IN)
  variables = init(jax.random.key(1), xs)
  ys, state = apply(variables, xs)
  _, apply_tm = layer_fns(fe.OnlineGrad(alif(F32)(), time_major=True))
  ys_tm, state_tm = apply_tm(variables, jnp.swapaxes(xs, 0, 1))
  assert_trees_close(jnp.swapaxes(ys_tm, 0, 1), ys)
  assert_trees_close(state_tm, state)


@pytest.mark.slow
def test_traces_keep_trace_dtype_with_x64(x64):
  model = Net((alif(F64),), param_dtype=F64)  # default trace_dtype
  params, state, xs, labels = setup(model, time=6)
  dtypes = lambda s: {a.dtype for a in jax.tree.leaves(s[fe.ELIGIBILITY])}
  assert dtypes(state) == {jnp.dtype(F32)}
  assert {a.dtype for a in jax.tree.leaves(state[fe.CARRY])} == {jnp.dtype(F64)}
  _, grads, new_state = online_fn(model, 4)(params, state, xs, labels)
  assert dtypes(new_state) == {jnp.dtype(F32)}
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(F64)}


# online_update: truly online learning.


OPTIMIZER = optax.adam(0.02)


@functools.cache
def update_fn(model, chunk):
  update = fe.online_update(model.apply, cross_entropy, OPTIMIZER, chunk)
  return jax.jit(update)


def toy_setup(model):
  k_data, k_init = jax.random.split(jax.random.key(0))
  xs, labels = toy_task(k_data, 6, 12, IN)
  params, state = split_variables(init_fn(model)(k_init, xs))
  return params, state, xs, labels


@pytest.mark.slow
@pytest.mark.parametrize(
  ('chunk', 'epochs'),
  [(1, 10), (12, 60)],
)
def test_online_update_trains_stacked_layers(chunk, epochs):
  model = stacked(F32)
  params, state, xs, labels = toy_setup(model)
  update = update_fn(model, chunk)
  evaluate = online_fn(model, 12)
  (before, _), _, _ = evaluate(params, state, xs, labels)
  opt_state = OPTIMIZER.init(params)
  start = params
  for _ in range(epochs):
    _, params, opt_state, _ = update(params, opt_state, state, xs, labels)
  (after, _), _, _ = evaluate(params, state, xs, labels)
  assert float(after) < 0.7 * float(before)
  lower = lambda p: p['cell0']['recurrent']['kernel']
  assert np.abs(lower(params) - lower(start)).max() > 1e-3


def test_online_update_whole_sequence_is_one_step():
  model = stacked(F32)
  params, state, xs, labels = toy_setup(model)
  opt_state = OPTIMIZER.init(params)
  (loss, _), new_params, new_opt, new_state = update_fn(model, 12)(
    params, opt_state, state, xs, labels
  )
  (ref_loss, _), grads, ref_state = online_fn(model, 12)(
    params, state, xs, labels
  )
  updates, ref_opt = OPTIMIZER.update(grads, opt_state, params)
  assert_all_nonzero(grads)  # every parameter moves: the step is not empty
  assert_trees_close(loss, ref_loss)
  assert_trees_close(new_opt, ref_opt)  # holds the gradient's moments
  assert_trees_close(new_params, optax.apply_updates(params, updates))
  assert_trees_close(new_state, ref_state)
