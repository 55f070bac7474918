"""The HDF5 reader: round trip, and one message per kind of bad file."""

import h5py
import numpy as np
import pytest

from flax_eprop.data import SpikeFile, SpikeFileError, write_spikes


def _write(path, times, units, labels=None, **kw):
  labels = list(range(len(times))) if labels is None else labels
  times = [np.asarray(t, np.float32) for t in times]
  write_spikes(path, times, units, labels, **kw)
  return path


def test_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  times = [np.sort(rng.uniform(0, 1, n)).astype(np.float32) for n in (5, 0, 9)]
  units = [rng.integers(0, 700, len(t)) for t in times]
  path = _write(
    tmp_path / 'a.h5', times, units, [4, 0, 19], speakers=[1, 2, 3],
    class_names=['zero', 'one'],
  )  # fmt: skip
  with SpikeFile(path) as f:
    ev = f.events(0, 3)
    assert len(f) == 3 and f.labels.tolist() == [4, 0, 19]
    assert f.speakers.tolist() == [1, 2, 3]
    assert f.class_names == ('zero', 'one')
    tail = f.events(1, 3)
  np.testing.assert_array_equal(ev.times, np.concatenate(times))
  np.testing.assert_array_equal(ev.units, np.concatenate(units))
  assert ev.sample.tolist() == [0] * 5 + [2] * 9 and ev.num_dropped == 0
  assert tail.sample.tolist() == [1] * 9


@pytest.mark.parametrize(
  'bad_times, bad_units, problem',
  [
    ([0.1, -0.5], [1, 2], r'spike time -0.5 s \(event 1\)'),
    ([np.nan, 0.1], [1, 2], r'spike time nan s \(event 0\)'),
    ([0.1, np.inf], [1, 2], r'spike time inf s \(event 1\)'),
    ([0.1, 0.2], [1, 700], r'channel id 700 \(event 1\) is outside \[0, 700\)'),
  ],
)
def test_invalid_events(tmp_path, bad_times, bad_units, problem):
  path = _write(
    tmp_path / 'bad.h5', [[0.1], [0.2], bad_times], [[1], [2], bad_units]
  )
  with SpikeFile(path) as f:
    f.events(0, 2)  # the good samples read fine
    with pytest.raises(SpikeFileError, match=problem) as info:
      f.events(0, 3)
  message = str(info.value)
  assert str(path) in message and 'sample 2:' in message
  assert "on_invalid='drop'" in message


def test_drop_counts_invalid_events(tmp_path):
  path = _write(
    tmp_path / 'bad.h5',
    [[0.1, np.nan, -1.0, 0.3], [np.inf, 0.2]],
    [[1, 2, 3, 800], [5, 6]],
  )
  with SpikeFile(path, on_invalid='drop') as f:
    ev = f.events(0, 2)
  assert ev.num_dropped == 4
  assert ev.times.tolist() == pytest.approx([0.1, 0.2])
  assert ev.units.tolist() == [1, 6] and ev.sample.tolist() == [0, 1]


def test_length_mismatch(tmp_path):
  path = _write(tmp_path / 'm.h5', [[0.1], [0.1, 0.2, 0.3]], [[1], [1, 2]])
  with SpikeFile(path, on_invalid='drop') as f:  # never dropped: an error
    with pytest.raises(SpikeFileError) as info:
      f.events(0, 2)
  assert str(info.value) == (
    f'{path}: sample 1: spikes/times has 3 events but spikes/units has 2; '
    'they must be equal.'
  )


@pytest.mark.parametrize('missing', ['spikes/times', 'spikes/units', 'labels'])
def test_missing_key(tmp_path, missing):
  path = _write(tmp_path / 'k.h5', [[0.1]], [[1]])
  with h5py.File(path, 'a') as f:
    del f[missing]
  with pytest.raises(SpikeFileError, match='missing HDF5 dataset') as info:
    SpikeFile(path)
  assert str(path) in str(info.value) and repr(missing) in str(info.value)


def test_sample_count_mismatch(tmp_path):
  path = _write(tmp_path / 'c.h5', [[0.1], [0.2]], [[1], [2]], labels=[0])
  with pytest.raises(SpikeFileError, match='labels 1; they must be equal'):
    SpikeFile(path)


def test_truncated_file(tmp_path):
  path = _write(tmp_path / 't.h5', [[0.1] * 100] * 50, [[1] * 100] * 50)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(SpikeFileError, match='truncated') as info:
    SpikeFile(path)
  assert str(path) in str(info.value) and 'fetch it again' in str(info.value)


def test_corrupt_file(tmp_path):
  path = tmp_path / 'garbage.h5'
  path.write_bytes(b'not an hdf5 file' * 64)
  with pytest.raises(SpikeFileError, match='cannot be read as HDF5'):
    SpikeFile(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.h5: no such spike file'):
    SpikeFile(tmp_path / 'absent.h5')


class _Unreadable:
  """A dataset whose samples from `bad` on cannot be read."""

  def __init__(self, data, bad):
    self.data, self.bad = data, bad

  def __getitem__(self, index):
    stop = index.stop if isinstance(index, slice) else index + 1
    if stop > self.bad:
      raise OSError("Can't read data (inflate() failed)")
    return self.data[index]


def test_unreadable_sample_is_named(tmp_path):
  path = _write(tmp_path / 'u.h5', [[0.1]] * 4, [[1]] * 4)
  with SpikeFile(path) as f:
    inner = f._file
    f._file = {'spikes/times': _Unreadable(inner['spikes/times'], 2)}
    with pytest.raises(SpikeFileError, match='sample 2: spikes/times cannot'):
      f.events(0, 4)
    f._file = inner
