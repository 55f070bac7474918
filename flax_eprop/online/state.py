"""The state of the `OnlineGrad` layers of a model: at rest, and reset.

Every `OnlineGrad` keeps its carry in the collection ``'carry'`` (variables
``'state'`` and ``'rest'``, the carry at rest) and its traces in
``'eligibility'``. `rest_state` makes that state at rest for any batch shape
without running the model; `reset_state` puts a state back at rest.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp

CARRY = 'carry'
ELIGIBILITY = 'eligibility'

# True while `rest_state` traces a model: layers only create their state.
_REST: contextvars.ContextVar[bool] = contextvars.ContextVar(
  'flax_eprop_rest', default=False
)


def resting() -> bool:
  """Whether the model is being traced by `rest_state` (layers that keep a
  state should then only create it at rest, as in ``init``)."""
  return _REST.get()


def rest_state(apply_fn: Callable, params, xs, **kwargs) -> dict:
  """The state at rest of every `OnlineGrad` in a model, for ``xs``.

  Traces the model once in a mode in which each `OnlineGrad` only creates
  its state at rest (the cell's ``initialize_carry``, zero traces) for the
  batch shape of its inputs and outputs zeros: no chunk is run.

  The mode is read when the model is traced: pass the model's own
  ``apply``, not a jitted one (a cached trace would run the chunk), and jit
  the whole call instead, e.g. ``jax.jit(lambda p, x: fe.rest_state(
  model.apply, p, x))``.

  Args:
    apply_fn: the model's ``apply``, called as ``apply_fn({'params':
      params}, xs, mutable=['carry', 'eligibility'], **kwargs)``.
    params: the model's parameters.
    xs: inputs as the model takes them, e.g. ``(batch, time, in)``; only
      their shapes matter (any number of steps).
    **kwargs: passed to ``apply_fn`` (e.g. ``mask``).

  Returns:
    ``{'carry': ..., 'eligibility': ...}`` (the collections the model has),
    to pass as ``apply_fn({'params': params, **state}, ...)``. Other
    collections the model keeps (e.g. ``'feedback'``) are not included.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax_eprop as fe
    >>> layer = fe.OnlineGrad(fe.LIF(4))
    >>> params = layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))['params']
    >>> state = fe.rest_state(layer.apply, params, jnp.ones((16, 1, 3)))
    >>> state['carry']['state'].v.shape  # any batch shape
    (16, 4)
  """
  token = _REST.set(True)
  try:
    _, state = apply_fn(
      {'params': params}, xs, mutable=[CARRY, ELIGIBILITY], **kwargs
    )
  finally:
    _REST.reset(token)
  return {c: state[c] for c in (CARRY, ELIGIBILITY) if c in state}


def reset_state(state: dict, where: jax.Array | None = None) -> dict:
  """Puts every `OnlineGrad` back at rest: its carry at the cell's initial
  carry (``initialize_carry``, kept under ``'rest'``), its traces at zero.

  Args:
    state: the non-parameter collections, e.g. ``{'carry': ...,
      'eligibility': ...}`` as returned by ``init``/``apply``.
    where: optional bool ``(*batch,)``: reset only these batch rows (at
      sequence boundaries in a stream); default all.

  Returns:
    The new state (other collections unchanged).
  """
  w = None if where is None else jnp.asarray(where, bool)

  def select(rest, leaf):
    if w is None:
      return jnp.broadcast_to(rest, leaf.shape).astype(leaf.dtype)
    if leaf.shape[: w.ndim] != w.shape:
      raise ValueError(
        f'where: expected a bool mask of the batch shape {leaf.shape[: w.ndim]}'
        f', got shape {w.shape}.'
      )
    mask = w.reshape(w.shape + (1,) * (leaf.ndim - w.ndim))
    return jnp.where(mask, rest, leaf).astype(leaf.dtype)

  def carry(tree):
    if not isinstance(tree, Mapping):
      return jax.tree.map(lambda a: select(jnp.zeros((), a.dtype), a), tree)
    if 'state' in tree and 'rest' in tree:
      new = jax.tree.map(select, tree['rest'], tree['state'])
      return {**tree, 'state': new}
    return {k: carry(v) for k, v in tree.items()}

  out = dict(state)
  if CARRY in out:
    out[CARRY] = carry(out[CARRY])
  if ELIGIBILITY in out:
    out[ELIGIBILITY] = jax.tree.map(
      lambda a: select(jnp.zeros((), a.dtype), a), out[ELIGIBILITY]
    )
  return out
