"""End to end: spike file -> binned, cached `datasets.Dataset` -> batches."""

import numpy as np
import pytest

from flax_eprop import data
from flax_eprop.data import loading
from flax_eprop.data.synthetic import class_names


def _spike_file(path, dt=0.01):
  """Three samples with known spikes on and between the bin edges."""
  times = [
    np.array([0.0, 1 * dt, 1 * dt, 2.5 * dt, 9 * dt]),  # 9*dt: outside T=5
    np.array([4 * dt]),
    np.array([], np.float64),
  ]
  units = [np.array([0, 7, 7, 699, 3]), np.array([350]), np.array([], int)]
  data.write_spikes(
    path, times, units, [2, 0, 1], speakers=[5, 6, 7], time_dtype=np.float64
  )
  return path


def test_round_trip_exact_counts_and_bin_edges(tmp_path):
  path = _spike_file(tmp_path / 'x.h5')
  ds = data.from_hdf5(
    path, dt=0.01, max_time=0.05, cache_dir=tmp_path / 'c', progress=False
  )
  assert ds.num_rows == 3 and ds.features['x'].shape == (5, 700)
  x = np.asarray(ds.with_format('numpy')['x'], np.int64)
  expected = np.zeros((3, 5, 700), np.int64)
  expected[0, 0, 0], expected[0, 1, 7], expected[0, 2, 699] = 1, 2, 1
  expected[1, 4, 350] = 1
  np.testing.assert_array_equal(x, expected)
  assert ds['length'] == [3, 5, 1] and ds['y'] == [2, 0, 1]
  assert ds['speaker'] == [5, 6, 7]
  assert [sum(m) for m in ds['mask']] == [3, 5, 1]


def test_pool_and_binary(tmp_path):
  path = _spike_file(tmp_path / 'x.h5')
  ds = data.from_hdf5(
    path,
    dt=0.01,
    max_time=0.05,
    pool=7,
    binary=True,
    cache_dir=tmp_path / 'c',
    progress=False,
  )
  batch = next(data.BatchIterator(ds, 3, shuffle=False))
  assert batch['x'].dtype == np.bool_ and batch['x'].shape == (3, 5, 100)
  assert batch['x'][0, 1, 1] and batch['x'][0, 2, 99] and batch['x'].sum() == 4


def test_cache_hit_and_miss(tmp_path, monkeypatch):
  path = _spike_file(tmp_path / 'x.h5')
  calls = []
  original = loading._bin_to_arrow
  monkeypatch.setattr(
    loading, '_bin_to_arrow', lambda *a: calls.append(a) or original(*a)
  )

  def load(**kw):
    kw = {'dt': 0.01, 'max_time': 0.05, **kw}
    return data.from_hdf5(path, cache_dir=tmp_path / 'c', progress=False, **kw)

  first = load()
  second = load()
  assert len(calls) == 1 and second.cache_files == first.cache_files
  assert second['x'] == first['x']
  for options in ({'dt': 0.005}, {'max_time': 0.04}, {'pool': 2},
                  {'binary': True}, {'on_invalid': 'drop'}):  # fmt: skip
    load(**options)
  assert len(calls) == 6
  assert len(list((tmp_path / 'c').glob('*.arrow'))) == 6
  _spike_file(path, dt=0.02)  # the file changed: its cache entry is stale
  load()
  assert len(calls) == 7


def test_a_failed_binning_leaves_no_cache_entry(tmp_path):
  path = tmp_path / 'bad.h5'
  data.write_spikes(path, [np.array([0.1, np.nan])], [np.array([1, 2])], [0])
  with pytest.raises(data.SpikeFileError, match='sample 0: spike time nan'):
    data.from_hdf5(path, cache_dir=tmp_path / 'c', progress=False)
  assert not list((tmp_path / 'c').glob('*.json'))
  with pytest.warns(data.DroppedEventsWarning, match='dropped 1 invalid'):
    ds = data.from_hdf5(
      path, on_invalid='drop', cache_dir=tmp_path / 'c', progress=False
    )
  assert np.asarray(ds['x'][0]).sum() == 1


def test_load_synthetic_and_batch(tmp_path):
  ds = data.load(
    'synthetic-shd',
    'train',
    num_samples=40,
    dt=0.01,
    pool=10,
    data_dir=tmp_path,
    progress=False,
  )
  assert ds.features['x'].shape == (100, 70)
  assert ds.features['y'].names == class_names(seed=0)  # from extra/keys
  it = data.BatchIterator(ds, 16, seed=0)
  batch = next(it)
  assert batch['x'].shape == (16, 100, 70) and batch['mask'].shape == (16, 100)
  assert (batch['x'].sum((1, 2)) > 0).all()
  # padding after each sample's end is zero
  assert not (batch['x'] * ~batch['mask'][:, :, None]).any()
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'binned',
    'synthetic-shd',
  ]


def test_load_real_name_uses_a_present_file(tmp_path):
  _spike_file(tmp_path / 'shd_test.h5')
  ds = data.load(
    'shd', 'test', data_dir=tmp_path, download=False, progress=False
  )
  assert ds.features['x'].shape == (140, 700)  # SHD default: 1.4 s at 10 ms
  with pytest.raises(data.DatasetNotFoundError, match='shd_train.h5 not found'):
    data.load('shd', 'train', data_dir=tmp_path, download=False)
  with pytest.raises(ValueError, match='num_samples is for'):
    data.load('shd', 'test', data_dir=tmp_path, num_samples=3)
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    data.load('mnist')


def test_load_downloads_through_the_opener(tmp_path):
  import gzip
  import hashlib
  import io

  _spike_file(tmp_path / 'src.h5')
  gz = gzip.compress((tmp_path / 'src.h5').read_bytes())
  files = {
    f'{data.BASE_URL}/md5sums.txt': (
      f'{hashlib.md5(gz).hexdigest()}  ssc_test.h5.gz\n'.encode()
    ),
    f'{data.BASE_URL}/ssc_test.h5.gz': gz,
  }

  class Response(io.BytesIO):
    status, headers = 200, {}

  def urlopen(request, timeout=None):
    return Response(files[request.full_url])

  root = tmp_path / 'root'
  ds = data.load('ssc', 'test', data_dir=root, urlopen=urlopen, progress=False)
  assert ds.num_rows == 3 and (root / 'ssc_test.h5').is_file()


def test_dt_ms_is_dt_in_milliseconds(tmp_path):
  path = _spike_file(tmp_path / 'x.h5')
  kwargs = dict(max_time=0.05, cache_dir=tmp_path / 'c', progress=False)
  by_s = data.from_hdf5(path, dt=0.01, **kwargs)
  by_ms = data.from_hdf5(path, dt_ms=10.0, **kwargs)
  assert by_ms.cache_files == by_s.cache_files  # the same binning, cached once
  default = data.from_hdf5(path, **kwargs)  # 10 ms when neither is given
  assert default.cache_files == by_s.cache_files
  coarse = data.from_hdf5(path, dt_ms=25.0, **kwargs)
  assert coarse.features['x'].shape == (2, 700)
  with pytest.raises(ValueError, match='dt .seconds. or dt_ms'):
    data.from_hdf5(path, dt=0.01, dt_ms=10.0, **kwargs)
  with pytest.raises(ValueError, match='dt_ms must be a positive'):
    data.from_hdf5(path, dt_ms=0.0, **kwargs)


def test_load_takes_dt_ms(tmp_path):
  ds = data.load('synthetic-shd', 'test', num_samples=2, dt_ms=20.0, pool=10,
                 data_dir=tmp_path, progress=False)  # fmt: skip
  assert ds.features['x'].shape == (50, 70)
  with pytest.raises(ValueError, match='not both'):
    data.load('synthetic-shd', 'test', num_samples=2, dt=0.02, dt_ms=20.0,
              data_dir=tmp_path, progress=False)  # fmt: skip
