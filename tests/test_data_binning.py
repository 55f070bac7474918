"""Fixed-dt binning: the bin-edge convention, counts, pooling, saturation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_eprop.data import bin_events, bin_index, bin_spikes, num_bins


def test_spike_at_k_dt_lands_in_bin_k():
  dt = 0.01
  k = np.arange(140)
  for dtype in (np.float64, np.float32):
    times = (k * dt).astype(dtype)
    np.testing.assert_array_equal(bin_index(times, dt), k)
    # just before an edge stays in the previous bin (float64 resolution)
  before = k[1:] * dt - 1e-7
  np.testing.assert_array_equal(bin_index(before, dt), k[1:] - 1)
  # inside a bin
  np.testing.assert_array_equal(bin_index(k * dt + 0.5 * dt, dt), k)


def test_decimal_literals_land_on_their_edge():
  # 0.3 / 0.1 == 2.9999999999999996 in float64.
  assert bin_index(np.array([0.3, 0.7, 1.1]), 0.1).tolist() == [3, 7, 11]
  assert num_bins(1.4, 0.01) == 140
  assert num_bins(0.3, 0.1) == 3
  assert num_bins(0.31, 0.1) == 4


def test_spike_at_max_time_is_outside():
  x = bin_spikes(
    np.array([0.0, 0.029, 0.03]),
    np.array([0, 1, 2]),
    dt=0.01,
    max_time=0.03,
    channels=3,
  )
  assert x.shape == (3, 3)
  assert x.sum() == 2 and x[2, 1] == 1 and x[:, 2].sum() == 0


def test_pooling_sums_adjacent_channels():
  units = np.array([0, 1, 2, 3, 699, 698])
  x = bin_spikes(np.zeros(6), units, dt=0.01, max_time=0.01, pool=2)
  assert x.shape == (1, 350)
  assert x[0, 0] == 2 and x[0, 1] == 2 and x[0, 349] == 2 and x.sum() == 6


def test_counts_saturate_and_binary():
  times, units = np.zeros(300), np.zeros(300, np.int64)
  x = bin_spikes(times, units, dt=0.01, max_time=0.01, channels=1)
  assert x.dtype == np.uint8 and x[0, 0] == 255
  xb = bin_spikes(times, units, dt=0.01, max_time=0.01, channels=1, binary=True)
  assert xb.dtype == np.bool_ and xb[0, 0]


def test_mask_and_length():
  out = bin_events(
    np.array([0.015, 0.0, 0.5]),
    np.array([1, 1, 1]),
    np.array([0, 1, 2]),
    batch_size=4,
    dt=0.01,
    max_time=0.05,
    channels=2,
  )
  # sample 2 only spikes after max_time; sample 3 has no spikes: length 1
  assert out.length.tolist() == [2, 1, 1, 1]
  assert out.mask.sum(1).tolist() == [2, 1, 1, 1]
  assert out.mask.dtype == np.bool_ and out.mask.shape == (4, 5)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(dt=0.0, max_time=1.0), 'dt must be'),
    (dict(dt=0.01, max_time=float('nan')), 'max_time must be'),
    (dict(dt=10.0, max_time=1.0), 'shorter than one bin'),
    (dict(dt=0.01, max_time=1.0, pool=3), 'pool=3 must divide'),
  ],
)
def test_bad_binning_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bin_spikes(np.zeros(1), np.zeros(1, np.int64), **kwargs)


@settings(max_examples=40, deadline=None)
@given(
  st.lists(
    st.tuples(
      st.integers(0, 3),
      st.floats(0.0, 0.2, allow_nan=False, allow_infinity=False),
      st.integers(0, 9),
    ),
    max_size=60,
  ),
  st.sampled_from([1, 2, 5]),
  st.sampled_from([0.01, 0.02, 0.025]),
)
def test_matches_a_loop(events, pool, dt):
  sample = np.array([e[0] for e in events], np.int64)
  times = np.array([e[1] for e in events], np.float64)
  units = np.array([e[2] for e in events], np.int64)
  out = bin_events(
    times,
    units,
    sample,
    batch_size=4,
    dt=dt,
    max_time=0.15,
    channels=10,
    pool=pool,
  )
  steps = num_bins(0.15, dt)
  expected = np.zeros((4, steps, 10 // pool), np.int64)
  for s, t, u in events:
    k = int(bin_index(np.array([t]), dt)[0])
    if k < steps:
      expected[s, k, u // pool] += 1
  np.testing.assert_array_equal(out.x, expected)
