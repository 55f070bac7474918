"""Data for the recipe: splits (validation held out of train), augmentation.

The test split is loaded for the final report only; model selection uses the
validation split: the dataset's own (SSC, synthetic-shd), a ``--valid-file``,
or a part of the training file held out by speaker (SHD has no validation
split).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from recipes.config import Config


class DataError(ValueError):
  """A data problem, with the recipe option that led to it."""


@dataclasses.dataclass
class Splits:
  """The three splits (``datasets.Dataset``) and their sizes.

  Attributes:
    train, valid, test: the datasets (``x: (T, C)``, ``y``, ``mask``, ...).
    num_classes: the number of classes.
    steps: T, time steps per sample.
    channels: C, input channels after pooling.
    valid_source: where the validation set came from (for the log).
  """

  train: object
  valid: object
  test: object
  num_classes: int
  steps: int
  channels: int
  valid_source: str


def _data():
  from flax_eprop import data

  return data


def load_splits(config: Config, progress: bool = True) -> Splits:
  """Loads and bins train, validation and test as the config says.

  Raises:
    DataError: a missing or malformed file, named with the option that
      points at it.
  """
  data = _data()
  binning = dict(dt=config.dt, pool=config.pool, progress=progress)
  if config.max_time is not None:
    binning['max_time'] = config.max_time
  if config.train_file is not None:
    binning.setdefault('max_time', 1.4)
    binning['cache_dir'] = data.resolve_data_dir(config.data_dir) / 'binned'
    train = _from_file(config.train_file, 'train_file', binning)
    test = _from_file(config.test_file, 'test_file', binning)
    if config.valid_file is not None:
      valid = _from_file(config.valid_file, 'valid_file', binning)
      source = f'--valid-file {config.valid_file}'
    else:
      train, valid, source = hold_out(train, config.valid_fraction, config.seed)
  else:
    name = config.dataset
    kwargs = dict(binning, data_dir=config.data_dir)

    def split(s, **extra):
      try:
        return data.load(name, s, **kwargs, **extra)
      except (data.DatasetNotFoundError, data.SpikeFileError, OSError) as e:
        raise DataError(f'--dataset {name} ({s} split): {e}') from e

    extra = {}
    if name == 'synthetic-shd':
      extra = {'num_samples': config.synthetic_samples}
    train = split('train', **extra)
    test = split('test')
    if name == 'shd':
      train, valid, source = hold_out(train, config.valid_fraction, config.seed)
    else:
      valid, source = split('valid'), f'the {name} valid split'
  num_classes = max(ds.features['y'].num_classes for ds in (train, valid, test))
  steps, channels = train.features['x'].shape
  for name, ds in (('valid', valid), ('test', test)):
    if ds.features['x'].shape != (steps, channels):
      raise DataError(
        f'the {name} set has samples of shape {ds.features["x"].shape}, the '
        f'training set {(steps, channels)}: bin them alike.'
      )
  return Splits(train, valid, test, num_classes, steps, channels, source)


def _from_file(path, option: str, binning: dict):
  data = _data()
  flag = '--' + option.replace('_', '-')
  if not Path(path).is_file():
    raise DataError(
      f'{flag} {path}: no such file (expected an HDF5 file in the SHD/SSC '
      'layout: spikes/times, spikes/units, labels).'
    )
  try:
    return data.from_hdf5(path, **binning)
  except (data.SpikeFileError, OSError) as e:
    raise DataError(f'{flag} {path}: {e}') from e


def hold_out(train, fraction: float, seed: int):
  """Splits a validation set off ``train`` with `data.split_by_speaker`.

  Whole speakers go to validation where the file has speakers (so
  validation measures generalisation to new speakers, as SHD's test split
  does), else a seeded random ``fraction`` of the examples.

  Returns:
    ``(train, valid, description)``.
  """
  train, valid = _data().split_by_speaker(
    train, valid_fraction=fraction, seed=seed
  )
  speakers = sorted(set(np.asarray(valid['speaker']).tolist()) - {-1})
  if speakers and not set(speakers) & set(
    np.asarray(train['speaker']).tolist()
  ):
    how = f'speakers {speakers} held out of train'
  else:
    how = f'{fraction:.0%} of train held out at random'
  return train, valid, f'{how} ({len(valid)} samples)'


def augmentation(config: Config):
  """The training batches' `data.Augment`, or None when all are off."""
  if not (config.channel_shift or config.time_shift or config.input_dropout):
    return None
  return _data().Augment(
    channel_shift=config.channel_shift,
    time_shift=config.time_shift,
    dropout=config.input_dropout,
  )
