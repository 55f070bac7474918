"""split_by_speaker: whole speakers held out, deterministic; by example
when the file has no speakers."""

import datasets
import numpy as np
import pytest

from flax_eprop import data


def col(ds, name):
  return [int(v) for v in ds[name]]


def _dataset(speakers):
  speakers = np.asarray(speakers)
  return datasets.Dataset.from_dict(
    {'speaker': speakers, 'y': np.arange(len(speakers))}
  )


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_no_speaker_in_both_parts_and_a_partition(seed):
  rng = np.random.default_rng(9)
  speakers = rng.integers(0, 10, 500)  # ~50 examples per speaker
  train, valid = data.split_by_speaker(_dataset(speakers), 0.1, seed=seed)
  assert not set(col(train, 'speaker')) & set(col(valid, 'speaker'))
  ys = sorted(col(train, 'y') + col(valid, 'y'))
  assert ys == list(range(500))
  assert col(train, 'y') == sorted(col(train, 'y')) and col(
    valid, 'y'
  ) == sorted(col(valid, 'y'))
  assert len(set(col(valid, 'speaker'))) == 1  # one speaker is nearest 10%
  assert 30 < len(valid) < 75


def test_fraction_picks_the_nearest_number_of_speakers():
  speakers = np.repeat(np.arange(10), 20)  # 10 speakers x 20
  train, valid = data.split_by_speaker(_dataset(speakers), 0.3, seed=0)
  assert len(valid) == 60 and len(set(col(valid, 'speaker'))) == 3
  assert len(set(col(train, 'speaker'))) == 7


def test_deterministic_and_seed_dependent():
  speakers = np.repeat(np.arange(12), 7)
  ds = _dataset(speakers)
  first = data.split_by_speaker(ds, 0.25, seed=5)[1]['speaker']
  again = data.split_by_speaker(ds, 0.25, seed=5)[1]['speaker']
  assert first == again
  others = {tuple(col(data.split_by_speaker(ds, 0.25, seed=s)[1], 'speaker'))
            for s in range(6)}  # fmt: skip
  assert len(others) > 1


def test_no_speakers_splits_by_example():
  train, valid = data.split_by_speaker(_dataset([-1] * 50), 0.2, seed=0)
  assert len(valid) == 10 and len(train) == 40
  assert sorted(col(train, 'y') + col(valid, 'y')) == list(range(50))
  no_column = datasets.Dataset.from_dict({'y': np.arange(50)})
  t2, v2 = data.split_by_speaker(no_column, 0.2, seed=0)
  assert col(v2, 'y') == col(valid, 'y') and col(t2, 'y') == col(train, 'y')
  single = data.split_by_speaker(_dataset([4] * 50), 0.2, seed=0)[1]
  assert col(single, 'y') == col(valid, 'y')  # one speaker cannot be held out


def test_unknown_speakers_are_split_by_example_beside_whole_speakers():
  speakers = np.array([0] * 20 + [1] * 20 + [2] * 20 + [-1] * 20)
  train, valid = data.split_by_speaker(_dataset(speakers), 0.35, seed=1)
  known_valid = {s for s in col(valid, 'speaker') if s >= 0}
  assert len(known_valid) == 1 and not known_valid & set(col(train, 'speaker'))
  assert col(valid, 'speaker').count(-1) == 7  # round(0.35 * 20)


def test_tiny_sets_keep_both_parts_non_empty():
  train, valid = data.split_by_speaker(_dataset([-1, -1]), 0.1)
  assert len(train) == len(valid) == 1
  train, valid = data.split_by_speaker(_dataset([0, 1]), 0.9)
  assert len(train) == len(valid) == 1


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1])
def test_bad_fraction(fraction):
  with pytest.raises(ValueError, match=f'valid_fraction={fraction}'):
    data.split_by_speaker(_dataset([0, 1, 2]), fraction)


def test_synthetic_set_speakers(tmp_path):
  ds = data.load('synthetic-shd', 'train', num_samples=200, pool=10,
                 data_dir=tmp_path, progress=False)  # fmt: skip
  train, valid = data.split_by_speaker(ds, 0.1, seed=0)
  assert len(train) + len(valid) == 200
  assert not set(col(train, 'speaker')) & set(col(valid, 'speaker'))
  assert len(set(col(train, 'speaker'))) == 9
