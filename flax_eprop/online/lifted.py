"""The core of `OnlineGrad`: one chunk of a cell as a lifted custom VJP.

`online_transform` is a Flax core transform built on `flax.core.lift.pack`
(as ``nn.scan`` and ``nn.custom_vjp`` are): it packs the cell's variables,
turns the cell into a pure step ``(params, carry, x) -> (carry, y)`` and runs
a chunk with one of three gradients: e-prop or RTRL, both through the chunk
contract of `flax_eprop.online.engine`, or plain autodiff through a scan
(BPTT). It can also make only the rest state (zero traces) without running
the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.core import lift

from flax_eprop.online import engine, rtrl
from flax_eprop.online.engine import StateError as StateError
from flax_eprop.sparse.compression import carry_pattern, presynaptic_rows
from flax_eprop.sparse.structure import make_plan, pure_step


def cell_step(cell, carry, x):
  """The function `online_transform` lifts: one call of the cell."""
  return cell(carry, x)


def online_transform(
  fn,
  *,
  trace_dtype,
  gradient: str,
  mode: str,
  action: str,
  where: str,
  unroll: int = 1,
  feature_axes: int = 1,
  max_bytes: int | None = None,
):
  """The core lifted transform (cf. `flax.core.lift.custom_vjp`).

  The lifted function takes ``(carry, traces, xs, mask)`` (time-major
  ``xs``) and returns ``(ys, new_carry, new_traces)``. ``action``:

  * ``'run'``: runs the chunk (``traces`` None: from zero traces);
  * ``'sequence'``: runs the chunk as a whole sequence from rest that ends
    with the call (nothing is kept): the e-prop engine then skips the start
    traces' term and the final trace update (`flax_eprop.online.eprop`);
  * ``'init'``: creates the cell's parameters if missing and runs the chunk
    forward from ``carry`` (a plain scan, no traces): its real outputs and
    final carry, with the zero traces (``init``);
  * ``'rest'``: as ``'init'`` but without running the chunk: zero outputs,
    ``carry`` unchanged (`flax_eprop.rest_state`).

  ``where`` names the layer in error messages; ``unroll`` is the plain
  scan's (BPTT mode and ``'init'``); ``feature_axes`` is the cell's
  ``num_feature_axes``; ``max_bytes`` bounds what mode ``'exact'`` may
  allocate (`flax_eprop.online.rtrl.check_memory`).
  """

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    carry, traces, xs, mask = args
    params, others = variable_groups
    if not jax.tree.leaves(params):  # init: one step creates the params
      scopes = scope_fn(variable_groups, rng_groups)
      fn(scopes, carry, xs[0])
      variable_groups = repack_fn(scopes)
      params, others = variable_groups

    def step(p, c, x):
      return fn(scope_fn((p, others), rng_groups), c, x)

    if gradient == 'bptt' and action in ('run', 'sequence'):
      ys, new_carry = _scan(step, params, carry, xs, mask, unroll)
      return (ys, new_carry, traces), variable_groups
    steps = xs.shape[0] if action in ('run', 'sequence') else 1
    sizes = dict(steps=steps, max_bytes=max_bytes, where=where)
    from_rest = action == 'sequence'
    chunk = _engine(
      step,
      params,
      carry,
      xs[0],
      trace_dtype,
      mode,
      feature_axes,
      sizes,
      from_rest,
    )
    if action == 'init':
      ys, new_carry = _scan(step, params, carry, xs, mask, unroll)
      return (ys, new_carry, chunk.init_traces()), variable_groups
    if action == 'rest':
      shapes = jax.eval_shape(step, params, carry, xs[0])[1]
      ys = jax.tree.map(
        lambda s: jnp.zeros((xs.shape[0], *s.shape), s.dtype), shapes
      )
      return (ys, carry, chunk.init_traces()), variable_groups
    if traces is None:
      traces = chunk.init_traces()
    engine.check_traces(chunk, traces, where)
    run = engine.chunk_vjp(chunk)
    return run(params, xs, carry, traces, mask), variable_groups

  return lift.pack(
    inner, ('params', True), ('params', True), (True,), name='online_grad'
  )


def _engine(
  step,
  params,
  carry,
  x,
  trace_dtype,
  mode,
  feature_axes,
  sizes,
  from_rest=False,
) -> engine.ChunkEngine:
  """The chunk engine of ``mode`` for the step at these shapes.

  ``sizes``: ``steps``, ``max_bytes`` and ``where`` for the memory check of
  mode ``'exact'``; ``from_rest``: the chunk is a whole sequence from rest
  (e-prop skips the start term and the final trace update).
  """
  if mode == 'eprop':
    plan = make_plan(step, params, carry, x)
    pre = presynaptic_rows(plan, params, carry, x)
    pattern = carry_pattern(plan, params, carry, x)
    return engine.eprop_engine(plan, trace_dtype, pre, from_rest, pattern)
  rank = jnp.ndim(jax.tree.leaves(carry)[0]) - feature_axes  # batch axes
  first = lambda tree: jax.tree.map(lambda a: a[(0,) * rank], tree)
  one = (first(carry), first(x))
  pure, out_def = _pure_step(step, params, *one)
  if feature_axes != 1:
    return _flat_features(pure, out_def, params, carry, one, trace_dtype, sizes)
  outputs = out_def.children()[1].num_leaves
  rtrl.check_memory(params, carry, outputs, trace_dtype=trace_dtype, **sizes)
  return engine.rtrl_engine(pure, out_def, params, carry, trace_dtype)


def _flat_features(pure, out_def, params, carry, one, trace_dtype, sizes):
  """The RTRL engine for a cell with several feature axes (carry and output
  leaves ``(*batch, *features)``, e.g. ``nn.ConvLSTMCell``'s ``(*batch,
  height, width, channels)``): RTRL runs on the features flattened to one
  axis; carry and outputs are given back their shapes.

  ``one`` is ``(carry, x)`` of one example, ``pure`` the step on it.
  """
  carry_def = jax.tree.structure(carry)
  c_shapes = [jnp.shape(a) for a in jax.tree.leaves(one[0])]
  y_shapes = [
    a.shape for a in jax.tree.leaves(jax.eval_shape(pure, params, *one)[1])
  ]
  batch = jnp.ndim(jax.tree.leaves(carry)[0]) - len(c_shapes[0])
  flat = lambda a: a.reshape(*a.shape[: a.ndim - len(c_shapes[0])], -1)
  shape = lambda leaves, shapes, lead: [
    a.reshape(*a.shape[:lead], *s) for a, s in zip(leaves, shapes)
  ]

  def flat_pure(p, c, x):  # one example, features flattened
    c = jax.tree.unflatten(carry_def, shape(jax.tree.leaves(c), c_shapes, 0))
    return jax.tree.map(lambda a: a.reshape(-1), pure(p, c, x))

  flat_carry = jax.tree.map(flat, carry)
  rtrl.check_memory(
    params, flat_carry, len(y_shapes), trace_dtype=trace_dtype, **sizes
  )
  inner = engine.rtrl_engine(
    flat_pure, out_def, params, flat_carry, trace_dtype
  )
  y_def = out_def.children()[1]

  def forward(params, carry, xs, mask, traces):
    ys, new_carry, new_traces, res = inner.forward(
      params, jax.tree.map(flat, carry), xs, mask, traces
    )
    ys = shape(jax.tree.leaves(ys), y_shapes, batch + 1)
    new_carry = shape(jax.tree.leaves(new_carry), c_shapes, batch)
    return (
      jax.tree.unflatten(y_def, ys),
      jax.tree.unflatten(carry_def, new_carry),
      new_traces,
      res,
    )

  def backward(res, ys_bar):
    return inner.backward(res, jax.tree.map(flat, ys_bar))

  return engine.ChunkEngine(inner.init_traces, forward, backward, inner.name)


def _scan(step, params, carry, xs, mask, unroll=1):
  """Plain forward scan (differentiable by `jax.grad`: BPTT)."""

  def body(h, inputs):
    x, m = inputs
    new_h, y = step(params, h, x)
    keep = lambda new, old: jnp.where(
      m.reshape(m.shape + (1,) * (new.ndim - m.ndim)), new, old
    )
    new_h = jax.tree.map(keep, new_h, h)
    return new_h, jax.tree.map(lambda a: keep(a, jnp.zeros_like(a)), y)

  new_carry, ys = jax.lax.scan(body, carry, (xs, mask), unroll=unroll)
  return ys, new_carry


def _pure_step(step, params, carry, x):
  """The step as a function of arrays only (its jaxpr, re-evaluated), for
  arguments shaped like ``(params, carry, x)``.

  Unlike ``step``, it builds no Flax scope, so the backward pass of a custom
  VJP may call it after the module's scopes are gone.
  """
  return pure_step(step, params, carry, x)
