"""Presynaptic traces: carry components whose synapse trace needs no
post-synaptic axis (DESIGN.md section 3, compression 2).

With the core rows' local Jacobian ``De = D E`` (``E`` forms the derived
rows from the core rows, `Plan.derived`), a set ``S`` of core rows is
*presynaptic* when, at every step,

* each row of ``S`` reads no core row outside ``S`` (``De[S, not S] = 0``)
  and no derived row directly;
* the block ``De[S, S]`` and, for every synapse, the post-synaptic factor
  ``post[S]`` are the same for every neuron.

Then, for a synapse ``I = u @ W``, ``eps_S[b, :, n, m] = ebar[b, :, m]`` for
every post-neuron ``n`` with ``ebar_t = Lambda_t ebar_{t-1} + c_t u_t``: the
trace is ``(*batch, |S|, in)`` instead of ``(*batch, |S|, in, features)``.
LIF's ``v`` with a shared ``tau_mem`` and a detached reset is one.

The test is made on the step's own numbers pass, never on a cell's class:
each coefficient is computed by one lane of the linearized step, and a
coefficient that reads none of the step's arguments (params, carry, input)
is a constant; its value, evaluated once, says whether it is the same for
every neuron (and zero where it must be). Anything that varies (a
per-neuron learnable ``tau_mem``, a reset through ``z`` that is not
detached, ``reset='zero'``) keeps the full per-synapse trace.

The same reading of the step's coefficients gives `carry_pattern`: which
entries of the local Jacobian block vary from step to step (and must be
stored per step), are the same at every step, or are zero.
"""

from __future__ import annotations

import jax
import jax.extend.core as jcore
import numpy as np

from flax_eprop.sparse.factors import linearized
from flax_eprop.sparse.structure import Plan


def presynaptic_rows(plan: Plan, params, carry, x) -> tuple[int, ...]:
  """The positions in ``plan.core`` whose traces are presynaptic (sorted;
  empty when none is, or when the layer has no synapse).

  Args:
    plan: the step's plan.
    params, carry, x: arguments of the step (their shapes and dtypes are
      used; tracers are fine).
  """
  if not plan.synapses:
    return ()
  k, s = plan.num_carry, len(plan.synapses)
  core = plan.core
  # Coefficients: D[core_p, j] (lane j, output core_p) for every carry leaf
  # j and post_s[core_p] (lane k + s, output core_p).
  wanted = [(core[p], j) for p in range(len(core)) for j in range(k)]
  wanted += [(core[p], k + i) for p in range(len(core)) for i in range(s)]

  def coefficients(params, carry, x):
    _, linear, _, lanes = linearized(plan, params, carry, x)
    per_lane = {}
    out = []
    for row, lane in wanted:
      if lane not in per_lane:
        one = jax.tree.map(lambda a, i=lane: a[i], lanes)
        per_lane[lane] = linear(*one)
      out.append(per_lane[lane][row])
    return out

  closed, constant, values = _traced_constants(coefficients, params, carry, x)
  kind = {}  # (row, lane) -> 'zero' | 'uniform' | None (varies)
  for key, const, value in zip(wanted, constant, values):
    if not const:
      kind[key] = None
    elif not np.any(value):
      kind[key] = 'zero'
    else:
      flat = np.reshape(value, (-1,))
      kind[key] = 'uniform' if np.all(flat == flat[0]) else None
  return _closed_set(plan, kind)


def _closed_set(plan: Plan, kind: dict) -> tuple[int, ...]:
  """The largest set S of core positions meeting the conditions."""
  k, s = plan.num_carry, len(plan.synapses)
  core = plan.core
  cand = {
    p
    for p, row in enumerate(core)
    if all(kind[(row, k + i)] is not None for i in range(s))
    and all(kind[(row, d)] == 'zero' for d in plan.derived)
    and all(kind[(row, core[q])] is not None for q in range(len(core)))
  }
  changed = True
  while changed:  # drop rows that read a row outside the set
    changed = False
    for p in sorted(cand):
      outside = [q for q in range(len(core)) if q not in cand]
      if any(kind[(core[p], core[q])] != 'zero' for q in outside):
        cand.discard(p)
        changed = True
  return tuple(sorted(cand))


def carry_pattern(plan: Plan, params, carry, x) -> tuple[tuple[str, ...], ...]:
  """Which entries of the step's local Jacobian block ``StepFactors.carry``
  (rows: the K new carry leaves and the R outputs; columns: the K carry
  leaves) vary from step to step.

  An entry is ``'zero'`` when it reads none of the step's arguments and is
  zero, ``'const'`` when it reads neither the carry nor the input (it may
  read the parameters: the same at every step of a chunk), ``'vary'``
  otherwise. Decided on the step's own linearization, as
  `presynaptic_rows`.

  Args:
    plan: the step's plan.
    params, carry, x: arguments of the step (shapes and dtypes are used).

  Returns:
    A ``(K + R) x K`` nested tuple of the kinds.
  """
  k = plan.num_carry

  def coefficients(params, carry, x):
    _, linear, _, lanes = linearized(plan, params, carry, x)
    out = []
    for lane in range(k):
      out += list(linear(*jax.tree.map(lambda a, i=lane: a[i], lanes)))
    return out

  closed, constant, values = _traced_constants(coefficients, params, carry, x)
  steady = _constant_outputs(closed, len(jax.tree.leaves(params)))
  rows = len(constant) // k
  kinds = [[None] * k for _ in range(rows)]
  for n, (const, value, same) in enumerate(zip(constant, values, steady)):
    lane, row = divmod(n, rows)
    if const and not np.any(value):
      kinds[row][lane] = 'zero'
    else:
      kinds[row][lane] = 'const' if same else 'vary'
  return tuple(tuple(r) for r in kinds)


def _traced_constants(coefficients, params, carry, x):
  """``coefficients(params, carry, x)`` traced on the arguments' shapes:
  its closed jaxpr, per output whether it reads no argument, and the values
  of those that do not (None for the others)."""
  args = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.numpy.result_type(a)),
    (params, carry, x),
  )
  closed = jax.make_jaxpr(coefficients)(*args)
  constant = _constant_outputs(closed)
  return closed, constant, _evaluate_constants(closed, constant)


def _constant_outputs(closed, first: int = 0) -> list[bool]:
  """Per output of a closed jaxpr: True when it reads none of the inputs
  from position ``first`` on (conservatively: an equation whose inputs read
  one taints all its outputs)."""
  jaxpr = closed.jaxpr
  tainted = set(jaxpr.invars[first:])
  is_tainted = lambda v: not isinstance(v, jcore.Literal) and v in tainted
  for eqn in jaxpr.eqns:
    if any(is_tainted(v) for v in eqn.invars):
      tainted.update(eqn.outvars)
  return [not is_tainted(v) for v in jaxpr.outvars]


def _evaluate_constants(closed, constant: list[bool]) -> list:
  """The values of the constant outputs (None for the others), evaluated
  with zero inputs (which they do not read)."""
  zeros = [np.zeros(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
  with jax.ensure_compile_time_eval():
    outs = jcore.jaxpr_as_fun(closed)(*zeros)
  return [np.asarray(o) if c else None for o, c in zip(outs, constant)]
