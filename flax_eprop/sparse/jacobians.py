"""Structured Jacobians returned by `sparse_jacfwd` (registered pytrees).

Each has ``.todense()``, which returns exactly what `jax.jacfwd` of the step
returns for that argument (with the recurrent input stop-gradiented in
``mode='eprop'``): a pytree over the outputs ``(new_carry, y)`` whose leaves
are pytrees over the argument, each leaf of shape
``output_leaf.shape + argument_leaf.shape``. Dense forms are for tests and
small networks; the library itself only uses the factors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


def _pytree(*meta):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
    return jax.tree_util.register_dataclass(cls, data, list(meta))

  return wrap


def _diag_embed(values, batch_shape):
  """``(*batch, F) -> (*batch, F, *batch, F)``: block diagonal over rows."""
  n = math.prod(batch_shape)
  f = values.shape[-1]
  flat = values.reshape(n, f)
  eye_b = jnp.eye(n, dtype=values.dtype)[:, None, :, None]
  eye_f = jnp.eye(f, dtype=values.dtype)[None, :, None, :]
  dense = flat[:, :, None, None] * eye_b * eye_f
  return dense.reshape(*batch_shape, f, *batch_shape, f)


def _rows(out_def, per_row):
  """Unflattens a list over output rows into the ``(new_carry, y)`` tree."""
  return jax.tree.unflatten(out_def, per_row)


@_pytree('out_def', 'carry_def', 'batch_shape')
class CarryJacobian:
  """Neuron-local Jacobian of the step's outputs w.r.t. the carry.

  Attributes:
    blocks: ``(*batch, K + R, K, features)``: for each neuron, the block
      ``d out_r[n] / d carry_k[n]`` (K carry leaves; rows are the K new carry
      leaves then the R outputs). Off-diagonal (cross-neuron) entries are zero
      by construction in ``mode='eprop'``.
  """

  blocks: jax.Array
  out_def: Any
  carry_def: Any
  batch_shape: tuple

  def todense(self):
    k = self.blocks.shape[-2]
    return _rows(
      self.out_def,
      [
        jax.tree.unflatten(
          self.carry_def,
          [
            _diag_embed(self.blocks[..., r, j, :], self.batch_shape)
            for j in range(k)
          ],
        )
        for r in range(self.blocks.shape[-3])
      ],
    )


@_pytree('out_def', 'carry_def', 'batch_shape')
class DenseCarryJacobian:
  """Full per-example Jacobian w.r.t. the carry (``mode='exact'``).

  Attributes:
    blocks: ``(*batch, K + R, features, K, features)``: for each example,
      ``d out_r[n] / d carry_k[m]`` including the recurrent synapse paths.
      Examples do not interact, so the batch is never densified.
  """

  blocks: jax.Array
  out_def: Any
  carry_def: Any
  batch_shape: tuple

  def todense(self):
    n = math.prod(self.batch_shape)
    rows, f = self.blocks.shape[-4], self.blocks.shape[-1]
    k = self.blocks.shape[-2]
    flat = self.blocks.reshape(n, rows, f, k, f)
    eye_b = jnp.eye(n, dtype=flat.dtype)

    def leaf(r, j):
      dense = flat[:, r, :, None, j, :] * eye_b[:, None, :, None]
      return dense.reshape(*self.batch_shape, f, *self.batch_shape, f)

    return _rows(
      self.out_def,
      [
        jax.tree.unflatten(self.carry_def, [leaf(r, j) for j in range(k)])
        for r in range(rows)
      ],
    )


@_pytree(
  'out_def', 'param_def', 'param_shapes', 'direct_params', 'kernel_in_axes',
  'batch_shape', 'features', 'dtype',
)  # fmt: skip
class ParamJacobian:
  """Jacobian of the step's outputs w.r.t. the parameters, in factors.

  For a synapse ``I = u @ W`` the Jacobian is the Kronecker product
  ``d out_r[b, n] / d W[m, n'] = delta(n, n') post[b, r, n] pre[b, m]``;
  parameters that build ``W`` (a masked or cast kernel) are reached through
  ``kernel_vjp``. Per-neuron parameters have a diagonal Jacobian and scalar
  ones a column.

  Attributes:
    post: per synapse, ``(*batch, K + R, features)``.
    pre: per synapse, ``(*batch, in)``.
    direct: per direct parameter, ``(*batch, K + R, features)``.
    kernel_vjp: maps cotangents of the kernels ``W`` (one per synapse) to
      cotangents of the parameter leaves (a `jax.vjp` function).
  """

  post: tuple
  pre: tuple
  direct: tuple
  kernel_vjp: Any
  out_def: Any
  param_def: Any
  param_shapes: tuple
  direct_params: tuple
  kernel_in_axes: tuple
  batch_shape: tuple
  features: int
  dtype: Any

  def kernel_dense(self, r: int) -> list[jax.Array]:
    """``d out_r / d W`` per synapse: ``(*batch, features, *W.shape)``."""
    dense = []
    for post, pre, axis in zip(self.post, self.pre, self.kernel_in_axes):
      f, lead = post.shape[-1], (1,) * (post.ndim - 2)
      eye = jnp.eye(f, dtype=post.dtype).reshape(*lead, f, 1, f)
      d = post[..., r, :, None, None] * pre[..., None, :, None] * eye
      dense.append(d if axis == 0 else jnp.swapaxes(d, -1, -2))
    return dense

  def todense(self):
    rows = range(self.out_def.num_leaves)
    return _rows(self.out_def, [self._row(r) for r in rows])

  def _row(self, r: int):
    lead = (*self.batch_shape, self.features)
    leaves = [
      jnp.zeros(lead + shape, self.dtype) for shape in self.param_shapes
    ]
    if self.post:
      cot = [c.reshape(-1, *c.shape[len(lead) :]) for c in self.kernel_dense(r)]
      pulled = jax.vmap(lambda *c: self.kernel_vjp(list(c))[0])(*cot)
      leaves = [
        a + b.reshape(lead + b.shape[1:]).astype(a.dtype)
        for a, b in zip(leaves, pulled)
      ]
    for q, i in enumerate(self.direct_params):
      column = self.direct[q][..., r, :]
      if self.param_shapes[i]:
        f, lead = column.shape[-1], (1,) * (column.ndim - 1)
        eye = jnp.eye(f, dtype=column.dtype).reshape(*lead, f, f)
        column = column[..., None] * eye
      leaves[i] = leaves[i] + column.astype(leaves[i].dtype)
    return jax.tree.unflatten(self.param_def, leaves)


@_pytree()
class DenseJacobian:
  """A Jacobian already in `jax.jacfwd` layout (``mode='exact'`` params)."""

  dense: Any

  def todense(self):
    return self.dense
