"""The core of `OnlineGrad`: one chunk of a cell as a lifted custom VJP.

`online_transform` is a Flax core transform built on `flax.core.lift.pack`
(as ``nn.scan`` and ``nn.custom_vjp`` are): it packs the cell's variables,
turns the cell into a pure step ``(params, carry, x) -> (carry, y)`` and runs
a chunk with one of three gradients: e-prop (`flax_eprop.eligibility`), RTRL
(`flax_eprop.rtrl`) or plain autodiff through a scan (BPTT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.core import lift

from flax_eprop import eligibility, rtrl
from flax_eprop.sparse import Plan, _jaxpr, make_plan

# Name of the derived-leaf coefficients among the traces (`Plan.derived`).
DERIVED = 'derived_coefficients'


class StateError(ValueError):
  """The stored state does not fit this layer (raised as is)."""


def cell_step(cell, carry, x):
  """The function `online_transform` lifts: one call of the cell."""
  return cell(carry, x)


def online_transform(fn, *, trace_dtype, gradient: str, mode: str):
  """The core lifted transform (cf. `flax.core.lift.custom_vjp`)."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    carry, traces, xs, mask = args
    params, others = variable_groups
    if not jax.tree.leaves(params):  # init: let the cell create its params
      scopes = scope_fn(variable_groups, rng_groups)
      fn(scopes, carry, xs[0])
      variable_groups = repack_fn(scopes)
      params, others = variable_groups

    def step(p, c, x):
      return fn(scope_fn((p, others), rng_groups), c, x)

    if gradient == 'bptt':
      ys, new_carry = _scan(step, params, carry, xs, mask)
      out = (ys, new_carry, traces)
    elif mode == 'exact':
      out = _exact(step, params, carry, traces, xs, mask, trace_dtype)
    else:
      out = _online(step, params, carry, traces, xs, mask, trace_dtype)
    return out, variable_groups

  return lift.pack(
    inner, ('params', True), ('params', True), (True,), name='online_grad'
  )


def _scan(step, params, carry, xs, mask):
  """Plain forward scan (differentiable by `jax.grad`: BPTT)."""

  def body(h, inputs):
    x, m = inputs
    new_h, y = step(params, h, x)
    keep = lambda new, old: jnp.where(m[..., None], new, old)
    new_h = jax.tree.map(keep, new_h, h)
    return new_h, jax.tree.map(lambda a: keep(a, jnp.zeros_like(a)), y)

  new_carry, ys = jax.lax.scan(body, carry, (xs, mask))
  return ys, new_carry


def _online(step, params, carry, traces, xs, mask, trace_dtype):
  plan = make_plan(step, params, carry, xs[0])
  names = _trace_names(plan)
  if traces is None:
    traces = dict(
      zip(names, _flat_traces(eligibility.zero_traces(plan, trace_dtype)))
    )
  _check_traces(plan, names, traces)
  split = lambda t: _split_traces(plan, [t[n] for n in names])
  run = _chunk_vjp(
    lambda p, x, c, t, m: eligibility.forward(plan, p, c, x, m, t, trace_dtype),
    lambda res, ys_bar: eligibility.backward(plan, res, ys_bar),
  )
  ys, new_carry, new_traces = run(params, xs, carry, split(traces), mask)
  y_def = plan.out_def.children()[1]
  new_traces = dict(zip(names, _flat_traces(new_traces)))
  return jax.tree.unflatten(y_def, ys), new_carry, new_traces


def _chunk_vjp(forward, backward):
  """A chunk ``(params, xs, carry, traces, mask)`` as a `jax.custom_vjp`.

  ``forward(...) -> (ys, new_carry, new_traces, residuals)``;
  ``backward(residuals, ys_bar) -> (params_bar, [xs_bar])``. Carry, traces
  and mask get no cotangent: nothing flows back across calls.
  """

  @jax.custom_vjp
  def run(params, xs, carry, traces, mask):
    return forward(params, xs, carry, traces, mask)[:3]

  def fwd(params, xs, carry, traces, mask):
    ys, new_carry, new_traces, res = forward(params, xs, carry, traces, mask)
    return (ys, new_carry, new_traces), res

  def bwd(res, cotangents):
    params_bar, (xs_bar,) = backward(res, cotangents[0])
    return params_bar, xs_bar, None, None, None

  run.defvjp(fwd, bwd)
  return run


def _exact(step, params, carry, traces, xs, mask, trace_dtype):
  """RTRL (``mode='exact'``) over the chunk; traces ``{'rtrl': ...}``."""
  rank = jnp.ndim(jax.tree.leaves(carry)[0]) - 1  # batch axes
  first = lambda tree: jax.tree.map(lambda a: a[(0,) * rank], tree)
  pure, out_def = _pure_step(step, params, first(carry), first(xs[0]))
  shape = rtrl.trace_shape(params, carry)
  if traces is None:
    traces = {'rtrl': jnp.zeros(shape, trace_dtype)}
  got = {k: jnp.shape(v) for k, v in traces.items()}
  if got != {'rtrl': shape}:
    raise StateError(
      f"OnlineGrad: the stored 'eligibility' traces {got} do not match this "
      f"cell and input in mode='exact' (expected {{'rtrl': {shape}}}); "
      're-init the state or reset it with fe.reset_state.'
    )
  carry_def = jax.tree.structure(carry)
  run = _chunk_vjp(
    lambda p, x, c, t, m: rtrl.forward(pure, p, c, x, m, t, trace_dtype),
    lambda res, ys_bar: rtrl.backward(pure, res, ys_bar, carry_def),
  )
  ys, new_carry, new_trace = run(params, xs, carry, traces['rtrl'], mask)
  y_def = out_def.children()[1]
  return jax.tree.unflatten(y_def, ys), new_carry, {'rtrl': new_trace}


def _pure_step(step, params, carry, x):
  """The step as a function of arrays only (its jaxpr, re-evaluated), for
  arguments shaped like ``(params, carry, x)``.

  Unlike ``step``, it builds no Flax scope, so the backward pass of a custom
  VJP may call it after the module's scopes are gone.
  """
  program, out_def, _ = _jaxpr.trace(step, params, carry, x)

  def pure(p, c, x):
    leaves = [*jax.tree.leaves(p), *jax.tree.leaves(c), *jax.tree.leaves(x)]
    return jax.tree.unflatten(out_def, _jaxpr.evaluate(program, leaves))

  return pure, out_def


def _trace_names(plan: Plan) -> list[str]:
  """Names of the traces: the path of the parameter(s) each belongs to."""
  paths = jax.tree_util.tree_flatten_with_path(
    jax.tree.unflatten(plan.param_def, range(plan.param_def.num_leaves))
  )[0]
  leaf_names = [
    '/'.join(
      str(k.key)
      for k in path
      if isinstance(k, jax.tree_util.DictKey) and k.key != 'params'
    )
    for path, _ in paths
  ]
  names = [
    '+'.join(leaf_names[i] for i in sorted(s.params)) for s in plan.synapses
  ]
  names += [leaf_names[i] for i in plan.direct_params]
  names += [DERIVED] * bool(plan.derived)
  seen: dict[str, int] = {}
  for i, name in enumerate(names):
    seen[name] = seen.get(name, 0) + 1
    if seen[name] > 1:
      names[i] = f'{name}#{seen[name] - 1}'
  return names


def _flat_traces(traces) -> list:
  return [leaf for group in traces for leaf in group]


def _split_traces(plan: Plan, flat: list):
  s, p = len(plan.synapses), len(plan.direct_params)
  return flat[:s], flat[s : s + p], flat[s + p :]


def _check_traces(plan: Plan, names, traces) -> None:
  expected = dict(zip(names, _flat_traces(eligibility.trace_shapes(plan))))
  got = {k: jnp.shape(v) for k, v in traces.items()}
  if got != expected:
    raise StateError(
      f"OnlineGrad: the stored 'eligibility' traces {got} do not match this "
      f'cell and input (expected {expected}); re-init the state or reset it '
      'with fe.reset_state.'
    )
