"""SHD/SSC spike data: readers, fixed-dt binning, a synthetic set, batching.

Imported explicitly (the core package never imports it)::

  from flax_eprop import data

  train = data.load('shd', 'train', dt_ms=10.0)       # or 'synthetic-shd'
  train, valid = data.split_by_speaker(train, valid_fraction=0.1)
  batches = data.BatchIterator(train, batch_size=32, seed=0, dtype='float32',
                               transform=data.Augment(channel_shift=3))
  batch = next(batches)   # {'x': (32, 140, 700), 'y': (32,), 'mask': (32, 140)}

Units: spike times, ``dt`` and ``max_time`` are in seconds, as in the
files; ``dt_ms`` gives the bin width in milliseconds, the unit of the cells'
``dt`` and time constants, so one number serves both.

Needs the ``data`` extra (``datasets``, ``h5py``, ``numpy``, ``tqdm``).
"""

from flax_eprop.data.augment import Augment as Augment
from flax_eprop.data.augment import chain as chain
from flax_eprop.data.augment import drop_inputs as drop_inputs
from flax_eprop.data.augment import shift_channels as shift_channels
from flax_eprop.data.augment import shift_time as shift_time
from flax_eprop.data.batching import BatchIterator as BatchIterator
from flax_eprop.data.binning import Binned as Binned
from flax_eprop.data.binning import bin_events as bin_events
from flax_eprop.data.binning import bin_index as bin_index
from flax_eprop.data.binning import bin_spikes as bin_spikes
from flax_eprop.data.binning import num_bins as num_bins
from flax_eprop.data.download import BASE_URL as BASE_URL
from flax_eprop.data.download import ChecksumError as ChecksumError
from flax_eprop.data.download import (
  DatasetNotFoundError as DatasetNotFoundError,
)
from flax_eprop.data.download import fetch as fetch
from flax_eprop.data.download import resolve_data_dir as resolve_data_dir
from flax_eprop.data.hdf5 import Events as Events
from flax_eprop.data.hdf5 import SpikeFile as SpikeFile
from flax_eprop.data.hdf5 import SpikeFileError as SpikeFileError
from flax_eprop.data.hdf5 import write_spikes as write_spikes
from flax_eprop.data.loading import DroppedEventsWarning as DroppedEventsWarning
from flax_eprop.data.loading import cache_key as cache_key
from flax_eprop.data.loading import from_hdf5 as from_hdf5
from flax_eprop.data.loading import load as load
from flax_eprop.data.splits import split_by_speaker as split_by_speaker
from flax_eprop.data.splits import split_indices as split_indices
from flax_eprop.data.synthetic import make_synthetic as make_synthetic

__all__ = [
  'Augment',
  'BASE_URL',
  'BatchIterator',
  'Binned',
  'ChecksumError',
  'DatasetNotFoundError',
  'DroppedEventsWarning',
  'Events',
  'SpikeFile',
  'SpikeFileError',
  'bin_events',
  'bin_index',
  'bin_spikes',
  'cache_key',
  'chain',
  'drop_inputs',
  'fetch',
  'from_hdf5',
  'load',
  'make_synthetic',
  'num_bins',
  'resolve_data_dir',
  'shift_channels',
  'shift_time',
  'split_by_speaker',
  'split_indices',
  'write_spikes',
]
