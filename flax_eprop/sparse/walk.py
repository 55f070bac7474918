"""The labelling walk of the structure pass (see `flax_eprop.sparse.structure`).

It labels every value of the flattened step with what it depends on and,
for values with a tangent (or parameter values), where their neuron and
batch axes are, asking the locality table (`flax_eprop.sparse.rules`) about
every operation; it collects the synapses and the parameters that enter the
dynamics directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flax_eprop.sparse import _jaxpr, rules
from flax_eprop.sparse._jaxpr import Const, Op, Program
from flax_eprop.sparse.rules import HINT, NonLocalError


@dataclasses.dataclass(frozen=True)
class Label:
  """What a value of the step depends on.

  kind: 'const' (nothing), 'param' (parameters only), 'input' (no tangent:
    the input `x`, constants, integers, stop-gradiented values), or
    'tracked' (carries a tangent).
  axes: per-axis label of a tracked or parameter value: 'n' neuron, 'b'
    batch, None free (see `rules`); empty when unknown (all free).
  params: parameter leaves a 'param' value derives from.
  sources: where a tracked value's tangent comes from: 'carry' (the previous
    carry), 'param' (per-neuron or scalar parameters), 'synapse' (synapse
    outputs).
  mixed: the refusal of an op that mixed this value across neurons, raised
    if the value reaches the dynamics (None: neuron-local so far).
  """

  kind: str
  axes: tuple = ()
  params: frozenset = frozenset()
  sources: frozenset = frozenset()
  mixed: NonLocalError | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Synapse:
  """A ``dot_general`` of a kernel ``W`` (param-only) with presynaptic ``u``.

  Attributes:
    op: the ``dot_general`` op.
    kernel_operand: 0 or 1, which operand is ``W``.
    kernel_in_axis: the axis of ``W`` that is contracted (its ``in`` axis).
    pre_in_axis: the axis of ``u`` that is contracted.
    in_features: size of the contracted axis.
    params: the parameter leaves ``W`` is computed from.
  """

  op: Op
  kernel_operand: int
  kernel_in_axis: int
  pre_in_axis: int
  in_features: int
  params: frozenset


class Walk:
  """Labels every value of a program (see `Label`) and collects synapses.

  Each op is looked up in `rules.RULES`; a refusal taints the op's results
  (`Label.mixed`) and is raised when they reach the dynamics. A ``strict``
  walk (of a call's or loop's body) cuts no tangent: the body of a
  ``custom_jvp`` is the primal function, whose comparisons stand for the
  surrogate derivative of its JVP rule.
  """

  def __init__(self, features: int, strict: bool = False):
    self.features = features
    self.strict = strict
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
    if op.name in rules.IMMEDIATE:
      rules.out_axes(op, [], self.body)  # raises
    kinds = {label.kind for label in ins}
    if kinds <= {'const', 'param'}:  # the parameter-only prelude
      params = frozenset().union(*(label.params for label in ins))
      if not params:
        return [Label('const')] * len(op.outs)
      return self.apply(op, ins, 'param', params=params)
    if op.name == 'dot_general' and 'param' in kinds:
      return [self.synapse(op, ins)]
    if kinds <= {'const', 'input'}:
      return [Label('input')] * len(op.outs)
    ins = [
      self.enter(label, op.in_avals[i].shape, f'{op.where}: `{op.name}`')
      for i, label in enumerate(ins)
    ]
    sources = frozenset().union(*(label.sources for label in ins))
    return self.apply(op, ins, 'tracked', sources=sources)

  def apply(self, op: Op, ins: list[Label], kind: str, **fields) -> list:
    """The table's labels for `op`'s results; a refusal is kept in them."""
    mixed = next((label.mixed for label in ins if label.mixed), None)
    axes = [_axes(label, op.in_avals[i]) for i, label in enumerate(ins)]
    try:
      out = rules.out_axes(op, axes, self.body)
    except NonLocalError as error:
      out, mixed = [()] * len(op.outs), mixed or error
    keep = self.strict or op.name not in rules.CUTS
    return [
      Label(kind, a, mixed=mixed, **fields)
      if keep and (self.strict or np.issubdtype(aval.dtype, np.inexact))
      else Label('const' if kind == 'param' else 'input')
      for a, aval in zip(out, op.out_avals)
    ]

  def body(self, op: Op, jaxpr, axes: list) -> list:
    """Walks a call's or loop's body (`rules.call`, `rules.scan`...) with
    every operand tracked; returns its results' labels, or raises."""
    program = _jaxpr.flatten(jaxpr, op.where)
    inner = Walk(self.features, strict=True)
    outs = inner.run(program, [Label('tracked', a) for a in axes])
    for label in outs:
      if label.mixed is not None:
        raise label.mixed
    return [_axes(o, a) for o, a in zip(outs, _jaxpr.out_avals(jaxpr))]

  def enter(self, label: Label, shape, what: str) -> Label:
    """A parameter value entering the dynamics becomes a tangent source."""
    if label.kind != 'param':
      return label
    if label.mixed is not None:
      raise label.mixed
    self.direct |= label.params
    shape = tuple(shape)
    if shape and shape[-1] not in (1, self.features):
      raise NonLocalError(
        f'{what} mixes a parameter value of shape {shape} into the neuron '
        f'dynamics; expected () or (..., {self.features}) with one value per '
        f'neuron on the last axis. {HINT}'
      )
    axes = label.axes if len(label.axes) == len(shape) else ()
    return Label('tracked', axes, sources=frozenset({'param'}))

  def synapse(self, op: Op, ins: list[Label]) -> Label:
    k = 0 if ins[0].kind == 'param' else 1
    kernel, pre = ins[k], ins[1 - k]
    (contract, batch) = op.params['dimension_numbers']
    w_shape = op.in_avals[k].shape
    if len(w_shape) != 2 or len(contract[k]) != 1 or any(batch):
      raise NonLocalError(
        f'{op.where}: `dot_general` with a parameter of shape {w_shape} is '
        'not a synapse of the supported form `u @ W` with W of shape '
        '(in, features) contracting one axis.'
      )
    if pre.mixed is not None:
      raise pre.mixed
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
        in_features=w_shape[w_in],
        params=kernel.params,
      )
    )
    pre_axes = ['b'] * (len(op.in_avals[1 - k].shape) - 1)
    w_axes = ['n']
    axes = pre_axes + w_axes if k == 1 else w_axes + pre_axes
    return Label('tracked', tuple(axes), sources=frozenset({'synapse'}))


def _axes(label: Label, aval) -> tuple:
  """The label's axes, or all free where unknown (``()`` or untracked)."""
  rank = len(aval.shape)
  if label.kind in ('tracked', 'param') and len(label.axes) == rank:
    return label.axes
  return (None,) * rank
