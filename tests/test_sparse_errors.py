"""`sparse_jacfwd` on cells e-prop cannot represent: clear errors.

A cell that mixes neurons outside a parameter synapse raises `NonLocalError`
at trace time, naming the primitive and the line of the cell that made it;
a ``jax.custom_vjp`` spike says to use ``jax.custom_jvp``. The hint in the
message (``mode='exact'``) must work.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from sparse_cells import setup, zero_state

import flax_eprop as fe

NonLocalError = fe.NonLocalError
sparse_jacfwd = fe.sparse_jacfwd

FEATURES, IN = 4, 3
sg = jax.lax.stop_gradient


def line_of(marker: str) -> str:
  """``test_sparse_errors.py:<line>`` of the one line holding ``marker``."""
  with open(__file__) as f:
    lines = [i for i, text in enumerate(f, 1) if text.rstrip().endswith(marker)]
  (line,) = lines
  return rf'test_sparse_errors\.py:{line}\b'


class MeanLIF(nn.Module):
  """Subtracts the population mean: mixes neurons without a synapse."""

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    v = 0.9 * v + nn.Dense(FEATURES, name='input')(x) - sg(z)
    v = v - v.mean(-1, keepdims=True)  # <- mean
    z = fe.surrogates.triangle(v - 1.0)
    return (v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return zero_state(input_shape, FEATURES, 2)


# Fixed lateral inhibition: a constant, not a parameter.
INHIBITION = 0.2 * (np.ones((FEATURES, FEATURES)) - np.eye(FEATURES))


class LateralLIF(nn.Module):
  """Lateral inhibition ``z @ M`` through the constant matrix ``M``."""

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    inhibition = z @ INHIBITION  # <- lateral
    v = 0.9 * v + nn.Dense(FEATURES, name='input')(x) - inhibition - sg(z)
    z = fe.surrogates.triangle(v - 1.0)
    return (v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return zero_state(input_shape, FEATURES, 2)


@jax.custom_vjp
def vjp_spike(x):
  return (x > 0).astype(x.dtype)


def _vjp_spike_fwd(x):
  return vjp_spike(x), x


def _vjp_spike_bwd(x, g):
  return (g * 0.3 * jnp.maximum(0.0, 1.0 - jnp.abs(x)),)


vjp_spike.defvjp(_vjp_spike_fwd, _vjp_spike_bwd)


class VjpLIF(nn.Module):
  """A LIF whose spike function is a ``jax.custom_vjp``."""

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    v = 0.9 * v + nn.Dense(FEATURES, name='input')(x) - sg(z)
    z = vjp_spike(v - 1.0)  # <- custom_vjp
    return (v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return zero_state(input_shape, FEATURES, 2)


@pytest.mark.parametrize(
  'cell, primitive, marker',
  [
    (MeanLIF(), 'reduce_sum', '# <- mean'),
    (LateralLIF(), 'dot_general', '# <- lateral'),
  ],
  ids=['mean', 'lateral_inhibition'],
)
def test_non_local_cell_raises(x64, key, cell, primitive, marker):
  params, carry, x = setup(cell, key, (2, IN))
  match = line_of(marker) + rf'.*`{primitive}`.*neuron'
  with pytest.raises(NonLocalError, match=match) as info:
    sparse_jacfwd(cell.apply)(params, carry, x)
  message = str(info.value)
  assert 'parameter synapse' in message  # what to do ...
  assert "mode='exact'" in message  # ... or the alternative


def test_non_local_error_is_a_value_error():
  assert issubclass(fe.NonLocalError, ValueError)
  assert fe.sparse.NonLocalError is fe.NonLocalError


@pytest.mark.parametrize(
  'cell', [MeanLIF(), LateralLIF()], ids=['mean', 'lateral']
)
def test_non_local_cell_works_in_exact_mode(x64, key, cell):
  """The fix the error message suggests: ``mode='exact'``, checked against
  reverse mode (`jax.jacrev`, an independent computation)."""
  params, carry, x = setup(cell, key, (2, IN))

  @jax.jit
  def both(params, carry, x):
    jac_p, jac_c = sparse_jacfwd(cell.apply, mode='exact')(params, carry, x)
    rev = [jax.jacrev(cell.apply, a)(params, carry, x) for a in (0, 1)]
    return [jac_p.todense(), jac_c.todense()], rev

  actual, expected = both(params, carry, x)
  for jac in expected:
    assert any(bool(jnp.any(d != 0)) for d in jax.tree.leaves(jac[1]))
  assert_trees_close(actual, expected)


def test_custom_vjp_spike_raises(x64, key):
  cell = VjpLIF()
  params, carry, x = setup(cell, key, (2, IN))
  match = line_of('# <- custom_vjp') + '.*' + re.escape('jax.custom_vjp')
  with pytest.raises(NonLocalError, match=match) as info:
    sparse_jacfwd(cell.apply)(params, carry, x)
  assert 'jax.custom_jvp' in str(info.value)  # says what to use instead


class GainedRecurrence(nn.Module):
  """A per-neuron gain applied before a recurrent synapse: its immediate
  derivative goes through W_rec (not Kronecker), so e-prop must refuse it."""

  @nn.compact
  def __call__(self, carry, x):
    v, z = carry
    gain = self.param('gain', nn.initializers.ones, (FEATURES,))
    current = nn.Dense(FEATURES, name='input')(x)
    recurrent = nn.Dense(FEATURES, use_bias=False, name='recurrent')
    current = current + recurrent(z * gain[None])  # <- gained
    v = 0.9 * v + current - sg(z)
    z = fe.surrogates.triangle(v - 1.0)
    return (v, z), z


def test_parameter_before_a_synapse_raises_at_the_users_line(key):
  carry = (jnp.zeros((2, FEATURES)),) * 2
  x = jnp.ones((2, IN))
  params = GainedRecurrence().init(key, carry, x)['params']
  step = lambda p, c, x: GainedRecurrence().apply({'params': p}, c, x)
  # The op is inside Flax's Dense; the message names the user's line.
  match = line_of('# <- gained') + r'.*presynaptic input.*parameter'
  with pytest.raises(NonLocalError, match=match):
    sparse_jacfwd(step)(params, carry, x)
