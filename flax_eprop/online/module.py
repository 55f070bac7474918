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
from collections.abc import Mapping
from typing import Any, Iterator, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict, unfreeze
from flax.errors import ScopeParamShapeError
from flax.linen.transforms import lift_transform

from flax_eprop.online import filtered, lifted, rnn_api, rtrl
from flax_eprop.online.state import CARRY, ELIGIBILITY, resting
from flax_eprop.sparse import Mode, NonLocalError

METRICS = 'online_metrics'
LOSSES = 'online_losses'
GradientMode = Literal['online', 'bptt']

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


# True while `online_value_and_grad` / `online_update` trace one chunk of
# a longer sequence: a layer with ``reverse=True`` would then read each
# chunk backwards instead of the sequence, so it refuses.
_SPLIT_SEQUENCE: contextvars.ContextVar[bool] = contextvars.ContextVar(
  'flax_eprop_split_sequence', default=False
)


@contextlib.contextmanager
def split_sequence(split: bool) -> Iterator[None]:
  """Marks the layers traced in the block as running chunks of a longer
  sequence (``split``) or whole sequences."""
  token = _SPLIT_SEQUENCE.set(bool(split))
  try:
    yield
  finally:
    _SPLIT_SEQUENCE.reset(token)


class OnlineGrad(nn.Module):
  """Runs a recurrent cell over time with an online e-prop gradient.

  Use it where you would use ``nn.RNN(cell)``. Every call consumes one chunk
  ``inputs: (*batch, time, in)`` (or ``(time, *batch, in)`` with
  ``time_major``) and returns the cell's outputs ``(*batch, time,
  features)``; a single step is a chunk of length 1.

  State. The carry (collection ``'carry'``) and the traces (collection
  ``'eligibility'``) are created at rest by ``init`` (the cell's
  ``initialize_carry``, zero traces) or, for any batch shape, by
  `rest_state`. A call with the state advances it, so ``apply`` then needs
  ``mutable=['carry', 'eligibility']`` and the returned state must be fed to
  the next chunk; `reset_state` puts it back at rest between sequences. A
  call without the state (``apply({'params': params}, xs)``, nothing
  mutable) runs from rest and keeps nothing, like ``nn.RNN``: inference at
  any batch size, or training on a whole sequence in one call, whose
  e-prop gradient then needs no start term and no final trace update.
  ``init`` (and ``init_with_output``) returns what ``nn.RNN`` returns, the
  outputs (and with ``return_carry`` the carry) of the chunk run from rest
  by a plain forward scan, but stores the state at rest: training starts
  from rest, not after the ``init`` inputs.

  The ``'carry'`` collection holds ``'state'`` (the carry, ``(*batch,
  features)`` leaves) and ``'rest'`` (the carry at rest, which `reset_state`
  restores). The ``'eligibility'`` collection holds, in mode ``'eprop'``::

    synapses:    {'input/kernel': (*batch, K' - S, in, features), ...}
    presynaptic: {'input/kernel': (*batch, S, in), ...}
    direct:      {'tau_mem': (*batch, K', features), ...}
    derived:     (*batch, K - K', K', features)

  ``synapses``, ``presynaptic`` and ``direct`` are the eligibility traces
  of the K' carry leaves that need one, keyed by the parameter's path (a
  synapse by its kernel's). The S rows whose trace is the same for every
  post-neuron (LIF's ``v`` with a shared ``tau_mem`` and a detached reset,
  found by `flax_eprop.sparse.compression`) are kept once per presynaptic
  neuron under ``presynaptic``; ``synapses`` holds the others (absent when
  there are none). ``derived`` (only for cells that have such leaves) is not a
  trace but the coefficients ``C`` that give the traces of the carry leaves
  computed from the others' new values in the same step (the spike ``z_t``:
  ``eps_z = C eps_core``). In mode ``'exact'`` it holds ``rtrl: (*batch,
  K * features, P)``. A layer with ``readout_decay`` also holds
  ``readout_filter``, its filter's state (`flax_eprop.online.filtered`).
  Traces are stored in ``trace_dtype`` (float32 by default, also with x64
  enabled).

  Firing-rate regularisation (Bellec et al. 2020): with ``target_rate`` set,
  each call adds ``rate_coefficient / 2 * sum_j (f_j - target_rate)^2`` to
  the loss, where ``f_j`` is neuron ``j``'s mean output over the chunk's
  valid steps and batch rows (the whole sequence when it is one chunk). The
  term is sown into the ``'online_losses'`` collection, which
  `online_value_and_grad` and `bptt_value_and_grad` add to the loss; its
  gradient reaches the parameters through the same eligibility traces.

  Differences from ``nn.RNN``. ``OnlineGrad`` takes ``nn.RNN``'s attributes
  and call arguments (the ``RNNBase`` interface ``nn.Bidirectional`` uses),
  with the same params tree and, on a whole sequence, the same outputs and
  carry. What differs:

  * State: the carry and traces persist in the ``'carry'`` and
    ``'eligibility'`` collections; pass them with ``mutable=['carry',
    'eligibility']`` (or no state at all, to run from rest as ``nn.RNN``).
  * Gradient: e-prop (or RTRL in mode ``'exact'``), not BPTT: nothing flows
    back across steps or calls; ``initial_carry`` gets no gradient.
  * Padded steps (``mask`` or ``seq_lengths``) change nothing and output
    zeros; ``nn.RNN`` keeps computing there (its outputs are not masked) and
    only selects the last valid carry. The returned carry is the same.
  * ``reverse`` / ``keep_order`` act on the chunk of one call. Across calls
    the state continues from the previous call: feeding a sequence's chunks
    last first, each with ``reverse=True``, runs the whole sequence
    backwards (the traces too). With ``seq_lengths`` each sequence's valid
    steps are reversed and the padding stays at the end, as ``nn.RNN``;
    with ``mask`` the whole time axis is reversed (padded steps may sit
    anywhere).
  * ``initial_carry`` with a stored state starts a new sequence from that
    carry (traces from zero); ``init_key`` is used when the carry starts at
    rest (``init``, a call without state).
  * ``nn.scan`` options: ``unroll`` is the plain scan's (BPTT mode, ``init``;
    the engines choose their own loops, results are the same);
    ``variable_axes``, ``variable_broadcast``, ``variable_carry`` and
    ``split_rngs`` are accepted at ``nn.RNN``'s defaults only (shared
    parameters, a pure step) and refused otherwise, with the reason.
  * Cells: any cell in mode ``'exact'`` (``nn.ConvLSTMCell`` too, features
    flattened), within ``exact_max_bytes``. Mode ``'eprop'`` takes cells
    with one feature axis whose neurons interact only through parameter
    synapses (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.MGUCell``,
    ``nn.SimpleCell`` and the spiking cells); it refuses
    ``nn.OptimizedLSTMCell`` (fused gate kernels: use ``nn.LSTMCell``, the
    same function and params) and ``nn.ConvLSTMCell`` (a convolution mixes
    neighbouring positions).
  * ``init`` stores the state at rest, although it returns the chunk's
    outputs.

  Attributes:
    cell: the recurrent cell, ``cell(carry, x) -> (carry, y)`` with every
      carry and output leaf of shape ``(*batch, *features)`` (one feature
      axis in mode ``'eprop'``; ``cell.num_feature_axes`` of them).
    mode: ``'eprop'`` (default): compressed e-prop traces, the recurrent
      synapse paths dropped. ``'exact'``: real-time recurrent learning
      (`flax_eprop.online.rtrl`), the exact gradient of the layer computed
      forward in time with a dense trace; for small networks and for
      measuring e-prop's approximation. Any cell works in this mode,
      neuron-mixing ones too.
    time_major: inputs are ``(time, *batch, in)`` instead of batch-major.
    trace_dtype: dtype of the stored eligibility traces.
    target_rate: target mean output per step (spikes per step, e.g. 0.01 =
      10 Hz at dt = 1 ms), or None for no regularisation.
    rate_coefficient: weight of the firing-rate term (>= 0).
    return_carry: return ``(carry, outputs)`` (``nn.RNN``'s attribute).
    reverse: process each call's chunk from its last step to its first.
    keep_order: with ``reverse``, return outputs in the input's order.
    unroll: scan iterations per loop iteration of the plain forward scan.
    variable_axes: ``nn.RNN``'s; only ``{}`` (no per-step variables).
    variable_broadcast: ``nn.RNN``'s; only ``'params'``.
    variable_carry: ``nn.RNN``'s; only ``False``.
    split_rngs: ``nn.RNN``'s; only ``{'params': False}``.
    exact_max_bytes: in mode ``'exact'``, the most memory a chunk may need
      (`flax_eprop.online.rtrl.memory_bytes`: the dense trace, the per-step
      Jacobians and the chunk's sensitivities), checked before anything is
      allocated; above it `TraceTooLargeError` says how much is needed.
      Default 4 GiB; None: no check.
    readout_decay: the decay ``kappa = exp(-dt / tau_mem)`` of the leaky
      readout ``fe.OnlineGrad(fe.LI(...))`` that reads this layer's output
      (either form), or None (default): the layer then learns from the
      instantaneous signal only. With it, the layer's traces are filtered
      by ``kappa`` (Bellec et al. 2020): its gradient is ``sum_t L_t .
      ebar_t``, ``ebar_t = kappa ebar_{t-1} + e_t``, which through a
      readout directly on its output equals BPTT with the recurrent inputs
      and the reset stop-gradiented (`flax_eprop.online.filtered`). The
      cell's output must be one of its carry leaves (the spikes). The
      filter's state is ``'readout_filter'`` in ``'eligibility'`` (one more
      trace row per parameter); under ``gradient_mode('bptt')`` the plain
      cell runs. The training functions refuse it unless the model has a
      non-learnable leaky readout with this decay. In a stack, a lower
      layer may declare it too: it then filters its own traces by
      ``kappa`` and contracts them with the instantaneous signal it gets
      through the layers above (an approximation, like e-prop's for
      stacked layers).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> layer = fe.OnlineGrad(fe.ALIF(8))
    >>> xs = jnp.ones((2, 5, 3))  # (batch, time, in)
    >>> variables = layer.init(jax.random.key(0), xs)
    >>> sorted(variables)
    ['carry', 'eligibility', 'params']
    >>> jax.tree.map(jnp.shape, variables['eligibility'])
    {'derived': (2, 1, 2, 8), 'presynaptic': {'input/kernel': (2, 1, 3),
     'recurrent/kernel': (2, 1, 8)}, 'synapses': {'input/kernel': (2, 1, 3, 8),
     'recurrent/kernel': (2, 1, 8, 8)}}
    >>> params, state = variables['params'], {'carry': variables['carry'],
    ...                                       'eligibility': variables['eligibility']}
    >>> ys, state = layer.apply({'params': params, **state}, xs,
    ...                         mutable=['carry', 'eligibility'])
    >>> ys.shape
    (2, 5, 8)
    >>> layer.apply({'params': params}, jnp.ones((7, 5, 3))).shape  # from rest
    (7, 5, 8)
  """

  cell: nn.RNNCellBase
  mode: Mode = 'eprop'
  time_major: bool = False
  trace_dtype: Any = jnp.float32
  target_rate: float | None = None
  rate_coefficient: float = 1.0
  readout_decay: float | None = None
  # nn.RNN's attributes (the same meaning; see "Differences from nn.RNN").
  return_carry: bool = False
  reverse: bool = False
  keep_order: bool = False
  unroll: int = 1
  variable_axes: Mapping[Any, Any] = FrozenDict()
  variable_broadcast: Any = 'params'
  variable_carry: Any = False
  split_rngs: Mapping[Any, bool] = FrozenDict({'params': False})
  exact_max_bytes: int | None = rtrl.DEFAULT_MAX_BYTES

  @nn.compact
  def __call__(
    self,
    inputs: jax.Array,
    *,
    mask: jax.Array | None = None,
    seq_lengths: jax.Array | None = None,
    initial_carry: Any = None,
    init_key: jax.Array | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
  ):
    """Runs one chunk (the call of ``nn.RNN``, plus ``mask``).

    Args:
      inputs: ``(*batch, time, *features)`` (``(time, *batch, *features)``
        if ``time_major``); ``features`` has the cell's
        ``num_feature_axes`` axes (one for every cell e-prop takes).
      mask: optional bool ``(*batch, time)`` (``(time, *batch)`` if
        ``time_major``); False marks padded steps, which change neither the
        carry, the traces nor the gradient, and output zeros.
      seq_lengths: optional int ``(*batch,)`` (``nn.RNN``'s keyword): the
        same as ``mask=jnp.arange(time) < seq_lengths[..., None]`` (padded
        steps output zeros, unlike ``nn.RNN``'s). Not with ``mask``.
      initial_carry: the carry to start this chunk from instead of the
        stored state (or the rest carry); the traces then start at zero: a
        new sequence from this carry. It gets no gradient.
      init_key: key of the cell's ``initialize_carry`` when the carry starts
        at rest (``init``, a call without state); default
        ``jax.random.key(0)``, as ``nn.RNN``.
      return_carry: overrides the attribute: return ``(carry, outputs)``,
        the carry after the chunk's last valid step.
      time_major: overrides the attribute.
      reverse: overrides the attribute: run the chunk from its last step
        to its first (with ``seq_lengths``: each sequence's valid steps,
        padding kept at the end), outputs in processing order.
      keep_order: overrides the attribute: with ``reverse``, return the
        outputs in the input's order (as ``nn.Bidirectional`` asks).

    Returns:
      The outputs ``(*batch, time, *features)`` (or time-major), or
      ``(carry, outputs)`` with ``return_carry``.
    """
    pick = lambda arg, attr: attr if arg is None else arg
    return_carry = pick(return_carry, self.return_carry)
    time_major = pick(time_major, self.time_major)
    reverse = pick(reverse, self.reverse)
    keep_order = pick(keep_order, self.keep_order)
    where = self._where()
    if self.mode not in ('eprop', 'exact'):
      raise ValueError(
        f"{where}: mode must be 'eprop' or 'exact', got {self.mode!r}."
      )
    if self.target_rate is not None and (
      not 0 <= self.target_rate <= 1 or self.rate_coefficient < 0
    ):
      raise ValueError(
        f'{where}: target_rate must be in [0, 1] (spikes per step) '
        f'and rate_coefficient >= 0; got {self.target_rate} and '
        f'{self.rate_coefficient}.'
      )
    if reverse and _SPLIT_SEQUENCE.get():
      raise ValueError(
        f'{where}: reverse=True reverses the time axis of one call, but the '
        'sequence is being fed in chunks (online_value_and_grad / '
        'online_update with chunk shorter than the sequence), so the layer '
        'would read each chunk backwards, not the sequence. Pass the whole '
        'sequence as one chunk (chunk >= its length) or use '
        'bptt_value_and_grad.'
      )
    rnn_api.check_scan_options(self)
    rnn_api.check_cell(self.cell, self.mode, where)
    axes = self._feature_axes(inputs)
    inputs = jnp.asarray(inputs)  # a NumPy array is taken as well
    filtered.record(self, self._filter_decay(), self.cell)
    mask, lengths = rnn_api.steps_mask(
      inputs,
      mask,
      seq_lengths,
      feature_axes=axes,
      time_major=time_major,
      where=where,
    )
    time_axis = 0 if time_major else inputs.ndim - axes - 1
    batch_axes = inputs.ndim - axes - 1
    flip = lambda tree, m: rnn_api.flip(
      tree, m, lengths, batch_axes=batch_axes, time_major=time_major
    )
    if reverse:
      inputs, mask = flip(inputs, mask)
    xs = jnp.moveaxis(inputs, time_axis, 0)
    carry, ys = self._chunk(
      xs, jnp.moveaxis(mask, time_axis, 0), initial_carry, init_key, inputs
    )
    ys = jax.tree.map(lambda y: jnp.moveaxis(y, 0, time_axis), ys)
    if reverse and keep_order:
      ys, _ = flip(ys, mask)
    return (carry, ys) if return_carry else ys

  def _chunk(self, xs, mask, initial_carry, init_key, inputs):
    """Runs time-major ``xs`` and keeps the state; ``(carry, ys)``."""
    where = self._where()
    if self.is_initializing() or resting():
      rest = self._rest_carry(xs, init_key)
      start = rest
      if initial_carry is not None:
        start = rnn_api.check_initial_carry(initial_carry, rest, where)
      action = 'rest' if resting() else 'init'
      ys, carry, traces, _ = self._run(start, None, xs, mask, action, inputs)
      # Traces at rest, the readout filter's state too (its carry ran).
      self._store(rest, jax.tree.map(jnp.zeros_like, traces), rest=rest)
      return carry, ys
    stateful = self._has_state()
    if initial_carry is not None:
      rest = self._rest_carry(xs, init_key)
      carry = rnn_api.check_initial_carry(initial_carry, rest, where)
      traces = None  # a new sequence from this carry
    elif stateful:
      carry = self._stored_carry(xs)
      traces = unfreeze(self.variables.get(ELIGIBILITY, {}))
    else:  # nothing passed, nothing kept: run from rest
      carry, traces = self._rest_carry(xs, init_key), None
    action = 'run' if stateful else 'sequence'
    ys, carry, traces, own = self._run(carry, traces, xs, mask, action, inputs)
    if stateful:
      self._store(carry, traces)
    self._report(own, mask)
    return carry, ys

  def _feature_axes(self, inputs) -> int:
    """The cell's ``num_feature_axes``, after checking the inputs' rank."""
    axes = getattr(self.cell, 'num_feature_axes', 1)
    if not isinstance(inputs, jax.Array | np.ndarray) or (
      jnp.ndim(inputs) < axes + 1
    ):
      raise ValueError(
        f'{self._where()}: inputs must be an array of shape (*batch, time, '
        f'in_features) (time-major: (time, *batch, in_features)), with '
        f'{axes} feature axes for {type(self.cell).__name__}; got '
        f'{getattr(inputs, "shape", type(inputs))}.'
      )
    return axes

  def _where(self) -> str:
    """The layer in error messages: its path, name or cell class."""
    path = '/'.join(self.scope.path) if self.scope is not None else ''
    if path or self.name:
      return f'OnlineGrad {path or self.name!r}'
    return f'OnlineGrad({type(self.cell).__name__})'

  def _filter_decay(self) -> float | None:
    if self.readout_decay is None:
      return None
    return filtered.check_decay(self.readout_decay, self._where())

  def _run(self, carry, traces, xs, mask, action, inputs):
    """``(ys, carry, traces, own)``: ``own`` are the outputs with the
    cell's own derivative, ``ys`` with the readout filter's (the same
    without ``readout_decay``)."""
    decay, gradient = self._filter_decay(), _GRADIENT.get()
    if decay is None or (gradient == 'bptt' and action != 'rest'):
      ys, carry, traces = self._run_chunk(
        lifted.cell_step, carry, traces, xs, mask, action, inputs
      )
      return ys, carry, traces, ys
    filt = filtered.Filter(decay, self._where())  # the readout filter
    carry, traces = filt.merge(carry, traces)
    out = self._run_chunk(filt.step(), carry, traces, xs, mask, action, inputs)
    return filt.split(*out)

  def _run_chunk(self, step, carry, traces, xs, mask, action, inputs):
    run_chunk = lift_transform(
      lifted.online_transform,
      step,
      trace_dtype=self.trace_dtype,
      gradient=_GRADIENT.get(),
      mode=self.mode,
      action=action,
      where=self._where(),
      unroll=self.unroll,
      feature_axes=getattr(self.cell, 'num_feature_axes', 1),
      max_bytes=self.exact_max_bytes,
    )
    try:
      return run_chunk(self.cell, carry, traces, xs, mask)
    except (ValueError, ScopeParamShapeError) as e:
      if isinstance(
        e, NonLocalError | lifted.StateError | rtrl.TraceTooLargeError
      ):
        raise
      raise ValueError(
        f'{self._where()}: its cell {type(self.cell).__name__} raised an '
        f'error (inputs of shape {inputs.shape}): {e}'
      ) from e

  def _store(self, carry, traces, rest=None) -> None:
    self.put_variable(CARRY, 'state', carry)
    if rest is not None:
      self.put_variable(CARRY, 'rest', rest)
    for name, value in traces.items():
      self.put_variable(ELIGIBILITY, name, value)

  def _report(self, ys, mask) -> None:
    """Sows the spike count and the firing-rate regulariser."""
    add = dict(init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    if self.is_mutable_collection(METRICS):
      total = sum(jnp.sum(y) for y in jax.tree.leaves(ys))
      self.sow(METRICS, 'output_sum', total, **add)
    if self.target_rate is None or not self.is_mutable_collection(LOSSES):
      return
    y0 = jax.tree.leaves(ys)[0]  # (n, *batch, *features)
    weight = mask.reshape(mask.shape + (1,) * (y0.ndim - mask.ndim))
    weight = weight.astype(y0.dtype)
    count = jnp.maximum(jnp.sum(weight, axis=tuple(range(mask.ndim))), 1)
    penalty = 0.0
    for y in jax.tree.leaves(ys):
      rate = jnp.sum(y * weight, axis=tuple(range(mask.ndim))) / count
      penalty = penalty + jnp.sum((rate - self.target_rate) ** 2)
    self.sow(
      LOSSES, 'firing_rate', 0.5 * self.rate_coefficient * penalty, **add
    )

  def _rest_carry(self, xs, init_key=None):
    """The cell's initial carry for time-major ``xs`` (``init_key``, by
    default ``jax.random.key(0)`` as ``nn.RNN``)."""
    key = jax.random.key(0) if init_key is None else init_key
    return self.cell.initialize_carry(key, xs.shape[1:])

  def _has_state(self) -> bool:
    """Whether a state was passed; raises if it cannot be kept."""
    mutable = [self.is_mutable_collection(c) for c in (CARRY, ELIGIBILITY)]
    if not self.has_variable(CARRY, 'state'):
      if any(mutable):
        raise ValueError(
          f'{self._where()}: no {CARRY!r} collection was passed but the '
          'state is mutable. Pass the state from init or fe.rest_state: '
          "model.apply({'params': params, **state}, xs, mutable=['carry', "
          "'eligibility']), or nothing mutable to run from rest."
        )
      return False
    for collection, ok in zip((CARRY, ELIGIBILITY), mutable):
      if collection not in self.variables:
        raise ValueError(
          f'{self._where()}: no {collection!r} collection was passed. Pass '
          "the state from init: model.apply({'params': params, **state}, xs, "
          "mutable=['carry', 'eligibility'])."
        )
      if not ok:
        raise ValueError(
          f'{self._where()}: the {collection!r} collection must be mutable: '
          'every call advances the state. Call apply(..., '
          "mutable=['carry', 'eligibility']) and keep the returned state, or "
          'pass no state to run from rest.'
        )
    return True

  def _stored_carry(self, xs):
    carry = self.get_variable(CARRY, 'state')
    want = jax.tree.leaves(carry)[0].shape[:-1]
    got = xs.shape[1:-1]
    if got == want:
      return carry
    if xs.shape[:-1] == want:
      raise ValueError(
        f'{self._where()}: the inputs of shape {xs.shape} have no time axis: '
        f'their batch shape is the stored state batch shape {want}. Pass '
        '(*batch, time, in_features), e.g. xs[..., None, :] for one step.'
      )
    raise ValueError(
      f'{self._where()}: the input batch shape {got} differs from the stored '
      f'state batch shape {want}; make a state for this batch with '
      'fe.rest_state(model.apply, params, xs) (or model.init).'
    )
