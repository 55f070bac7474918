"""Per-neuron blocks of a step's local Jacobian, ``(..., I, J, F)``.

Products of the small ``K x K`` blocks loop over the few carry components,
which XLA fuses into elementwise work (as einsums they become thousands of
tiny matmuls). A step's block can also be held entry by entry (`block`):
``block[r][c]`` is ``(*batch, F)``, or None where it is structurally zero,
so products skip the zeros (`compact_matmul`, `compact_rmatvec`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve(pattern, rows: int, k: int) -> tuple:
  """``pattern``, or all entries varying when it is None."""
  return pattern if pattern is not None else (('vary',) * k,) * rows


def entries(pattern, kind: str) -> list:
  """The ``(row, column)`` entries of ``kind``, row-major."""
  return [
    (r, c) for r, row in enumerate(pattern) for c, x in enumerate(row)
    if x == kind
  ]  # fmt: skip


def stack(values: list, like) -> jax.Array:
  """``(*batch, V, F)``: the V ``(*batch, F)`` values stacked (V may be 0;
  ``like: (*batch, ..., ..., F)`` gives the shape and dtype then)."""
  if values:
    return jnp.stack(values, axis=-2)
  return jnp.zeros((*like.shape[:-3], 0, like.shape[-1]), like.dtype)


def block(pattern, vary, constants, m) -> list:
  """The masked block of one step, entry by entry.

  Args:
    pattern: the kind of each entry, rows of ``'vary'``, ``'const'`` or
      ``'zero'`` (`flax_eprop.sparse.compression.carry_pattern`).
    vary: ``(*batch, V, F)``, the step's varying entries, row-major.
    constants: the constant entries, row-major, each ``(*batch, F)``.
    m: ``(*batch,)`` bool; a masked step (False) is the identity on the
      carry and zero on the outputs.

  Returns:
    Rows of entries ``(*batch, F)``, None where the entry is zero.
  """
  pos = {e: i for i, e in enumerate(entries(pattern, 'vary'))}
  pos.update({e: i for i, e in enumerate(entries(pattern, 'const'))})
  m = m[..., None]
  out = []
  for r, row in enumerate(pattern):
    line = []
    for c, kind in enumerate(row):
      if kind == 'zero':
        raw = None
      elif kind == 'vary':
        raw = vary[..., pos[(r, c)], :]
      else:
        raw = constants[pos[(r, c)]].astype(vary.dtype)
      if raw is None and r != c:
        line.append(None)
      else:
        raw = jnp.zeros((), vary.dtype) if raw is None else raw
        line.append(jnp.where(m, raw, jnp.asarray(r == c, vary.dtype)))
    out.append(line)
  return out


def compact_matmul(phi, block):
  """``(..., I, K, F) x block[:K] -> (..., I, K, F)``."""
  k = phi.shape[-2]
  cols = []
  for c in range(k):
    terms = [
      phi[..., :, j, :] * block[j][c][..., None, :]
      for j in range(k) if block[j][c] is not None
    ]  # fmt: skip
    cols.append(sum(terms) if terms else jnp.zeros_like(phi[..., :, 0, :]))
  return jnp.stack(cols, axis=-2)


def compact_rmatvec(block, g):
  """``block^T g``: ``g: (..., K + R, F) -> (..., K, F)``."""
  k = len(block[0])
  out = []
  for c in range(k):
    terms = [
      block[i][c] * g[..., i, :]
      for i in range(len(block)) if block[i][c] is not None
    ]  # fmt: skip
    out.append(sum(terms) if terms else jnp.zeros_like(g[..., 0, :]))
  return jnp.stack(out, axis=-2)


def matmul(a, b):
  """``(..., I, J, F) x (..., J, K, F) -> (..., I, K, F)``."""
  return sum(
    a[..., :, j, None, :] * b[..., None, j, :, :] for j in range(a.shape[-2])
  )


def matvec(a, v):
  """``(..., I, J, F) x (..., J, F) -> (..., I, F)``."""
  return sum(a[..., :, j, :] * v[..., None, j, :] for j in range(a.shape[-2]))


def rmatvec(a, v):
  """``(..., I, J, F)^T x (..., I, F) -> (..., J, F)``."""
  return sum(a[..., i, :, :] * v[..., i, None, :] for i in range(a.shape[-3]))


def trace(a, eps):
  """``(..., I, J, F) x (..., J, M, F) -> (..., I, M, F)``."""
  return sum(
    a[..., :, j, None, :] * eps[..., None, j, :, :] for j in range(a.shape[-2])
  )
