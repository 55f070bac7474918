"""Augmentation transforms and the iterator's transform hook and cast."""

import json

import datasets
import numpy as np
import pytest

from flax_eprop import data
from flax_eprop.data import Augment, BatchIterator


def _batch(b=6, t=8, c=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(1, 9, (b, t, c)).astype(np.uint8)
  length = np.arange(b) % t + 1
  length[0] = t  # one example uses the whole window
  mask = np.arange(t)[None] < length[:, None]
  x = np.where(mask[..., None], x, 0).astype(np.uint8)
  return {'x': x, 'mask': mask, 'length': length.astype(np.int32)}


class FixedDraws:
  """A generator stand-in that returns the given per-example shifts."""

  def __init__(self, shifts):
    self.shifts = np.asarray(shifts)

  def integers(self, low, high, size):
    assert size == len(self.shifts)
    assert np.all((low <= self.shifts) & (self.shifts < high))
    return self.shifts


def test_shift_channels_is_the_formula_without_wrap():
  batch = _batch()
  shifts = [-2, -1, 0, 1, 2, 3]
  out = data.shift_channels(batch, FixedDraws(shifts), 3)
  x = batch['x']
  for b, s in enumerate(shifts):
    for c in range(x.shape[2]):
      want = x[b, :, c - s] if 0 <= c - s < x.shape[2] else 0
      np.testing.assert_array_equal(out['x'][b, :, c], want)
  assert out['mask'] is batch['mask'] and out['x'].dtype == np.uint8


def test_shift_time_moves_data_mask_and_length():
  batch = _batch()
  shifts = [2, -3, 0, 1, -1, 3]
  out = data.shift_time(batch, FixedDraws(shifts), 3)
  x, mask, steps = batch['x'], batch['mask'], batch['x'].shape[1]
  for b, d in enumerate(shifts):
    d = max(d, 1 - int(batch['length'][b]))  # keeps one valid step
    for t in range(steps):
      inside = 0 <= t - d < steps
      np.testing.assert_array_equal(
        out['x'][b, t], x[b, t - d] if inside else 0
      )
    # a prefix mask stays a prefix: the end moves with the data
    length = min(max(int(batch['length'][b]) + d, 1), steps)
    np.testing.assert_array_equal(out['mask'][b], np.arange(steps) < length)
    assert out['length'][b] == length
  assert out['length'].dtype == np.int32
  # example 1 has length 2: shifted by -1, not -3
  assert out['length'][1] == 1 and out['x'][1, 0].tolist() == x[1, 1].tolist()
  np.testing.assert_array_equal(batch['mask'], mask)  # input untouched


def test_shift_time_drops_what_leaves_the_window():
  batch = _batch()
  out = data.shift_time(batch, FixedDraws([3, 0, 0, 0, 0, 0]), 3)
  x = batch['x']
  assert out['x'][0].sum() == x[0, :-3].sum() < x[0].sum()
  assert out['x'][0, :3].sum() == 0 and out['mask'][0].all()


def test_dropout_deletes_entries_at_the_rate():
  x = np.full((40, 50, 30), 3.0, np.float32)
  out = data.drop_inputs({'x': x}, np.random.default_rng(0), 0.1)['x']
  assert set(np.unique(out).tolist()) == {0.0, 3.0}  # deleted, not rescaled
  assert abs((out == 0).mean() - 0.1) < 0.01


def test_augment_composes_and_zero_settings_are_identity():
  batch = _batch()
  same = Augment()(batch, np.random.default_rng(0))
  for k in batch:
    np.testing.assert_array_equal(same[k], batch[k])
  aug = Augment(channel_shift=2, time_shift=2, dropout=0.2)
  one = aug(batch, np.random.default_rng(5))
  rng = np.random.default_rng(5)
  manual = data.drop_inputs(
    data.shift_channels(data.shift_time(batch, rng, 2), rng, 2), rng, 0.2
  )
  for k in batch:
    np.testing.assert_array_equal(one[k], manual[k])
  chained = data.chain(
    lambda b, r: data.shift_time(b, r, 2),
    lambda b, r: data.shift_channels(b, r, 2),
    lambda b, r: data.drop_inputs(b, r, 0.2),
  )(batch, np.random.default_rng(5))
  for k in batch:
    np.testing.assert_array_equal(one[k], chained[k])
  assert not np.array_equal(one['x'], batch['x'])


@pytest.mark.parametrize(
  'kwargs,field',
  [
    ({'channel_shift': -1}, 'channel_shift=-1'),
    ({'time_shift': 1.5}, 'time_shift=1.5'),
    ({'dropout': 1.0}, 'dropout=1.0'),
  ],
)
def test_augment_bad_settings(kwargs, field):
  with pytest.raises(ValueError, match=field):
    Augment(**kwargs)


def test_bad_batches_name_the_column():
  with pytest.raises(ValueError, match=r'shift_time: batch must hold mask'):
    data.shift_time({'x': np.zeros((2, 3, 4))}, np.random.default_rng(0), 1)
  with pytest.raises(ValueError, match=r'x of shape \(B, T, C\)'):
    data.drop_inputs({'x': np.zeros((2, 3))}, np.random.default_rng(0), 0.1)


@pytest.fixture(scope='module')
def dataset():
  batch = _batch(b=11, t=8, c=5, seed=1)
  features = datasets.Features(
    {
      'x': datasets.Array2D((8, 5), 'uint8'),
      'mask': datasets.Sequence(datasets.Value('bool'), length=8),
      'y': datasets.Value('int64'),
    }
  )
  return datasets.Dataset.from_dict(
    {'x': batch['x'], 'mask': batch['mask'], 'y': np.arange(11)},
    features=features,
  )


def test_cast_to_float32(dataset):
  batch = next(BatchIterator(dataset, 4, dtype=np.float32, shuffle=False))
  assert batch['x'].dtype == np.float32 and batch['mask'].dtype == np.bool_
  np.testing.assert_array_equal(batch['x'], np.asarray(dataset['x'][:4]))
  with pytest.raises(ValueError, match="dtype casts the column 'x'"):
    BatchIterator(dataset, 4, dtype=np.float32, columns=('y',))
  with pytest.raises(TypeError, match='transform must be callable'):
    BatchIterator(dataset, 4, transform='augment')


def test_transform_gets_fresh_draws_per_batch(dataset):
  seen = []

  def record(batch, rng):
    seen.append(rng.integers(1 << 30))
    return batch

  it = BatchIterator(dataset, 4, seed=2, transform=record)
  for _ in range(9):  # three epochs
    next(it)
  assert len(set(seen)) == 9


@pytest.mark.parametrize('drop_remainder', [False, True])
@pytest.mark.parametrize('position', [0, 1, 2, 4, 7])
def test_resume_with_random_transform_is_exact(
  dataset, position, drop_remainder
):
  aug = Augment(channel_shift=2, time_shift=3, dropout=0.3)
  kwargs = dict(dtype=np.float32, transform=aug, drop_remainder=drop_remainder)
  it = BatchIterator(dataset, 3, seed=4, **kwargs)
  plain = BatchIterator(dataset, 3, seed=4, drop_remainder=drop_remainder)
  for _ in range(position):
    next(it)
    next(plain)
  saved = json.dumps(it.state_dict())
  expected = [next(it) for _ in range(6)]
  resumed = BatchIterator(dataset, 3, state=json.loads(saved), **kwargs)
  changed = 0
  for want, got in zip(
    expected, [next(resumed) for _ in range(6)], strict=True
  ):
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
    changed += not np.array_equal(want['x'], next(plain)['x'])
  assert changed == 6  # the transform did act on every batch
