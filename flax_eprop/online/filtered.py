"""Learning through a leaky readout: Bellec's filtered eligibility traces.

A leaky readout ``fe.OnlineGrad(fe.LI(...))`` computes ``y_t = kappa
y_{t-1} + c W z_t + b`` (``c = 1`` for ``form='bellec'``, ``1 - kappa`` for
``'scaled'``) and sends the layer below the instantaneous learning signal
``L_t = c W^T ybar_t`` (its input cotangent). Through the readout's memory
``z_t`` also moves every later output, so BPTT gives ``dE/dz_t = sum_{t' >=
t} kappa^(t' - t) L_t'`` and, with ``e_t`` the layer's e-prop eligibility
(Bellec et al. 2020, Nat. Commun. 11:3625, eq. 30)::

  grad = sum_t e_t . dE/dz_t = sum_t L_t . ebar_t,  ebar_t = kappa ebar_{t-1} + e_t

which is online: no future signal is needed. ``ebar_t = d zbar_t / d theta``
is the e-prop eligibility of the filtered output ``zbar_t = kappa
zbar_{t-1} + z_t``, so a layer with ``readout_decay=kappa`` runs its cell
augmented with one carry leaf ``s_t = zbar_{t-1}`` (`filtered_step`)::

  s_t    = kappa s_{t-1} + y_{t-1}           (y_{t-1}: the previous output)
  zbar_t = kappa s_t + y_t
  out_t  = sg(y_t) + (zbar_t - sg(zbar_t))    value y_t, derivative of zbar_t

and the chunk engines derive the traces of ``s`` like any other carry leaf:
the forward outputs are unchanged, the learning signal ``L_t`` that reaches
``out_t`` is contracted with ``ebar_t``, and the inputs get the cotangent
of the step's own path, as before. Only the returned output carries the
filter's derivative, so it must feed the leaky readout alone (anything else
reading it gets a filtered cotangent too); the step also outputs ``y`` with
its own derivative, which the firing-rate regulariser reads. ``s`` reads the *previous* output, never
a new value, so the spike stays a derived leaf without a trace of its own:
the filter costs exactly one more trace row per parameter (ALIF 2 -> 3, LIF
1 -> 2). Under ``gradient_mode('bptt')`` the layer runs its plain cell: BPTT
through the readout already gives the full ``dE/dz_t``.

The filter's state lives in the ``'eligibility'`` collection, apart from
the cell's own traces (same layout as without the filter)::

  readout_filter: {'previous_filtered_output': (*batch, features),  # s_t
                   'synapses': {'input/kernel': (*batch, in, features), ...},
                   'direct':   {'tau_mem': (*batch, features), ...}}

(``d s_t / d theta = ebar_{t-1}``), so `flax_eprop.reset_state` and
`flax_eprop.rest_state` reset it with the rest of the traces.

The layer and the readout both record, into the collection
``'readout_decays'``, the decay they assume and provide; the training
functions (`flax_eprop.online_value_and_grad`, ...) compare them
(`check_readout_decays`) and refuse a filter without a matching
non-learnable leaky readout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from flax_eprop.online.engine import StateError

FILTER = 'readout_filter'  # the key of the filter's state in 'eligibility'
STATE = 'previous_filtered_output'
RECORDS = 'readout_decays'  # collection: decays assumed and provided
ASSUMED, PROVIDED, LEARNABLE = 'assumed', 'provided', 'learnable'
sg = jax.lax.stop_gradient


def check_decay(decay: Any, where: str) -> float:
  """``decay`` as a float in (0, 1); ``ValueError`` otherwise."""
  ok = isinstance(decay, numbers.Real) and not isinstance(decay, bool)
  if not ok or not 0 < decay < 1:
    raise ValueError(
      f"{where}: readout_decay must be the leaky readout's decay kappa = "
      f'exp(-dt / tau_mem), a float in (0, 1), e.g. math.exp(-1 / 20); got '
      f'{decay!r}.'
    )
  return float(decay)


class Filter(NamedTuple):
  """A layer's readout filter: its step, and its state in and out.

  Attributes:
    decay: the readout's ``kappa``.
    where: the layer, for error messages.
  """

  decay: float
  where: str

  def step(self) -> Callable:
    """``fn(cell, (carry, s), x) -> ((carry, s), (out, y))`` for the
    lifted transform (`filtered_step`)."""

    def fn(cell, carry, x):
      return filtered_step(self, cell, carry, x)

    return fn

  def merge(self, carry, traces):
    """The augmented carry ``(carry, s)`` and the engine's traces (the
    filter's row last) from the stored state; ``traces`` None: at rest."""
    if traces is None:
      return (carry, _zero_state(carry)), None
    if not isinstance(traces, Mapping) or FILTER not in traces:
      raise StateError(
        f"{self.where}: the stored 'eligibility' traces have no "
        f'{FILTER!r} entry, but this layer filters its traces by its '
        f'readout_decay={self.decay}. Make a state for this model with '
        'fe.rest_state(model.apply, params, xs) (or model.init).'
      )
    traces = dict(traces)
    own = traces.pop(FILTER)
    merged = dict(traces)
    try:
      for group, axis in (('synapses', -3), ('direct', -2)):
        if group in own:  # the cell's rows (if any), then the filter's
          rows = traces.get(group, {})
          merged[group] = {
            k: jnp.concatenate(
              [*([rows[k]] if k in rows else []), jnp.expand_dims(v, axis)],
              axis,
            )
            for k, v in own[group].items()
          }
      state = own[STATE]
    except (KeyError, TypeError, ValueError) as e:
      raise StateError(
        f'{self.where}: the stored {FILTER!r} state does not fit this '
        f'layer ({type(e).__name__}: {e}). Make a state for this model with '
        'fe.rest_state(model.apply, params, xs) (or model.init).'
      ) from e
    if 'derived' in traces:  # the cell's derived leaves never read s: 0
      c = traces['derived']
      zero = jnp.zeros((*c.shape[:-2], 1, c.shape[-1]), c.dtype)
      merged['derived'] = jnp.concatenate([c, zero], axis=-2)
    return (carry, state), merged

  def split(self, ys, carry, traces):
    """The inverse of `merge` on the transform's results: ``(outputs with
    the filter's derivative, carry, traces, outputs with the cell's own)``.
    """
    (ys, own), (carry, s) = ys, carry
    if traces is None:
      return ys, carry, None, own
    cell = dict(traces)
    filt = {STATE: s}
    for group, axis in (('synapses', -3), ('direct', -2)):
      if group in traces:
        rows = traces[group]
        cell[group] = {
          k: jax.lax.slice_in_dim(v, 0, v.shape[axis] - 1, axis=axis)
          for k, v in rows.items()
        }
        if all(v.shape[axis] == 1 for v in rows.values()):
          del cell[group]  # the cell keeps no such rows (e.g. LIF)
        filt[group] = {k: jnp.take(v, -1, axis=axis) for k, v in rows.items()}
    if 'derived' in traces:
      c = traces['derived']
      cell['derived'] = c[..., :-1, :]
    cell[FILTER] = filt
    return ys, carry, cell, own


def _zero_state(carry):
  leaf = jax.tree.leaves(carry)[0]
  return jnp.zeros(leaf.shape, leaf.dtype)


def filtered_step(filt: Filter, cell, carry, x):
  """One step of ``cell`` with the readout filter (module docstring).

  Args:
    filt: the filter.
    cell: the bound cell, ``cell(carry, x) -> (new_carry, y)``; its output
      ``y`` must be one of its carry leaves (the spike ``z``).
    carry: ``(cell carry, s)``, ``s: (*batch, features)`` = ``zbar_{t-1}``.
    x: ``(*batch, in)``.

  Returns:
    ``((new cell carry, new s), (out, y))``: ``out`` equals ``y`` and has
    the derivative of ``zbar_t`` (the layer's output, for the readout);
    ``y`` keeps its own (for the firing-rate regulariser).
  """
  inner, s = carry
  new_inner, y = cell(inner, x)
  index = _output_leaf(filt, new_inner, y)
  y_prev = jax.tree.leaves(inner)[index]
  new_s = (filt.decay * s + y_prev).astype(s.dtype)
  zbar = filt.decay * new_s + y
  return (new_inner, new_s), (sg(y) + (zbar - sg(zbar)), y)


def _output_leaf(filt: Filter, carry, y) -> int:
  """The index of the carry leaf that is the output ``y``."""
  for i, leaf in enumerate(jax.tree.leaves(carry)):
    if leaf is y:
      return i
  raise ValueError(
    f"{filt.where}: readout_decay needs the cell's output to be one of its "
    'carry leaves (the same array, as the spikes z of fe.LIF and fe.ALIF): '
    'the filter reads the previous output from the carry. This cell returns '
    f'an output of shape {jnp.shape(y)} that is not a carry leaf; return '
    'the carry leaf itself, or drop readout_decay.'
  )


# The check that a filtered layer sits below a matching leaky readout.


def record(module, decay: float | None, cell) -> None:
  """Sows what ``module`` (an `OnlineGrad`) assumes and provides.

  A layer with a ``readout_decay`` sows it as ``'assumed'``; a layer whose
  cell is `flax_eprop.LI` sows its decay as ``'provided'`` (``'learnable'``
  when its ``tau_mem`` is a parameter). Nothing happens unless the caller
  made ``'readout_decays'`` mutable (``init``, which makes every
  collection mutable, records nothing: the records are Python values, not
  state).
  """
  from flax_eprop.cells import LI  # cells import no online code

  if module.is_initializing() or not module.is_mutable_collection(RECORDS):
    return
  if decay is not None:
    module.sow(RECORDS, ASSUMED, decay)
  if isinstance(cell, LI):
    kappa = (
      LEARNABLE if cell.learn_tau_mem else math.exp(-cell.dt / cell.tau_mem)
    )
    module.sow(RECORDS, PROVIDED, kappa)


def check_readout_decays(records: Mapping, rtol: float = 1e-6) -> None:
  """Refuses filtered layers without a matching leaky readout.

  Args:
    records: the ``'readout_decays'`` collection of one ``apply``.
    rtol: relative tolerance of the comparison of decays.

  Raises:
    ValueError: a layer assumes a decay and the model has no leaky readout
      ``fe.OnlineGrad(fe.LI(...))``, or one that learns its ``tau_mem``, or
      none with that decay.
  """
  found = {ASSUMED: [], PROVIDED: []}
  _collect(records, (), found)
  if not found[ASSUMED]:
    return
  provided = found[PROVIDED]
  for where, decay in found[ASSUMED]:
    if not provided:
      raise ValueError(
        f'OnlineGrad {where!r}: readout_decay={decay} filters its traces by '
        "a leaky readout's decay, but the model has no leaky readout "
        'fe.OnlineGrad(fe.LI(...)) (a Dense, an nn.RNN or a spiking layer '
        'cannot be filtered through). Use fe.OnlineGrad(fe.LI(...)) as the '
        'readout, or drop readout_decay.'
      )
    learnable = [w for w, k in provided if k == LEARNABLE]
    if learnable:
      raise ValueError(
        f'OnlineGrad {where!r}: readout_decay={decay} needs a fixed readout '
        f'decay, but the readout {learnable[0]!r} learns its tau_mem '
        "(learn_tau_mem=True). Fix the readout's tau_mem or drop "
        'readout_decay.'
      )
    if not any(math.isclose(decay, k, rel_tol=rtol) for _, k in provided):
      have = ', '.join(f'{w!r}: {k!r}' for w, k in provided)
      raise ValueError(
        f'OnlineGrad {where!r}: readout_decay={decay} matches no leaky '
        f"readout of the model (decays {have}). Declare the readout's "
        'decay, math.exp(-dt / tau_mem) with its dt and tau_mem.'
      )


def _collect(tree, path, found) -> None:
  for key, value in tree.items():
    if key in found and isinstance(value, tuple):
      found[key].extend(('/'.join(path), v) for v in value)
    elif isinstance(value, Mapping):
      _collect(value, (*path, str(key)), found)
