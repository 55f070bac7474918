"""The locality table: one rule per primitive, and nothing else decides.

The structure pass (`flax_eprop.sparse.structure`) labels each axis of every
value a cell step computes: ``'n'`` the neuron axis, ``'b'`` a batch axis,
``None`` any other (free) axis. For each operation it looks up
``RULES[primitive name]``; the rule maps the operands' axis labels to the
results' axis labels, or raises `NonLocalError` when the operation moves data
across a labelled axis (that is, when a result at neuron ``n`` or batch row
``b`` would depend on another neuron's or row's value). **A primitive without
an entry is refused** (`missing`), never treated as elementwise.

Families, in table order:

=====================  ===================================================
elementwise            ``sin``, ``add``, ``select_n``, ``stop_gradient``...
                       (operands of one shape, or rank-0): labels merge
                       per axis; a neuron axis meeting a batch axis refuses.
reductions             ``reduce_sum``, ``argmax``...: refuse when a reduced
                       axis is labelled, else drop the reduced axes.
cumulative             ``cumsum``...: refuse when ``axis`` is labelled.
along one axis         ``sort``, ``top_k``, ``rev``, ``fft``, ``split``...:
                       refuse when the axis they act along is labelled.
windows                ``reduce_window*``, ``conv_general_dilated``: refuse
                       when a labelled axis has a window or padding.
shape ops              ``reshape``, ``broadcast_in_dim``, ``squeeze``,
                       ``transpose``, ``concatenate``, ``pad``, ``slice``,
                       ``dynamic_(update_)slice``, ``gather``, ``scatter``...:
                       track where labelled axes go; refuse any size change
                       or indexing along a labelled axis.
``dot_general``        a contraction that is not a synapse: refuse when a
                       contracted axis is labelled.
calls, control flow    ``jit``, ``custom_jvp_call``, ``checkpoint``,
                       ``cond``, ``while``, ``scan``: the bodies are walked
                       with the same table (a loop's carry must keep its
                       labels); ``custom_vjp_call`` refuses (no forward mode).
=====================  ===================================================

A rule is ``rule(op, axes, body) -> out_axes``: ``axes`` holds one tuple of
labels per operand (free axes ``None``; an operand without a tangent is all
``None``), ``out_axes`` one tuple per result. ``body(op, jaxpr, axes)`` walks
a sub-jaxpr with the structure pass and returns its results' labels.

Synapses (a ``dot_general`` of a parameter-only kernel with a non-parameter
operand) are found by the structure pass before the table is consulted.
Results of the primitives in `CUTS` (``stop_gradient``) and integer or
boolean results carry no tangent: a value mixed across neurons is harmless
once its tangent is cut, so the structure pass raises a refusal only when
the mixed value reaches the dynamics.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from flax_eprop.sparse import shapes
from flax_eprop.sparse._jaxpr import Op
from flax_eprop.sparse.axes import HINT as HINT
from flax_eprop.sparse.axes import NonLocalError as NonLocalError
from flax_eprop.sparse.axes import (
  Rule,
  full,
  in_shape,
  labelled,
  merge,
  missing,
  nonlocal_error,
  out_shape,
)

# Results that carry no tangent, whatever their operands.
CUTS = frozenset({'stop_gradient'})
# Refused even where no tangent reaches them (forward mode cannot trace them).
IMMEDIATE = frozenset({'custom_vjp_call'})


# Elementwise families (as jax.experimental.sparse registers them in loops).

_UNARY = """
  abs acos acosh asin asinh atan atanh bessel_i0e bessel_i1e cbrt ceil clz
  conj convert_element_type copy cos cosh digamma erf erf_inv erfc exp
  exp2 expm1 floor imag integer_pow is_finite lgamma log log1p logistic neg
  not population_count real reduce_precision round rsqrt sign sin sinh sqrt
  square stop_gradient tan tanh
"""
_NARY = """
  add and atan2 clamp complex div eq ge gt igamma igammac le lt max min mul ne
  nextafter or polygamma pow regularized_incomplete_beta rem select_n
  shift_left shift_right_arithmetic shift_right_logical sub xor zeta
"""


def elementwise(op: Op, axes, body) -> list:
  """Operands of the result's shape (or rank 0): labels merge per axis."""
  shape_out = out_shape(op)
  columns = [[] for _ in shape_out]
  for i, a in enumerate(axes):
    shape = in_shape(op, i)
    if not shape:
      continue
    if len(shape) != len(shape_out):
      raise nonlocal_error(op, 'broadcasts neuron state across ranks')
    for d, (label, size) in enumerate(zip(a, shape)):
      columns[d].append(label if size == shape_out[d] else None)
  return [merge(op, columns)] * len(op.out_avals)


def identity(op: Op, axes, body) -> list:
  """Each result is its operand (``optimization_barrier``, ``device_put``)."""
  return list(axes)


def constant(op: Op, axes, body) -> list:
  """Results built from nothing tracked (``iota``): all axes free."""
  return [(None,) * len(a.shape) for a in op.out_avals]


# Reductions, cumulative ops and ops along one axis.


# Reductions and cumulative ops.


def reduction(op: Op, axes, body) -> list:
  """Reduces ``params['axes']``: refused when one of them is labelled."""
  dims = op.params['axes'] if 'axes' in op.params else op.params['dimensions']
  if any(labelled(a, dims) for a in full(axes)):
    raise nonlocal_error(op, 'reduces over the neuron or batch axis')
  keep = merge(op, zip(*full(axes)))
  out = tuple(label for d, label in enumerate(keep) if d not in dims)
  return [out] * len(op.out_avals)


def along(key: str) -> Rule:
  """Acts along the axis ``params[key]`` and keeps the shape elsewhere."""

  def rule(op: Op, axes, body) -> list:
    dims = tuple(int(d) for d in np.ravel(op.params[key]))
    dims = [d % len(axes[0]) for d in dims] if axes[0] else []
    if any(a and labelled(a, dims) for a in axes):
      raise nonlocal_error(op, 'acts along the neuron or batch axis')
    out = merge(op, zip(*axes))
    return [
      tuple(None if d in dims else label for d, label in enumerate(out))
    ] * len(op.out_avals)

  rule.__name__ = f'along_{key}'
  return rule


def trailing(count_key: str) -> Rule:
  """Acts along the trailing ``len(params[count_key])`` axes (``fft``)."""

  def rule(op: Op, axes, body) -> list:
    (a,) = axes
    n = len(op.params[count_key])
    dims = range(len(a) - n, len(a))
    if labelled(a, dims):
      raise nonlocal_error(op, 'transforms along the neuron or batch axis')
    return [a]

  return rule


def last_axis(op: Op, axes, body) -> list:
  """``top_k``: acts along ``params['axis']`` (the last axis by default)."""
  (a,) = axes
  d = op.params.get('axis', len(a) - 1) % len(a)
  if a[d] is not None:
    raise nonlocal_error(op, 'selects along the neuron or batch axis')
  return [a] * len(op.out_avals)


# Windows: refused when a labelled axis has a window, stride, dilation or pad.


# Windows: refused when a labelled axis has a window, stride, dilation or pad.


def window(op: Op, axes, body) -> list:
  """``reduce_window*``: every labelled axis must have a window of one."""
  p = op.params
  for d in range(len(axes[0])):
    if not any(a[d] is not None for a in full(axes)):
      continue
    trivial = (
      p['window_dimensions'][d] == 1
      and p['window_strides'][d] == 1
      and tuple(p['padding'][d]) == (0, 0)
      and p.get('base_dilation', (1,) * (d + 1))[d] == 1
      and p.get('window_dilation', (1,) * (d + 1))[d] == 1
    )
    if not trivial:
      raise nonlocal_error(op, 'has a window along the neuron or batch axis')
  return [merge(op, zip(*full(axes)))] * len(op.out_avals)


def conv(op: Op, axes, body) -> list:
  """``conv_general_dilated``: only the lhs batch axis may be labelled."""
  lhs, rhs = axes
  spec = op.params['dimension_numbers']
  lhs_batch = spec.lhs_spec[0]
  if labelled(rhs, range(len(rhs))) or labelled(
    lhs, [d for d in range(len(lhs)) if d != lhs_batch]
  ):
    raise nonlocal_error(op, 'convolves along the neuron or batch axis')
  if op.params['batch_group_count'] != 1 and lhs[lhs_batch] is not None:
    raise nonlocal_error(op, 'groups the batch axis')
  out = [None] * len(out_shape(op))
  out[spec.out_spec[0]] = lhs[lhs_batch]
  return [tuple(out)]


# Contractions that are not synapses.


# Contractions that are not synapses.


def dot_general(op: Op, axes, body) -> list:
  """Refused when a contracted axis is labelled; batch axes merge."""
  (contract, batch) = op.params['dimension_numbers']
  lhs, rhs = axes
  if labelled(lhs, contract[0]) or labelled(rhs, contract[1]):
    raise nonlocal_error(
      op,
      'contracts the neuron or batch axis of neuron state with a '
      'non-parameter matrix',
    )
  free = [
    [d for d in range(len(a)) if d not in c and d not in b]
    for a, c, b in zip(axes, contract, batch)
  ]
  batch_axes = list(merge(op, [[lhs[i], rhs[j]] for i, j in zip(*batch)]))
  return [
    tuple(batch_axes + [lhs[d] for d in free[0]] + [rhs[d] for d in free[1]])
  ]


# Calls and control flow: the bodies are walked with this same table.


# Calls and control flow: the bodies are walked with this same table.


def call(key: str) -> Rule:
  """A call of ``params[key]`` on all operands (``jit``, ``custom_jvp``)."""

  def rule(op: Op, axes, body) -> list:
    return body(op, op.params[key], axes)

  rule.__name__ = f'call_{key}'
  return rule


def custom_vjp(op: Op, axes, body) -> list:
  raise NonLocalError(
    f'{op.where}: the cell uses jax.custom_vjp, and forward-mode '
    'differentiation cannot pass through it. Define spike functions with '
    'jax.custom_jvp (see flax_eprop.surrogates).'
  )


def cond(op: Op, axes, body) -> list:
  """Every branch on ``operands[1:]``; results merge over the branches."""
  outs = [body(op, branch, axes[1:]) for branch in op.params['branches']]
  return [merge(op, zip(*column)) for column in zip(*outs)]


def _loop(op: Op, run, consts, carry) -> list:
  """Joins the carry's labels with the body's until they are stable."""
  for _ in range(2 + sum(len(c) for c in carry)):
    outs = run(consts, carry)
    new = [merge(op, zip(c, o)) for c, o in zip(carry, outs)]
    if new == carry:
      return outs
    carry = new
  raise nonlocal_error(op, 'moves the neuron or batch axis around its loop')


def while_(op: Op, axes, body) -> list:
  """The body must keep each carry's labels (the predicate is ignored: it
  selects the trip count and carries no derivative)."""
  p = op.params
  n_cond, n_body = p['cond_nconsts'], p['body_nconsts']
  consts = axes[n_cond : n_cond + n_body]
  run = lambda c, h: body(op, p['body_jaxpr'], [*c, *h])
  return _loop(op, run, consts, list(axes[n_cond + n_body :]))


def scan(op: Op, axes, body) -> list:
  """The scanned axis of the ``xs`` must be free; the carry keeps labels."""
  p = op.params
  n_c, n_k = p['num_consts'], p['num_carry']
  xs = axes[n_c + n_k :]
  if any(a and a[0] is not None for a in xs):
    raise nonlocal_error(op, 'scans along the neuron or batch axis')
  consts = axes[:n_c]

  def run(c, h):
    return body(op, p['jaxpr'], [*c, *h, *(a[1:] for a in xs)])[:n_k]

  carry = _loop(op, run, consts, list(axes[n_c : n_c + n_k]))
  outs = body(op, p['jaxpr'], [*consts, *carry, *(a[1:] for a in xs)])
  return outs[:n_k] + [(None, *a) for a in outs[n_k:]]


# The table. One entry per primitive; no entry, no acceptance.

RULES: dict[str, Rule] = {}


def _register(names: str, rule: Rule) -> None:
  for name in names.split():
    RULES[name] = rule


_register(_UNARY + _NARY, elementwise)
_register('optimization_barrier device_put sharding_constraint', identity)
_register('iota', constant)
_register(
  'reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or '
  'reduce_xor argmax argmin reduce',
  reduction,
)
_register('cumsum cumprod cummax cummin cumlogsumexp', along('axis'))
_register('sort concatenate', along('dimension'))
_register('rev', along('dimensions'))
_register('split', along('axis'))
_register('approx_top_k', along('reduction_dimension'))
_register('top_k', last_axis)
_register('fft', trailing('fft_lengths'))
# The variadic `reduce_window` has no linearization rule: not listed.
_register('reduce_window_sum reduce_window_max reduce_window_min', window)
_register('conv_general_dilated', conv)
_register('broadcast_in_dim', shapes.broadcast_in_dim)
_register('reshape', shapes.reshape)
_register('squeeze', shapes.squeeze)
_register('transpose', shapes.transpose)
_register('stack', shapes.stack)
_register('unstack', shapes.unstack)
_register('tile', shapes.tile)
_register('slice', shapes.slice_)
_register('pad', shapes.pad)
_register('dynamic_slice', shapes.dynamic_slice)
_register('dynamic_update_slice', shapes.dynamic_update_slice)
_register('gather', shapes.gather)
_register(
  'scatter scatter-add scatter-sub scatter-mul scatter-min scatter-max',
  shapes.scatter,
)
_register('dot_general', dot_general)
# `_jaxpr.flatten` inlines these calls (and older JAX's names for them)
# before the walk; the entries are for a body it keeps.
_register('jit remat2', call('jaxpr'))
_register('custom_jvp_call', call('call_jaxpr'))
_register('cond', cond)
_register('while', while_)
_register('scan', scan)
_register(' '.join(IMMEDIATE), custom_vjp)


def out_axes(op: Op, axes: list, body: Callable) -> list:
  """Labels of `op`'s results (one tuple per result), or `NonLocalError`."""
  rule = RULES.get(op.name)
  if rule is None:
    raise missing(op)
  return rule(op, axes, body)
