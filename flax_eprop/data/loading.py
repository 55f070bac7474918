"""Spike files to binned, cached Hugging Face datasets: ``load``, ``from_hdf5``.

A file is binned once per set of options and written as an Arrow file under
``<data dir>/binned/``; the cache key hashes the file's identity (resolved path,
size, modification time) and every option that changes the result (``dt``,
``max_time``, ``channels``, ``pool``, ``binary``, ``on_invalid``), so changing
any of them bins again, and loading with the same ones memory-maps the Arrow
file.
The binning is a batched ``Dataset.map`` that reads 256 samples at a time from
the HDF5 file and bins them with one ``np.unique`` over flat indices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from flax_eprop.data import download as remote
from flax_eprop.data import synthetic
from flax_eprop.data._deps import require
from flax_eprop.data.binning import (
  bin_events,
  check_binning,
  num_bins,
  resolve_dt,
)
from flax_eprop.data.hdf5 import OnInvalid, SpikeFile

NAMES = ('shd', 'ssc', synthetic.NAME)
DEFAULT_MAX_TIME = {'shd': 1.4, 'ssc': 1.0, synthetic.NAME: 1.0}
CHANNELS = 700
_CACHE_VERSION = 1
_BATCH = 256


class DroppedEventsWarning(UserWarning):
  """Invalid events were dropped (``on_invalid='drop'``); the count is given."""


def load(
  name: str,
  split: str = 'train',
  *,
  dt: float | None = None,
  dt_ms: float | None = None,
  max_time: float | None = None,
  pool: int = 1,
  binary: bool = False,
  on_invalid: OnInvalid = 'raise',
  data_dir=None,
  download: bool = True,
  num_samples: int | None = None,
  seed: int = 0,
  urlopen=None,
  progress: bool = True,
):
  """Loads a split of SHD, SSC or 'synthetic-shd', binned at a fixed ``dt``.

  Bin ``k`` covers ``[k * dt, (k + 1) * dt)`` (see
  :mod:`flax_eprop.data.binning`). Each example has

  - ``x``: ``(T, 700 // pool)`` uint8 spike counts (bool if ``binary``),
    ``T = ceil(max_time / dt)``, zero-padded after the sample's end;
  - ``mask``: ``(T,)`` bool, True on the first ``length`` steps;
  - ``length``: int, one plus the bin of the sample's last spike;
  - ``y``: int class label (a ``ClassLabel`` with the file's class names);
  - ``speaker``: int speaker id (-1 if the file has none).

  Args:
    name: ``'shd'``, ``'ssc'`` or ``'synthetic-shd'``.
    split: ``'train'``/``'test'`` (SHD), ``'train'``/``'valid'``/``'test'``
      (SSC, synthetic-shd).
    dt: the bin width in seconds (default 0.01, i.e. 10 ms).
    dt_ms: the bin width in milliseconds, instead of ``dt``: the unit of
      the cells' ``dt``, so ``load(..., dt_ms=c.dt)`` and ``fe.ALIF(...,
      dt=c.dt)`` agree. Same cache as the equal ``dt``.
    max_time: the duration kept, in seconds; later spikes are left out.
      Default: 1.4 (SHD), 1.0 (SSC, synthetic-shd).
    pool: sum this many adjacent channels into one (must divide 700).
    binary: bool ``x`` (any spike in the bin) instead of counts.
    on_invalid: ``'raise'`` or ``'drop'`` invalid events (NaN/inf/negative
      times, channel ids >= 700); dropped events are reported with a
      :class:`DroppedEventsWarning` that gives their count.
    data_dir: the data directory (default ``$FLAX_EPROP_DATA``, else
      ``~/.cache/flax_eprop``).
    download: download absent SHD/SSC files (else raise).
    num_samples: synthetic-shd only: the split's size (default 600 train,
      200 valid, 200 test).
    seed: synthetic-shd only: the set's seed.
    urlopen: the opener used to download (tests pass a fake).
    progress: show progress bars.

  Returns:
    A map-style ``datasets.Dataset`` backed by a cached Arrow file.

  Examples:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> ds = load('synthetic-shd', 'test', num_samples=4, pool=10,
    ...           data_dir=tmp.name, progress=False)
    >>> ds.num_rows, ds.features['x'].shape, ds.features['y'].num_classes
    (4, (100, 70), 20)
    >>> tmp.cleanup()
  """
  if name not in NAMES:
    raise ValueError(f'unknown dataset {name!r}; expected one of {list(NAMES)}')
  dt = resolve_dt(dt, dt_ms)
  root = remote.resolve_data_dir(data_dir)
  if name == synthetic.NAME:
    path = synthetic.make_synthetic(
      split, num_samples=num_samples, seed=seed, directory=root / name
    )
  else:
    if num_samples is not None:
      raise ValueError(f'num_samples is for {synthetic.NAME!r}, not {name!r}.')
    path = remote.fetch(
      name,
      split,
      data_dir=root,
      download=download,
      urlopen=urlopen,
      progress=progress,
    )
  return from_hdf5(
    path,
    dt=dt,
    max_time=DEFAULT_MAX_TIME[name] if max_time is None else max_time,
    pool=pool,
    binary=binary,
    on_invalid=on_invalid,
    cache_dir=root / 'binned',
    progress=progress,
  )


def cache_key(path, **options) -> str:
  """The cache key of a file binned with ``options``.

  Args:
    path: the spike file.
    **options: the binning options (``dt``, ``max_time``, ``channels``,
      ``pool``, ``binary``, ``on_invalid``).

  Returns:
    A 16-hex-digit hash of the file's identity and the options.
  """
  stat = Path(path).stat()
  ident = {
    'version': _CACHE_VERSION,
    'file': str(Path(path).resolve()),
    'size': stat.st_size,
    'mtime_ns': stat.st_mtime_ns,
    **{
      k: (float(v) if isinstance(v, float) else v) for k, v in options.items()
    },
  }
  text = json.dumps(ident, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def from_hdf5(
  path,
  *,
  dt: float | None = None,
  dt_ms: float | None = None,
  max_time: float = 1.4,
  channels: int = CHANNELS,
  pool: int = 1,
  binary: bool = False,
  on_invalid: OnInvalid = 'raise',
  cache_dir=None,
  progress: bool = True,
):
  """Bins a spike file in the SHD/SSC layout into a cached ``datasets.Dataset``.

  Args:
    path: the ``.h5`` file.
    dt: the bin width in seconds (default 0.01).
    dt_ms: the bin width in milliseconds, instead of ``dt`` (see
      :func:`load`).
    max_time: the duration kept, in seconds.
    channels: the number of input channels C.
    pool: sum this many adjacent channels into one (must divide C).
    binary: bool ``x`` instead of uint8 counts.
    on_invalid: ``'raise'`` or ``'drop'`` invalid events.
    cache_dir: where the Arrow files go (default ``<data dir>/binned``).
    progress: show a progress bar while binning.

  Returns:
    The dataset described in :func:`load`.

  Raises:
    SpikeFileError: a malformed file or invalid event (naming the sample).
  """
  dt = resolve_dt(dt, dt_ms)
  check_binning(dt, max_time, channels, pool)
  if on_invalid not in ('raise', 'drop'):
    raise ValueError(
      f"on_invalid must be 'raise' or 'drop', not {on_invalid!r}"
    )
  options = dict(dt=dt, max_time=max_time, channels=channels, pool=pool)
  options.update(binary=bool(binary), on_invalid=on_invalid)
  cache = Path(cache_dir or remote.resolve_data_dir() / 'binned')
  stem = f'{Path(path).stem}-{cache_key(path, **options)}'
  arrow, meta = cache / f'{stem}.arrow', cache / f'{stem}.json'
  if not (arrow.is_file() and meta.is_file()):
    cache.mkdir(parents=True, exist_ok=True)
    _bin_to_arrow(Path(path), arrow, meta, options, progress)
  info = json.loads(meta.read_text())
  if info['num_dropped']:
    warnings.warn(
      f'{path}: dropped {info["num_dropped"]} invalid events '
      "(on_invalid='drop').",
      DroppedEventsWarning,
      stacklevel=2,
    )
  return require('datasets').Dataset.from_file(str(arrow))


def _features(options: dict, f: SpikeFile):
  ds = require('datasets')
  steps = num_bins(options['max_time'], options['dt'])
  width = options['channels'] // options['pool']
  dtype = 'bool' if options['binary'] else 'uint8'
  classes = int(f.labels.max()) + 1 if len(f) else 1
  names = f.class_names
  if names is not None and len(names) >= classes:
    label = ds.ClassLabel(names=list(names))
  else:
    label = ds.ClassLabel(num_classes=classes)
  return ds.Features(
    {
      'x': ds.Array2D((steps, width), dtype),
      'mask': ds.Sequence(ds.Value('bool'), length=steps),
      'length': ds.Value('int32'),
      'y': label,
      'speaker': ds.Value('int32'),
    }
  )


def _binner(f: SpikeFile, options: dict, stats: dict):
  """The batched map function: sample indices -> binned columns."""
  binning = {k: options[k] for k in ('dt', 'max_time', 'channels', 'pool')}
  speakers = f.speakers if f.speakers is not None else np.full(len(f), -1)

  def fn(batch):
    index = np.asarray(batch['index'])
    start, stop = int(index[0]), int(index[-1]) + 1
    assert np.array_equal(index, np.arange(start, stop)), 'not contiguous'
    ev = f.events(start, stop)
    stats['num_dropped'] += ev.num_dropped
    out = bin_events(
      ev.times,
      ev.units,
      ev.sample,
      batch_size=stop - start,
      binary=options['binary'],
      **binning,
    )
    return {
      'x': out.x,
      'mask': out.mask,
      'length': out.length,
      'y': f.labels[start:stop],
      'speaker': speakers[start:stop],
    }

  return fn


def _bin_to_arrow(path: Path, arrow: Path, meta: Path, options, progress):
  ds = require('datasets')
  stats = {'num_dropped': 0}
  with SpikeFile(path, channels=options['channels'],
                 on_invalid=options['on_invalid']) as f:  # fmt: skip
    index = ds.Dataset.from_dict({'index': np.arange(len(f), dtype=np.int64)})
    with _progress_bars(progress):
      index.map(
        _binner(f, options, stats),
        batched=True,
        batch_size=_BATCH,
        writer_batch_size=_BATCH,
        remove_columns=['index'],
        features=_features(options, f),
        cache_file_name=str(arrow),
        load_from_cache_file=False,
        new_fingerprint=arrow.stem,
        desc=f'binning {path.name}',
      )
  info = {'source': str(path), 'num_samples': len(f), **options, **stats}
  tmp = meta.with_name(f'{meta.name}.tmp-{os.getpid()}')
  tmp.write_text(json.dumps(info, indent=1))
  os.replace(tmp, meta)  # the marker of a complete cache entry


@contextlib.contextmanager
def _progress_bars(enabled: bool):
  ds = require('datasets')
  was = ds.is_progress_bar_enabled()
  if not enabled:
    ds.disable_progress_bars()
  try:
    yield
  finally:
    if was and not enabled:
      ds.enable_progress_bars()
