"""A validation split held out of a training set, by speaker where possible.

SHD has no validation split, and its test set has speakers the training set
lacks: a validation set of unseen speakers estimates that better than random
examples do.
"""

from __future__ import annotations

import numpy as np

_SPLIT_STREAM = 0x5B  # keeps the split's draws apart from other uses of seed


def split_indices(
  speakers: np.ndarray, valid_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """The example indices of :func:`split_by_speaker`.

  Args:
    speakers: ``(N,)`` integer speaker ids, -1 for none.
    valid_fraction: the share of examples to hold out, in ``(0, 1)``.
    seed: seeds the choice.

  Returns:
    ``(train, valid)``: sorted int64 index arrays that partition
    ``range(N)``, both non-empty.
  """
  speakers = np.asarray(speakers)
  n = len(speakers)
  if not 0 < valid_fraction < 1:
    raise ValueError(
      f'valid_fraction={valid_fraction!r} must be in (0, 1), e.g. 0.1.'
    )
  if n < 2:
    raise ValueError(f'cannot split {n} example(s): need at least 2.')
  rng = np.random.default_rng([seed, _SPLIT_STREAM])
  valid = np.zeros(n, bool)
  known = np.unique(speakers[speakers >= 0])
  unknown = np.flatnonzero(speakers < 0)
  if len(known) >= 2:
    order = rng.permutation(known)
    counts = np.array([np.sum(speakers == s) for s in order])
    target = valid_fraction * np.sum(counts)
    # The number of whole speakers whose total is nearest the target (at
    # least one held out, at least one kept).
    totals = np.cumsum(counts)[:-1]
    k = int(np.argmin(np.abs(totals - target))) + 1
    valid |= np.isin(speakers, order[:k])
  else:
    unknown = np.arange(n)  # fewer than two speakers: split by example
  if len(unknown):
    take = min(max(round(valid_fraction * len(unknown)), 1), len(unknown) - 1)
    valid[rng.permutation(unknown)[:take]] = True
  return np.flatnonzero(~valid), np.flatnonzero(valid)


def split_by_speaker(dataset, valid_fraction: float = 0.1, seed: int = 0):
  """Holds a validation set out of a training set: whole speakers if known.

  The rule, deterministic in ``seed``:

  - with two or more speakers (ids >= 0 in the ``speaker`` column), the
    speakers are put in a seeded random order and the first ``k`` are held
    out, ``k >= 1`` chosen so that their examples come nearest to
    ``valid_fraction`` of the examples with a speaker (at least one speaker
    stays in train). No speaker is in both parts.
  - examples without a speaker (id -1), or all examples when the dataset has
    no ``speaker`` column or fewer than two speakers, are split at random
    by example: ``round(valid_fraction * m)`` of those ``m`` examples go to
    the validation part (at least one and never all, if ``m >= 2``).

  Args:
    dataset: a map-style ``datasets.Dataset``, e.g. from
      :func:`~flax_eprop.data.load`.
    valid_fraction: the share to hold out, in ``(0, 1)``.
    seed: seeds the choice of speakers and examples.

  Returns:
    ``(train, valid)``: two ``datasets.Dataset`` selections of ``dataset``,
    each in the dataset's order.

  Examples:
    >>> import datasets
    >>> ds = datasets.Dataset.from_dict({'speaker': [0, 0, 1, 1, 2, 2, 3, 3]})
    >>> train, valid = split_by_speaker(ds, valid_fraction=0.25, seed=0)
    >>> len(train), len(valid)
    (6, 2)
    >>> set(train['speaker']) & set(valid['speaker'])
    set()
  """
  if 'speaker' in dataset.column_names:
    speakers = np.asarray(dataset.with_format('numpy')['speaker'], np.int64)
  else:
    speakers = np.full(len(dataset), -1, np.int64)
  train, valid = split_indices(speakers, valid_fraction, seed)
  return dataset.select(train), dataset.select(valid)
