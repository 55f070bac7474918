"""Surrogates: forward is the Heaviside step, derivative the documented one."""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

from flax_eprop import surrogates

X = np.array([-2.0, -1.0, -0.6, -0.1, 0.0, 0.05, 0.3, 1.0, 1.5])


def triangle_prime(x, dampening=0.3):
  return dampening * np.maximum(0.0, 1.0 - np.abs(x))


def fast_sigmoid_prime(x, slope=10.0):
  return 1.0 / (slope * np.abs(x) + 1.0) ** 2


def arctan_prime(x, alpha=2.0):
  return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)


# (spike function, its hand-written pseudo-derivative, keyword arguments)
CASES = [
  (surrogates.triangle, triangle_prime, {}),
  (surrogates.triangle, triangle_prime, {'dampening': 1.0}),
  (surrogates.fast_sigmoid, fast_sigmoid_prime, {}),
  (surrogates.fast_sigmoid, fast_sigmoid_prime, {'slope': 25.0}),
  (surrogates.arctan, arctan_prime, {}),
  (surrogates.arctan, arctan_prime, {'alpha': 5.0}),
]
IDS = [f'{f.__name__}-{kw}' for f, _, kw in CASES]


@pytest.mark.parametrize('fn,prime,kwargs', CASES, ids=IDS)
def test_forward_is_heaviside(x64, fn, prime, kwargs):
  for dtype in (jnp.float32, jnp.float64):
    x = jnp.asarray(X, dtype)
    z = fn(x, **kwargs)
    assert z.dtype == dtype
    np.testing.assert_array_equal(z, (X > 0).astype(np.float64))


@pytest.mark.parametrize('fn,prime,kwargs', CASES, ids=IDS)
def test_jvp_is_pseudo_derivative(x64, fn, prime, kwargs):
  x = jnp.asarray(X)
  x_dot = jnp.linspace(0.5, 2.0, X.size)
  z, z_dot = jax.jvp(functools.partial(fn, **kwargs), (x,), (x_dot,))
  assert_trees_close(z, (X > 0).astype(np.float64))
  assert_trees_close(z_dot, prime(X, **kwargs) * np.asarray(x_dot))


@pytest.mark.parametrize('fn,prime,kwargs', CASES, ids=IDS)
def test_grad_and_jacfwd_are_pseudo_derivative(x64, fn, prime, kwargs):
  f = functools.partial(fn, **kwargs)
  x = jnp.asarray(X)
  grad = jax.vmap(jax.grad(f))(x)
  assert_trees_close(grad, prime(X, **kwargs))
  assert_trees_close(jax.jacfwd(f)(x), np.diag(prime(X, **kwargs)))
  assert_trees_close(jax.jacrev(f)(x), np.diag(prime(X, **kwargs)))


@pytest.mark.parametrize('fn,prime,kwargs', CASES, ids=IDS)
def test_float32_and_jit(fn, prime, kwargs):
  f = jax.jit(jax.vmap(jax.grad(functools.partial(fn, **kwargs))))
  grad = f(jnp.asarray(X, jnp.float32))
  assert grad.dtype == jnp.float32
  assert_trees_close(grad, prime(X, **kwargs).astype(np.float32))


def test_chain_rule_gives_psi_over_threshold(x64):
  """psi = dz/dv = dampening * max(0, 1 - |v - A| / thr) / thr."""
  threshold, a = 2.0, 2.5
  v = jnp.linspace(0.0, 5.0, 11)
  psi = jax.vmap(jax.grad(lambda v: surrogates.triangle((v - a) / threshold)))
  expected = 0.3 * np.maximum(0, 1 - np.abs(np.asarray(v) - a) / threshold)
  assert_trees_close(psi(v), expected / threshold)


def test_heaviside_has_zero_gradient():
  assert jax.grad(surrogates.heaviside)(jnp.array(0.0)) == 0.0


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  x=st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False),
  case=st.sampled_from(range(len(CASES))),
)
def test_any_point_matches_hand_formula(x, case):
  fn, prime, kwargs = CASES[case]
  with jax.enable_x64(True):
    value, slope = jax.value_and_grad(functools.partial(fn, **kwargs))(
      jnp.float64(x)
    )
    assert float(value) == float(x > 0)
    assert float(slope) == pytest.approx(prime(x, **kwargs), rel=1e-12)
