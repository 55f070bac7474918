"""Batch augmentation against speaker and onset variation (numpy).

Each function takes a batch ``{'x': (B, T, C), 'mask': (B, T), ...}`` and a
``np.random.Generator`` and returns a new batch (the input is not modified);
draws are per example. :class:`Augment` chains them and is a ``transform``
for :class:`~flax_eprop.data.BatchIterator`, which seeds the generator from
its position, so augmented batches resume exactly::

  it = data.BatchIterator(train, 32, dtype=np.float32,
                          transform=data.Augment(channel_shift=3,
                                                 time_shift=5, dropout=0.1))

Nothing wraps around: what is shifted past an edge is dropped and the
vacated bins or channels are zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Transform = Callable[[dict, np.random.Generator], dict]


def _check_x(batch: dict, name: str) -> np.ndarray:
  x = batch.get('x')
  if x is None or np.ndim(x) != 3:
    raise ValueError(
      f'{name}: batch must hold x of shape (B, T, C), got '
      f'{None if x is None else np.shape(x)}.'
    )
  return np.asarray(x)


def _shift_axis(a: np.ndarray, shifts: np.ndarray, axis: int, fill):
  """Shifts ``a[b]`` by ``shifts[b]`` along ``axis`` (1 or 2), no wrap."""
  size = a.shape[axis]
  source = np.arange(size)[None, :] - shifts[:, None]  # (B, size)
  valid = (source >= 0) & (source < size)
  source = np.clip(source, 0, size - 1)
  if axis == 1:
    index = source.reshape(source.shape + (1,) * (a.ndim - 2))
    keep = valid.reshape(index.shape)
  else:
    index, keep = source[:, None, :], valid[:, None, :]
  out = np.take_along_axis(a, index, axis=axis)
  return np.where(keep, out, np.asarray(fill, a.dtype))


def shift_channels(
  batch: dict, rng: np.random.Generator, max_shift: int
) -> dict:
  """Shifts every example's channels by a random ``s`` in ``[-k, k]``.

  ``x'[b, t, c] = x[b, t, c - s_b]``; channels shifted past either edge are
  dropped and the vacated ones are zero.

  Args:
    batch: ``x: (B, T, C)`` and any other columns (kept).
    rng: the generator.
    max_shift: ``k >= 0``, in (pooled) channels.

  Returns:
    The batch with the shifted ``x``.

  Examples:
    >>> import numpy as np
    >>> x = np.arange(1, 6, dtype=np.float32).reshape(1, 1, 5)
    >>> out = shift_channels({'x': x}, np.random.default_rng(4), 2)  # s = 1
    >>> out['x'].tolist()
    [[[0.0, 1.0, 2.0, 3.0, 4.0]]]
  """
  x = _check_x(batch, 'shift_channels')
  shifts = rng.integers(-max_shift, max_shift + 1, size=x.shape[0])
  return {**batch, 'x': _shift_axis(x, shifts, 2, 0)}


def shift_time(batch: dict, rng: np.random.Generator, max_shift: int) -> dict:
  """Moves every example's onset by a random ``d`` in ``[-k, k]`` bins.

  ``x'[b, t] = x[b, t - d_b]`` and the mask moves with the data: a later
  onset (``d > 0``) prepends ``d`` silent bins, valid where the example's
  first bin was, and pushes the last ``d`` bins out of the window; an
  earlier one (``d < 0``) drops the first ``|d|`` bins and leaves the last
  ``|d|`` bins zero and masked. ``d`` is limited so that every example
  keeps at least one valid step; a ``length`` column is updated to the
  number of valid steps.

  Args:
    batch: ``x: (B, T, C)``, ``mask: (B, T)`` bool, optionally ``length:
      (B,)``, and any other columns (kept).
    rng: the generator.
    max_shift: ``k >= 0``, in bins.

  Returns:
    The batch with ``x``, ``mask`` (and ``length``) shifted.

  Examples:
    >>> import numpy as np
    >>> x = np.array([[[1.], [2.], [3.], [0.]]])
    >>> mask = np.array([[True, True, True, False]])
    >>> out = shift_time({'x': x, 'mask': mask}, np.random.default_rng(0), 1)
    >>> out['x'][0, :, 0].tolist(), out['mask'][0].tolist()
    ([0.0, 1.0, 2.0, 3.0], [True, True, True, True])
  """
  x = _check_x(batch, 'shift_time')
  mask = batch.get('mask')
  if mask is None or np.shape(mask) != x.shape[:2]:
    raise ValueError(
      f'shift_time: batch must hold mask of shape {x.shape[:2]} (B, T), got '
      f'{None if mask is None else np.shape(mask)}.'
    )
  mask = np.asarray(mask, bool)
  shifts = rng.integers(-max_shift, max_shift + 1, size=x.shape[0])
  steps = np.arange(x.shape[1])
  last = np.max(np.where(mask, steps, -1), axis=1)  # last valid step
  shifts = np.maximum(shifts, -np.maximum(last, 0))  # keep one valid step
  out = {**batch, 'x': _shift_axis(x, shifts, 1, 0)}
  moved = _shift_axis(mask, shifts, 1, False)
  lead = steps[None, :] < shifts[:, None]  # prepended bins: as the first one
  out['mask'] = np.where(lead, mask[:, :1], moved)
  if 'length' in batch:
    length = out['mask'].sum(axis=1)
    out['length'] = length.astype(np.asarray(batch['length']).dtype)
  return out


def drop_inputs(batch: dict, rng: np.random.Generator, rate: float) -> dict:
  """Zeroes each entry of ``x`` with probability ``rate`` (spike deletion).

  The kept entries are not rescaled: a count stays a count, and training
  sees ``1 - rate`` of the input on average.

  Args:
    batch: ``x: (B, T, C)`` and any other columns (kept).
    rng: the generator.
    rate: the probability in ``[0, 1)``.

  Returns:
    The batch with the thinned ``x``.
  """
  x = _check_x(batch, 'drop_inputs')
  keep = rng.random(x.shape) >= rate
  return {**batch, 'x': np.where(keep, x, np.zeros((), x.dtype))}


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random channel shifts, onset shifts and input dropout, per example.

  A ``transform(batch, rng) -> batch`` for
  :class:`~flax_eprop.data.BatchIterator`. Applies, in this order,
  :func:`shift_time` (``time_shift``), :func:`shift_channels`
  (``channel_shift``) and :func:`drop_inputs` (``dropout``); a zero
  setting skips its step (and its random draws).

  Attributes:
    channel_shift: largest channel shift ``k`` (pooled channels): against
      speaker (pitch/formant) variation.
    time_shift: largest onset shift (bins): against onset variation.
    dropout: probability of zeroing an input entry.

  Examples:
    >>> import numpy as np
    >>> batch = {'x': np.ones((2, 4, 6), np.float32),
    ...          'mask': np.ones((2, 4), bool)}
    >>> out = Augment(channel_shift=1, time_shift=1, dropout=0.5)(
    ...   batch, np.random.default_rng(0))
    >>> out['x'].shape, out['mask'].shape, float(batch['x'].min())
    ((2, 4, 6), (2, 4), 1.0)
  """

  channel_shift: int = 0
  time_shift: int = 0
  dropout: float = 0.0

  def __post_init__(self):
    for name in ('channel_shift', 'time_shift'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f'Augment: {name}={value!r} must be an int >= 0.')
      if value < 0:
        raise ValueError(f'Augment: {name}={value!r} must be an int >= 0.')
    if not 0 <= self.dropout < 1:
      raise ValueError(
        f'Augment: dropout={self.dropout!r} must be a probability in [0, 1).'
      )

  def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
    """Augments ``batch`` (``x: (B, T, C)``, ``mask: (B, T)``)."""
    if self.time_shift:
      batch = shift_time(batch, rng, self.time_shift)
    if self.channel_shift:
      batch = shift_channels(batch, rng, self.channel_shift)
    if self.dropout:
      batch = drop_inputs(batch, rng, self.dropout)
    return batch


def chain(*transforms: Transform) -> Transform:
  """Composes transforms left to right, sharing the one generator.

  Args:
    *transforms: ``transform(batch, rng) -> batch`` callables.

  Returns:
    ``transform(batch, rng)`` applying each in turn.
  """

  def transform(batch: dict, rng: np.random.Generator) -> dict:
    for t in transforms:
      batch = t(batch, rng)
    return batch

  return transform
