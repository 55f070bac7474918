"""Shared fixtures: CPU only, strict rank promotion, seeded keys, float64."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_numpy_rank_promotion', 'raise')

SEED = 0


@pytest.fixture
def key():
  """A fixed PRNG key; split it, never reuse it across draws."""
  return jax.random.key(SEED)


@pytest.fixture
def x64():
  """Enables float64 for the test; the previous setting is restored after."""
  with jax.enable_x64(True):
    yield
