"""Steps as a new user writes them: refused when they mix neurons, exact
(``.todense()`` equal to `jax.jacfwd`) when they do not.

The named tests are the cases once silently accepted with wrong Jacobians,
falsely refused, or refused without a source line. The property test builds
steps from a pool of neuron-local operations, harmless operations on
non-neuron axes and operations that mix neurons (or batch rows), and checks
every step: refused, or exact; and a step of local operations only is never
refused.
"""

from __future__ import annotations

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from jax import lax

import flax_eprop as fe

F, B, IN = 4, 3, 2
sg = lax.stop_gradient
NonLocalError = fe.NonLocalError


def line_of(marker: str) -> str:
  """``test_sparse_locality.py:<line>`` of the one line ending in marker."""
  with open(__file__) as f:
    lines = [i for i, text in enumerate(f, 1) if text.rstrip().endswith(marker)]
  (line,) = lines
  return rf'test_sparse_locality\.py:{line}\b'


def setup(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    'w': jax.random.normal(k[0], (IN, F), jnp.float64),
    'tau': jax.random.uniform(k[1], (F,), jnp.float64, 1.0, 2.0),
  }
  v = jax.random.normal(k[2], (B, F), jnp.float64)
  x = jax.random.normal(k[3], (B, IN), jnp.float64)
  return params, (v,), x


def make_step(body):
  """``new_v = body(v, tau, x) + x @ w`` with ``tau: (F,)``."""

  def step(params, carry, x):
    (v,) = carry
    new = body(v, params['tau'], x) + x @ params['w']
    return (new,), jnp.tanh(new)

  return step


def assert_exact(step, seed=0):
  params, carry, x = setup(seed)

  @jax.jit
  def both(params, carry, x):
    jac = fe.sparse_jacfwd(step)(params, carry, x)
    ref = [jax.jacfwd(step, a)(params, carry, x) for a in (0, 1)]
    return [j.todense() for j in jac], ref

  actual, expected = both(params, carry, x)
  # absolute tolerance at the leaves' scale: an entry that is small by
  # cancellation carries the rounding error of its larger terms
  scale = max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(expected))
  assert_trees_close(actual, expected, atol=1e-12 * scale)
  assert any(bool(jnp.any(d != 0)) for d in jax.tree.leaves(expected[1]))


def refusal(step) -> str:
  params, carry, x = setup()
  with pytest.raises(NonLocalError) as info:
    fe.sparse_jacfwd(step)(params, carry, x)
  return str(info.value)


# Once silently accepted with a wrong Jacobian.


def smooth(v, t, x):
  window, ones = (1,) * (v.ndim - 1) + (3,), (1,) * v.ndim
  return lax.reduce_window(v, 0.0, lax.add, window, ones, 'SAME')  # <- rw


def fft_filter(v, t, x):
  gain = jnp.array([[1.0, 0.5, 0.0]])
  return jnp.fft.irfft(jnp.fft.rfft(v) * gain, n=F)  # <- fft


def shift(v, t, x):
  padded = lax.dynamic_update_slice(jnp.zeros((B, F + 1)), v, (0, 1))  # <- dus
  return padded[:, :F]


def param_mean(v, t, x):
  return v * t.mean()  # <- param mean


def param_roll(v, t, x):
  return v * jnp.roll(t, 1)[None]  # <- param roll


def param_sort(v, t, x):
  return v * jnp.sort(t)[None]  # <- param sort


def param_moved(v, t, x):
  return v * t.reshape(2, F // 2).T.reshape(1, F)  # <- param moved


def roll(v, t, x):
  return jnp.roll(v, 1, axis=-1)  # <- roll


@pytest.mark.parametrize(
  'body, primitive, marker',
  [
    (smooth, 'reduce_window_sum', '# <- rw'),
    (fft_filter, 'fft', '# <- fft'),
    (shift, 'dynamic_update_slice', '# <- dus'),
    (param_mean, 'reduce_sum', '# <- param mean'),
    (param_roll, 'slice', '# <- param roll'),
    (param_sort, 'sort', '# <- param sort'),
    (param_moved, 'reshape', '# <- param moved'),
    (roll, 'slice', '# <- roll'),
  ],
  ids=lambda p: getattr(p, '__name__', None) if callable(p) else None,
)
def test_mixing_step_is_refused_at_the_users_line(x64, body, primitive, marker):
  """Each names the primitive and the user's line, also when the op was
  emitted inside a jitted jax.numpy helper (``jnp.roll``, ``jnp.sort``)."""
  message = refusal(make_step(body))
  assert re.search(line_of(marker) + rf'.*`{primitive}`', message), message
  assert "mode='exact'" in message


def test_refused_step_works_in_exact_mode(x64):
  """The alternative the message names: ``mode='exact'`` vs reverse mode."""
  step = make_step(smooth)
  params, carry, x = setup()
  jac_c = fe.sparse_jacfwd(step, argnums=1, mode='exact')(params, carry, x)
  assert_trees_close(jac_c.todense(), jax.jacrev(step, 1)(params, carry, x))


# Once falsely refused, or exact only by accident.


def test_stack_reshape_sum_is_exact(x64):
  assert_exact(
    make_step(
      lambda v, t, x: jnp.stack([v, v * v]).reshape(2, B, 1, F).sum(0)[:, 0]
    )
  )


def test_flip_over_a_non_neuron_axis_is_exact(x64):
  assert_exact(
    make_step(lambda v, t, x: jnp.flip(jnp.stack([v, 2 * v], -2), -2)[:, 0])
  )


def test_mixed_value_without_a_tangent_is_exact(x64):
  """``stop_gradient`` and comparisons cut the tangent: harmless mixing."""
  body = lambda v, t, x: (
    jnp.where(v > v.mean(-1, keepdims=True), v, -v)
    - sg(v.max(-1, keepdims=True))
  )
  assert_exact(make_step(body))


def test_kernel_prelude_is_free(x64):
  """Kernel-only code may mix its axes (a masked, transposed, flipped
  kernel); a per-neuron gain folded into a kernel is a kernel too."""

  def step(params, carry, x):
    (v,) = carry
    w = (
      jnp.flip(params['w'] * (1 - jnp.eye(IN, F)), 0)
      * jnp.roll(params['tau'], 1)[None]
    )
    new = 0.9 * v + x @ w
    return (new,), new

  assert_exact(step)


def test_parameter_output_is_exact(x64):
  """An output computed from a per-neuron parameter alone."""

  def step(params, carry, x):
    (v,) = carry
    new = 0.9 * v + x @ params['w']
    return (new,), jnp.broadcast_to(params['tau'][None] ** 2, new.shape)

  assert_exact(step)


def test_control_flow_is_analysed(x64):
  def body(v, t, x):
    v = lax.cond(x.sum() > 0, lambda v: v * t[None], jnp.sin, v)
    return lax.scan(
      lambda c, s: (0.9 * c + s * jnp.tanh(c), None), v, jnp.arange(3.0)
    )[0]

  assert_exact(make_step(body))


# Property: refused, or exact; local-only steps are never refused.

LOCAL = {
  'sin': lambda u, v, t: jnp.sin(u),
  'scale_tau': lambda u, v, t: u * t[None],
  'where': lambda u, v, t: jnp.where(u > 0, u, 0.5 * u),
  'spike': lambda u, v, t: fe.surrogates.triangle(u - 0.3) + u,
  'jit': lambda u, v, t: jax.jit(lambda a: a * jnp.tanh(a))(u),
  'cut_mean': lambda u, v, t: u - sg(u.mean(-1, keepdims=True)),
  'keep_reshape': lambda u, v, t: u.reshape(B, 1, F)[:, 0],
  'transpose_twice': lambda u, v, t: (u.T * 2.0).T,
}
FREE_AXIS = {
  'stack_sum': lambda u, v, t: jnp.stack([u, v * u], -2).sum(-2),
  'stack_reshape_sum': lambda u, v, t: (
    jnp.stack([u, v]).reshape(2, B, 1, F).sum(0)[:, 0]
  ),
  'flip_free': lambda u, v, t: jnp.flip(jnp.stack([u, 2 * u], -2), -2)[
    ..., 0, :
  ],
  'cumsum_free': lambda u, v, t: jnp.cumsum(jnp.stack([u, v], -2), -2)[
    ..., 1, :
  ],
  'sort_free': lambda u, v, t: jnp.sort(jnp.stack([u, v], -2), -2)[..., 0, :],
  'einsum_free': lambda u, v, t: jnp.einsum(
    'ck,bkn->bn', jnp.array([[0.5, 0.2]]), jnp.stack([u, v], -2)
  ),
  'pad_free': lambda u, v, t: jnp.pad(u[:, None], ((0, 0), (1, 0), (0, 0))).sum(
    1
  ),
}
MIXING = {
  'mean': lambda u, v, t: u - u.mean(-1, keepdims=True),
  'roll': lambda u, v, t: jnp.roll(u, 1, -1),
  'sort': lambda u, v, t: jnp.sort(u, -1),
  'cumsum': lambda u, v, t: jnp.cumsum(u, -1),
  'flip': lambda u, v, t: jnp.flip(u, -1),
  'fft': lambda u, v, t: jnp.fft.irfft(jnp.fft.rfft(u) * jnp.array([[1.0, 0.5, 0.0]]), n=F),
  'smooth': lambda u, v, t: lax.reduce_window(u, 0.0, lax.add, (1, 3), (1, 1), 'SAME'),
  'max_batch': lambda u, v, t: lax.reduce_window(u, -jnp.inf, lax.max, (2, 1), (1, 1), 'SAME'),
  'shift': lambda u, v, t: lax.dynamic_update_slice(jnp.zeros((B, F + 1)), u, (0, 1))[:, :F],
  'take': lambda u, v, t: jnp.take(u, jnp.array([1, 0, 3, 2]), axis=-1),
  'batch_mean': lambda u, v, t: u - u.mean(0, keepdims=True),
  'lateral': lambda u, v, t: u @ (0.3 * np.ones((F, F))),
  'param_mean': lambda u, v, t: u * t.mean(),
  'param_roll': lambda u, v, t: u * jnp.roll(t, 1)[None],
  'param_cumsum': lambda u, v, t: u * jnp.cumsum(t)[None],
}  # fmt: skip
POOL = {**LOCAL, **FREE_AXIS, **MIXING}


def check_property(names):
  def body(v, t, x):
    u = v
    for name in names:
      u = POOL[name](u, v, t)
    return u

  step = make_step(body)
  params, carry, x = setup()
  local = not any(name in MIXING for name in names)
  try:
    jacobians = fe.sparse_jacfwd(step)
    jax.eval_shape(jacobians, params, carry, x)
  except NonLocalError:
    assert not local, f'a step of local operations {names} was refused'
    return 'refused'
  assert_exact(step)
  return 'exact'


names_strategy = st.lists(st.sampled_from(sorted(POOL)), min_size=1, max_size=4)


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(names=names_strategy)
def test_property_refused_or_exact(names):
  with jax.enable_x64(True):
    check_property(names)


@pytest.mark.slow
@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(names=names_strategy)
def test_property_refused_or_exact_many(names):
  with jax.enable_x64(True):
    check_property(names)


def test_pool_covers_both_outcomes(x64):
  """The property is not vacuous: the pool yields refusals and exact steps."""
  assert check_property(['roll', 'sin']) == 'refused'
  assert check_property(['param_mean']) == 'refused'
  assert (
    check_property(['stack_reshape_sum', 'flip_free', 'cut_mean']) == 'exact'
  )
