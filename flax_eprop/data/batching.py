"""An epoch iterator over a map-style dataset that resumes exactly.

The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(n)``
(or ``arange(n)`` without shuffling), and the position inside it is a cursor,
so the whole state is a small dict of ints, ``{'seed', 'epoch', 'cursor',
'num_examples'}``, that can be saved as JSON next to a checkpoint and resumed
to the identical sequence of batches. (A shuffle buffer cannot resume exactly.)

A ``transform(batch, rng)`` (augmentation, e.g. :class:`Augment`) gets a
generator seeded from ``(seed, epoch, cursor)`` at the batch's start, so the
transformed batches resume exactly too; no generator state is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from flax_eprop.data._deps import require

_STATE_KEYS = ('seed', 'epoch', 'cursor', 'num_examples')
_TRANSFORM_STREAM = 0x7A  # keeps transform draws apart from the permutations

Transform = Callable[[dict, np.random.Generator], dict]


class BatchIterator:
  """Yields numpy batches over epochs, with an exactly resumable state.

  Iterating never ends: after the last batch of epoch ``e`` comes the first
  batch of epoch ``e + 1``. Use :meth:`iter_epoch` for the rest of one epoch.

  Args:
    dataset: a map-style ``datasets.Dataset``, e.g. from :func:`load`.
    batch_size: the number of examples B per batch.
    seed: seeds the per-epoch permutations.
    shuffle: if False, every epoch is in dataset order.
    drop_remainder: if True, the last ``n % B`` examples of each epoch (a
      different set each epoch when shuffling) are skipped, so every batch
      has B examples; otherwise the last batch of an epoch is smaller.
    columns: the columns to yield.
    state: a dict from :meth:`state_dict` to resume from.
    dtype: if given, ``x`` is cast to it (e.g. ``np.float32``: the cells
      need floating inputs, the counts are stored as uint8), before the
      transform.
    transform: ``transform(batch, rng) -> batch`` applied to every batch
      (after the cast), e.g. :class:`Augment`; ``rng`` is a fresh
      ``np.random.Generator`` seeded from ``(seed, epoch, cursor)`` at the
      batch's start, so a resumed iterator yields the same transformed
      batches. It must not keep random state of its own.

  Yields:
    Dicts of numpy arrays, by default ``x: (B, T, C)`` uint8 (or bool, or
    ``dtype``), ``y: (B,)`` int32 and ``mask: (B, T)`` bool.

  Examples:
    >>> import datasets, numpy as np
    >>> ds = datasets.Dataset.from_dict({'y': np.arange(5)})
    >>> it = BatchIterator(ds, 2, seed=1, columns=('y',))
    >>> first = next(it)['y']
    >>> state = it.state_dict()
    >>> state
    {'seed': 1, 'epoch': 0, 'cursor': 2, 'num_examples': 5}
    >>> after = [next(it)['y'].tolist() for _ in range(3)]
    >>> resumed = BatchIterator(ds, 2, state=state, columns=('y',))
    >>> [next(resumed)['y'].tolist() for _ in range(3)] == after
    True
  """

  def __init__(
    self,
    dataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
    columns: Sequence[str] = ('x', 'y', 'mask'),
    state: dict | None = None,
    dtype=None,
    transform: Transform | None = None,
  ):
    n = len(dataset)
    if batch_size < 1 or (drop_remainder and batch_size > n):
      raise ValueError(
        f'batch_size={batch_size} must be >= 1 (and <= the {n} examples '
        'when drop_remainder=True).'
      )
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
      raise ValueError(
        f'columns {missing} are not in the dataset ({dataset.column_names}).'
      )
    self.batch_size, self.shuffle = int(batch_size), shuffle
    self.drop_remainder, self.columns = drop_remainder, tuple(columns)
    self._features = dataset.features
    self._table = dataset.with_format('arrow')
    self._n, self.seed, self.epoch, self.cursor = n, int(seed), 0, 0
    self._order_epoch, self._order = None, None
    if transform is not None and not callable(transform):
      raise TypeError(
        f'transform must be callable as transform(batch, rng), got '
        f'{transform!r}.'
      )
    if dtype is not None and 'x' not in self.columns:
      raise ValueError(f"dtype casts the column 'x', not in {self.columns}.")
    self.dtype = None if dtype is None else np.dtype(dtype)
    self.transform = transform
    if state is not None:
      self.load_state_dict(state)

  @property
  def num_batches(self) -> int:
    """Batches per epoch."""
    full, rest = divmod(self._n, self.batch_size)
    return full + (rest > 0 and not self.drop_remainder)

  def state_dict(self) -> dict:
    """The position, as a JSON-serialisable dict of ints."""
    return {
      'seed': self.seed,
      'epoch': self.epoch,
      'cursor': self.cursor,
      'num_examples': self._n,
    }

  def load_state_dict(self, state: dict) -> None:
    """Moves to a position saved by :meth:`state_dict`.

    Args:
      state: ``{'seed', 'epoch', 'cursor', 'num_examples'}``.
    """
    if sorted(state) != sorted(_STATE_KEYS):
      raise ValueError(
        f'state must have keys {_STATE_KEYS}, got {sorted(state)}'
      )
    if state['num_examples'] != self._n:
      raise ValueError(
        f'state is for a dataset of {state["num_examples"]} examples; this '
        f'one has {self._n}.'
      )
    if not 0 <= state['cursor'] <= self._n or state['epoch'] < 0:
      raise ValueError(f'state out of range: {state}')
    self.seed, self.epoch = int(state['seed']), int(state['epoch'])
    self.cursor = int(state['cursor'])
    self._normalise()

  def order(self, epoch: int) -> np.ndarray:
    """The order of the examples in an epoch: ``(num_examples,)`` int64."""
    if not self.shuffle:
      return np.arange(self._n, dtype=np.int64)
    return np.random.default_rng([self.seed, epoch]).permutation(self._n)

  def _normalise(self) -> None:
    left = self._n - self.cursor
    if left == 0 or (self.drop_remainder and left < self.batch_size):
      self.epoch, self.cursor = self.epoch + 1, 0

  def __iter__(self) -> Iterator[dict]:
    return self

  def rng(self, epoch: int, cursor: int) -> np.random.Generator:
    """The generator the transform gets for the batch starting at ``cursor``.

    Args:
      epoch: the epoch.
      cursor: the position of the batch's first example in the epoch.

    Returns:
      ``np.random.default_rng([seed, epoch, cursor, 0x7A])``.
    """
    return np.random.default_rng([self.seed, epoch, cursor, _TRANSFORM_STREAM])

  def __next__(self) -> dict:
    if self._order_epoch != self.epoch:
      self._order_epoch, self._order = self.epoch, self.order(self.epoch)
    epoch, cursor = self.epoch, self.cursor
    index = self._order[cursor : cursor + self.batch_size]
    self.cursor += len(index)
    self._normalise()
    batch = self.gather(index)
    if self.dtype is not None:
      batch['x'] = batch['x'].astype(self.dtype)
    if self.transform is not None:
      batch = self.transform(batch, self.rng(epoch, cursor))
    return batch

  def iter_epoch(self) -> Iterator[dict]:
    """Yields the remaining batches of the current epoch, then stops."""
    epoch = self.epoch
    while self.epoch == epoch:
      yield next(self)

  def gather(self, index: np.ndarray) -> dict:
    """The examples at ``index`` as numpy arrays, one per column.

    Args:
      index: ``(B,)`` integer row indices.

    Returns:
      ``{column: (B, *shape)}``; integer scalars (``y``, ``length``,
      ``speaker``) as int32.
    """
    table = self._table[np.asarray(index, np.int64)]
    return {
      c: _to_numpy(table.column(c), self._features[c]) for c in self.columns
    }


def _to_numpy(column, feature) -> np.ndarray:
  """A fixed-shape Arrow column -> ``(rows, *shape)`` numpy, dtype kept."""
  pa = require('pyarrow')
  array = column.combine_chunks()
  if isinstance(array, pa.ExtensionArray):  # Array2D
    array = array.storage
  rows, shape = len(array), _shape(feature)
  while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
    if not shape:
      raise ValueError(f'cannot batch the variable-length column {feature}')
    array = array.flatten()
  values = array.to_numpy(zero_copy_only=False).reshape(rows, *shape)
  if not shape and values.dtype.kind in 'iu' and values.dtype.itemsize > 4:
    values = values.astype(np.int32)  # labels: JAX's default integer
  return values


def _shape(feature) -> tuple[int, ...]:
  if hasattr(feature, 'shape'):  # Array2D, Array3D, ...
    return tuple(feature.shape)
  length = getattr(feature, 'length', None)
  if length is not None and length >= 0:  # fixed-length Sequence/List
    return (length,)
  return ()
