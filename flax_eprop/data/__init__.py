"""SHD/SSC spike data: readers, fixed-dt binning, a synthetic set, batching.

Imported explicitly (the core package never imports it)::

  from flax_eprop import data

  train = data.load('shd', 'train', dt=0.01)          # or 'synthetic-shd'
  batches = data.BatchIterator(train, batch_size=32, seed=0)
  batch = next(batches)   # {'x': (32, 140, 700), 'y': (32,), 'mask': (32, 140)}

Needs the ``data`` extra (``datasets``, ``h5py``, ``numpy``, ``tqdm``).
"""

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
from flax_eprop.data.synthetic import make_synthetic as make_synthetic

__all__ = [
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
  'fetch',
  'from_hdf5',
  'load',
  'make_synthetic',
  'num_bins',
  'resolve_data_dir',
  'write_spikes',
]
