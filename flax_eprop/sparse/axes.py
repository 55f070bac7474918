"""Axis labels shared by the locality rules: the error, the helpers.

A value's axes are labelled ``'n'`` (the neuron axis), ``'b'`` (a batch axis)
or ``None`` (free); see `flax_eprop.sparse.rules`.
"""

from __future__ import annotations

from typing import Callable

from flax_eprop.sparse._jaxpr import Op

HINT = (
  'e-prop needs neuron-local dynamics: route interactions between neurons '
  'through a parameter synapse (a matmul with a kernel param), or use '
  "mode='exact' (dense, for small networks)."
)

Axes = tuple  # one label per axis: 'n', 'b' or None
Rule = Callable[[Op, list, Callable], list]


class NonLocalError(ValueError):
  """A cell step has a derivative path that e-prop cannot represent."""


def nonlocal_error(op: Op, why: str) -> NonLocalError:
  """The refusal of `op`: its source line, primitive, reason and the fix."""
  return NonLocalError(f'{op.where}: `{op.name}` {why}. {HINT}')


def missing(op: Op) -> NonLocalError:
  """The refusal of a primitive the table does not know."""
  return NonLocalError(
    f'{op.where}: `{op.name}` has no locality rule in flax_eprop.sparse, so '
    'it cannot be proven neuron-local. Write the step with jax.numpy/lax '
    'operations that act elementwise or along non-neuron axes. ' + HINT
  )


def labelled(axes: Axes, dims) -> bool:
  return any(axes[d] is not None for d in dims)


def merge(op: Op, columns) -> Axes:
  """One label per column of labels; a neuron axis meeting a batch axis
  (or two different labels) refuses."""
  out = []
  for column in columns:
    named = {a for a in column if a is not None}
    if len(named) > 1:
      raise nonlocal_error(op, 'combines the neuron axis with a batch axis')
    out.append(named.pop() if named else None)
  return tuple(out)


def full(axes) -> list:
  """The operands of the first operand's rank (drops scalar init values)."""
  return [a for a in axes if len(a) == len(axes[0])]


def in_shape(op: Op, i: int) -> tuple:
  return tuple(op.in_avals[i].shape)


def out_shape(op: Op, i: int = 0) -> tuple:
  return tuple(op.out_avals[i].shape)
