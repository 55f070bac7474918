"""Axis rules of the structure pass: which axes of a traced value are the
neuron and batch axes, and which operations would mix them.

Each rule maps an op and the `Label`s of its operands to the axis labels of
its result, or raises `NonLocalError` naming the op and the user's line.
"""

from __future__ import annotations

import dataclasses

from flax_eprop.sparse._jaxpr import Op

HINT = (
  'e-prop needs neuron-local dynamics: route interactions between neurons '
  'through a parameter synapse (a matmul with a kernel param), or use '
  "mode='exact' (dense, for small networks)."
)
# Params naming axes: an op carrying one of these is not elementwise.
_AXIS_PARAMS = {
  'axes', 'axis', 'dimension', 'dimensions', 'permutation',
  'broadcast_dimensions', 'new_sizes', 'dimension_numbers', 'start_indices',
  'limit_indices', 'strides', 'padding_config', 'slice_sizes', 'jaxpr',
  'call_jaxpr', 'branches', 'body_jaxpr', 'cond_jaxpr', 'reduce_jaxpr',
}  # fmt: skip
_REDUCTIONS = {
  'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'reduce_and',
  'reduce_or', 'reduce_xor', 'argmax', 'argmin',
}  # fmt: skip


class NonLocalError(ValueError):
  """A cell step has a derivative path that e-prop cannot represent."""


@dataclasses.dataclass(frozen=True)
class Label:
  """What a value of the step depends on.

  kind: 'const' (nothing), 'param' (parameters only), 'input' (no tangent:
    the input `x`, constants), or 'tracked' (carries a tangent).
  axes: per-axis label of a tracked value: 'n' neuron, 'b' batch, None free.
  params: parameter leaves a 'param' value derives from.
  sources: where a tracked value's tangent comes from: 'carry' (the previous
    carry), 'param' (per-neuron or scalar parameters), 'synapse' (synapse
    outputs).
  """

  kind: str
  axes: tuple = ()
  params: frozenset = frozenset()
  sources: frozenset = frozenset()


def out_axes(op: Op, ins: list[Label]) -> tuple:
  """Axis labels of a tracked op's result, or `NonLocalError`."""
  rule = _AXIS_RULES.get(op.name)
  if rule is not None:
    return rule(op, ins)
  if op.name in _REDUCTIONS:
    return _reduce(op, ins)
  if _AXIS_PARAMS & set(op.params) or len(op.out_avals) != 1:
    if op.name in ('cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp'):
      return _along(op, ins, (op.params['axis'],))
    raise nonlocal_error(op, 'is not a supported operation on neuron state')
  return _elementwise(op, ins)


def nonlocal_error(op: Op, why: str) -> NonLocalError:
  return NonLocalError(f'{op.where}: `{op.name}` {why}. {HINT}')


def _tracked(ins):
  return [label for label in ins if label.kind == 'tracked']


def _merge(op: Op, columns) -> tuple:
  axes = []
  for column in columns:
    named = {a for a in column if a is not None}
    if len(named) > 1:
      raise nonlocal_error(op, 'combines the neuron axis with a batch axis')
    axes.append(named.pop() if named else None)
  return tuple(axes)


def _elementwise(op: Op, ins):
  rank = len(op.out_avals[0].shape)
  out_shape = op.out_avals[0].shape
  columns = [[] for _ in range(rank)]
  for label, aval in zip(ins, op.in_avals):
    if label.kind != 'tracked' or not label.axes:
      continue
    if len(label.axes) != rank:
      raise nonlocal_error(op, 'broadcasts neuron state across ranks')
    for d, (a, size) in enumerate(zip(label.axes, aval.shape)):
      columns[d].append(a if size == out_shape[d] else None)
  return _merge(op, columns)


def _along(op: Op, ins, axes_used):
  for label in _tracked(ins):
    if any(label.axes and label.axes[a] is not None for a in axes_used):
      raise nonlocal_error(op, 'acts along the neuron or batch axis')
  return _elementwise(op, [label for label in ins])


def _reduce(op: Op, ins):
  (label,) = _tracked(ins) or [Label('tracked')]
  axes = op.params['axes']
  if any(label.axes[a] is not None for a in axes):
    raise nonlocal_error(op, 'reduces over the neuron or batch axis')
  return tuple(a for d, a in enumerate(label.axes) if d not in axes)


def _broadcast_in_dim(op: Op, ins):
  label = ins[0]
  shape, dims = op.params['shape'], op.params['broadcast_dimensions']
  axes = [None] * len(shape)
  in_shape = op.in_avals[0].shape
  for d, out_d in enumerate(dims):
    if label.axes and in_shape[d] == shape[out_d]:
      axes[out_d] = label.axes[d]
  return tuple(axes)


def _reshape(op: Op, ins):
  (label,) = ins[:1]
  old, new = op.in_avals[0].shape, op.params['new_sizes']
  if not label.axes:
    return (None,) * len(new)
  squeeze_old = [(s, a) for s, a in zip(old, label.axes) if s != 1]
  if [s for s, _ in squeeze_old] == [s for s in new if s != 1]:
    it = iter(a for _, a in squeeze_old)
    return tuple(next(it) if s != 1 else None for s in new)
  if label.axes[-1] == 'n' and new and new[-1] == old[-1]:
    rest = 'b' if 'b' in label.axes[:-1] else None
    return (rest,) * (len(new) - 1) + ('n',)
  raise nonlocal_error(op, f'reshapes neuron state {old} -> {tuple(new)}')


def _squeeze(op: Op, ins):
  dims = set(op.params['dimensions'])
  return tuple(a for d, a in enumerate(ins[0].axes) if d not in dims)


def _transpose(op: Op, ins):
  return tuple(ins[0].axes[p] for p in op.params['permutation'])


def _concatenate(op: Op, ins):
  return _along(op, ins, (op.params['dimension'],))


def _stack(op: Op, ins):
  axis = op.params['axis']  # a new free axis, e.g. jnp.stack([v, a])
  columns = [[] for _ in op.out_avals[0].shape]
  for label in _tracked(ins):
    axes = list(label.axes) or [None] * (len(columns) - 1)
    axes.insert(axis, None)
    for column, a in zip(columns, axes):
      column.append(a)
  return _merge(op, columns)


def _dot_general(op: Op, ins):
  (contract, batch) = op.params['dimension_numbers']
  for label, c in zip(ins, contract):
    if label.kind == 'tracked' and label.axes:
      if any(label.axes[d] is not None for d in c):
        raise nonlocal_error(
          op,
          'contracts the neuron or batch axis of neuron state '
          'with a non-parameter matrix',
        )
  lhs, rhs = (
    label.axes if label.kind == 'tracked' and label.axes else None
    for label in ins
  )
  shapes = [aval.shape for aval in op.in_avals]
  free = [
    [d for d in range(len(s)) if d not in c and d not in b]
    for s, c, b in zip(shapes, contract, batch)
  ]
  get = lambda axes, d: axes[d] if axes else None
  batch_axes = [
    _merge(op, [[get(lhs, i), get(rhs, j)]])[0] for i, j in zip(*batch)
  ]
  return tuple(
    batch_axes + [get(lhs, d) for d in free[0]] + [get(rhs, d) for d in free[1]]
  )


def _slice(op: Op, ins):
  in_shape, out_shape = op.in_avals[0].shape, op.out_avals[0].shape
  cut = tuple(d for d, (a, b) in enumerate(zip(in_shape, out_shape)) if a != b)
  if ins[0].axes and any(ins[0].axes[d] is not None for d in cut):
    raise nonlocal_error(op, 'slices the neuron or batch axis')
  return ins[0].axes or (None,) * len(out_shape)


_AXIS_RULES = {
  'broadcast_in_dim': _broadcast_in_dim,
  'reshape': _reshape,
  'squeeze': _squeeze,
  'transpose': _transpose,
  'concatenate': _concatenate,
  'stack': _stack,
  'dot_general': _dot_general,
  'slice': _slice,
}
