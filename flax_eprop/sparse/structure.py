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
  outside a synapse. Which operations do is decided by one table,
  `flax_eprop.sparse.rules.RULES`; a primitive it does not know is refused.
  A refusal is kept with the value it taints and raised when that value
  reaches a new carry, an output or a synapse: a mixed value whose tangent
  is cut (``stop_gradient``, a comparison, a cast to an integer) is harmless.
  These raise `NonLocalError` naming the op and the line of the user's cell.

Parameter-only code (the prelude) is labelled too: the neuron axis of a
``(features,)`` parameter is followed through it, so a per-neuron parameter
mixed across neurons (``mean``, ``roll``, ``sort``) is refused when it enters
the dynamics, while kernel-only code (masks, casts) is free.

No numbers are computed here: the result, a `Plan`, is reused every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from flax_eprop.sparse import _jaxpr
from flax_eprop.sparse._jaxpr import Const, Op, Program
from flax_eprop.sparse.rules import HINT, NonLocalError
from flax_eprop.sparse.walk import Label, Synapse, Walk


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Everything the numbers pass needs, found once per trace.

  Attributes:
    program: the flattened step over ``(*param_leaves, *carry_leaves,
      *x_leaves)`` returning ``(*new_carry_leaves, *y_leaves)``.
    param_def, carry_def, out_def: tree definitions.
    num_carry: K, the number of carry leaves.
    batch_shape, features: carry leaves are ``(*batch_shape, features)``.
    synapses: the synapses in program order.
    direct_params: indices of parameter leaves entering the dynamics
      elementwise (each of shape ``()`` or ``(features,)``).
    core: carry leaves that need eligibility traces of their own.
    derived: carry leaves that are a function of the core leaves' NEW values
      (and the input) in the same step, like the spike ``z_t = H(v_t -
      A_t)``: their traces are ``C_t`` times the core traces, with ``C_t``
      the per-neuron derivative (DESIGN.md, "Derived components").
    core_outputs: per core leaf, the program id of its new value where the
      numbers pass probes ``C_t``, or None for a core leaf no derived leaf
      reads directly (its column of ``C_t`` is zero); empty when nothing
      is derived.
  """

  program: Program
  param_def: Any
  carry_def: Any
  out_def: Any
  num_carry: int
  batch_shape: tuple
  features: int
  synapses: tuple[Synapse, ...]
  direct_params: tuple[int, ...]
  core: tuple[int, ...]
  derived: tuple[int, ...]
  core_outputs: tuple[int, ...]

  def synapse_of(self, op: Op) -> int | None:
    for i, s in enumerate(self.synapses):
      if s.op is op:
        return i
    return None

  def output_aliases(self) -> list:
    """Per output leaf, the carry leaf whose new value it is (LIF's spike
    is both), or None."""
    ids = [None if isinstance(o, Const) else o for o in self.program.outvars]
    carry = ids[: self.num_carry]
    return [
      carry.index(i) if i is not None and i in carry else None
      for i in ids[self.num_carry :]
    ]

  def evaluate(self, p_leaves, c_leaves, x_leaves, rule=None) -> list:
    """Runs the step on flat leaves: ``(*new_carry, *y)`` leaves.

    Works under any JAX transformation. ``rule(op, values)`` may override
    ops (see `flax_eprop.sparse._jaxpr.evaluate`).
    """
    return _jaxpr.evaluate(
      self.program, [*p_leaves, *c_leaves, *x_leaves], rule
    )


def pure_step(step: Callable, params, carry, x) -> tuple[Callable, Any]:
  """``step`` as a function of arrays only, for arguments shaped like
  ``(params, carry, x)``: ``(pure, out_def)``.

  The step is traced once and its jaxpr re-evaluated on every call, so
  ``pure(params, carry, x) -> (new_carry, y)`` builds no Flax scope: a
  custom VJP's backward pass may call it after the module's scopes are gone.
  """
  program, out_def, _ = _jaxpr.trace(step, params, carry, x)

  def pure(p, c, x):
    leaves = [*jax.tree.leaves(p), *jax.tree.leaves(c), *jax.tree.leaves(x)]
    return jax.tree.unflatten(out_def, _jaxpr.evaluate(program, leaves))

  return pure, out_def


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
  labels = [
    Label('param', _param_axes(p, features), frozenset([i]))
    for i, p in enumerate(p_leaves)
  ]
  labels += [Label('tracked', neuron, sources=frozenset({'carry'}))] * n_c
  labels += [Label('input')] * len(x_leaves)
  walk = Walk(features)
  outs = walk.run(program, labels)
  outs = [
    walk.enter(label, out.shape, f'step: output leaf {i}')
    for i, (label, out) in enumerate(zip(outs, out_shapes))
  ]
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
  core, derived, probed = _derived_leaves(program, n_p, n_c)
  return Plan(
    program=program,
    param_def=p_def,
    carry_def=c_def,
    out_def=out_def,
    num_carry=n_c,
    batch_shape=batch_shape,
    features=features,
    synapses=tuple(walk.synapses),
    direct_params=tuple(sorted(direct)),
    core=core,
    derived=derived,
    core_outputs=tuple(
      program.outvars[i] if i in probed else None for i in core
    )
    if derived
    else (),
  )


def _derived_leaves(program: Program, n_p: int, n_c: int):
  """Splits the carry leaves into (core, derived, probed); see `Plan`.

  A new-carry leaf is derived when its computation, cut at the new values of
  the other (core) leaves, reads no previous carry and no parameter. Its
  coefficients ``C`` are the partial derivatives w.r.t. the core values it
  reads directly (``probed``): a probe at each of those values gives them
  when none of these values reads another (a current-based LIF's ``v_t``
  reads ``i_t``, but its spike reads ``v_t`` alone). Otherwise a probe
  would also count a path through another core value: then nothing is
  derived.
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
  derived = tuple(i for i in range(n_c) if i not in core)
  core_ids = {outs[j] for j in core if outs[j] is not None}
  read = set()  # core values a derived leaf reads directly
  for i in derived:
    read |= reads(outs[i], core_ids) & core_ids
  probed = tuple(j for j in core if outs[j] in read)
  if any(
    reads(outs[j], set()) & (read - {outs[j]}) for j in probed
  ):  # fmt: skip
    return tuple(range(n_c)), (), ()
  return tuple(core), derived, probed


def _param_axes(leaf, features: int) -> tuple:
  """A ``(features,)`` parameter's axis is the neuron axis; others free."""
  shape = np.shape(leaf)
  return ('n',) if shape == (features,) else (None,) * len(shape)


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
    if label.mixed is not None:
      raise label.mixed
    if label.kind == 'tracked' and label.axes[-1:] != ('n',):
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
