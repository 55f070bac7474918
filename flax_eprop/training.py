"""Sequence losses and gradients: online (chunked e-prop) and BPTT.

`online_value_and_grad` feeds a sequence to a model chunk by chunk, taking
one `jax.value_and_grad` per chunk (each `OnlineGrad` layer supplies its
e-prop gradient) and summing: peak memory depends on ``chunk``, never on the
sequence length. `bptt_value_and_grad` has the same signature and
backpropagates through the whole sequence (the reference). `online_update`
applies an optimizer after every chunk (truly online learning).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flax_eprop.online import LOSSES, METRICS, gradient_mode

ApplyFn = Callable[..., Any]
LossFn = Callable[[Any, Any], jax.Array]


def _sequence_loss(apply_fn, loss_fn, params, state, xs, ys, mask):
  """``sum_t sum_b mask[b, t] * loss_fn(out[b, t], ys[b, t]) / batch``, plus
  the penalties the layers sow (firing-rate regularisation)."""
  kwargs = {} if mask is None else {'mask': mask}
  outputs, new_state = apply_fn(
    {'params': params, **state},
    xs,
    mutable=[*state, METRICS, LOSSES],
    **kwargs,
  )
  per_step = jax.vmap(jax.vmap(loss_fn))(outputs, ys)  # (batch, time)
  if jnp.ndim(per_step) != 2:
    raise ValueError(
      'loss_fn: must return a scalar for one example and step; got shape '
      f'{jnp.shape(per_step)[2:]}.'
    )
  valid = jnp.ones(per_step.shape, bool) if mask is None else mask
  loss = jnp.sum(jnp.where(valid, per_step, 0)) / per_step.shape[0]
  metrics = new_state.pop(METRICS, {})
  penalties = jax.tree.leaves(new_state.pop(LOSSES, {}))
  penalty = sum(penalties, jnp.zeros((), loss.dtype)).astype(loss.dtype)
  aux = {'steps': jnp.sum(valid), 'output_sum': metrics, 'penalty': penalty}
  loss = loss + penalty
  return loss, (aux, new_state)


# Differentiates `_sequence_loss` w.r.t. its params argument.
_loss_and_grad = jax.value_and_grad(_sequence_loss, argnums=2, has_aux=True)


def _check(xs, ys, mask):
  if jnp.ndim(xs) < 3:
    raise ValueError(
      f'xs: expected shape (batch, time, in_features), got {jnp.shape(xs)}.'
    )
  batch, time = jnp.shape(xs)[:2]
  for leaf in jax.tree.leaves(ys):
    if jnp.shape(leaf)[:2] != (batch, time):
      raise ValueError(
        f'ys: every leaf must start with (batch, time) = {(batch, time)}, got '
        f'{jnp.shape(leaf)}.'
      )
  if mask is not None and jnp.shape(mask) != (batch, time):
    raise ValueError(
      f'mask: expected shape (batch, time) = {(batch, time)}, got '
      f'{jnp.shape(mask)}.'
    )


def _chunks(tree, start: int, size: int):
  return jax.tree.map(
    lambda a: jax.lax.slice_in_dim(a, start, start + size, axis=1), tree
  )


def _scan_chunks(chunk_fn, carry, xs, ys, mask, chunk: int):
  """Folds ``chunk_fn(carry, xs_c, ys_c, mask_c) -> carry`` over chunks.

  Each chunk is sliced out of the sequence inside the loop (no re-stacked
  copy of the inputs: working memory does not grow with the time axis).
  """
  time = jnp.shape(xs)[1]
  count, rest = divmod(time, chunk)
  if count:

    def body(c, i):
      piece = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, 1)
      return chunk_fn(c, *jax.tree.map(piece, (xs, ys, mask))), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(count))
  if rest:
    carry = chunk_fn(carry, *_chunks((xs, ys, mask), count * chunk, rest))
  return carry


def _check_chunk(chunk) -> int:
  """``chunk`` as an int; ``ValueError`` unless it is a positive integer."""
  if (
    isinstance(chunk, bool)
    or not isinstance(chunk, numbers.Integral)
    or chunk < 1
  ):
    raise ValueError(f'chunk: expected a positive int (steps), got {chunk!r}.')
  return int(chunk)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def online_value_and_grad(
  apply_fn: ApplyFn, loss_fn: LossFn, chunk: int = 50
) -> Callable:
  """Loss and online e-prop gradient of a sequence, fed chunk by chunk.

  Args:
    apply_fn: the model's ``apply``; called as ``apply_fn({'params': params,
      **state}, xs_chunk, mutable=[...])`` (plus ``mask=mask_chunk`` when a
      mask is given: the model should pass it on to its `OnlineGrad`
      layers) and returning the outputs ``(batch, chunk, ...)`` (a pytree).
    loss_fn: ``loss_fn(output, target) -> scalar`` for ONE example at ONE
      step (it is vmapped over batch and time). The sequence loss is the sum
      over valid steps, averaged over the batch.
    chunk: steps per chunk (a last, shorter chunk is handled).

  Returns:
    ``f(params, state, xs, ys, mask=None) -> ((loss, aux), grads, state)``
    with ``xs: (batch, time, in)``, ``ys: (batch, time, ...)``, ``mask:
    (batch, time)`` bool, ``state`` the non-parameter collections from
    ``init`` (``'carry'``, ``'eligibility'``), returned advanced by the
    sequence. ``aux`` has ``'steps'`` (valid steps), ``'output_sum'`` (per
    `OnlineGrad` layer, the sum of its outputs: the spike count) and
    ``'penalty'`` (the firing-rate regularisation included in the loss).
  """
  fold = _online_fold(
    apply_fn, loss_fn, chunk, lambda g, total, p: (_add(total, g), p)
  )

  def f(params, state, xs, ys, mask=None):
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, aux), _, grads, state = fold(params, zeros, state, xs, ys, mask)
    return (loss, aux), grads, state

  return f


def _online_fold(apply_fn, loss_fn, chunk, learn) -> Callable:
  """The chunk loop shared by `online_value_and_grad` and `online_update`.

  Returns ``f(params, learner, state, xs, ys, mask) -> ((loss, aux), params,
  learner, state)``: one `jax.value_and_grad` per chunk, after which
  ``learn(grads, learner, params) -> (learner, params)`` accumulates the
  gradient or applies an optimizer step.
  """
  chunk = _check_chunk(chunk)

  def f(params, learner, state, xs, ys, mask=None):
    _check(xs, ys, mask)
    full_mask = jnp.ones(jnp.shape(xs)[:2], bool) if mask is None else mask

    def chunk_fn(carry, xs_c, ys_c, mask_c):
      loss, aux, params, learner, state = carry
      m = None if mask is None else mask_c
      (chunk_loss, (a, state)), g = _loss_and_grad(
        apply_fn, loss_fn, params, state, xs_c, ys_c, m
      )
      learner, params = learn(g, learner, params)
      return loss + chunk_loss, _add(aux, a), params, learner, state

    loss, aux = _zero_loss_aux(
      apply_fn, loss_fn, params, state, xs, ys, mask, chunk
    )
    loss, aux, params, learner, state = _scan_chunks(
      chunk_fn, (loss, aux, params, learner, state), xs, ys, full_mask, chunk
    )
    return (loss, aux), params, learner, state

  return f


def _zero_loss_aux(apply_fn, loss_fn, params, state, xs, ys, mask, chunk):
  """Zeros shaped like the ``(loss, aux)`` of one chunk."""
  size = min(chunk, jnp.shape(xs)[1])
  m = None if mask is None else mask[:, :size]
  shapes = jax.eval_shape(
    lambda p, s: _sequence_loss(apply_fn, loss_fn, p, s, xs[:, :size],
                                _chunks(ys, 0, size), m),
    params, state,
  )  # fmt: skip
  loss, (aux, _) = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return loss, aux


def bptt_value_and_grad(apply_fn: ApplyFn, loss_fn: LossFn) -> Callable:
  """Loss and BPTT gradient: the reference for `online_value_and_grad`.

  Same arguments and return value as `online_value_and_grad`, but the whole
  sequence is one call traced in ``gradient_mode('bptt')``: every
  `OnlineGrad` runs a plain `jax.lax.scan` and `jax.grad` backpropagates
  through time (memory grows with the sequence length). Other layers are
  unchanged, so the same model and params serve both.
  """

  def f(params, state, xs, ys, mask=None):
    _check(xs, ys, mask)
    with gradient_mode('bptt'):
      (loss, (aux, state)), grads = _loss_and_grad(
        apply_fn, loss_fn, params, state, xs, ys, mask
      )
    return (loss, aux), grads, state

  return f


def online_update(
  apply_fn: ApplyFn, loss_fn: LossFn, optimizer, chunk: int = 50
) -> Callable:
  """Online learning: an optimizer step after every chunk.

  Args:
    apply_fn, loss_fn, chunk: as in `online_value_and_grad`; ``chunk=1``
      updates the parameters at every time step.
    optimizer: an optax ``GradientTransformation`` (anything with
      ``update(grads, opt_state, params) -> (updates, opt_state)``).

  Returns:
    ``f(params, opt_state, state, xs, ys, mask=None) -> ((loss, aux),
    params, opt_state, state)``.
  """

  def learn(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    step = lambda p, u: (p + u).astype(p.dtype)
    return opt_state, jax.tree.map(step, params, updates)

  return _online_fold(apply_fn, loss_fn, chunk, learn)
