"""The factors of one step's compressed Jacobians, from JAX's own `jvp`.

The step is re-evaluated op by op (`Plan.evaluate`) with two changes at
every synapse ``I = u @ W`` found by the structure pass:

* the presynaptic operand ``u`` is wrapped in ``stop_gradient``, which cuts
  the recurrent path ``carry -> u -> I`` that e-prop drops, and ``u`` is kept
  as the synapse's presynaptic Kronecker factor;
* a zero *probe* ``delta`` is added to ``I``: its tangent gives the
  postsynaptic factor ``d out / d I``.

Every remaining path is neuron-local, so each Jacobian is diagonal across
neurons and one `jvp` with an all-ones tangent recovers its diagonal. All
probes run as lanes of one vmapped linearization: one primal evaluation plus
``K + S + P`` elementwise tangent evaluations (K carry leaves, S synapses, P
per-neuron/scalar parameters). Custom JVP rules, ``where`` and nested ``jit``
are differentiated by JAX itself.

A synapse whose presynaptic operand is computed from the parameters and the
input alone (`input_synapses`, e.g. ``x @ W_in``) does not depend on the
step's carry: a chunk computes its outputs for all steps at once
(`input_synapse_values`, one matmul) and each step is given them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flax_eprop.sparse import _jaxpr
from flax_eprop.sparse.structure import Plan


class StepFactors(NamedTuple):
  """Compressed Jacobians of one step; rows are the K new carry leaves, then
  the R output leaves.

  Attributes:
    carry: ``(*batch, K + R, K, features)``, row-by-carry-leaf blocks of the
      neuron-local Jacobian ``d out_r[n] / d carry_k[n]``.
    post: per synapse, ``(*batch, K + R, features)``: ``d out_r[n] / d I[n]``
      where ``I = u @ W`` is the synapse's output.
    pre: per synapse, ``(*batch, in)``: the presynaptic activity ``u``.
    direct: per direct parameter, ``(*batch, K + R, features)``: the
      diagonal ``d out_r[n] / d p[n]`` (shape ``(features,)`` params) or the
      column ``d out_r[n] / d p`` (scalar params).
    derived: ``(*batch, Kd, K', features)``: ``C_t``, the derivative of each
      derived carry leaf's new value w.r.t. the core leaves' new values
      (`Plan.derived`); ``None`` when nothing is derived.
  """

  carry: jax.Array
  post: tuple
  pre: tuple
  direct: tuple
  derived: jax.Array | None = None


def linearized(plan: Plan, params, carry, x, given=None):
  """The step linearized at ``(params, carry, x)`` with the probes.

  ``given`` maps synapses (`input_synapses`) to their outputs at this step,
  computed beforehand; their presynaptic operands are then returned as
  None.

  Returns:
    ``(outs, linear, pres, lanes)``: the flat outputs, the linear map of
    the probes' tangents (`jax.linearize`), the presynaptic operands and the
    one-hot lanes (lane ``l`` sets probe ``l``'s tangent to ones; probes:
    the K carry leaves, the S synapse outputs, the P direct parameters, then
    the core outputs when some leaf is derived).
  """
  given = given or {}
  p_leaves = jax.tree.leaves(params)
  c_leaves = jax.tree.leaves(carry)
  x_leaves = jax.tree.leaves(x)
  direct = [p_leaves[i] for i in plan.direct_params]
  deltas = [
    jnp.zeros(s.op.out_avals[0].shape, s.op.out_avals[0].dtype)
    for s in plan.synapses
  ]

  c_index = {o: i for i, o in enumerate(plan.core_outputs)}
  c_probes = [jnp.zeros_like(c_leaves[i]) for i in plan.core] if c_index else []

  def core(c_in, probes, d_in, c_at):
    leaves = list(p_leaves)
    for i, value in zip(plan.direct_params, d_in):
      leaves[i] = value
    pres = [None] * len(plan.synapses)

    def rule(op, values):
      s = plan.synapse_of(op)
      if s is not None and s in given:
        outs = [given[s] + probes[s]]
      elif s is not None:
        k = 1 - plan.synapses[s].kernel_operand
        values = list(values)
        values[k] = jax.lax.stop_gradient(values[k])
        pres[s] = values[k]
        (out,) = _jaxpr.bind(op, values)
        outs = [out + probes[s]]
      elif any(o in c_index for o in op.outs):
        outs = _jaxpr.bind(op, values)
      else:
        return None
      return [
        out + c_at[c_index[o]] if o in c_index else out
        for o, out in zip(op.outs, outs)
      ]

    outs = plan.evaluate(leaves, c_in, x_leaves, rule)
    return outs, pres

  primals = (c_leaves, deltas, direct, c_probes)
  outs, linear, pres = jax.linearize(core, *primals, has_aux=True)
  return outs, linear, pres, _lanes(primals)


def step_factors(
  plan: Plan, params, carry, x, given=None
) -> tuple[list, StepFactors]:
  """Runs one step and returns its flat outputs and `StepFactors`.

  Args:
    plan: from `structure.make_plan` for the same shapes.
    params, carry, x: the step's arguments (pytrees as in the plan).
    given: optional ``{synapse: output}`` for synapses in `input_synapses`
      (see `linearized`); their ``pre`` factors are None.

  Returns:
    ``(outs, factors)`` where ``outs`` are the flat ``(*new_carry, *y)``
    leaves.
  """
  outs, linear, pres, lanes = linearized(plan, params, carry, x, given)
  tangents = jax.vmap(linear)(*lanes)  # each leaf (L, *batch, features)
  rows = jnp.moveaxis(jnp.stack(tangents, axis=1), (0, 1), (-2, -3))
  # rows: (*batch, K + R, L, features)
  k, s, p = plan.num_carry, len(plan.synapses), len(plan.direct_params)
  derived = None
  if plan.derived:
    derived = rows[..., jnp.array(plan.derived), k + s + p :, :]
  factors = StepFactors(
    carry=rows[..., :k, :],
    post=tuple(rows[..., k + i, :] for i in range(s)),
    pre=tuple(
      None if u is None else _pre(plan, i, u) for i, u in enumerate(pres)
    ),
    direct=tuple(rows[..., k + s + i, :] for i in range(p)),
    derived=derived,
  )
  return outs, factors


def _lanes(primals) -> list:
  """One-hot lanes: lane l sets the l-th primal leaf's tangent to ones."""
  leaves, treedef = jax.tree.flatten(primals)
  n = len(leaves)
  lanes = []
  for i, leaf in enumerate(leaves):
    onehot = jnp.zeros((n,), leaf.dtype).at[i].set(1)
    shape = (n,) + (1,) * jnp.ndim(leaf)
    lanes.append(
      jnp.broadcast_to(onehot.reshape(shape), (n,) + jnp.shape(leaf))
    )
  return list(jax.tree.unflatten(treedef, lanes))


def _pre(plan: Plan, i: int, u: Any) -> jax.Array:
  """The presynaptic factor as ``(*batch, in)``."""
  u = jnp.moveaxis(u, plan.synapses[i].pre_in_axis, -1)
  return jnp.broadcast_to(u, (*plan.batch_shape, u.shape[-1]))


def input_synapses(plan: Plan) -> tuple[int, ...]:
  """The synapses whose presynaptic operand reads no carry leaf: computed
  from the parameters and the step's input alone."""
  n_p = plan.param_def.num_leaves
  carried = set(plan.program.invars[n_p : n_p + plan.num_carry])
  for op in plan.program.ops:
    if any(a in carried for a in op.ins if not isinstance(a, _jaxpr.Const)):
      carried.update(op.outs)
  return tuple(
    i
    for i, s in enumerate(plan.synapses)
    if s.op.ins[1 - s.kernel_operand] not in carried
  )


def input_synapse_values(plan: Plan, params, x, which) -> tuple[list, list]:
  """The presynaptic factors ``(*batch, in)`` and outputs of the synapses
  ``which`` (all in `input_synapses`) at one step with input ``x``.

  Only the ops these synapses read are evaluated; ``jax.vmap`` over steps
  turns each synapse into a single matmul.
  """
  program = plan.program
  producer = {o: op for op in program.ops for o in op.outs}
  needed, todo = set(), [plan.synapses[s].op for s in which]
  while todo:
    op = todo.pop()
    if op in needed:
      continue
    needed.add(op)
    todo.extend(
      producer[a]
      for a in op.ins
      if not isinstance(a, _jaxpr.Const) and a in producer
    )
  n_p = plan.param_def.num_leaves
  env = dict(program.consts)
  env.update(zip(program.invars[:n_p], jax.tree.leaves(params)))
  env.update(zip(program.invars[n_p + plan.num_carry :], jax.tree.leaves(x)))
  read = lambda a: a.value if isinstance(a, _jaxpr.Const) else env[a]
  for op in program.ops:
    if op in needed:
      env.update(zip(op.outs, _jaxpr.bind(op, [read(a) for a in op.ins])))
  pres, outs = [], []
  for s in which:
    op = plan.synapses[s].op
    pres.append(
      _pre(plan, s, read(op.ins[1 - plan.synapses[s].kernel_operand]))
    )
    outs.append(read(op.outs[0]))
  return pres, outs


def kernel_values(plan: Plan, params) -> list[jax.Array]:
  """The synapse kernels ``W`` as the step computes them from ``params``.

  Evaluates only the parameter-only part of the step (masks, casts), so
  ``jax.vjp`` of this function maps kernel gradients to parameter gradients.
  """
  env = dict(plan.program.consts)
  env.update(zip(plan.program.invars, jax.tree.leaves(params)))
  kernels = [None] * len(plan.synapses)
  read = lambda a: a.value if isinstance(a, _jaxpr.Const) else env[a]
  for op in plan.program.ops:
    s = plan.synapse_of(op)
    if s is not None:
      kernels[s] = read(op.ins[plan.synapses[s].kernel_operand])
    elif all(isinstance(a, _jaxpr.Const) or a in env for a in op.ins):
      env.update(zip(op.outs, _jaxpr.bind(op, [read(a) for a in op.ins])))
  return kernels
