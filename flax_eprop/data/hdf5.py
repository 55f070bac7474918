"""Reading and writing spike files in the SHD/SSC HDF5 layout.

The layout of the Spiking Heidelberg Digits and Spiking Speech Commands files
(Cramer et al. 2020)::

  spikes/times        (num_samples,) ragged float, seconds
  spikes/units        (num_samples,) ragged int, channel ids in [0, 700)
  labels              (num_samples,) int, class ids
  extra/speaker       (num_samples,) int (optional)
  extra/keys          (num_classes,) bytes, class names (optional)
  extra/meta_info/*   per-speaker information (optional, not read)

Files are read with ``h5py`` directly (the generic ``datasets`` HDF5 loader
fails on ``extra/keys``), a block of samples at a time, so memory stays bounded
for the 75k-sample SSC training file.

Every problem is a :class:`SpikeFileError` that names the file, the sample and
the problem. With ``on_invalid='drop'`` the events with a non-finite or negative
time or a channel id outside ``[0, channels)`` are dropped instead and counted;
a ``spikes/times``/``spikes/units`` length mismatch is always an error, since
the events cannot be paired.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from flax_eprop.data._deps import require

OnInvalid = Literal['raise', 'drop']
REQUIRED_KEYS = ('spikes/times', 'spikes/units', 'labels')


class SpikeFileError(ValueError):
  """A spike file is missing data, malformed or holds invalid events."""


class Events(NamedTuple):
  """The events of a block of samples, flattened.

  Attributes:
    times: ``(num_events,)`` float64 spike times in seconds.
    units: ``(num_events,)`` int64 channel ids.
    sample: ``(num_events,)`` int64 index of the event's sample, relative to
      the first sample of the block.
    num_dropped: events dropped by ``on_invalid='drop'``.
  """

  times: np.ndarray
  units: np.ndarray
  sample: np.ndarray
  num_dropped: int


def _open(path: Path):
  h5py = require('h5py')
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such spike file.')
  try:
    return h5py.File(path, 'r')
  except OSError as err:
    raise SpikeFileError(
      f'{path}: cannot be read as HDF5 ({err}); the file is truncated or '
      'corrupt. Delete it and fetch it again.'
    ) from err


def _check_layout(path: Path, f) -> None:
  missing = [k for k in REQUIRED_KEYS if k not in f]
  if missing:
    raise SpikeFileError(
      f'{path}: missing HDF5 dataset(s) {missing}; a spike file needs '
      f'{list(REQUIRED_KEYS)} (found top-level keys {sorted(f.keys())}).'
    )
  n_times, n_units = len(f['spikes/times']), len(f['spikes/units'])
  n_labels = len(f['labels'])
  if not n_times == n_units == n_labels:
    raise SpikeFileError(
      f'{path}: spikes/times has {n_times} samples, spikes/units {n_units} and '
      f'labels {n_labels}; they must be equal.'
    )
  units = require('h5py').check_vlen_dtype(f['spikes/units'].dtype)
  if units is None or not np.issubdtype(units, np.integer):
    raise SpikeFileError(
      f'{path}: spikes/units must be ragged integers, got dtype '
      f'{f["spikes/units"].dtype}.'
    )


def _read_labels(path: Path, f) -> np.ndarray:
  labels = np.asarray(f['labels'][:])
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise SpikeFileError(
      f'{path}: labels must be a 1-d integer array, got shape {labels.shape} '
      f'and dtype {labels.dtype}.'
    )
  bad = np.flatnonzero(labels < 0)
  if bad.size:
    raise SpikeFileError(
      f'{path}: sample {bad[0]}: negative label {labels[bad[0]]}.'
    )
  return labels.astype(np.int64)


def _read_names(f) -> tuple[str, ...] | None:
  if 'extra/keys' not in f:
    return None
  names = f['extra/keys'][:]
  return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


class SpikeFile:
  """A reader of one spike file in the SHD/SSC layout (a context manager).

  Args:
    path: the ``.h5`` file.
    channels: the number of input channels; larger channel ids are invalid.
    on_invalid: ``'raise'`` (default) raises a :class:`SpikeFileError` at the
      first invalid event; ``'drop'`` drops invalid events and counts them in
      :attr:`Events.num_dropped`.

  Attributes:
    path: the file.
    labels: ``(num_samples,)`` int64 class ids.
    speakers: ``(num_samples,)`` int64 speaker ids, or None if absent.
    class_names: names from ``extra/keys``, or None if absent.

  Examples:
    >>> import tempfile, numpy as np
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = tmp.name + '/tiny.h5'
    >>> write_spikes(path, [np.array([0.0, 0.5])], [np.array([1, 2])], [3])
    >>> with SpikeFile(path) as f:
    ...   ev = f.events(0, 1)
    >>> len(f), f.labels.tolist(), ev.times.tolist(), ev.units.tolist()
    (1, [3], [0.0, 0.5], [1, 2])
    >>> tmp.cleanup()
  """

  def __init__(
    self, path, *, channels: int = 700, on_invalid: OnInvalid = 'raise'
  ):
    if on_invalid not in ('raise', 'drop'):
      raise ValueError(
        f"on_invalid must be 'raise' or 'drop', not {on_invalid!r}"
      )
    self.path, self.channels, self.on_invalid = Path(path), channels, on_invalid
    self._file = _open(self.path)
    try:
      _check_layout(self.path, self._file)
      self.labels = _read_labels(self.path, self._file)
      self.speakers = self._read_speakers()
      self.class_names = _read_names(self._file)
    except BaseException:
      self._file.close()
      raise

  def _read_speakers(self) -> np.ndarray | None:
    if 'extra/speaker' not in self._file:
      return None
    speakers = np.asarray(self._file['extra/speaker'][:], np.int64)
    if speakers.shape != self.labels.shape:
      raise SpikeFileError(
        f'{self.path}: extra/speaker has shape {speakers.shape}, expected '
        f'{self.labels.shape} (one per sample).'
      )
    return speakers

  def __len__(self) -> int:
    return len(self.labels)

  def __enter__(self) -> SpikeFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes the file."""
    self._file.close()

  def _rows(self, key: str, start: int, stop: int) -> np.ndarray:
    data = self._file[key]
    try:
      return data[start:stop]
    except OSError as err:
      for i in range(start, stop):  # find the first unreadable sample
        try:
          data[i]
        except OSError:
          raise SpikeFileError(
            f'{self.path}: sample {i}: {key} cannot be read ({err}); the '
            'file is truncated or corrupt. Delete it and fetch it again.'
          ) from err
      raise SpikeFileError(f'{self.path}: {key}: read failed: {err}') from err

  def events(self, start: int, stop: int) -> Events:
    """Reads and checks the events of samples ``start, ..., stop - 1``.

    Args:
      start: the first sample.
      stop: one past the last sample.

    Returns:
      The :class:`Events` of the block, with ``sample`` relative to ``start``.

    Raises:
      SpikeFileError: a length mismatch, or an invalid event when
        ``on_invalid='raise'``; the message names the sample index.
    """
    times = self._rows('spikes/times', start, stop)
    units = self._rows('spikes/units', start, stop)
    n_t = np.fromiter(map(len, times), np.int64, count=len(times))
    n_u = np.fromiter(map(len, units), np.int64, count=len(units))
    bad = np.flatnonzero(n_t != n_u)
    if bad.size:
      i = bad[0]
      raise SpikeFileError(
        f'{self.path}: sample {start + i}: spikes/times has {n_t[i]} events '
        f'but spikes/units has {n_u[i]}; they must be equal.'
      )
    flat_t = _concat(times, np.float64)
    flat_u = _concat(units, np.int64)
    sample = np.repeat(np.arange(len(times), dtype=np.int64), n_t)
    return self._validate(flat_t, flat_u, sample, start)

  def _validate(self, t, u, sample, start: int) -> Events:
    bad_t = ~np.isfinite(t) | (t < 0)
    bad_u = (u < 0) | (u >= self.channels)
    bad = bad_t | bad_u
    if not bad.any():
      return Events(t, u, sample, 0)
    if self.on_invalid == 'drop':
      keep = ~bad
      return Events(t[keep], u[keep], sample[keep], int(bad.sum()))
    j = int(np.flatnonzero(bad)[0])
    k = j - int(np.searchsorted(sample, sample[j]))
    if bad_t[j]:
      why = 'negative' if t[j] < 0 else 'not finite'
      what = f'spike time {float(t[j])} s (event {k}) is {why}'
    else:
      what = (
        f'channel id {int(u[j])} (event {k}) is outside [0, {self.channels})'
      )
    raise SpikeFileError(
      f'{self.path}: sample {start + int(sample[j])}: {what}. Pass '
      "on_invalid='drop' to drop such events (they are counted and reported)."
    )


def _concat(rows: np.ndarray, dtype) -> np.ndarray:
  if len(rows) == 0:
    return np.zeros(0, dtype)
  return np.concatenate([np.asarray(r) for r in rows]).astype(dtype)


def write_spikes(
  path,
  times: Sequence[np.ndarray],
  units: Sequence[np.ndarray],
  labels: Sequence[int],
  *,
  speakers: Sequence[int] | None = None,
  class_names: Sequence[str] | None = None,
  meta_info: Mapping[str, np.ndarray] | None = None,
  time_dtype=np.float32,
) -> None:
  """Writes samples in the SHD/SSC layout, atomically (temp file + rename).

  Args:
    path: the ``.h5`` file to write.
    times: per sample, ``(num_events_i,)`` spike times in seconds.
    units: per sample, ``(num_events_i,)`` channel ids.
    labels: ``(num_samples,)`` class ids.
    speakers: ``(num_samples,)`` speaker ids, written to ``extra/speaker``.
    class_names: written to ``extra/keys``.
    meta_info: arrays written to ``extra/meta_info/<name>``.
    time_dtype: the float dtype of ``spikes/times``.
  """
  h5py = require('h5py')
  path = Path(path)
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  try:
    with h5py.File(tmp, 'w') as f:
      _write_ragged(f, 'spikes/times', times, np.dtype(time_dtype))
      _write_ragged(f, 'spikes/units', units, np.dtype(np.uint16))
      f.create_dataset('labels', data=np.asarray(labels, np.uint16))
      if speakers is not None:
        f.create_dataset('extra/speaker', data=np.asarray(speakers, np.uint16))
      if class_names is not None:
        names = np.array([n.encode() for n in class_names])
        f.create_dataset('extra/keys', data=names)
      for name, value in (meta_info or {}).items():
        f.create_dataset(f'extra/meta_info/{name}', data=np.asarray(value))
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _write_ragged(f, key: str, rows: Sequence[np.ndarray], dtype) -> None:
  h5py = require('h5py')
  data = np.empty(len(rows), dtype=object)
  for i, row in enumerate(rows):  # a list of equal-length rows would broadcast
    data[i] = np.asarray(row).astype(dtype)
  f.create_dataset(key, data=data, dtype=h5py.vlen_dtype(dtype))
