"""The sparse forward-mode transform: compressed Jacobians of a cell step.

A recurrent cell step ``step(params, carry, x) -> (new_carry, y)`` has
Jacobians with two kinds of structure (Lohoff et al. 2025): w.r.t. the carry
and per-neuron parameters they are diagonal across neurons (one small block
per neuron), w.r.t. a synapse kernel ``W`` they are a Kronecker product of a
postsynaptic and a presynaptic factor. `sparse_jacfwd` finds that structure
in the step's jaxpr once (`structure`, which asks the locality table `rules`
what each primitive does to the neuron and batch axes) and computes the
factors each step with JAX's own forward mode (`factors`).

Public: `sparse_jacfwd`, the Jacobian classes and `NonLocalError`. The
library's own plumbing stays in its modules: `structure.Plan`,
`structure.make_plan`, `structure.pure_step`, `factors.step_factors`,
`factors.kernel_values`, `factors.StepFactors`.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp

from flax_eprop.sparse.factors import kernel_values, step_factors
from flax_eprop.sparse.jacobians import (
  CarryJacobian as CarryJacobian,
)
from flax_eprop.sparse.jacobians import (
  DenseCarryJacobian as DenseCarryJacobian,
)
from flax_eprop.sparse.jacobians import (
  DenseJacobian as DenseJacobian,
)
from flax_eprop.sparse.jacobians import (
  ParamJacobian as ParamJacobian,
)
from flax_eprop.sparse.rules import NonLocalError as NonLocalError
from flax_eprop.sparse.structure import make_plan

Mode = Literal['eprop', 'exact']


def sparse_jacfwd(
  step: Callable,
  argnums: int | Sequence[int] = (0, 1),
  mode: Mode = 'eprop',
) -> Callable:
  """Compressed forward-mode Jacobian of a recurrent cell step.

  Like `jax.jacfwd`, but for a step ``step(params, carry, x) -> (new_carry,
  y)`` it returns structured Jacobians that store only what is non-zero:

  * w.r.t. the carry (``argnums`` 1), a `CarryJacobian` with one
    ``K x K`` block per neuron, ``blocks: (*batch, K + R, K, features)``
    (K carry leaves, R output leaves);
  * w.r.t. the parameters (``argnums`` 0), a `ParamJacobian` holding, per
    synapse ``I = u @ W``, a postsynaptic factor ``(*batch, K + R,
    features)`` and the presynaptic activity ``(*batch, in)``, and per
    per-neuron (``(features,)``) or scalar parameter a ``(*batch, K + R,
    features)`` diagonal.

  With ``mode='eprop'`` the paths from the carry through a recurrent synapse
  (a matmul of a parameter with a carry-derived value) are dropped, exactly
  as e-prop does: ``.todense()`` equals `jax.jacfwd` of the step with the
  recurrent input wrapped in `jax.lax.stop_gradient`. ``mode='exact'`` keeps
  them: the carry Jacobian is then a `DenseCarryJacobian`, full per example
  (RTRL-style, for small networks and tests), and the parameter Jacobian is
  dense (`DenseJacobian`).

  Args:
    step: ``step(params, carry, x) -> (new_carry, y)``; every leaf of
      ``carry``, ``new_carry`` and ``y`` has shape ``(*batch, features)``.
    argnums: 0 (params), 1 (carry) or a sequence of them.
    mode: ``'eprop'`` (default) or ``'exact'``.

  Returns:
    A function of ``(params, carry, x)`` returning one Jacobian object per
    entry of ``argnums`` (a tuple when ``argnums`` is a sequence).

  Raises:
    NonLocalError: (``mode='eprop'``) the step mixes neurons outside a
      parameter synapse, uses ``jax.custom_vjp``, or has a synapse of an
      unsupported form. The message names the operation and the source line.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax_eprop as fe
    >>> def step(params, v, x):
    ...   v = 0.9 * v + x @ params['w']
    ...   return v, jnp.tanh(v)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> v, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
    >>> jac_p, jac_v = fe.sparse_jacfwd(step)(params, v, x)
    >>> jac_v.blocks.shape  # (*batch, K + R, K, features)
    (2, 2, 1, 4)
    >>> jac_p.post[0].shape, jac_p.pre[0].shape
    ((2, 2, 4), (2, 3))
    >>> dense = jax.jacfwd(step)(params, v, x)
    >>> bool(jnp.allclose(jac_p.todense()[0]['w'], dense[0]['w']))
    True
  """
  if mode not in ('eprop', 'exact'):
    raise ValueError(f"mode: expected 'eprop' or 'exact', got {mode!r}.")
  single = isinstance(argnums, int)
  nums = (argnums,) if single else tuple(argnums)
  if any(a not in (0, 1) for a in nums):
    raise ValueError(
      f'argnums: expected 0 (params), 1 (carry) or both, got {argnums!r}.'
    )

  def jacobians(params, carry, x):
    make = _exact if mode == 'exact' else _eprop
    out = make(step, nums, params, carry, x)
    return out[0] if single else out

  return jacobians


def _eprop(step, nums, params, carry, x):
  plan = make_plan(step, params, carry, x)
  outs, f = step_factors(plan, params, carry, x)
  result = []
  for a in nums:
    if a == 1:
      result.append(
        CarryJacobian(f.carry, plan.out_def, plan.carry_def, plan.batch_shape)
      )
      continue
    p_leaves = jax.tree.leaves(params)
    _, vjp = jax.vjp(lambda leaves: kernel_values(plan, leaves), p_leaves)
    result.append(
      ParamJacobian(
        post=f.post,
        pre=f.pre,
        direct=f.direct,
        kernel_vjp=vjp,
        out_def=plan.out_def,
        param_def=plan.param_def,
        param_shapes=tuple(jnp.shape(p) for p in p_leaves),
        direct_params=plan.direct_params,
        kernel_in_axes=tuple(s.kernel_in_axis for s in plan.synapses),
        batch_shape=plan.batch_shape,
        features=plan.features,
        dtype=outs[0].dtype,
      )
    )
  return tuple(result)


def _exact(step, nums, params, carry, x):
  c_leaves = jax.tree.leaves(carry)
  batch_shape = jnp.shape(c_leaves[0])[:-1]
  n = math.prod(batch_shape)
  result = []
  for a in nums:
    if a == 0:
      result.append(
        DenseJacobian(jax.jacfwd(step, argnums=0)(params, carry, x))
      )
      continue
    flat = lambda t: t.reshape(n, *t.shape[len(batch_shape) :])
    one = lambda c, xi: step(params, c, xi)
    dense = jax.vmap(jax.jacfwd(one))(
      jax.tree.map(flat, carry), jax.tree.map(flat, x)
    )
    out_def = jax.tree.structure(jax.eval_shape(step, params, carry, x))
    out_leaves = out_def.flatten_up_to(dense)
    blocks = jnp.stack(
      [jnp.stack(jax.tree.leaves(row), axis=-2) for row in out_leaves], axis=1
    )  # (n, K + R, features, K, features)
    result.append(
      DenseCarryJacobian(
        blocks.reshape(*batch_shape, *blocks.shape[1:]),
        out_def,
        jax.tree.structure(carry),
        batch_shape,
      )
    )
  return tuple(result)


__all__ = [
  'CarryJacobian',
  'DenseCarryJacobian',
  'DenseJacobian',
  'NonLocalError',
  'ParamJacobian',
  'sparse_jacfwd',
]
