"""The chunk-gradient contract shared by the e-prop and RTRL engines.

A gradient engine runs one chunk of a cell step and defines the chunk's
gradient. Like an optax transform (a pair ``init``/``update`` over a small
state), an engine is a `ChunkEngine` of three pure functions over its
*traces*, the per-layer state besides the carry that the layer keeps in the
``'eligibility'`` collection:

* ``init_traces() -> traces``: the traces at rest (zeros);
* ``forward(params, carry, xs, mask, traces) -> (ys, new_carry, new_traces,
  residuals)``: the chunk's outputs, the carry and traces after it, and what
  the backward pass needs;
* ``backward(residuals, ys_bar) -> (params_bar, xs_bar)``: the parameter
  gradient of the chunk and the inputs' cotangents.

`chunk_vjp` turns an engine into one `jax.custom_vjp` per chunk; the lifted
transform (`flax_eprop.online.lifted`) uses it for both engines:

* `eprop_engine`: compressed e-prop traces (`flax_eprop.online.eprop`), a
  readable pytree keyed by the parameters' paths (`eprop_layout`);
* `rtrl_engine`: real-time recurrent learning (`flax_eprop.online.rtrl`),
  traces ``{'rtrl': (*batch, K * features, P)}``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from flax_eprop.online import eprop, rtrl

Traces = Any  # a pytree of arrays; its layout is the engine's


class StateError(ValueError):
  """The stored state does not fit this layer (raised as is)."""


class ChunkEngine(NamedTuple):
  """The gradient of one chunk, as three pure functions.

  Shapes: ``params`` the cell's parameters; ``carry`` a pytree of ``(*batch,
  features)`` leaves; ``xs`` time-major inputs, a pytree of ``(n, *batch,
  ...)`` leaves; ``mask: (n, *batch)`` bool (False: a padded step, which
  changes nothing and outputs zeros); ``ys`` the outputs, a pytree of ``(n,
  *batch, features)`` leaves.

  Attributes:
    init_traces: ``() -> traces``, the traces at rest.
    forward: ``(params, carry, xs, mask, traces) -> (ys, new_carry,
      new_traces, residuals)``.
    backward: ``(residuals, ys_bar) -> (params_bar, xs_bar)``: the chunk's
      gradient (a tree like ``params``) and the cotangents of ``xs``.
    name: the engine's name, for error messages.
  """

  init_traces: Callable[[], Traces]
  forward: Callable[..., tuple[Any, Any, Traces, Any]]
  backward: Callable[[Any, Any], tuple[Any, Any]]
  name: str


def chunk_vjp(engine: ChunkEngine) -> Callable:
  """``run(params, xs, carry, traces, mask) -> (ys, new_carry, new_traces)``
  with the engine's gradient as a `jax.custom_vjp`.

  Parameters and inputs get the engine's cotangents; the carry, the traces
  and the mask get none: nothing flows back across calls.
  """

  @jax.custom_vjp
  def run(params, xs, carry, traces, mask):
    return engine.forward(params, carry, xs, mask, traces)[:3]

  def fwd(params, xs, carry, traces, mask):
    ys, new_carry, new_traces, res = engine.forward(
      params, carry, xs, mask, traces
    )
    return (ys, new_carry, new_traces), res

  def bwd(res, cotangents):
    params_bar, xs_bar = engine.backward(res, cotangents[0])
    return params_bar, xs_bar, None, None, None

  run.defvjp(fwd, bwd)
  return run


def check_traces(engine: ChunkEngine, traces: Traces, where: str) -> None:
  """Raises `StateError` unless ``traces`` has the engine's layout."""
  expected = jax.eval_shape(engine.init_traces)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  got_def, want_def = jax.tree.structure(traces), jax.tree.structure(expected)
  if got_def == want_def and shapes(traces) == shapes(expected):
    return
  raise StateError(
    f"{where}: the stored 'eligibility' traces do not fit this cell and "
    f'input ({engine.name} engine). Expected {_describe(expected)}, got '
    f'{_describe(traces)}. Make a state for this model and batch with '
    'fe.rest_state(model.apply, params, xs) (or model.init).'
  )


def _describe(tree) -> str:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves:
    return 'no traces'
  return ', '.join(
    f'{jax.tree_util.keystr(p)}: {tuple(jnp.shape(a))}' for p, a in leaves
  )


# e-prop


def eprop_layout(plan) -> tuple[list[str], list[str]]:
  """The keys of the e-prop traces: ``(synapse keys, direct keys)``.

  A synapse is keyed by the path of its kernel parameter (``'input/kernel'``;
  the paths of all its parameters, joined by ``', '``, when the kernel is
  computed from several); a per-neuron or scalar parameter by its path
  (``'tau_mem'``). A key used twice (one kernel in two synapses) gets a
  suffix ``' (2)'``, ``' (3)'``...
  """
  paths = jax.tree_util.tree_flatten_with_path(
    jax.tree.unflatten(plan.param_def, range(plan.param_def.num_leaves))
  )[0]
  leaf = [
    '/'.join(
      str(k.key)
      for k in path
      if isinstance(k, jax.tree_util.DictKey) and k.key != 'params'
    )
    for path, _ in paths
  ]
  synapses = [
    ', '.join(leaf[i] for i in sorted(s.params)) for s in plan.synapses
  ]
  direct = [leaf[i] for i in plan.direct_params]
  return _unique(synapses), _unique(direct)


def _unique(names: list[str]) -> list[str]:
  seen: dict[str, int] = {}
  out = []
  for name in names:
    seen[name] = seen.get(name, 0) + 1
    out.append(name if seen[name] == 1 else f'{name} ({seen[name]})')
  return out


def eprop_engine(
  plan, trace_dtype, pre: tuple = (), from_rest: bool = False, pattern=None
) -> ChunkEngine:
  """The chunked e-prop engine (`flax_eprop.online.eprop`) for ``plan``.

  Its traces are a dict (groups with nothing in them are left out)::

    {'synapses':    {'input/kernel': (*batch, K' - |S|, in, features), ...},
     'presynaptic': {'input/kernel': (*batch, |S|, in), ...},
     'direct':      {'tau_mem': (*batch, K', features), ...},
     'derived':     (*batch, K - K', K', features)}

  ``'synapses'`` and ``'direct'`` hold the eligibility traces of the K'
  *core* carry leaves w.r.t. each synapse kernel and each per-neuron or
  scalar parameter (keys: `eprop_layout`). The core rows ``pre``
  (positions in ``plan.core``, `flax_eprop.sparse.compression`) have the
  same trace for every post-neuron: they are kept once per presynaptic
  neuron under ``'presynaptic'``, and ``'synapses'`` holds the other core
  rows (left out when there are none: LIF). ``'derived'`` is not a trace:
  it holds the coefficients ``C`` of the last step that express the traces
  of the derived carry leaves (the spike ``z_t``, a function of the core
  leaves' new values) through the core ones, ``eps_derived = C eps_core``;
  present only when the cell has derived leaves.

  With ``from_rest`` every chunk is a whole sequence from rest (zero
  traces) whose traces are not kept: no start term, no final trace update;
  the returned traces are the (zero) ones given.

  ``pattern`` says which entries of the step's local Jacobian block vary
  (`flax_eprop.sparse.compression.carry_pattern`; None: all): only those
  are stored per step.
  """
  synapse_keys, direct_keys = eprop_layout(plan)
  shapes = eprop.trace_shapes(plan, pre)
  per_synapse = len(plan.core) > len(pre)

  def to_engine(traces):  # the pytree -> eprop's four groups
    if per_synapse:
      synapses = [traces['synapses'][k] for k in synapse_keys]
    else:  # no per-synapse rows: empty arrays
      synapses = [jnp.zeros(s, trace_dtype) for s in shapes[0]]
    return (
      synapses,
      [traces['presynaptic'][k] for k in synapse_keys] if pre else [],
      [traces['direct'][k] for k in direct_keys],
      [traces['derived']] if 'derived' in traces else [],
    )

  def to_tree(synapses, presynaptic, direct, derived):
    tree = {}
    if synapse_keys and per_synapse:
      tree['synapses'] = dict(zip(synapse_keys, synapses))
    if synapse_keys and pre:
      tree['presynaptic'] = dict(zip(synapse_keys, presynaptic))
    if direct_keys:
      tree['direct'] = dict(zip(direct_keys, direct))
    if derived:
      tree['derived'] = derived[0]
    return tree

  def init_traces():
    return to_tree(*eprop.zero_traces(plan, trace_dtype, pre))

  def forward(params, carry, xs, mask, traces):
    ys, new_carry, new_traces, res = eprop.forward(
      plan, params, carry, xs, mask, to_engine(traces), trace_dtype, pre,
      from_rest, pattern,
    )  # fmt: skip
    y_def = plan.out_def.children()[1]
    return jax.tree.unflatten(y_def, ys), new_carry, to_tree(*new_traces), res

  def backward(res, ys_bar):
    params_bar, (xs_bar,) = eprop.backward(
      plan, res, jax.tree.leaves(ys_bar), pre, from_rest, pattern
    )
    return params_bar, xs_bar

  return ChunkEngine(init_traces, forward, backward, 'e-prop')


# RTRL


def rtrl_engine(pure, out_def, params, carry, trace_dtype) -> ChunkEngine:
  """The RTRL engine (`flax_eprop.online.rtrl`).

  ``pure(params, carry, x) -> (new_carry, y)`` is the step on ONE example
  (carry leaves ``(features,)``), ``out_def`` its output tree. Traces:
  ``{'rtrl': (*batch, K * features, P)}``, the sensitivity of the carry
  (K leaves stacked) to the P parameters raveled by
  `jax.flatten_util.ravel_pytree`.
  """
  shape = rtrl.trace_shape(params, carry)
  carry_def = jax.tree.structure(carry)
  y_def = out_def.children()[1]

  def init_traces():
    return {'rtrl': jnp.zeros(shape, trace_dtype)}

  def forward(params, carry, xs, mask, traces):
    ys, new_carry, new_trace, res = rtrl.forward(
      pure, params, carry, xs, mask, traces['rtrl'], trace_dtype
    )
    return jax.tree.unflatten(y_def, ys), new_carry, {'rtrl': new_trace}, res

  def backward(res, ys_bar):
    params_bar, (xs_bar,) = rtrl.backward(
      pure, res, jax.tree.leaves(ys_bar), carry_def
    )
    return params_bar, xs_bar

  return ChunkEngine(init_traces, forward, backward, 'RTRL')
