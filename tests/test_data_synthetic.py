"""'synthetic-shd': deterministic, SHD layout, learnable only from timing."""

import numpy as np

from flax_eprop.data import SpikeFile, bin_events, make_synthetic
from flax_eprop.data.synthetic import NUM_CLASSES, generate


def test_written_in_the_shd_layout_and_deterministic(tmp_path):
  a = make_synthetic('test', num_samples=30, directory=tmp_path / 'a')
  b = make_synthetic('test', num_samples=30, directory=tmp_path / 'b')
  assert a.read_bytes() == b.read_bytes()
  with SpikeFile(a) as f:
    ev = f.events(0, 30)
    assert len(f) == 30 and len(f.class_names) == NUM_CLASSES
    assert f.labels.tolist() == [i % 20 for i in range(30)]
    assert set(f.speakers.tolist()) <= set(range(10))
  assert ev.times.min() >= 0 and ev.times.max() < 1.0
  assert ev.units.min() >= 0 and ev.units.max() < 700
  lengths = np.bincount(ev.sample)
  assert lengths.min() > 500  # every sample spikes


def test_a_larger_set_starts_with_the_smaller_one():
  small, big = generate('train', 5, seed=3), generate('train', 8, seed=3)
  for t_small, t_big in zip(small[0], big[0][:5], strict=True):
    np.testing.assert_array_equal(t_small, t_big)
  other = generate('train', 5, seed=4)
  assert not np.array_equal(small[0][0], other[0][0])


def _features(split, n, windows, pool):
  times, units, labels, _ = generate(split, n)
  sample = np.repeat(np.arange(n), [len(t) for t in times])
  x = bin_events(
    np.concatenate(times),
    np.concatenate(units),
    sample,
    batch_size=n,
    dt=1.0 / windows,
    max_time=1.0,
    pool=pool,
  ).x
  return x.reshape(n, -1).astype(np.float64), labels


def _nearest_centroid_accuracy(windows, pool):
  x, y = _features('train', 400, windows, pool)
  x_test, y_test = _features('test', 200, windows, pool)
  centroids = np.stack([x[y == c].mean(0) for c in range(NUM_CLASSES)])
  dist = ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1)
  return (dist.argmin(1) == y_test).mean()


def test_counts_alone_are_near_chance_timing_is_not():
  chance = 1 / NUM_CLASSES
  counts = _nearest_centroid_accuracy(windows=1, pool=10)  # (70,) per sample
  timed = _nearest_centroid_accuracy(windows=8, pool=10)  # (8 x 70,)
  assert counts < 2.5 * chance, counts
  assert timed > 0.6, timed
