"""Exact online gradients by real-time recurrent learning (RTRL).

``OnlineGrad(cell, mode='exact')`` keeps, per example, the full sensitivity
of the carry to every parameter, ``eps_t = d h_t / d theta: (K * F, P)``,
propagated with the dense per-example carry Jacobian (recurrent synapses
included):

    eps_t = J_h(t) eps_{t-1} + J_theta(t)
    grad  = sum_t ybar_t . (J^y_h(t) eps_{t-1} + J^y_theta(t))

This is the exact gradient of the layer (equal to BPTT through it) computed
forward in time, at a cost of ``O(K F P)`` memory and ``O(K^2 F^2 P)`` time
per example and step: a reference for small networks, to measure what
e-prop's approximation costs. Inputs still receive the instantaneous
cotangent. Traces are stored as one array ``(*batch, K * F, P)`` with the
parameters raveled by `jax.flatten_util.ravel_pytree`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flax_eprop.online.eprop import instantaneous_cotangents

DEFAULT_MAX_BYTES = 4 * 2**30
"""The default of ``OnlineGrad.exact_max_bytes``: 4 GiB."""


class TraceTooLargeError(ValueError):
  """``mode='exact'`` would need more memory than the layer allows."""


def memory_bytes(params, carry, outputs: int, steps: int, trace_dtype) -> dict:
  """What one chunk of RTRL holds, in bytes, before it is allocated.

  Args:
    params: the cell's parameters (P numbers in all).
    carry: the carry, K leaves ``(*batch, F)``.
    outputs: R, the number of output leaves ``(*batch, F)``.
    steps: n, the chunk's number of steps.
    trace_dtype: dtype of the stored trace.

  Returns:
    ``{'trace': ..., 'chunk': ..., 'total': ...}``: the stored trace
    ``(*batch, K F, P)``, and what a chunk adds: each step's Jacobians
    ``((K + R) F, P)`` twice, the trace in the compute dtype, and the
    output sensitivities of every step ``(n, *batch, R F, P)`` kept for the
    backward pass.
  """
  leaves = jax.tree.leaves(carry)
  batch = math.prod(jnp.shape(leaves[0])[:-1])
  k, f = len(leaves), jnp.shape(leaves[0])[-1]
  p = sum(math.prod(jnp.shape(a)) for a in jax.tree.leaves(params))
  compute = jnp.dtype(jnp.result_type(*jax.tree.leaves(params))).itemsize
  per = batch * f * p  # one (*batch, F, P) block
  trace = per * k * jnp.dtype(trace_dtype).itemsize
  chunk = per * compute * (k + 2 * (k + outputs) + steps * outputs)
  return {'trace': trace, 'chunk': chunk, 'total': trace + chunk}


def check_memory(
  params, carry, outputs, steps, trace_dtype, max_bytes, where
) -> None:
  """Raises `TraceTooLargeError` if `memory_bytes` exceeds ``max_bytes``
  (None: no limit)."""
  if max_bytes is None:
    return
  need = memory_bytes(params, carry, outputs, steps, trace_dtype)
  if need['total'] <= max_bytes:
    return
  gib = lambda b: f'{b / 2**30:.2f} GiB ({b:,} bytes)'
  raise TraceTooLargeError(
    f"{where}: mode='exact' would need about {gib(need['total'])}: the "
    f'dense trace {trace_shape(params, carry)} takes {gib(need["trace"])} '
    f'and a chunk of {steps} steps {gib(need["chunk"])} more (per-step '
    'Jacobians and the sensitivities kept for the backward pass). That is '
    f'above exact_max_bytes={max_bytes:,}. Use fewer features, a smaller '
    "batch or shorter chunks, mode='eprop', or raise exact_max_bytes "
    '(None: no check).'
  )


class RTRLResiduals(NamedTuple):
  """Backward-pass inputs: ``sens`` is ``d y_s / d theta`` per step,
  ``(n, *batch, R * F, P)``; the rest as in `ChunkResiduals`."""

  sens: jax.Array
  carries: list
  xs: list
  mask: jax.Array
  params: Any


def trace_shape(params, carry) -> tuple[int, ...]:
  """``(*batch, K * F, P)``: the RTRL trace for this cell and batch."""
  leaves = jax.tree.leaves(carry)
  size = sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(params))
  shape = jnp.shape(leaves[0])
  return (*shape[:-1], len(leaves) * shape[-1], size)


def _jacobians(step: Callable, params, h_leaves, x_leaves, carry_def):
  """Outputs and dense per-example Jacobians of one step.

  ``step`` acts on ONE example (carry leaves ``(F,)``); it is vmapped here.

  Returns:
    ``(outs, j_h, j_p)``: ``outs`` the ``(*new_carry, *y)`` leaves;
    ``j_h: (*batch, (K + R) F, K F)`` and ``j_p: (*batch, (K + R) F, P)``.
  """
  p_vec, unravel = ravel_pytree(params)
  batch = h_leaves[0].shape[:-1]
  n, k, f = math.prod(batch), len(h_leaves), h_leaves[0].shape[-1]

  def one(p, h, x):  # one example: h (K F,) -> outputs ((K + R) F,), twice
    carry = jax.tree.unflatten(carry_def, list(h.reshape(k, f)))
    out = jnp.concatenate(jax.tree.leaves(step(unravel(p), carry, x)))
    return out, out  # the value rides along as jacfwd's aux: one evaluation

  h = jnp.stack(h_leaves, axis=-2).reshape(n, k * f)
  xs = [x.reshape(n, *x.shape[len(batch) :]) for x in x_leaves]
  jac = jax.jacfwd(one, argnums=(0, 1), has_aux=True)
  (j_p, j_h), out = jax.vmap(jac, (None, 0, 0))(p_vec, h, xs)
  rows = out.shape[-1] // f
  outs = list(jnp.moveaxis(out.reshape(*batch, rows, f), -2, 0))
  return (
    outs,
    j_h.reshape(*batch, *j_h.shape[1:]),
    j_p.reshape(*batch, *j_p.shape[1:]),
  )


def forward(step, params, carry, xs, mask, trace, trace_dtype):
  """RTRL over a chunk; same contract as `eprop.forward`, but ``step``
  acts on ONE example (carry leaves ``(F,)``) and is vmapped over the batch.
  """
  carry_leaves, carry_def = jax.tree.flatten(carry)
  k, f = len(carry_leaves), carry_leaves[0].shape[-1]

  def body(state, inputs):
    h, eps = state
    x, m = inputs
    outs, j_h, j_p = _jacobians(step, params, h, x, carry_def)
    total = jnp.einsum('...ij,...jp->...ip', j_h, eps.astype(j_h.dtype)) + j_p
    keep = lambda new, old: jnp.where(m[..., None], new, old)
    new_h = [keep(a, b) for a, b in zip(outs[:k], h)]
    new_eps = jnp.where(m[..., None, None], total[..., : k * f, :], eps)
    sens = jnp.where(m[..., None, None], total[..., k * f :, :], 0)
    ys = [keep(y, jnp.zeros_like(y)) for y in outs[k:]]
    return (new_h, new_eps.astype(trace_dtype)), (ys, sens, h)

  x_leaves = jax.tree.leaves(xs)
  (h_end, eps_end), (ys, sens, carries) = jax.lax.scan(
    body, (carry_leaves, trace), (x_leaves, mask)
  )
  residuals = RTRLResiduals(sens, carries, x_leaves, mask, params)
  return ys, jax.tree.unflatten(carry_def, h_end), eps_end, residuals


def backward(step, res: RTRLResiduals, ys_bar, carry_def):
  """The exact parameter gradient and the instantaneous input cotangents.

  ``step`` acts on one example, as in `forward`.
  """
  valid = res.mask[..., None]
  ys_bar = [jnp.where(valid, y, 0) for y in ys_bar]
  g = jnp.concatenate(ys_bar, axis=-1)  # (n, *batch, R F)
  p_vec, unravel = ravel_pytree(res.params)
  grad = jnp.einsum('...i,...ip->p', g.astype(res.sens.dtype), res.sens)
  params_bar = unravel(grad.astype(p_vec.dtype))

  def outputs(h, x):  # batched h, x -> y leaves, one example at a time
    batch = h[0].shape[:-1]
    flat = lambda a: a.reshape(math.prod(batch), *a.shape[len(batch) :])
    one = lambda h, x: step(res.params, jax.tree.unflatten(carry_def, h), x)[1]
    ys = jax.vmap(one)([flat(a) for a in h], [flat(a) for a in x])
    return [y.reshape(*batch, *y.shape[1:]) for y in jax.tree.leaves(ys)]

  xs_bar = instantaneous_cotangents(outputs, res.carries, res.xs, ys_bar)
  return params_bar, xs_bar
