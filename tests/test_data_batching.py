"""The epoch iterator: permutations, remainders and exact resume."""

import json

import datasets
import numpy as np
import pytest

from flax_eprop.data import BatchIterator


@pytest.fixture(scope='module')
def dataset():
  n, steps = 10, 3
  x = np.arange(n * steps * 2, dtype=np.uint8).reshape(n, steps, 2)
  features = datasets.Features(
    {
      'x': datasets.Array2D((steps, 2), 'uint8'),
      'y': datasets.Value('int64'),
      'mask': datasets.Sequence(datasets.Value('bool'), length=steps),
    }
  )
  mask = np.arange(steps)[None] < (np.arange(n) % steps + 1)[:, None]
  return datasets.Dataset.from_dict(
    {'x': x, 'y': np.arange(n), 'mask': mask}, features=features
  )


def test_batches_are_numpy_with_shapes_and_dtypes(dataset):
  batch = next(BatchIterator(dataset, 4, shuffle=False))
  assert batch['x'].dtype == np.uint8 and batch['x'].shape == (4, 3, 2)
  assert batch['y'].dtype == np.int32 and batch['y'].tolist() == [0, 1, 2, 3]
  assert batch['mask'].dtype == np.bool_ and batch['mask'].shape == (4, 3)
  np.testing.assert_array_equal(batch['x'], np.asarray(dataset['x'][:4]))
  np.testing.assert_array_equal(batch['mask'], np.asarray(dataset['mask'][:4]))


def test_each_epoch_is_a_fresh_permutation(dataset):
  it = BatchIterator(dataset, 4, seed=7)
  assert it.num_batches == 3
  epochs = []
  for _ in range(3):
    ys = np.concatenate([b['y'] for b in it.iter_epoch()])
    assert sorted(ys.tolist()) == list(range(10))
    epochs.append(ys.tolist())
  assert epochs[0] != epochs[1] != epochs[2]
  assert it.state_dict() == {
    'seed': 7,
    'epoch': 3,
    'cursor': 0,
    'num_examples': 10,
  }
  again = BatchIterator(dataset, 4, seed=7)
  assert (
    np.concatenate([b['y'] for b in again.iter_epoch()]).tolist() == (epochs[0])
  )


def test_drop_remainder(dataset):
  it = BatchIterator(dataset, 4, seed=0, drop_remainder=True)
  assert it.num_batches == 2
  sizes = [len(next(it)['y']) for _ in range(6)]
  assert sizes == [4] * 6 and it.epoch == 3
  with pytest.raises(ValueError, match='batch_size=11'):
    BatchIterator(dataset, 11, drop_remainder=True)


@pytest.mark.parametrize('drop_remainder', [False, True])
@pytest.mark.parametrize('position', [0, 1, 2, 3, 5, 7])
def test_exact_resume(dataset, position, drop_remainder):
  it = BatchIterator(dataset, 3, seed=5, drop_remainder=drop_remainder)
  for _ in range(position):
    next(it)
  saved = json.dumps(it.state_dict())  # as a checkpoint would store it
  expected = [next(it) for _ in range(6)]
  resumed = BatchIterator(
    dataset, 3, drop_remainder=drop_remainder, state=json.loads(saved)
  )
  for want, got in zip(
    expected, [next(resumed) for _ in range(6)], strict=True
  ):
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_bad_state_and_columns(dataset):
  it = BatchIterator(dataset, 2)
  with pytest.raises(ValueError, match='dataset of 11 examples'):
    it.load_state_dict({'seed': 0, 'epoch': 0, 'cursor': 0, 'num_examples': 11})
  with pytest.raises(ValueError, match='must have keys'):
    it.load_state_dict({'epoch': 0, 'cursor': 0})
  with pytest.raises(ValueError, match=r"columns \['speaker'\]"):
    BatchIterator(dataset, 2, columns=('x', 'speaker'))
