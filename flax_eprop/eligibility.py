"""Eligibility traces over a chunk of steps: forward update and gradient.

Pure JAX (no Flax). For one layer with K carry leaves and a synapse
``I = u @ W`` the e-prop eligibility ``eps_t = d h_t / d W`` obeys
``eps_t = D_t eps_{t-1} + d_t (x) u_t`` with ``D_t`` the neuron-local
``K x K`` block per neuron and ``d_t (x) u_t`` the Kronecker-factored
immediate Jacobian (`flax_eprop.sparse`). Over a chunk ``t0 < s <= t0 + n``
(DESIGN.md, "Chunked trace updates"), with step outputs ``y_s`` whose
cotangents ``ybar_s`` are the learning signals:

    g_s      = [lambda_s ; ybar_s]                         (K + R per neuron)
    lambda_{s-1} = B_s^T g_s,   lambda_{t0+n} = 0           (B_s: (K+R) x K)
    grad_W   = sum_s (g_s . post_s) (x) u_s + lambda_{t0} . eps_{t0}
    eps_{t0+n} = Phi eps_{t0} + sum_s (Phi_s d_s) (x) u_s,  Phi_s = D_{t0+n} ... D_{s+1}

The recursions run on per-neuron vectors; the sums over ``s`` are single
matmuls, and the per-synapse trace is read and written once per chunk. The
gradient equals propagating the traces step by step and contracting each
step's learning signal, for any chunk length.

Only the K' *core* carry leaves keep traces (`Plan.core`): a derived leaf
such as the spike ``z_t = H(v_t - A_t)`` has ``eps_z = C_t eps_core``, so its
trace is never stored; the coefficients ``C`` at the chunk boundary are
(``E = [I; C]`` below maps core traces to all K rows). Trace layout: a
synapse trace is ``(*batch, K', features, in)``, a per-neuron or scalar
parameter trace ``(*batch, K', features)``, the derived coefficients
``(*batch, Kd, K', features)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flax_eprop.sparse import (
  Plan,
  StepFactors,
  _jaxpr,
  kernel_values,
  step_factors,
)


class ChunkResiduals(NamedTuple):
  """What the backward pass of a chunk needs (all bounded by the chunk).

  Attributes:
    factors: `StepFactors` stacked over the chunk (leading axis ``n``).
    carries: the carry leaves before each step, each ``(n, *batch, F)``.
    xs: the input leaves, each ``(n, *batch, ...)``.
    mask: ``(n, *batch)`` valid steps.
    traces: the traces at the chunk's start (`zero_traces` layout).
    params: the step's parameters.
  """

  factors: StepFactors
  carries: list
  xs: list
  mask: jax.Array
  traces: tuple
  params: Any


def trace_shapes(plan: Plan) -> tuple[list, list, list]:
  """Shapes of the synapse traces, the direct-parameter traces and the
  derived coefficients (an empty list when no carry leaf is derived)."""
  k, f = len(plan.core), plan.features
  lead = (*plan.batch_shape, k, f)
  synapses = [lead + (s.in_features,) for s in plan.synapses]
  derived = (*plan.batch_shape, len(plan.derived), k, f)
  return (
    synapses,
    [lead] * len(plan.direct_params),
    [derived] * bool(plan.derived),
  )


def zero_traces(plan: Plan, dtype) -> tuple[list, list, list]:
  """All-zero traces, as `trace_shapes` for `plan`."""
  zeros = lambda shapes: [jnp.zeros(shape, dtype) for shape in shapes]
  return tuple(zeros(shapes) for shapes in trace_shapes(plan))


def forward(plan: Plan, params, carry, xs, mask, traces, trace_dtype):
  """Runs a chunk: outputs, final carry, updated traces and residuals.

  Args:
    plan: the step's plan.
    params: the step's parameters.
    carry: the carry before the chunk (pytree of ``(*batch, F)``).
    xs: time-major inputs, a pytree of ``(n, *batch, ...)`` leaves.
    mask: ``(n, *batch)`` bool; False steps leave the carry, the traces and
      the gradient unchanged and output zeros.
    traces: ``(synapse traces, direct traces, derived coefficients)`` at the
      chunk's start (`zero_traces` layout).
    trace_dtype: dtype the updated traces are stored in.

  Returns:
    ``(ys, new_carry, new_traces, residuals)``; ``ys`` is a list over the
    output leaves of ``(n, *batch, F)``.
  """
  k = plan.num_carry
  c_leaves = jax.tree.leaves(carry)

  def body(state, inputs):
    h, coefficients = state
    x, m = inputs
    outs, f = step_factors(plan, params, h, x)
    f = _mask_factors(f, m, k)
    keep = lambda new, old: jnp.where(m[..., None], new, old)
    new_h = [keep(a, b) for a, b in zip(outs[:k], h)]
    ys = [keep(y, jnp.zeros_like(y)) for y in outs[k:]]
    coefficients = [
      jnp.where(m[..., None, None, None], f.derived, c).astype(c.dtype)
      for c in coefficients
    ]
    return (new_h, coefficients), (ys, f, h)

  x_leaves = jax.tree.leaves(xs)
  (h_end, c_end), (ys, factors, carries) = jax.lax.scan(
    body, (c_leaves, traces[2]), (x_leaves, mask)
  )
  new_traces = (*_propagate(plan, factors, traces, trace_dtype), c_end)
  residuals = ChunkResiduals(factors, carries, x_leaves, mask, traces, params)
  return ys, jax.tree.unflatten(plan.carry_def, h_end), new_traces, residuals


def _mask_factors(f: StepFactors, m, k: int) -> StepFactors:
  """A padded step acts as the identity on the carry and adds nothing."""
  rows, kk = f.carry.shape[-3], f.carry.shape[-2]
  eye = jnp.eye(rows, kk, dtype=f.carry.dtype)[..., None]
  valid = m[..., None, None, None]
  zero = lambda a: jnp.where(m[..., None, None], a, 0)
  return f._replace(
    carry=jnp.where(valid, f.carry, eye),
    post=tuple(zero(p) for p in f.post),
    direct=tuple(zero(d) for d in f.direct),
  )


# Per-neuron products of small K x K blocks ``(..., I, J, F)``: loops over the
# few carry components, which XLA fuses into elementwise work (as einsums they
# become thousands of tiny matmuls).


def _block_matmul(a, b):
  """``(..., I, J, F) x (..., J, K, F) -> (..., I, K, F)``."""
  return sum(
    a[..., :, j, None, :] * b[..., None, j, :, :] for j in range(a.shape[-2])
  )


def _block_matvec(a, v):
  """``(..., I, J, F) x (..., J, F) -> (..., I, F)``."""
  return sum(a[..., :, j, :] * v[..., None, j, :] for j in range(a.shape[-2]))


def _block_rmatvec(a, v):
  """``(..., I, J, F)^T x (..., I, F) -> (..., J, F)``."""
  return sum(a[..., i, :, :] * v[..., i, None, :] for i in range(a.shape[-3]))


def _block_trace(a, eps):
  """``(..., I, J, F) x (..., J, F, M) -> (..., I, F, M)``."""
  return sum(
    a[..., :, j, :, None] * eps[..., None, j, :, :] for j in range(a.shape[-2])
  )


def _expand(plan: Plan, coefficients: list, like) -> jax.Array:
  """``E: (*batch, K, K', F)``, all K trace rows from the K' core rows:
  identity rows for the core leaves, ``C`` for the derived ones."""
  shape = (*plan.batch_shape, len(plan.core), plan.features)
  rows = [None] * plan.num_carry
  for p, i in enumerate(plan.core):
    onehot = jnp.zeros(len(plan.core), like.dtype).at[p].set(1)
    rows[i] = jnp.broadcast_to(onehot[:, None], shape)
  for d, i in enumerate(plan.derived):
    rows[i] = coefficients[0][..., d, :, :].astype(like.dtype)
  return jnp.stack(rows, axis=-3)


def _propagate(plan: Plan, factors: StepFactors, traces, trace_dtype):
  """``eps_{t0+n} = Phi E eps_{t0} + sum_s Phi_s F_s`` for the core rows."""
  k = plan.num_carry
  local = factors.carry[..., :k, :, :]  # (n, *batch, K, K, F)
  eye = jnp.broadcast_to(
    jnp.eye(k, dtype=local.dtype)[..., None], local.shape[1:]
  )

  def back(phi, d):  # phi = Phi(end, s); emits it, carries Phi(end, s - 1)
    return _block_matmul(phi, d), phi

  phi_total, phis = jax.lax.scan(back, eye, local, reverse=True)
  synapse_traces, direct_traces, coefficients = traces
  core = jnp.array(plan.core)
  phis = phis[..., core, :, :]  # (n, *batch, K', K, F)
  phi_start = _block_matmul(
    phi_total[..., core, :, :], _expand(plan, coefficients, local)
  )
  new_synapses = []
  for eps, post, pre in zip(synapse_traces, factors.post, factors.pre):
    a = _block_matvec(phis, post[..., :k, :])
    new = _block_trace(phi_start, eps)
    new = new + jnp.einsum('s...if,s...m->...ifm', a, pre)
    new_synapses.append(new.astype(trace_dtype))
  new_direct = []
  for eps, direct in zip(direct_traces, factors.direct):
    new = _block_matvec(phi_start, eps)
    new = new + _block_matvec(phis, direct[..., :k, :]).sum(0)
    new_direct.append(new.astype(trace_dtype))
  return new_synapses, new_direct


def backward(plan: Plan, res: ChunkResiduals, ys_bar: list):
  """The chunk's e-prop parameter gradient and instantaneous input cotangents.

  Args:
    plan: the step's plan.
    res: residuals from `forward`.
    ys_bar: cotangents of the outputs, a list of ``(n, *batch, F)``.

  Returns:
    ``(params_bar, xs_bar)``: the e-prop gradient (same tree as the params)
    and, per input leaf, ``(n, *batch, ...)`` cotangents through each step's
    own path ``x_s -> y_s`` only.
  """
  k = plan.num_carry
  valid = res.mask[..., None]
  ys_bar = [jnp.where(valid, y, 0) for y in ys_bar]
  y_rows = jnp.stack(ys_bar, axis=-2)  # (n, *batch, R, F)
  rows = res.factors.carry  # (n, *batch, K + R, K, F)

  def back(lam, inputs):
    block, y = inputs
    g = jnp.concatenate([lam, y.astype(lam.dtype)], axis=-2)
    return _block_rmatvec(block, g), g

  lam0 = jnp.zeros(rows.shape[1:-3] + (k, rows.shape[-1]), rows.dtype)
  lam0, g = jax.lax.scan(back, lam0, (rows, y_rows), reverse=True)
  # The start traces of all K rows are E eps: their cotangent is E^T lam0.
  lam0 = _block_rmatvec(_expand(plan, res.traces[2], lam0), lam0)
  params_bar = _param_grads(plan, res, g, lam0)
  p_leaves = jax.tree.leaves(res.params)
  outputs = lambda h, x: _jaxpr.evaluate(plan.program, [*p_leaves, *h, *x])[k:]
  xs_bar = instantaneous_cotangents(outputs, res.carries, res.xs, ys_bar)
  return params_bar, xs_bar


def _param_grads(plan: Plan, res: ChunkResiduals, g, lam0):
  synapse_traces, direct_traces, _ = res.traces
  kernel_bar = []
  for s, eps, post, pre in zip(
    plan.synapses, synapse_traces, res.factors.post, res.factors.pre
  ):
    c = jnp.sum(g * post, axis=-2)
    grad = jnp.einsum('s...m,s...f->mf', pre, c)
    start = jnp.sum(lam0[..., None] * eps.astype(lam0.dtype), axis=-3)
    grad = grad + jnp.sum(start, axis=tuple(range(start.ndim - 2))).T
    kernel_bar.append(grad if s.kernel_in_axis == 0 else grad.T)
  p_leaves, p_def = jax.tree.flatten(res.params)
  if plan.synapses:
    kernels, pullback = jax.vjp(lambda p: kernel_values(plan, p), p_leaves)
    (grads,) = pullback(
      [w.astype(v.dtype) for w, v in zip(kernel_bar, kernels)]
    )
  else:
    grads = [jnp.zeros_like(p) for p in p_leaves]
  for i, eps, direct in zip(
    plan.direct_params, direct_traces, res.factors.direct
  ):
    d = jnp.sum(g * direct, axis=(*range(g.ndim - 2), g.ndim - 2))
    d = d + jnp.sum(
      lam0 * eps.astype(lam0.dtype), axis=tuple(range(lam0.ndim - 1))
    )
    d = d if jnp.ndim(p_leaves[i]) else d.sum()
    grads[i] = grads[i] + d.astype(grads[i].dtype)
  grads = [gr.astype(p.dtype) for gr, p in zip(grads, p_leaves)]
  return jax.tree.unflatten(p_def, grads)


def instantaneous_cotangents(outputs, carries, xs, ys_bar):
  """Cotangents of each step's inputs through that step's outputs only.

  Args:
    outputs: ``outputs(h_leaves, x_leaves) -> y_leaves`` of one step.
    carries: the carry leaves before each step, each ``(n, *batch, F)``.
    xs: the input leaves, each ``(n, *batch, ...)``.
    ys_bar: the output cotangents, each ``(n, *batch, F)``.

  Returns:
    The input cotangents, a list like ``xs``.
  """

  def one(h, x, y_bar):
    ys, vjp = jax.vjp(lambda x_: outputs(h, x_), x)
    return vjp([yb.astype(y.dtype) for yb, y in zip(y_bar, ys)])[0]

  return jax.vmap(one)(carries, xs, ys_bar)
