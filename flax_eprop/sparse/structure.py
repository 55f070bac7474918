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
from flax_eprop.sparse.axes import HINT, Label, NonLocalError, out_axes


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
    core: carry leaves that need eligibility traces of their own.
    derived: carry leaves that are a function of the core leaves' NEW values
      (and the input) in the same step, like the spike ``z_t = H(v_t -
      A_t)``: their traces are ``C_t`` times the core traces, with ``C_t``
      the per-neuron derivative (DESIGN.md, "Derived components").
    core_outputs: the program ids of the core leaves' new values (where the
      numbers pass probes ``C_t``); empty when nothing is derived.
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
  core: tuple[int, ...]
  derived: tuple[int, ...]
  core_outputs: tuple[int, ...]

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
  labels += [Label('tracked', neuron, sources=frozenset({'carry'}))] * n_c
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
        f'({features},) (one value per neuron). {HINT}'
      )
  core, derived = _derived_leaves(program, n_p, n_c)
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
    core=core,
    derived=derived,
    core_outputs=tuple(program.outvars[i] for i in core) if derived else (),
  )


def _derived_leaves(program: Program, n_p: int, n_c: int):
  """Splits the carry leaves into (core, derived); see `Plan`.

  A new-carry leaf is derived when its computation, cut at the new values of
  the other (core) leaves, reads no previous carry and no parameter. The
  split is only used when no core leaf's new value reads another's (then the
  probes at the core values give partial derivatives).
  """
  producer = {o: op for op in program.ops for o in op.outs}
  roots = set(program.invars[: n_p + n_c])  # params and previous carry
  # The new value of each carry leaf, None unless an op computes it.
  outs = [
    o if not isinstance(o, Const) and o in producer else None
    for o in program.outvars[:n_c]
  ]

  def reads(start, stops):
    """Ids reached backwards from ``start`` without passing ``stops``."""
    seen, todo = set(), [start]
    while todo:
      i = todo.pop()
      if isinstance(i, Const) or i in seen:
        continue
      seen.add(i)
      if i not in stops and i in producer:
        todo.extend(producer[i].ins)
    return seen

  core = list(range(n_c))
  for i, o in enumerate(outs):
    if o is None or outs.count(o) > 1:
      continue
    stops = {outs[j] for j in core if j != i and outs[j] is not None}
    if stops and not (reads(o, stops) - stops) & roots:
      core.remove(i)
  core_ids = {outs[j] for j in core if outs[j] is not None}
  if any(
    reads(outs[j], set()) & (core_ids - {outs[j]})
    for j in core
    if outs[j] is not None
  ):
    return tuple(range(n_c)), ()
  derived = tuple(i for i in range(n_c) if i not in core)
  return tuple(core), derived


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
        f'(axis labels {label.axes}). {HINT}'
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
    sources = frozenset().union(*(label.sources for label in ins))
    if op.name == _jaxpr.CUSTOM_JVP:
      inner = _Walk(self.features, inside=op.params.get('name', 'custom_jvp'))
      outs = inner.run(op.body(), ins)
      self.direct |= inner.direct
      return outs
    axes = out_axes(op, ins)
    return [Label('tracked', axes, sources=sources)] * len(op.outs)

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
        f'with one value per neuron on the last axis. {HINT}'
      )
    last = 'n' if shape and shape[-1] == self.features != 1 else None
    axes = (None,) * (len(shape) - 1) + (last,) if shape else ()
    return Label('tracked', axes, sources=frozenset({'param'}))

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
    if pre.kind == 'tracked' and pre.sources - {'carry'}:
      raise NonLocalError(
        f'{op.where}: the presynaptic input of this synapse depends on '
        'another synapse or on a per-neuron/scalar parameter; e-prop supports '
        'one synapse between the input (or a function of the previous carry) '
        'and the neurons.'
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
    return Label('tracked', tuple(axes), sources=frozenset({'synapse'}))
