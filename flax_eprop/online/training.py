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
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from flax_eprop.online.filtered import RECORDS, check_readout_decays
from flax_eprop.online.module import (
  CARRY,
  ELIGIBILITY,
  LOSSES,
  METRICS,
  gradient_mode,
  split_sequence,
)

ApplyFn = Callable[..., Any]
LossFn = Callable[[Any, Any], jax.Array]
TimeReduction = Literal['sum', 'mean']


def _sequence_loss(apply_fn, loss_fn, params, state, xs, ys, mask, weights):
  """``sum_b w_b sum_t mask[b, t] loss_fn(out[b, t], ys[b, t]) / batch`` plus
  the penalties the layers sow (firing-rate regularisation); ``weights``
  ``(batch,)`` or None (all 1: the sum over time)."""
  kwargs = {} if mask is None else {'mask': mask}
  outputs, new_state = apply_fn(
    {'params': params, **state},
    xs,
    mutable=[CARRY, ELIGIBILITY, *state, METRICS, LOSSES, RECORDS],
    **kwargs,
  )
  check_readout_decays(new_state.pop(RECORDS, {}))
  per_step = jax.vmap(jax.vmap(loss_fn))(outputs, ys)  # (batch, time)
  if jnp.ndim(per_step) != 2:
    raise ValueError(
      'loss_fn: must return a scalar for one example and step; got shape '
      f'{jnp.shape(per_step)[2:]}.'
    )
  valid = jnp.ones(per_step.shape, bool) if mask is None else mask
  per_step = jnp.where(valid, per_step, 0)
  if weights is not None:
    per_step = per_step * weights[:, None].astype(per_step.dtype)
  loss = jnp.sum(per_step) / per_step.shape[0]
  metrics = new_state.pop(METRICS, {})
  penalties = jax.tree.leaves(new_state.pop(LOSSES, {}))
  penalty = sum(penalties, jnp.zeros((), loss.dtype)).astype(loss.dtype)
  aux = {'steps': jnp.sum(valid), 'output_sum': metrics, 'penalty': penalty}
  loss = loss + penalty
  return loss, (aux, new_state)


def _time_weights(time_reduction, xs, mask):
  """Per-sequence weights ``(batch,)`` of the loss over time, or None.

  ``'mean'``: ``1 / (valid steps of the sequence)`` (at least 1), from the
  whole sequence's mask, so that every chunk weighs its steps alike.
  """
  if time_reduction == 'sum':
    return None
  batch, time = jnp.shape(jax.tree.leaves(xs)[0])[:2]
  if mask is None:
    return jnp.full((batch,), 1.0 / time)
  return 1.0 / jnp.maximum(jnp.sum(mask, axis=1), 1)


def _check_time_reduction(time_reduction) -> str:
  if time_reduction not in ('sum', 'mean'):
    raise ValueError(
      f"time_reduction: expected 'sum' or 'mean', got {time_reduction!r}."
    )
  return time_reduction


# Differentiates `_sequence_loss` w.r.t. its params argument.
_loss_and_grad = jax.value_and_grad(_sequence_loss, argnums=2, has_aux=True)


def _check(xs, ys, mask):
  """Checks the batch-major ``(batch, time, ...)`` leaves of a sequence."""
  leaves = jax.tree.leaves(xs)
  if not leaves or any(jnp.ndim(a) < 3 for a in leaves):
    got = (
      [jnp.shape(a) for a in leaves]
      if len(leaves) != 1
      else jnp.shape(leaves[0])
    )
    raise ValueError(
      f'xs: expected shape (batch, time, in_features) (or a pytree of such '
      f'arrays), got {got}. The training functions take batch-major '
      'sequences and cut chunks along axis 1: add a time axis to a single '
      'step (xs[:, None]), and transpose time-major data (the model may '
      'still use OnlineGrad(time_major=True) inside).'
    )
  batch, time = jnp.shape(leaves[0])[:2]
  for name, tree in (('xs', xs), ('ys', ys)):
    for leaf in jax.tree.leaves(tree):
      if jnp.shape(leaf)[:2] != (batch, time):
        raise ValueError(
          f'{name}: every leaf must start with (batch, time) = '
          f'{(batch, time)}, got {jnp.shape(leaf)}.'
        )
  if mask is None:
    return
  if jnp.shape(mask) != (batch, time):
    raise ValueError(
      f'mask: expected shape (batch, time) = {(batch, time)}, got '
      f'{jnp.shape(mask)}.'
    )
  if jnp.result_type(mask) != jnp.bool_:
    raise TypeError(
      f'mask: expected a bool array (True: a valid step), got dtype '
      f'{jnp.result_type(mask)}; convert it explicitly, e.g. mask > 0.'
    )


def _chunks(tree, start: int, size: int):
  return jax.tree.map(
    lambda a: jax.lax.slice_in_dim(a, start, start + size, axis=1), tree
  )


def _scan_chunks(chunk_fn, carry, xs, ys, mask, chunk: int):
  """Folds ``chunk_fn(carry, xs_c, ys_c, mask_c) -> (carry, out)`` over the
  chunks; returns the last carry and the sum of the outs.

  Each chunk is sliced out of the sequence inside the loop (no re-stacked
  copy of the inputs: working memory does not grow with the time axis).
  """
  time = jnp.shape(jax.tree.leaves(xs)[0])[1]
  count, rest = divmod(time, chunk)
  total = None
  if count:

    def body(c, i):
      piece = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, 1)
      return chunk_fn(c, *jax.tree.map(piece, (xs, ys, mask)))

    carry, outs = jax.lax.scan(body, carry, jnp.arange(count))
    total = jax.tree.map(lambda a: jnp.sum(a, axis=0), outs)
  if rest:
    carry, out = chunk_fn(carry, *_chunks((xs, ys, mask), count * chunk, rest))
    total = out if total is None else _add(total, out)
  return carry, total


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
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  chunk: int = 50,
  *,
  time_reduction: TimeReduction = 'sum',
) -> Callable:
  """Loss and online e-prop gradient of a sequence, fed chunk by chunk.

  Args:
    apply_fn: the model's ``apply``; called as ``apply_fn({'params': params,
      **state}, xs_chunk, mutable=[...])`` (plus ``mask=mask_chunk`` when a
      mask is given: the model should pass it on to its `OnlineGrad`
      layers) and returning the outputs ``(batch, chunk, ...)`` (a pytree).
    loss_fn: ``loss_fn(output, target) -> scalar`` for ONE example at ONE
      step (it is vmapped over batch and time).
    chunk: steps per chunk (a last, shorter chunk is handled). A layer
      with ``reverse=True`` refuses to run when the sequence is longer
      than ``chunk`` (it would reverse each chunk, not the sequence).
    time_reduction: the loss of a sequence over time: ``'sum'``
      (default) sums ``loss_fn`` over its valid steps; ``'mean'`` divides
      that sum by the number of valid steps of the sequence (counted on the
      whole ``mask`` before chunking, so chunked and BPTT gradients agree and
      chunking does not change the result), which keeps the loss and
      gradient scale independent of the sequence length. Either way the
      sequence losses are then averaged over the batch.

  Returns:
    ``f(params, state, xs, ys, mask=None) -> ((loss, aux), grads, state)``
    with ``xs: (batch, time, in)`` (or a pytree of ``(batch, time, ...)``
    leaves), ``ys: (batch, time, ...)``, ``mask: (batch, time)`` bool,
    ``state`` the non-parameter collections (``'carry'``,
    ``'eligibility'``) from ``init`` or `flax_eprop.rest_state`, returned
    advanced by the sequence. ``aux`` has ``'steps'`` (valid steps),
    ``'output_sum'`` (per `OnlineGrad` layer, the sum of its outputs: the
    spike count) and ``'penalty'`` (the firing-rate regularisation included
    in the loss).
  """
  fold = _online_fold(
    apply_fn,
    loss_fn,
    chunk,
    lambda g, total, p: (_add(total, g), p),
    _check_time_reduction(time_reduction),
  )

  def f(params, state, xs, ys, mask=None):
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, aux), _, grads, state = fold(params, zeros, state, xs, ys, mask)
    return (loss, aux), grads, state

  return f


def _online_fold(apply_fn, loss_fn, chunk, learn, time_reduction) -> Callable:
  """The chunk loop shared by `online_value_and_grad` and `online_update`.

  Returns ``f(params, learner, state, xs, ys, mask) -> ((loss, aux), params,
  learner, state)``: one `jax.value_and_grad` per chunk, after which
  ``learn(grads, learner, params) -> (learner, params)`` accumulates the
  gradient or applies an optimizer step.
  """
  chunk = _check_chunk(chunk)

  def f(params, learner, state, xs, ys, mask=None):
    _check(xs, ys, mask)
    weights = _time_weights(time_reduction, xs, mask)
    batch_time = jnp.shape(jax.tree.leaves(xs)[0])[:2]
    full_mask = jnp.ones(batch_time, bool) if mask is None else mask

    def chunk_fn(carry, xs_c, ys_c, mask_c):
      params, learner, state = carry
      m = None if mask is None else mask_c
      (loss, (aux, state)), g = _loss_and_grad(
        apply_fn, loss_fn, params, state, xs_c, ys_c, m, weights
      )
      learner, params = learn(g, learner, params)
      return (params, learner, state), (loss, aux)

    with split_sequence(batch_time[1] > chunk):  # reversed layers refuse
      (params, learner, state), (loss, aux) = _scan_chunks(
        chunk_fn, (params, learner, state), xs, ys, full_mask, chunk
      )
    return (loss, aux), params, learner, state

  return f


def bptt_value_and_grad(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  *,
  time_reduction: TimeReduction = 'sum',
) -> Callable:
  """Loss and BPTT gradient: the reference for `online_value_and_grad`.

  Same arguments and return value as `online_value_and_grad`, but the whole
  sequence is one call traced in ``gradient_mode('bptt')``: every
  `OnlineGrad` runs a plain `jax.lax.scan` and `jax.grad` backpropagates
  through time (memory grows with the sequence length). Other layers are
  unchanged, so the same model and params serve both.

  Args:
    apply_fn: as in `online_value_and_grad`.
    loss_fn: as in `online_value_and_grad`.
    time_reduction: ``'sum'`` (default) or ``'mean'`` over each sequence's
      valid steps, as in `online_value_and_grad`.
  """
  _check_time_reduction(time_reduction)

  def f(params, state, xs, ys, mask=None):
    _check(xs, ys, mask)
    weights = _time_weights(time_reduction, xs, mask)
    with gradient_mode('bptt'):
      (loss, (aux, state)), grads = _loss_and_grad(
        apply_fn, loss_fn, params, state, xs, ys, mask, weights
      )
    return (loss, aux), grads, state

  return f


def online_update(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  optimizer,
  chunk: int = 50,
  *,
  time_reduction: TimeReduction = 'sum',
) -> Callable:
  """Online learning: an optimizer step after every chunk.

  Args:
    apply_fn: as in `online_value_and_grad`.
    loss_fn: as in `online_value_and_grad`.
    optimizer: an optax ``GradientTransformation`` (anything with
      ``update(grads, opt_state, params) -> (updates, opt_state)``).
    chunk: steps per chunk, as in `online_value_and_grad`; ``chunk=1``
      updates the parameters at every time step.
    time_reduction: ``'sum'`` (default) or ``'mean'`` over each sequence's
      valid steps, as in `online_value_and_grad`.

  Returns:
    ``f(params, opt_state, state, xs, ys, mask=None) -> ((loss, aux),
    params, opt_state, state)``.
  """

  def learn(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    step = lambda p, u: (p + u).astype(p.dtype)
    return opt_state, jax.tree.map(step, params, updates)

  return _online_fold(
    apply_fn, loss_fn, chunk, learn, _check_time_reduction(time_reduction)
  )
