"""Fixed-dt binning of spike events into dense ``(time, channels)`` arrays.

Convention: with a bin width ``dt`` (seconds), bin ``k`` covers the half-open
interval ``[k * dt, (k + 1) * dt)``, so a spike at ``t = k * dt`` lands in bin
``k`` and a spike at ``t = max_time`` is outside the ``num_bins(max_time, dt)``
bins. Spike times are stored as floats: a time within rounding of an edge
(four units in the last place of its own dtype, at most ``1e-3 * dt``) counts as
exactly on the edge, so ``t = 0.3`` with ``dt = 0.1`` is in bin 3 even though
``0.3 / 0.1 == 2.9999999999999996``.

Unlike a binning into a fixed *number* of bins per sample (whose width depends
on the sample's duration), the bin width here is the same for every sample:
one time step of the network is one ``dt`` in every sample.

Counts saturate at 255 (``uint8``); ``binary=True`` gives ``bool`` arrays.

Units: times, ``dt`` and ``max_time`` are in seconds here, as in the SHD/SSC
files. The cells count ``dt`` and time constants in milliseconds;
:func:`~flax_eprop.data.load` and :func:`~flax_eprop.data.from_hdf5` take
``dt_ms`` as well, so one millisecond value serves both.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Largest snapping tolerance, in units of dt.
_MAX_SNAP = 1e-3


def _snap_tolerance(dtype: np.dtype, q: np.ndarray) -> np.ndarray:
  """Per-value tolerance (in bins) for snapping ``q = t / dt`` to an edge."""
  eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
  eps = max(float(eps), float(np.finfo(np.float64).eps))
  return np.minimum(4 * eps * np.maximum(np.abs(q), 1.0), _MAX_SNAP)


def bin_index(times: np.ndarray, dt: float) -> np.ndarray:
  """Index of the bin of each spike time: ``floor(t / dt)``, edges snapped.

  Args:
    times: ``(num_events,)`` spike times in seconds (any float dtype).
    dt: the bin width in seconds.

  Returns:
    ``(num_events,)`` int64 bin indices (negative for negative times).

  Examples:
    >>> import numpy as np
    >>> bin_index(np.array([0.0, 0.0099, 0.01, 0.3, 0.31]), 0.01).tolist()
    [0, 0, 1, 30, 31]
    >>> bin_index(np.array([0.3]), 0.1).tolist()  # 0.3 / 0.1 < 3 in floats
    [3]
  """
  times = np.asarray(times)
  q = times.astype(np.float64) / float(dt)
  nearest = np.rint(q)
  on_edge = np.abs(q - nearest) <= _snap_tolerance(times.dtype, q)
  return np.where(on_edge, nearest, np.floor(q)).astype(np.int64)


def num_bins(max_time: float, dt: float) -> int:
  """Number of bins of width ``dt`` that cover ``[0, max_time)``.

  Args:
    max_time: the duration in seconds (> 0).
    dt: the bin width in seconds (> 0).

  Returns:
    ``ceil(max_time / dt)`` with the edge snapping of :func:`bin_index`.

  Examples:
    >>> num_bins(1.4, 0.01), num_bins(1.0, 0.3)
    (140, 4)
  """
  check_binning(dt, max_time)
  q = float(max_time) / float(dt)
  tol = float(_snap_tolerance(np.dtype(np.float64), np.asarray(q)))
  return int(round(q)) if abs(q - round(q)) <= tol else math.ceil(q)


DEFAULT_DT = 0.01  # s: 10 ms bins


def resolve_dt(dt: float | None, dt_ms: float | None) -> float:
  """The bin width in seconds from ``dt`` (s) or ``dt_ms`` (ms).

  Args:
    dt: the bin width in seconds, or None.
    dt_ms: the bin width in milliseconds (the unit of the cells' ``dt``),
      or None.

  Returns:
    ``dt``, or ``dt_ms / 1000``, or ``DEFAULT_DT`` (0.01 s) if both are None.

  Examples:
    >>> resolve_dt(None, 10.0), resolve_dt(0.004, None), resolve_dt(None, None)
    (0.01, 0.004, 0.01)
  """
  if dt is not None and dt_ms is not None:
    raise ValueError(
      f'pass dt (seconds) or dt_ms (milliseconds), not both: got dt={dt!r} '
      f'and dt_ms={dt_ms!r}.'
    )
  if dt_ms is not None:
    if not (np.isfinite(dt_ms) and dt_ms > 0):
      raise ValueError(
        f'dt_ms must be a positive number of milliseconds, got {dt_ms!r}.'
      )
    return float(dt_ms) / 1000.0
  return DEFAULT_DT if dt is None else dt


def check_binning(
  dt: float, max_time: float, channels: int = 700, pool: int = 1
):
  """Raises ``ValueError`` for a binning that cannot be applied.

  Args:
    dt: the bin width in seconds.
    max_time: the duration in seconds.
    channels: the number of input channels.
    pool: the number of adjacent channels summed into one.
  """
  if not (np.isfinite(dt) and dt > 0):
    raise ValueError(f'dt must be a positive number of seconds, got {dt!r}.')
  if not (np.isfinite(max_time) and max_time > 0):
    raise ValueError(f'max_time must be positive seconds, got {max_time!r}.')
  if max_time < dt:
    raise ValueError(
      f'max_time={max_time!r} is shorter than one bin dt={dt!r}; both are in '
      'seconds (10 ms is dt=0.01).'
    )
  if not isinstance(pool, (int, np.integer)) or pool < 1 or channels % pool:
    valid = [p for p in range(1, channels + 1) if channels % p == 0]
    raise ValueError(
      f'pool={pool!r} must divide channels={channels}; valid values: {valid}.'
    )


class Binned(NamedTuple):
  """A batch of binned samples.

  Attributes:
    x: ``(batch, time, channels // pool)`` uint8 counts (saturating at 255),
      or bool when binned with ``binary=True``.
    mask: ``(batch, time)`` bool, True on the first ``length`` steps.
    length: ``(batch,)`` int64, one plus the bin of the last spike inside
      ``[0, max_time)``, at least 1.
  """

  x: np.ndarray
  mask: np.ndarray
  length: np.ndarray


def bin_events(
  times: np.ndarray,
  units: np.ndarray,
  sample: np.ndarray,
  *,
  batch_size: int,
  dt: float,
  max_time: float,
  channels: int = 700,
  pool: int = 1,
  binary: bool = False,
) -> Binned:
  """Bins the events of a batch of samples, given as flat event arrays.

  Counts the flat indices ``(sample, bin, channel // pool)`` with one
  ``np.unique``: no Python loop over samples or events. Events at or after
  ``max_time`` are left out; times must be finite and non-negative and units
  in ``[0, channels)`` (the readers check this).

  Args:
    times: ``(num_events,)`` spike times in seconds.
    units: ``(num_events,)`` integer channel ids in ``[0, channels)``.
    sample: ``(num_events,)`` index of each event's sample in
      ``[0, batch_size)``.
    batch_size: the number of samples B.
    dt: the bin width in seconds.
    max_time: the duration covered; ``T = num_bins(max_time, dt)``.
    channels: the number of input channels C.
    pool: adjacent channels summed into one (must divide C).
    binary: if True, ``x`` is bool (any spike in the bin).

  Returns:
    A :class:`Binned` with ``x: (B, T, C // pool)``, ``mask: (B, T)``,
    ``length: (B,)``.

  Examples:
    >>> import numpy as np
    >>> out = bin_events(np.array([0.0, 0.01, 0.015, 0.02]),
    ...                  np.array([3, 3, 3, 1]), np.array([0, 0, 0, 1]),
    ...                  batch_size=2, dt=0.01, max_time=0.03, channels=4)
    >>> out.x[0, :, 3].tolist(), out.x[1, :, 1].tolist(), out.length.tolist()
    ([1, 2, 0], [0, 0, 1], [2, 3])
  """
  check_binning(dt, max_time, channels, pool)
  steps, width = num_bins(max_time, dt), channels // pool
  k = bin_index(times, dt)
  keep = (k >= 0) & (k < steps)
  k, sample = k[keep], np.asarray(sample, np.int64)[keep]
  units = np.asarray(units, np.int64)[keep] // pool
  flat = (sample * steps + k) * width + units
  # Scatter the counts of the occupied cells: a dense int64 bincount of the
  # whole (B, T, C) block and its conversion to uint8 cost ~8x more.
  cells, counts = np.unique(flat, return_counts=True)
  x = np.zeros(batch_size * steps * width, bool if binary else np.uint8)
  x[cells] = True if binary else np.minimum(counts, 255)
  x = x.reshape(batch_size, steps, width)
  last = np.full(batch_size, -1, np.int64)
  np.maximum.at(last, sample, k)
  length = np.maximum(last + 1, 1)
  mask = np.arange(steps)[None, :] < length[:, None]
  return Binned(x=x, mask=mask, length=length)


def bin_spikes(
  times: np.ndarray,
  units: np.ndarray,
  *,
  dt: float,
  max_time: float,
  channels: int = 700,
  pool: int = 1,
  binary: bool = False,
) -> np.ndarray:
  """Bins the events of one sample into a dense ``(time, channels)`` array.

  Args:
    times: ``(num_events,)`` spike times in seconds.
    units: ``(num_events,)`` integer channel ids in ``[0, channels)``.
    dt: the bin width in seconds.
    max_time: the duration covered; ``T = num_bins(max_time, dt)``.
    channels: the number of input channels C.
    pool: adjacent channels summed into one (must divide C).
    binary: if True, the result is bool.

  Returns:
    ``(T, C // pool)`` uint8 counts, or bool with ``binary=True``.

  Examples:
    >>> import numpy as np
    >>> x = bin_spikes(np.array([0.0, 0.02, 0.021]), np.array([0, 5, 6]),
    ...                dt=0.01, max_time=0.03, channels=8, pool=4)
    >>> x.tolist()
    [[1, 0], [0, 0], [0, 2]]
  """
  times = np.asarray(times)
  sample = np.zeros(times.shape, np.int64)
  return bin_events(
    times,
    units,
    sample,
    batch_size=1,
    dt=dt,
    max_time=max_time,
    channels=channels,
    pool=pool,
    binary=binary,
  ).x[0]
