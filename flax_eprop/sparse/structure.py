"""Structure pass: which derivative paths of a cell step exist, and their kind.

One walk over the flattened jaxpr of ``step(params, carry, x) -> (carry, y)``
labels every value with what it depends on and, for values that carry a
tangent, which of its axes is the neuron axis (``'n'``) and which are batch
axes (``'b'``). From the labels it finds

* *synapses*: a ``dot_general`` of a parameter-only operand (the kernel, after
  any masking or casting) with a non-parameter operand (the presynaptic
  activity). Their Jacobian is a Kronecker product. A synapse whose
  presynaptic operand derives from the carry is *recurrent*: e-prop drops the
  path through it;
* *direct parameters*: parameters that enter the neuron dynamics elementwise
  (a bias, a learnable ``tau``); they must have shape ``()`` or
  ``(features,)``;
* *non-local operations*: anything that mixes neurons (or batch rows)
  outside a synapse. These raise `NonLocalError` naming the op and the line of
  the user's cell.

No numbers are computed here: the result, a `Plan`, is reused every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from flax_eprop.sparse import _jaxpr
from flax_eprop.sparse._jaxpr import Const, Op, Program

_HINT = (
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
  carry: whether a tracked value depends on the previous carry.
  """

  kind: str
  axes: tuple = ()
  params: frozenset = frozenset()
  carry: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Synapse:
  """A ``dot_general`` of a kernel ``W`` (param-only) with presynaptic ``u``.

  Attributes:
    op: the ``dot_general`` op.
    kernel_operand: 0 or 1, which operand is ``W``.
    kernel_in_axis: the axis of ``W`` that is contracted (its ``in`` axis).
    pre_in_axis: the axis of ``u`` that is contracted.
    recurrent: whether ``u`` derives from the carry (dropped by e-prop).
    in_features: size of the contracted axis.
    params: the parameter leaves ``W`` is computed from.
  """

  op: Op
  kernel_operand: int
  kernel_in_axis: int
  pre_in_axis: int
  recurrent: bool
  in_features: int
  params: frozenset


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Everything the numbers pass needs, found once per trace.

  Attributes:
    program: the flattened step over ``(*param_leaves, *carry_leaves,
      *x_leaves)`` returning ``(*new_carry_leaves, *y_leaves)``.
    param_def, carry_def, x_def, out_def: tree definitions.
    num_carry: K, the number of carry leaves; num_out: K + R.
    batch_shape, features: carry leaves are ``(*batch_shape, features)``.
    synapses: the synapses in program order.
    direct_params: indices of parameter leaves entering the dynamics
      elementwise (each of shape ``()`` or ``(features,)``).
    kernel_params: indices of parameter leaves used only through kernels.
  """

  program: Program
  param_def: Any
  carry_def: Any
  x_def: Any
  out_def: Any
  num_carry: int
  num_out: int
  batch_shape: tuple
  features: int
  synapses: tuple[Synapse, ...]
  direct_params: tuple[int, ...]
  kernel_params: tuple[int, ...]

  def synapse_of(self, op: Op) -> int | None:
    for i, s in enumerate(self.synapses):
      if s.op is op:
        return i
    return None


def make_plan(step: Callable, params, carry, x) -> Plan:
  """Traces ``step(params, carry, x) -> (new_carry, y)`` and analyses it."""
  p_leaves, p_def = jax.tree.flatten(params)
  c_leaves, c_def = jax.tree.flatten(carry)
  x_leaves, x_def = jax.tree.flatten(x)
  batch_shape, features = _check_carry(c_leaves)
  n_p, n_c = len(p_leaves), len(c_leaves)

  def flat_step(*leaves):
    p = jax.tree.unflatten(p_def, leaves[:n_p])
    c = jax.tree.unflatten(c_def, leaves[n_p : n_p + n_c])
    xs = jax.tree.unflatten(x_def, leaves[n_p + n_c :])
    return step(p, c, xs)

  program, out_def, out_shapes = _jaxpr.trace(
    flat_step, *p_leaves, *c_leaves, *x_leaves
  )
  neuron = ('b',) * len(batch_shape) + ('n',)
  labels = [Label('param', params=frozenset([i])) for i in range(n_p)]
  labels += [Label('tracked', neuron, carry=True)] * n_c
  labels += [Label('input')] * len(x_leaves)
  walk = _Walk(features)
  outs = walk.run(program, labels)
  _check_outputs(outs, out_shapes, n_c, batch_shape, features)
  direct = walk.direct
  both = direct & walk.kernel
  if both:
    raise NonLocalError(
      f'Parameter leaves {_param_paths(p_def, both)} are used both as a '
      'synapse kernel and elsewhere in the dynamics; e-prop needs each '
      'parameter to be either a kernel or a per-neuron/scalar parameter.'
    )
  for i in sorted(direct):
    shape = np.shape(p_leaves[i])
    if shape not in ((), (features,)):
      raise NonLocalError(
        f'Parameter {_param_paths(p_def, {i})} of shape {shape} enters the '
        'neuron dynamics outside a synapse; expected shape () or '
        f'({features},) (one value per neuron). {_HINT}'
      )
  return Plan(
    program=program,
    param_def=p_def,
    carry_def=c_def,
    x_def=x_def,
    out_def=out_def,
    num_carry=n_c,
    num_out=len(program.outvars),
    batch_shape=batch_shape,
    features=features,
    synapses=tuple(walk.synapses),
    direct_params=tuple(sorted(direct)),
    kernel_params=tuple(sorted(walk.kernel)),
  )


def _check_carry(c_leaves):
  if not c_leaves:
    raise ValueError(
      'carry: the cell has no state leaves; expected at least one.'
    )
  shapes = {np.shape(c) for c in c_leaves}
  if len(shapes) != 1 or len(next(iter(shapes))) < 1:
    raise ValueError(
      f'carry: every state leaf must have the same shape (*batch, features); '
      f'got shapes {sorted(shapes)}.'
    )
  for c in c_leaves:
    dtype = jax.numpy.result_type(c)
    if not np.issubdtype(dtype, np.floating):
      raise TypeError(
        f'carry: state leaves must be floating point, got dtype '
        f'{dtype}; store counters as floats.'
      )
  shape = next(iter(shapes))
  return tuple(shape[:-1]), shape[-1]


def _check_outputs(labels, out_shapes, n_c, batch_shape, features):
  want = (*batch_shape, features)
  for i, (label, out) in enumerate(zip(labels, out_shapes)):
    what = 'new carry' if i < n_c else 'output y'
    shape = out.shape
    if tuple(shape) != want:
      raise ValueError(
        f'step: every leaf of the {what} must have shape {want} '
        f'(*batch, features); leaf {i} has shape {tuple(shape)}.'
      )
    if label.kind == 'tracked' and label.axes[-1] != 'n':
      raise NonLocalError(
        f'step: leaf {i} of the {what} does not keep the neuron axis last '
        f'(axis labels {label.axes}). {_HINT}'
      )


def _param_paths(p_def, indices):
  paths = [
    jax.tree_util.keystr(k)
    for k, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree.unflatten(p_def, list(range(p_def.num_leaves)))
    )[0]
  ]
  return ', '.join(paths[i] for i in sorted(indices))


class _Walk:
  """Labels every value of a program (see `Label`) and collects synapses."""

  def __init__(self, features: int, inside: str | None = None):
    self.features = features
    self.inside = inside  # name of an enclosing custom_jvp, if any
    self.synapses: list[Synapse] = []
    self.direct: set[int] = set()
    self.kernel: set[int] = set()

  def run(self, program: Program, in_labels) -> list[Label]:
    env = {i: Label('const') for i in program.consts}
    env.update(zip(program.invars, in_labels))
    read = lambda a: Label('const') if isinstance(a, Const) else env[a]
    for op in program.ops:
      outs = self.visit(op, [read(a) for a in op.ins])
      env.update(zip(op.outs, outs))
    return [read(a) for a in program.outvars]

  def visit(self, op: Op, ins: list[Label]) -> list[Label]:
    kinds = {label.kind for label in ins}
    if op.name in _jaxpr.CUSTOM_VJP:
      raise NonLocalError(
        f'{op.where}: the cell uses jax.custom_vjp, and forward-mode '
        'differentiation cannot pass through it. Define spike functions with '
        'jax.custom_jvp (see flax_eprop.surrogates).'
      )
    if kinds <= {'const', 'param'}:  # the parameter-only prelude
      params = frozenset().union(*(label.params for label in ins))
      kind = 'param' if params else 'const'
      return [Label(kind, params=params)] * len(op.outs)
    if op.name == 'dot_general' and 'param' in kinds:
      return [self.synapse(op, ins)]
    if kinds <= {'const', 'input'}:
      return [Label('input')] * len(op.outs)
    ins = [self.as_tracked(op, i, label) for i, label in enumerate(ins)]
    carry = any(label.carry for label in ins)
    if op.name == _jaxpr.CUSTOM_JVP:
      inner = _Walk(self.features, inside=op.params.get('name', 'custom_jvp'))
      outs = inner.run(op.body(), ins)
      self.direct |= inner.direct
      return outs
    axes = _out_axes(op, ins)
    return [Label('tracked', axes, carry=carry)] * len(op.outs)

  def as_tracked(self, op: Op, i: int, label: Label) -> Label:
    """A parameter value entering the dynamics becomes a tangent source."""
    if label.kind != 'param':
      return label
    self.direct |= label.params
    shape = op.in_avals[i].shape
    if shape and shape[-1] not in (1, self.features):
      raise NonLocalError(
        f'{op.where}: `{op.name}` mixes a parameter value of shape {shape} '
        f'into the neuron dynamics; expected () or (..., {self.features}) '
        f'with one value per neuron on the last axis. {_HINT}'
      )
    last = 'n' if shape and shape[-1] == self.features != 1 else None
    axes = (None,) * (len(shape) - 1) + (last,) if shape else ()
    return Label('tracked', axes)

  def synapse(self, op: Op, ins: list[Label]) -> Label:
    k = 0 if ins[0].kind == 'param' else 1
    kernel, pre = ins[k], ins[1 - k]
    (contract, batch) = op.params['dimension_numbers']
    w_shape = op.in_avals[k].shape
    if self.inside is not None:
      raise NonLocalError(
        f'{op.where}: a synapse (matmul with a parameter) inside the '
        f'custom_jvp function `{self.inside}` is not supported.'
      )
    if len(w_shape) != 2 or len(contract[k]) != 1 or any(batch):
      raise NonLocalError(
        f'{op.where}: `dot_general` with a parameter of shape {w_shape} is '
        'not a synapse of the supported form `u @ W` with W of shape '
        '(in, features) contracting one axis.'
      )
    if pre.kind == 'tracked' and not pre.carry:
      raise NonLocalError(
        f'{op.where}: the presynaptic input of this synapse depends on '
        'another synapse or on a per-neuron parameter; e-prop supports one '
        'synapse between the input (or the previous carry) and the neurons.'
      )
    self.kernel |= kernel.params
    w_in = contract[k][0]
    self.synapses.append(
      Synapse(
        op=op,
        kernel_operand=k,
        kernel_in_axis=w_in,
        pre_in_axis=contract[1 - k][0],
        recurrent=pre.kind == 'tracked',
        in_features=w_shape[w_in],
        params=kernel.params,
      )
    )
    pre_axes = ['b'] * (len(op.in_avals[1 - k].shape) - 1)
    w_axes = ['n']
    axes = pre_axes + w_axes if k == 1 else w_axes + pre_axes
    return Label('tracked', tuple(axes))


def _out_axes(op: Op, ins: list[Label]) -> tuple:
  """Axis labels of a tracked op's result, or `NonLocalError`."""
  rule = _AXIS_RULES.get(op.name)
  if rule is not None:
    return rule(op, ins)
  if op.name in _REDUCTIONS:
    return _reduce(op, ins)
  if _AXIS_PARAMS & set(op.params) or len(op.out_avals) != 1:
    if op.name in ('cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp'):
      return _along(op, ins, (op.params['axis'],))
    raise _nonlocal(op, 'is not a supported operation on neuron state')
  return _elementwise(op, ins)


def _nonlocal(op: Op, why: str) -> NonLocalError:
  return NonLocalError(f'{op.where}: `{op.name}` {why}. {_HINT}')


def _tracked(ins):
  return [label for label in ins if label.kind == 'tracked']


def _merge(op: Op, columns) -> tuple:
  axes = []
  for column in columns:
    named = {a for a in column if a is not None}
    if len(named) > 1:
      raise _nonlocal(op, 'combines the neuron axis with a batch axis')
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
      raise _nonlocal(op, 'broadcasts neuron state across ranks')
    for d, (a, size) in enumerate(zip(label.axes, aval.shape)):
      columns[d].append(a if size == out_shape[d] else None)
  return _merge(op, columns)


def _along(op: Op, ins, axes_used):
  for label in _tracked(ins):
    if any(label.axes and label.axes[a] is not None for a in axes_used):
      raise _nonlocal(op, 'acts along the neuron or batch axis')
  return _elementwise(op, [label for label in ins])


def _reduce(op: Op, ins):
  (label,) = _tracked(ins) or [Label('tracked')]
  axes = op.params['axes']
  if any(label.axes[a] is not None for a in axes):
    raise _nonlocal(op, 'reduces over the neuron or batch axis')
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
  raise _nonlocal(op, f'reshapes neuron state {old} -> {tuple(new)}')


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
        raise _nonlocal(
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
    raise _nonlocal(op, 'slices the neuron or batch axis')
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
