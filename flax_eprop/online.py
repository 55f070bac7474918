"""`OnlineGrad`: a drop-in for `nn.RNN` whose gradient is online e-prop.

``fe.OnlineGrad(cell)`` runs ``cell`` over a chunk of time steps exactly as
``nn.RNN(cell)`` does (same call, same output, same params tree), but keeps
the carry and the eligibility traces in the variable collections ``'carry'``
and ``'eligibility'`` and defines its gradient as one custom VJP per call:

* the parameters get the exact e-prop gradient of the chunk: the traces are
  propagated from those stored at the chunk's start and contracted with each
  step's learning signal (the cotangent of the step's output);
* each input ``x_t`` gets the *instantaneous* cotangent (through the same
  step only), which is the learning signal of the layers below;
* nothing flows back across steps or across calls, so the result does not
  depend on where a sequence is cut into chunks.

It is a Linen lifted transform built on `flax.core.lift.pack` (like
``nn.scan`` and ``nn.custom_vjp``): the cell's variables are packed, the step
becomes a pure function of ``(params, carry, x)`` and the sparse transform
derives its traces (`flax_eprop.sparse`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.errors import ScopeParamShapeError
from flax.linen.transforms import lift_transform

from flax_eprop import lifted
from flax_eprop.sparse import NonLocalError

CARRY = 'carry'
ELIGIBILITY = 'eligibility'
METRICS = 'online_metrics'
LOSSES = 'online_losses'
GradientMode = Literal['online', 'bptt']
Mode = Literal['eprop', 'exact']

_GRADIENT: contextvars.ContextVar[str] = contextvars.ContextVar(
  'flax_eprop_gradient', default='online'
)


@contextlib.contextmanager
def gradient_mode(mode: GradientMode) -> Iterator[None]:
  """Switches how `OnlineGrad` layers traced inside the block differentiate.

  ``'online'`` (the default) is the e-prop custom VJP. ``'bptt'`` runs the
  cell with a plain `jax.lax.scan`, so `jax.grad` backpropagates through
  time: the reference that `bptt_value_and_grad` uses. The mode is read when
  a layer is *traced*: a function already compiled by `jax.jit` keeps the
  mode it was traced with.

  Args:
    mode: ``'online'`` or ``'bptt'``.
  """
  if mode not in ('online', 'bptt'):
    raise ValueError(f"mode: expected 'online' or 'bptt', got {mode!r}.")
  token = _GRADIENT.set(mode)
  try:
    yield
  finally:
    _GRADIENT.reset(token)


class OnlineGrad(nn.Module):
  """Runs a recurrent cell over time with an online e-prop gradient.

  Use it where you would use ``nn.RNN(cell)``. Every call consumes one chunk
  ``inputs: (*batch, time, in)`` (or ``(time, *batch, in)`` with
  ``time_major``) and returns the cell's outputs ``(*batch, time,
  features)``; a single step is a chunk of length 1. The carry (collection
  ``'carry'``) and the traces (collection ``'eligibility'``) are created
  zero by ``init`` and advanced by every call, so ``apply`` needs
  ``mutable=['carry', 'eligibility']`` and the returned state must be fed to
  the next chunk. Reset them with `reset_state` between sequences.

  Traces: ``(*batch, K', features, in)`` per synapse kernel and ``(*batch,
  K', features)`` per per-neuron or scalar parameter, keyed by the
  parameter's path (``'input/kernel'``), where K' counts the carry leaves
  that need a trace of their own: a leaf computed from the others' new
  values in the same step (the spike ``z_t``) is derived from them with the
  coefficients stored under ``'derived_coefficients'`` ``(*batch, K - K',
  K', features)``. All are stored in ``trace_dtype`` (float32 by default,
  also with x64 enabled).

  Firing-rate regularisation (Bellec et al. 2020): with ``target_rate`` set,
  each call adds ``rate_coefficient / 2 * sum_j (f_j - target_rate)^2`` to
  the loss, where ``f_j`` is neuron ``j``'s mean output over the chunk's
  valid steps and batch rows (the whole sequence when it is one chunk). The
  term is sown into the ``'online_losses'`` collection, which
  `online_value_and_grad` and `bptt_value_and_grad` add to the loss; its
  gradient reaches the parameters through the same eligibility traces.

  Attributes:
    cell: the recurrent cell, ``cell(carry, x) -> (carry, y)`` with every
      carry and output leaf of shape ``(*batch, features)``.
    mode: ``'eprop'`` (default): compressed e-prop traces, the recurrent
      synapse paths dropped. ``'exact'``: real-time recurrent learning
      (`flax_eprop.rtrl`), the exact gradient of the layer computed forward
      in time with a dense trace ``(*batch, K * features, num_params)``
      stored under ``'rtrl'``; for small networks and for measuring e-prop's
      approximation. Any cell works in this mode, neuron-mixing ones too.
    time_major: inputs are ``(time, *batch, in)`` instead of batch-major.
    trace_dtype: dtype of the stored eligibility traces.
    target_rate: target mean output per step (spikes per step, e.g. 0.01 =
      10 Hz at dt = 1 ms), or None for no regularisation.
    rate_coefficient: weight of the firing-rate term (>= 0).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> layer = fe.OnlineGrad(fe.LIF(8))
    >>> xs = jnp.ones((2, 5, 3))  # (batch, time, in)
    >>> variables = layer.init(jax.random.key(0), xs)
    >>> sorted(variables)
    ['carry', 'eligibility', 'params']
    >>> params, state = variables['params'], {'carry': variables['carry'],
    ...                                       'eligibility': variables['eligibility']}
    >>> ys, state = layer.apply({'params': params, **state}, xs,
    ...                         mutable=['carry', 'eligibility'])
    >>> ys.shape
    (2, 5, 8)
  """

  cell: nn.RNNCellBase
  mode: Mode = 'eprop'
  time_major: bool = False
  trace_dtype: Any = jnp.float32
  target_rate: float | None = None
  rate_coefficient: float = 1.0

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mask: jax.Array | None = None):
    """Runs one chunk.

    Args:
      inputs: ``(*batch, time, in)`` (``(time, *batch, in)`` if
        ``time_major``).
      mask: optional bool ``(*batch, time)`` (``(time, *batch)`` if
        ``time_major``); False marks padded steps, which change neither the
        carry, the traces nor the gradient, and output zeros.

    Returns:
      The outputs, ``(*batch, time, features)`` (or time-major).
    """
    if self.mode not in ('eprop', 'exact'):
      raise ValueError(
        f"OnlineGrad {self.name!r}: mode must be 'eprop' or 'exact', got "
        f'{self.mode!r}.'
      )
    xs, mask = self._time_first(inputs, mask)
    carry = self._stored_carry(xs)
    init = self.is_initializing()
    traces = None if init else self._stored(ELIGIBILITY, 'traces')
    run_chunk = lift_transform(
      lifted.online_transform,
      lifted.cell_step,
      trace_dtype=self.trace_dtype,
      gradient=_GRADIENT.get(),
      mode=self.mode,
    )
    try:
      ys, new_carry, new_traces = run_chunk(self.cell, carry, traces, xs, mask)
    except (ValueError, ScopeParamShapeError) as e:
      if isinstance(e, NonLocalError | lifted.StateError):
        raise
      raise ValueError(
        f'OnlineGrad {self.name!r}: the cell rejected inputs of shape '
        f'{inputs.shape} (in_features {inputs.shape[-1]}): {e}'
      ) from e
    if init:  # the state starts at rest: the initial carry, zero traces
      zeros = jax.tree.map(jnp.zeros_like, new_traces)
      self.put_variable(ELIGIBILITY, 'traces', zeros)
    else:
      self.put_variable(CARRY, 'state', new_carry)
      self.put_variable(ELIGIBILITY, 'traces', new_traces)
      self._report(ys, mask)
    axis = 0 if self.time_major else inputs.ndim - 2
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, axis), ys)

  def _report(self, ys, mask) -> None:
    """Sows the spike count and the firing-rate regulariser."""
    add = dict(init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    if self.is_mutable_collection(METRICS):
      total = sum(jnp.sum(y) for y in jax.tree.leaves(ys))
      self.sow(METRICS, 'output_sum', total, **add)
    if self.target_rate is None or not self.is_mutable_collection(LOSSES):
      return
    if not 0 <= self.target_rate <= 1 or self.rate_coefficient < 0:
      raise ValueError(
        f'OnlineGrad {self.name!r}: target_rate must be in [0, 1] (spikes per '
        f'step) and rate_coefficient >= 0; got {self.target_rate} and '
        f'{self.rate_coefficient}.'
      )
    weight = mask[..., None].astype(jax.tree.leaves(ys)[0].dtype)
    count = jnp.maximum(jnp.sum(weight, axis=tuple(range(mask.ndim))), 1)
    penalty = 0.0
    for y in jax.tree.leaves(ys):
      rate = jnp.sum(y * weight, axis=tuple(range(mask.ndim))) / count
      penalty = penalty + jnp.sum((rate - self.target_rate) ** 2)
    self.sow(
      LOSSES, 'firing_rate', 0.5 * self.rate_coefficient * penalty, **add
    )

  def _time_first(self, inputs, mask):
    if not isinstance(inputs, jax.Array | jnp.ndarray) or jnp.ndim(inputs) < 2:
      raise ValueError(
        f'OnlineGrad {self.name!r}: inputs must be an array of shape '
        f'(*batch, time, in_features) (time-major: (time, *batch, '
        f'in_features)); got {getattr(inputs, "shape", type(inputs))}.'
      )
    axis = 0 if self.time_major else inputs.ndim - 2
    xs = jnp.moveaxis(inputs, axis, 0)
    if mask is None:
      return xs, jnp.ones(xs.shape[:-1], bool)
    expected = inputs.shape[:-1]
    if jnp.shape(mask) != expected:
      raise ValueError(
        f'OnlineGrad {self.name!r}: mask must have shape {expected} (the '
        f'inputs without the feature axis); got {jnp.shape(mask)}.'
      )
    return xs, jnp.moveaxis(jnp.asarray(mask, bool), axis, 0)

  def _stored_carry(self, xs):
    if self.is_initializing():  # a fixed key, as nn.RNN uses by default
      carry = self.cell.initialize_carry(jax.random.key(0), xs.shape[1:])
      return self.variable(CARRY, 'state', lambda: carry).value
    carry = self._stored(CARRY, 'state')
    want = jax.tree.leaves(carry)[0].shape[:-1]
    if want != xs.shape[1:-1]:
      raise ValueError(
        f'OnlineGrad {self.name!r}: the input batch shape {xs.shape[1:-1]} '
        f'differs from the stored state batch shape {want}; init the model '
        'with a batch of the same shape (model.init) to make a state for this '
        'batch.'
      )
    return carry

  def _stored(self, collection: str, name: str):
    if not self.has_variable(collection, name):
      raise ValueError(
        f'OnlineGrad {self.name!r}: no {collection!r} collection was passed. '
        "Pass the state from init: model.apply({'params': params, **state}, "
        "xs, mutable=['carry', 'eligibility'])."
      )
    if not self.is_mutable_collection(collection):
      raise ValueError(
        f'OnlineGrad {self.name!r}: the {collection!r} collection must be '
        'mutable: every call advances the state. Call apply(..., '
        "mutable=['carry', 'eligibility']) and keep the returned state."
      )
    return self.get_variable(collection, name)


def reset_state(state: dict, where: jax.Array | None = None) -> dict:
  """Zeroes the carry and the eligibility traces of every `OnlineGrad`.

  Args:
    state: the non-parameter collections, e.g. ``{'carry': ...,
      'eligibility': ...}`` as returned by ``init``/``apply``.
    where: optional bool ``(*batch,)``: reset only these batch rows (at
      sequence boundaries in a stream); default all.

  Returns:
    The new state (other collections unchanged).
  """

  def zero(leaf):
    if where is None:
      return jnp.zeros_like(leaf)
    w = jnp.asarray(where, bool)
    if leaf.shape[: w.ndim] != w.shape:
      raise ValueError(
        f'where: expected a bool mask of the batch shape {leaf.shape[: w.ndim]}'
        f', got shape {w.shape}.'
      )
    w = w.reshape(w.shape + (1,) * (leaf.ndim - w.ndim))
    return jnp.where(w, jnp.zeros_like(leaf), leaf)

  out = dict(state)
  for collection in (CARRY, ELIGIBILITY):
    if collection in out:
      out[collection] = jax.tree.map(zero, out[collection])
  return out
