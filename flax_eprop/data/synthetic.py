"""'synthetic-shd': a deterministic stand-in for SHD in the same HDF5 layout.

700 channels, 20 classes, generated on demand with numpy only (no network), so
the whole pipeline runs on a fresh machine. Each sample is a sequence of five
*syllables*; a syllable is a band of channels whose centre sweeps across ~30
channels during the syllable. All classes use the same five bands for the same
expected durations and differ only in their *order*: class ``(a, b)`` starts
with band ``a``, ends with band ``b`` (``a != b``, 20 ordered pairs) and has
the other three bands in between in a fixed class-specific order. Expected
per-channel spike counts are therefore the same for every class: a classifier
of total counts is near chance, while one that sees *when* each band fires
learns the set well.

Per sample: a speaker (10, each with a channel shift of up to +-20 channels and
a tempo factor in ``[0.8, 1.2]``), random syllable durations (~0.1-0.17 s), a
random onset, spike-time jitter and background noise spikes on all channels.
Lengths vary (about 0.6-0.95 s); all spikes lie in ``[0, 1)`` s.

Sample ``i`` of a split is a function of ``(seed, split, i)`` only, so a larger
set begins with the samples of a smaller one.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from flax_eprop.data.hdf5 import write_spikes

NAME = 'synthetic-shd'
VERSION = 1  # bump when the generator changes: it is part of the file name
CHANNELS = 700
NUM_CLASSES = 20
NUM_SPEAKERS = 10
SPLITS = {'train': 600, 'valid': 200, 'test': 200}  # default sizes
_SPLIT_IDS = {'train': 0, 'valid': 1, 'test': 2}
_BANDS = 5
_HALF_WIDTH = 25.0  # channels
_SWEEP = 30.0  # channels
_SYLLABLE = 0.11  # s, mean duration at tempo 1
_RATE = 2500.0  # spikes per second in the active band
_NOISE = 1.5  # spikes per second per channel
_JITTER = 0.003  # s


def patterns(seed: int = 0) -> dict[str, np.ndarray]:
  """The class and speaker parameters of the synthetic set.

  Args:
    seed: the set's seed.

  Returns:
    A dict of ``centres: (5,)`` band centres (channels), ``sweeps: (5,)``
    sweep directions (+-1), ``orders: (20, 5)`` band order of each class,
    ``shifts: (10,)`` speaker channel shifts and ``tempos: (10,)`` speaker
    tempo factors.

  Examples:
    >>> p = patterns(0)
    >>> p['orders'].shape, sorted(p['orders'][7].tolist())
    ((20, 5), [0, 1, 2, 3, 4])
  """
  rng = np.random.default_rng([seed, 0x5D])
  centres = np.linspace(90, 610, _BANDS) + rng.uniform(-15, 15, _BANDS)
  orders = []
  for a, b in itertools.permutations(range(_BANDS), 2):
    middle = [m for m in range(_BANDS) if m not in (a, b)]
    orders.append([a, *rng.permutation(middle).tolist(), b])
  return {
    'centres': centres,
    'sweeps': rng.choice([-1.0, 1.0], _BANDS),
    'orders': np.array(orders, np.int64),
    'shifts': rng.uniform(-20, 20, NUM_SPEAKERS),
    'tempos': rng.uniform(0.8, 1.2, NUM_SPEAKERS),
  }


def sample(
  rng: np.random.Generator, label: int, speaker: int, params: dict
) -> tuple[np.ndarray, np.ndarray]:
  """Draws the spikes of one sample.

  Args:
    rng: the sample's random generator.
    label: the class in ``[0, 20)``.
    speaker: the speaker in ``[0, 10)``.
    params: the output of :func:`patterns`.

  Returns:
    ``times: (num_events,)`` float32 seconds in ``[0, 1)``, sorted, and
    ``units: (num_events,)`` int64 channel ids in ``[0, 700)``.
  """
  tempo, shift = params['tempos'][speaker], params['shifts'][speaker]
  start = rng.uniform(0.02, 0.08)
  times, units = [], []
  for band in params['orders'][label]:
    dur = _SYLLABLE * tempo * rng.uniform(0.8, 1.2)
    n = rng.poisson(_RATE * dur)
    phase = rng.uniform(0.0, 1.0, n)
    centre = params['centres'][band] + shift + rng.normal(0.0, 3.0)
    sweep = params['sweeps'][band] * _SWEEP * (phase - 0.5)
    spread = rng.triangular(-_HALF_WIDTH, 0.0, _HALF_WIDTH, n)
    times.append(start + dur * phase + rng.normal(0.0, _JITTER, n))
    units.append(np.rint(centre + sweep + spread))
    start += dur
  end = start + rng.uniform(0.0, 0.05)
  n = rng.poisson(_NOISE * CHANNELS * end)
  times.append(rng.uniform(0.0, end, n))
  units.append(rng.integers(0, CHANNELS, n).astype(np.float64))
  t, u = np.concatenate(times), np.concatenate(units).astype(np.int64)
  keep = (t >= 0) & (t < 1.0) & (u >= 0) & (u < CHANNELS)
  order = np.argsort(t[keep], kind='stable')
  return t[keep][order].astype(np.float32), u[keep][order]


def generate(split: str, num_samples: int, seed: int = 0):
  """Generates a split in memory.

  Args:
    split: ``'train'``, ``'valid'`` or ``'test'``.
    num_samples: the number of samples N (labels cycle through the classes).
    seed: the set's seed.

  Returns:
    ``(times, units, labels, speakers)``: two lists of N ragged arrays, and
    ``(N,)`` int64 labels and speakers.

  Examples:
    >>> times, units, labels, speakers = generate('test', 3)
    >>> labels.tolist(), len(times[0]) == len(units[0]) > 1000
    ([0, 1, 2], True)
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f'{NAME} has splits {list(_SPLIT_IDS)}, not {split!r}')
  params = patterns(seed)
  labels = np.arange(num_samples, dtype=np.int64) % NUM_CLASSES
  speakers = np.zeros(num_samples, np.int64)
  times, units = [], []
  for i in range(num_samples):
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
    speakers[i] = rng.integers(NUM_SPEAKERS)
    t, u = sample(rng, int(labels[i]), int(speakers[i]), params)
    times.append(t)
    units.append(u)
  return times, units, labels, speakers


def class_names(seed: int = 0) -> list[str]:
  """Names of the classes, the band order spelled with letters: 'A-C-E-D-B'."""
  return ['-'.join('ABCDE'[b] for b in o) for o in patterns(seed)['orders']]


def make_synthetic(
  split: str = 'train',
  *,
  num_samples: int | None = None,
  seed: int = 0,
  directory,
) -> Path:
  """Writes a split of 'synthetic-shd' as an HDF5 file, unless it exists.

  Args:
    split: ``'train'``, ``'valid'`` or ``'test'``.
    num_samples: the number of samples; default ``SPLITS[split]``.
    seed: the set's seed.
    directory: where the file goes (``load`` uses
      ``<data dir>/synthetic-shd``).

  Returns:
    The path ``<directory>/v<VERSION>-seed<seed>/<split>-<num_samples>.h5``.
  """
  if split not in SPLITS:
    raise ValueError(f'{NAME} has splits {list(SPLITS)}, not {split!r}')
  n = SPLITS[split] if num_samples is None else int(num_samples)
  if n < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples!r}')
  path = Path(directory) / f'v{VERSION}-seed{seed}' / f'{split}-{n}.h5'
  if path.is_file():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  times, units, labels, speakers = generate(split, n, seed)
  params = patterns(seed)
  write_spikes(
    path,
    times,
    units,
    labels,
    speakers=speakers,
    class_names=class_names(seed),
    meta_info={'shift': params['shifts'], 'tempo': params['tempos']},
  )
  return path
