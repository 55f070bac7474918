"""`nn.RNN`'s call interface for `OnlineGrad`: options, lengths, reversal.

`OnlineGrad` takes the arguments of ``nn.RNN`` (the `flax.linen.RNNBase`
protocol that ``nn.Bidirectional`` calls) so that a model moves from one to
the other by changing the class. This module holds what that needs besides
the layer itself:

* `check_scan_options`: ``nn.RNN``'s ``nn.scan`` options (``unroll``,
  ``variable_axes``, ``variable_broadcast``, ``variable_carry``,
  ``split_rngs``), accepted where they mean what `OnlineGrad` does and
  refused with the reason otherwise;
* `check_cell`: cells the e-prop engine cannot take, refused with the
  reason and the alternative before any tracing;
* `steps_mask`: ``seq_lengths`` or ``mask`` as one bool step mask;
* `flip`: time reversal as ``nn.RNN`` does it (padding stays at the end
  with ``seq_lengths``);
* `check_initial_carry`: an ``initial_carry`` against the cell's carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.recurrent import flip_sequences

_WHY = (
  'OnlineGrad shares the cell parameters across all time steps and treats '
  'a step as a pure function of (params, carry, x), which is what nn.RNN '
  "does with its defaults (variable_broadcast='params', variable_axes={}, "
  "variable_carry=False, split_rngs={'params': False})"
)


def check_scan_options(layer) -> None:
  """Raises unless the layer's ``nn.scan`` options are ``nn.RNN``'s defaults
  (the only ones with a meaning for `OnlineGrad`); ``unroll`` is checked.

  Raises:
    ValueError: naming the option, its value, what is accepted and why.
  """
  where = layer._where()
  unroll = layer.unroll
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ValueError(
      f'{where}: unroll must be an int >= 1 (scan iterations unrolled per '
      f'loop iteration, as in nn.RNN); got {unroll!r}.'
    )
  if dict(layer.variable_axes or {}):
    raise ValueError(
      f'{where}: variable_axes={dict(layer.variable_axes)!r} is not '
      f'supported (per-step variables): {_WHY}. Pass variable_axes={{}}.'
    )
  if layer.variable_broadcast not in ('params', ['params'], ('params',)):
    raise ValueError(
      f'{where}: variable_broadcast={layer.variable_broadcast!r} is not '
      f"supported: {_WHY}. Pass variable_broadcast='params'."
    )
  if layer.variable_carry not in (False, None, (), []):
    raise ValueError(
      f'{where}: variable_carry={layer.variable_carry!r} is not supported '
      f'(variables carried through the loop would need their own traces): '
      f'{_WHY}. Keep recurrent state in the carry.'
    )
  split = layer.split_rngs
  if not isinstance(split, Mapping) or dict(split) not in (
    {},
    {'params': False},
  ):
    raise ValueError(
      f'{where}: split_rngs={dict(split) if isinstance(split, Mapping) else split!r} is not supported: {_WHY}; random '
      'streams inside a cell would be drawn again differently by the '
      "gradient pass. Pass split_rngs={'params': False} and give the cell "
      'its random numbers as inputs.'
    )


def check_cell(cell, mode: str, where: str) -> None:
  """Refuses, in e-prop mode, the cells whose layout the engine cannot take.

  Raises:
    ValueError: for ``nn.OptimizedLSTMCell`` (fused gate kernels) and cells
      with more than one feature axis (``nn.ConvLSTMCell``), naming the
      reason and the alternative.
  """
  if mode != 'eprop':
    return
  name = type(cell).__name__
  if isinstance(cell, nn.OptimizedLSTMCell):
    raise ValueError(
      f"{where}: mode='eprop' does not support nn.OptimizedLSTMCell: it "
      'concatenates the four gate kernels into one (in, 4 * features) '
      'kernel and splits the result, so a gate column is not attributed to '
      'its neuron by the structure pass. Use nn.LSTMCell (the same function '
      "and the same parameter tree, gates stored apart) or mode='exact'."
    )
  axes = getattr(cell, 'num_feature_axes', 1)
  if axes != 1:
    raise ValueError(
      f"{where}: mode='eprop' needs a cell with one feature axis (carry "
      f'leaves (*batch, features)); {name} has num_feature_axes={axes}. '
      'A convolutional cell (nn.ConvLSTMCell) mixes neighbouring positions '
      "in its recurrent step, which e-prop's neuron-local traces cannot "
      "represent. Use mode='exact' (dense RTRL, small sizes only)."
    )


def steps_mask(
  inputs: jax.Array,
  mask,
  seq_lengths,
  *,
  feature_axes: int,
  time_major: bool,
  where: str,
) -> tuple[jax.Array, Any]:
  """One bool mask of valid steps, in the layout of ``inputs``.

  Args:
    inputs: ``(*batch, time, *features)`` (``(time, *batch, *features)``
      if ``time_major``).
    mask: None or bool ``(*batch, time)`` (time-major ``(time, *batch)``).
    seq_lengths: None or int ``(*batch,)``: steps ``t < seq_lengths`` are
      valid (``nn.RNN``'s keyword).
    feature_axes: the cell's ``num_feature_axes``.
    time_major: the layout.
    where: the layer, for error messages.

  Returns:
    ``(mask, seq_lengths)``: the bool mask (all True when neither is given)
    and the lengths as an int array (or None).
  """
  shape = inputs.shape[: inputs.ndim - feature_axes]
  time_axis = 0 if time_major else len(shape) - 1
  batch = shape[1:] if time_major else shape[:-1]
  if seq_lengths is None:
    if mask is None:
      return jnp.ones(shape, bool), None
    if jnp.shape(mask) != shape:
      raise ValueError(
        f'{where}: mask must have shape {shape} (the inputs without their '
        f'feature axes); got {jnp.shape(mask)}.'
      )
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
      raise TypeError(
        f'{where}: mask must be a bool array (True: a valid step), got '
        f'dtype {dtype}; convert it explicitly, e.g. mask > 0.'
      )
    return mask, None
  if mask is not None:
    raise ValueError(
      f'{where}: pass either mask or seq_lengths, not both (seq_lengths '
      'is the mask jnp.arange(time) < seq_lengths[..., None]).'
    )
  lengths = jnp.asarray(seq_lengths)
  if lengths.shape != batch or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
      f'{where}: seq_lengths must be an int array of the batch shape '
      f'{batch}; got shape {lengths.shape}, dtype {lengths.dtype}.'
    )
  steps = jnp.arange(shape[time_axis]).reshape((1,) * len(batch) + (-1,))
  valid = steps < jnp.expand_dims(lengths, -1)  # (*batch, time)
  return (jnp.moveaxis(valid, -1, 0) if time_major else valid), lengths


def flip(tree, mask, seq_lengths, *, batch_axes: int, time_major: bool):
  """Reverses the time axis of every leaf, as ``nn.RNN(reverse=True)``.

  With ``seq_lengths`` each sequence's valid steps are reversed in place and
  the padding stays at the end (`flax.linen.recurrent.flip_sequences`);
  otherwise the whole time axis, ``mask`` included, is reversed (its padded
  steps change nothing, so they may sit anywhere).

  Returns:
    ``(flipped tree, flipped mask)``.
  """
  rev = lambda x: flip_sequences(
    x, seq_lengths, num_batch_dims=batch_axes, time_major=time_major
  )
  if seq_lengths is not None:
    return jax.tree.map(rev, tree), mask
  return jax.tree.map(rev, tree), rev(mask)


def check_initial_carry(initial, rest, where: str):
  """Returns ``initial`` if it has the tree structure and leaf shapes of the
  cell's carry ``rest``; raises a ValueError naming both otherwise."""
  shapes = lambda tree: jax.tree.map(lambda a: tuple(jnp.shape(a)), tree)
  try:
    ok = jax.tree.structure(initial) == jax.tree.structure(rest) and (
      jax.tree.leaves(shapes(initial), is_leaf=_shape)
      == jax.tree.leaves(shapes(rest), is_leaf=_shape)
    )
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
      f"{where}: initial_carry must have the cell's carry structure and "
      f'shapes for these inputs, {shapes(rest)}; got {shapes(initial)}.'
    )
  return initial


def _shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)
