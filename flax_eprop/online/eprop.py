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
matmuls, and the per-synapse trace is read and written once per chunk.
Per step only the entries of ``B_s`` that vary are stored
(`flax_eprop.sparse.compression.carry_pattern`); the reverse scans rebuild
each block (`flax_eprop.online.blocks`), skip its zeros, and the trace
update emits ``Phi_s post_s`` without forming the stack of ``Phi_s``. The
gradient equals propagating the traces step by step and contracting each
step's learning signal, for any chunk length.

Only the K' *core* carry leaves keep traces (`Plan.core`): a derived leaf
such as the spike ``z_t = H(v_t - A_t)`` has ``eps_z = C_t eps_core``, so its
trace is never stored; the coefficients ``C`` at the chunk boundary are
(``E = [I; C]`` below maps core traces to all K rows). Core rows whose
trace is the same for every post-neuron (`flax_eprop.sparse.compression`)
keep a presynaptic trace ``(*batch, |S|, in)``; the others a per-synapse
trace ``(*batch, K' - |S|, in, features)`` (features last: the per-neuron
factors broadcast along the contiguous axis, and the start term reduces
straight to the kernel's ``(in, features)``). A per-neuron or scalar
parameter trace is ``(*batch, K', features)``, the derived coefficients
``(*batch, Kd, K', features)``.

A chunk that is a whole sequence from rest (``from_rest``) needs neither
the start term nor the final trace update: its gradient is the sum over
steps alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_eprop.online import blocks
from flax_eprop.sparse.factors import (
  StepFactors,
  input_synapse_values,
  input_synapses,
  kernel_values,
  step_factors,
)
from flax_eprop.sparse.structure import Plan


class ChunkResiduals(NamedTuple):
  """What the backward pass of a chunk needs (all bounded by the chunk).

  Attributes:
    factors: `StepFactors` stacked over the chunk (leading axis ``n``),
      unmasked, except ``pre``: batch-major ``(*batch, n, in)`` (the
      layout of the matmuls that read it); their ``carry`` holds only the
      entries of the local Jacobian block that vary from step to step,
      ``(n, *batch, V, F)`` (`flax_eprop.sparse.compression.carry_pattern`).
    constants: the block's entries that are the same at every step, each
      ``(*batch, F)``.
    carries: the carry leaves before each step, each ``(n, *batch, F)``.
    xs: the input leaves, each ``(n, *batch, ...)``.
    mask: ``(n, *batch)`` valid steps.
    traces: the traces at the chunk's start (`zero_traces` layout).
    params: the step's parameters.
  """

  factors: StepFactors
  constants: list
  carries: list
  xs: list
  mask: jax.Array
  traces: tuple
  params: Any


def trace_shapes(plan: Plan, pre: tuple = ()) -> tuple[list, ...]:
  """Shapes of the trace groups: per synapse the per-synapse trace
  ``(*batch, K' - |S|, in, F)`` (the core rows not in ``pre``), per synapse
  the presynaptic trace ``(*batch, |S|, in)`` (none when ``pre`` is
  empty), per direct parameter ``(*batch, K', F)``, and the derived
  coefficients ``(*batch, Kd, K', F)`` (none when nothing is derived).

  Args:
    plan: the step's plan.
    pre: positions in ``plan.core`` kept as presynaptic traces
      (`flax_eprop.sparse.compression.presynaptic_rows`).
  """
  k, f = len(plan.core), plan.features
  batch = plan.batch_shape
  synapses = [(*batch, k - len(pre), s.in_features, f) for s in plan.synapses]
  presynaptic = [(*batch, len(pre), s.in_features) for s in plan.synapses]
  derived = (*batch, len(plan.derived), k, f)
  return (
    synapses,
    presynaptic * bool(pre),
    [(*batch, k, f)] * len(plan.direct_params),
    [derived] * bool(plan.derived),
  )


def zero_traces(plan: Plan, dtype, pre: tuple = ()) -> tuple[list, ...]:
  """All-zero traces, as `trace_shapes` for ``(plan, pre)``."""
  zeros = lambda shapes: [jnp.zeros(shape, dtype) for shape in shapes]
  return tuple(zeros(shapes) for shapes in trace_shapes(plan, pre))


def forward(
  plan: Plan, params, carry, xs, mask, traces, trace_dtype, pre=(),
  from_rest=False, pattern=None,
):  # fmt: skip
  """Runs a chunk: outputs, final carry, updated traces and residuals.

  Args:
    plan: the step's plan.
    params: the step's parameters.
    carry: the carry before the chunk (pytree of ``(*batch, F)``).
    xs: time-major inputs, a pytree of ``(n, *batch, ...)`` leaves.
    mask: ``(n, *batch)`` bool; False steps leave the carry, the traces and
      the gradient unchanged and output zeros.
    traces: the trace groups at the chunk's start (`trace_shapes`).
    trace_dtype: dtype the updated traces are stored in.
    pre: the presynaptic core positions (`trace_shapes`).
    from_rest: the chunk is a whole sequence that starts from rest (zero
      start traces) and ends with the call: the traces are neither read nor
      advanced (returned as given) and the gradient has no start term.
    pattern: the kind of each entry of the local Jacobian block
      (`flax_eprop.sparse.compression.carry_pattern`); None: all vary.

  Returns:
    ``(ys, new_carry, new_traces, residuals)``; ``ys`` is a list over the
    output leaves of ``(n, *batch, F)``.
  """
  k = plan.num_carry
  c_leaves = jax.tree.leaves(carry)
  x_leaves = jax.tree.leaves(xs)
  # synapses on the input alone: all steps' outputs as one matmul each
  hoisted = input_synapses(plan)
  # (mapped over batch-major inputs: XLA cancels the caller's move of the
  # time axis instead of copying the inputs)
  nb = len(plan.batch_shape)
  pres, given = [], []
  if hoisted:
    pres, given = jax.vmap(
      lambda x: input_synapse_values(plan, params, x, hoisted),
      in_axes=nb,
      out_axes=(nb, 0),
    )([jnp.moveaxis(x, 0, nb) for x in x_leaves])

  def body(state, inputs):
    h, coefficients, _ = state
    x, m, outputs = inputs
    outs, f = step_factors(plan, params, h, x, dict(zip(hoisted, outputs)))
    f = _kept_factors(plan, f)
    pat = _kept_pattern(plan, pattern)
    entries = lambda kind: [
      f.carry[..., r, c, :] for r, c in blocks.entries(pat, kind)
    ]
    vary, constants = entries('vary'), entries('const')
    f = _mask_factors(f, m)
    f = f._replace(carry=blocks.stack(vary, f.carry))
    keep = lambda new, old: jnp.where(m[..., None], new, old)
    new_h = [keep(a, b) for a, b in zip(outs[:k], h)]
    ys = [keep(y, jnp.zeros_like(y)) for y in outs[k:]]
    coefficients = [
      jnp.where(m[..., None, None, None], f.derived, c).astype(c.dtype)
      for c in coefficients
    ]
    return (new_h, coefficients, constants), (ys, f, h)

  inputs = (x_leaves, mask, given)
  first = jax.eval_shape(
    lambda: body(
      (c_leaves, traces[3], None), jax.tree.map(lambda a: a[0], inputs)
    )[0][2]
  )
  start = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
  # the constant entries leave the scan as its final state: stored once
  (h_end, c_end, constants), (ys, factors, carries) = jax.lax.scan(
    body, (c_leaves, traces[3], start), inputs
  )
  step_pres = [
    None if u is None else jnp.moveaxis(u, 0, nb) for u in factors.pre
  ]
  for i, u in zip(hoisted, pres):
    step_pres[i] = u
  factors = factors._replace(pre=tuple(step_pres))
  if from_rest:
    new_traces = traces
  else:
    new_traces = (
      *_propagate(
        plan, pre, factors, constants, mask, traces, trace_dtype, pattern
      ),
      c_end,
    )
  residuals = ChunkResiduals(
    factors, constants, carries, x_leaves, mask, traces, params
  )
  return ys, jax.tree.unflatten(plan.carry_def, h_end), new_traces, residuals


def _kept_rows(plan: Plan) -> list:
  """The factor rows that are stored: the K new carry leaves and the outputs
  that are not one of them (an alias has its carry leaf's row)."""
  aliases = plan.output_aliases()
  k = plan.num_carry
  return list(range(k)) + [k + r for r, j in enumerate(aliases) if j is None]


def _kept_factors(plan: Plan, f: StepFactors) -> StepFactors:
  rows = tuple(_kept_rows(plan))
  return f._replace(
    carry=_select(f.carry, rows, axis=-3),
    post=tuple(_select(p, rows) for p in f.post),
    direct=tuple(_select(d, rows) for d in f.direct),
  )


def _kept_pattern(plan: Plan, pattern) -> tuple:
  k = plan.num_carry
  pattern = blocks.resolve(pattern, k + len(plan.output_aliases()), k)
  return tuple(pattern[r] for r in _kept_rows(plan))


def _mask_factors(f: StepFactors, m) -> StepFactors:
  """A padded step adds nothing (its identity block: `blocks.block`)."""
  zero = lambda a: jnp.where(m[..., None, None], a, 0)
  return f._replace(
    post=tuple(zero(p) for p in f.post),
    direct=tuple(zero(d) for d in f.direct),
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


def _propagate(
  plan: Plan, pre, factors: StepFactors, constants, mask, traces,
  trace_dtype, pattern,
):  # fmt: skip
  """``eps_{t0+n} = Phi E eps_{t0} + sum_s Phi_s F_s`` for the core rows.

  Rows in ``pre`` are presynaptic: their block ``Phi`` and their factors
  are the same for every neuron, so feature 0 stands for all, and they
  never read the other rows (`flax_eprop.sparse.compression`).
  """
  k = plan.num_carry
  core = _index(plan.core)
  vary = factors.carry  # (n, *batch, V, F)
  pattern = _kept_pattern(plan, pattern)
  batch, f = vary.shape[1:-2], vary.shape[-1]
  eye = jnp.eye(k, dtype=vary.dtype)[core, :, None]  # (K', K, 1)
  phi_end = jnp.broadcast_to(eye, (*batch, len(core), k, f))
  zero = jnp.zeros((*batch, len(core), f), vary.dtype)
  direct_sum = [zero] * len(factors.direct)

  def back(state, inputs):
    # phi = rows core of Phi(end, s): emits Phi_s post_s (the Phi stack is
    # never stored), sums Phi_s direct_s, carries Phi(end, s - 1)
    phi, sums = state
    v, m, posts, directs = inputs
    d = blocks.block(pattern[:k], v, constants, m)
    a = [blocks.matvec(phi, post[..., :k, :]) for post in posts]
    # per-synapse rows in full; presynaptic rows: feature 0 stands for all
    a = [(_select(x, rows), _select(x, pres)[..., 0]) for x in a]
    sums = [
      t + blocks.matvec(phi, w[..., :k, :]) for t, w in zip(sums, directs)
    ]
    return (blocks.compact_matmul(phi, d), sums), a

  rows, pres = _rows(plan, pre), tuple(pre)
  (phi_total, direct_sum), post_sums = jax.lax.scan(
    back, (phi_end, direct_sum),
    (vary, mask, factors.post, factors.direct), reverse=True,
  )  # fmt: skip
  synapse_traces, pre_traces, direct_traces, coefficients = traces
  rows, pres = _index(rows), _index(pres)
  phi_start = blocks.matmul(
    phi_total, _expand(plan, coefficients, phi_total)
  )  # (*batch, K', K', F)
  new_synapses, new_pre = [], []
  for i, ((a, a_pre), u) in enumerate(zip(post_sums, factors.pre)):
    # Phi_s post_s: a (n, *batch, K' - |S|, F), a_pre (n, *batch, |S|)
    eps = synapse_traces[i]
    # the sum over steps is one contraction over s; the presynaptic rows'
    # start traces enter it as |S| more terms (cross x ebar)
    post, pre_values = [a], [u]
    if pre:
      ebar = pre_traces[i].astype(phi_start.dtype)
      cross = phi_start[..., rows, :, :][..., pres, :]  # (*b, R, S, F)
      post.append(jnp.moveaxis(cross, -2, 0))
      pre_values.append(ebar)
    new = blocks.trace(phi_start[..., rows, :, :][..., rows, :], eps)
    new = new + jnp.einsum(
      's...if,...sm->...imf',
      jnp.concatenate(post),
      jnp.concatenate(pre_values, axis=-2),
    )
    if pre:
      lam = phi_start[..., pres, :, :][..., pres, 0]  # (*batch, S, S)
      bar = jnp.einsum('...ij,...jm->...im', lam, ebar)
      bar = bar + jnp.einsum('s...i,...sm->...im', a_pre, u)
      new_pre.append(bar.astype(trace_dtype))
    new_synapses.append(new.astype(trace_dtype))
  new_direct = []
  for eps, summed in zip(direct_traces, direct_sum):
    new = blocks.matvec(phi_start, eps) + summed
    new_direct.append(new.astype(trace_dtype))
  return new_synapses, new_pre, new_direct


def _rows(plan: Plan, pre) -> tuple[int, ...]:
  """Positions in ``plan.core`` that keep per-synapse traces."""
  return tuple(p for p in range(len(plan.core)) if p not in pre)


def _select(a, positions: tuple, axis: int = -2):
  """``a[..., positions, :]`` for static positions, as slices (no gather)."""
  axis = axis % a.ndim
  start = positions[0] if positions else 0
  if positions == tuple(range(start, start + len(positions))):
    return jax.lax.slice_in_dim(a, start, start + len(positions), axis=axis)
  return jnp.concatenate(
    [jax.lax.slice_in_dim(a, p, p + 1, axis=axis) for p in positions], axis
  )


def _index(positions) -> np.ndarray:
  return np.asarray(positions, dtype=np.int32)


def backward(
  plan: Plan, res: ChunkResiduals, ys_bar: list, pre=(), from_rest=False,
  pattern=None,
):  # fmt: skip
  """The chunk's e-prop parameter gradient and instantaneous input cotangents.

  Args:
    plan: the step's plan.
    res: residuals from `forward`.
    ys_bar: cotangents of the outputs, a list of ``(n, *batch, F)``.
    pre, from_rest, pattern: as given to `forward`.

  Returns:
    ``(params_bar, xs_bar)``: the e-prop gradient (same tree as the params)
    and, per input leaf, ``(n, *batch, ...)`` cotangents through each step's
    own path ``x_s -> y_s`` only.
  """
  k = plan.num_carry
  valid = res.mask[..., None]
  ys_bar = [jnp.where(valid, y, 0) for y in ys_bar]
  y_rows = jnp.stack(ys_bar, axis=-2)  # (n, *batch, R, F)
  vary = res.factors.carry  # (n, *batch, V, F)
  pattern = _kept_pattern(plan, pattern)
  aliases = plan.output_aliases()

  def back(lam, inputs):
    v, m, y = inputs
    block = blocks.block(pattern, v, res.constants, m)
    # an output that is a carry leaf adds its cotangent to that leaf's row
    rows = [lam[..., j, :] for j in range(k)]
    for r, j in enumerate(aliases):
      y_r = y[..., r, :].astype(lam.dtype)
      if j is None:
        rows.append(y_r)
      else:
        rows[j] = rows[j] + y_r
    g = jnp.stack(rows, axis=-2)
    return blocks.compact_rmatvec(block, g), g

  lam0 = jnp.zeros(vary.shape[1:-2] + (k, vary.shape[-1]), vary.dtype)
  lam0, g = jax.lax.scan(back, lam0, (vary, res.mask, y_rows), reverse=True)
  # The start traces of all K rows are E eps: their cotangent is E^T lam0.
  if from_rest:
    lam0 = None
  else:
    lam0 = blocks.rmatvec(_expand(plan, res.traces[3], lam0), lam0)
  params_bar = _param_grads(plan, pre, res, g, lam0)
  p_leaves = jax.tree.leaves(res.params)
  outputs = lambda h, x: plan.evaluate(p_leaves, h, x)[k:]
  xs_bar = instantaneous_cotangents(outputs, res.carries, res.xs, ys_bar)
  return params_bar, xs_bar


def _param_grads(plan: Plan, pre, res: ChunkResiduals, g, lam0):
  """The chunk's parameter gradient; ``lam0`` (the start traces'
  cotangent) is None for a chunk from rest."""
  synapse_traces, pre_traces, direct_traces, _ = res.traces
  rows, pres = _index(_rows(plan, pre)), _index(pre)
  kernel_bar = []
  for i, (s, post, u) in enumerate(
    zip(plan.synapses, res.factors.post, res.factors.pre)
  ):
    c = jnp.moveaxis(jnp.sum(g * post, axis=-2), 0, -2)  # (*batch, n, F)
    # sum over steps and batch rows as one (n * batch) matmul
    grad = u.reshape(-1, u.shape[-1]).T @ c.reshape(-1, c.shape[-1])
    if lam0 is not None:
      ebar = pre_traces[i] if pre else None
      grad = grad + _kernel_start(lam0, synapse_traces[i], ebar, rows, pres)
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
    if lam0 is not None:
      eps = eps.astype(lam0.dtype)
      d = d + jnp.sum(lam0 * eps, axis=tuple(range(lam0.ndim - 1)))
    d = d if jnp.ndim(p_leaves[i]) else d.sum()
    grads[i] = grads[i] + d.astype(grads[i].dtype)
  grads = [gr.astype(p.dtype) for gr, p in zip(grads, p_leaves)]
  return jax.tree.unflatten(p_def, grads)


def _kernel_start(lam0, eps, ebar, rows, pres):
  """The start traces' term of a kernel gradient, ``(in, F)``: per-synapse
  rows ``rows`` of ``eps`` and presynaptic rows ``pres`` of ``ebar``."""
  grad = 0
  if rows.size:
    grad = _start_term(lam0[..., rows, :], eps.astype(lam0.dtype))
  if ebar is not None:  # sum_{b, j} ebar[b, j, m] lam0[b, j, f]: a matmul
    ebar = ebar.astype(lam0.dtype).reshape(-1, ebar.shape[-1])
    lam = lam0[..., pres, :].reshape(-1, lam0.shape[-1])
    grad = grad + ebar.T @ lam
  return grad


def _start_term(lam0, eps):
  """``sum_{b, k} lam0[b, k, f] eps[b, k, m, f] -> (in, F)``.

  A sum streamed over the flattened batch: on XLA:CPU the same contraction
  written as a broadcast-multiply-and-sum (or an einsum) compiles to a
  reduction 10-40x slower than this loop of elementwise updates.
  """
  k, m, f = eps.shape[-3:]
  lam0 = lam0.reshape(-1, k, f)
  eps = eps.reshape(-1, k, m, f)

  def add(total, row):
    lam, e = row
    return total + jnp.sum(lam[:, None, :] * e, axis=0), None

  total = jnp.zeros((m, f), eps.dtype)
  return jax.lax.scan(add, total, (lam0, eps))[0]


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
