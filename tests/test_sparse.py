"""Rung 1 of the verification ladder: `sparse_jacfwd` vs `jax.jacfwd`.

For every cell, ``.todense()`` of the structured Jacobians must equal
`jax.jacfwd` of the same step, w.r.t. the parameters and the carry:
with ``mode='eprop'`` of the step whose recurrent input is stop-gradiented
(DESIGN.md section 2, oracle 3), with ``mode='exact'`` of the plain step.
States are realistic (voltages near threshold, random spikes) and every test
checks that the compared Jacobians are not trivially zero.
"""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from sparse_cells import (
  CubaLIF,
  GaussALIF,
  TauLIF,
  TwoCompartmentLIF,
  WhereLIF,
  reference_step,
  setup,
)

import flax_eprop as fe
from flax_eprop.sparse import (
  CarryJacobian,
  DenseCarryJacobian,
  ParamJacobian,
)

sparse_jacfwd = fe.sparse_jacfwd

FEATURES, IN = 5, 4

# (id, cell, spiking): every cell runs on x: (3, IN).
CELLS = [
  ('lif', fe.LIF(FEATURES), True),
  ('lif_recurrent', fe.LIF(FEATURES, recurrent=True), True),
  (
    'lif_learnable_bias_attached_reset',
    fe.LIF(
      FEATURES,
      recurrent=True,
      use_bias=True,
      learn_tau_mem=True,
      detach_reset=False,
    ),
    True,
  ),
  (
    'lif_refractory_zero_reset',
    fe.LIF(FEATURES, reset='zero', refractory=2),
    True,
  ),
  ('alif', fe.ALIF(FEATURES), True),
  (
    'alif_learnable',
    fe.ALIF(FEATURES, learn_tau_mem=True, learn_tau_adapt=True, use_bias=True),
    True,
  ),
  ('li', fe.LI(FEATURES, use_bias=True), False),
  ('cuba_lif_k3', CubaLIF(FEATURES), True),
  ('tau_bias_lif', TauLIF(FEATURES, recurrent=True), True),
  ('where_jit_lif', WhereLIF(FEATURES), True),
  ('custom_jvp_alif', GaussALIF(FEATURES), True),
  ('two_compartment_stack', TwoCompartmentLIF(FEATURES), True),
]


def dense_pair(cell, params, carry, x, mode):
  """``(sparse, reference)`` dense Jacobians, each ``(d/dparams, d/dcarry)``.

  Jitted as a whole: one compilation instead of one per eager op.
  """

  @jax.jit
  def pair(params, carry, x):
    jac_p, jac_c = sparse_jacfwd(cell.apply, mode=mode)(params, carry, x)
    ref = reference_step(cell, mode)
    expected = tuple(
      jax.jacfwd(ref, argnums=a)(params, carry, x) for a in (0, 1)
    )
    return (jac_p.todense(), jac_c.todense()), expected

  return pair(params, carry, x)


def is_nonzero(tree) -> bool:
  return any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(tree))


def check_realistic(cell, params, carry, x, expected, spiking):
  """The step spikes (if it can) and the Jacobians of ``y`` are non-zero."""
  _, y = cell.apply(params, carry, x)
  if spiking:
    assert bool(jnp.any(y > 0)), 'the cell is silent: the test is vacuous'
  for jac in expected:  # row y: surrogate derivatives reach the output
    assert is_nonzero(jac[1]), 'd y / d (params, carry) is all zeros'


@pytest.mark.parametrize('mode', ['eprop', 'exact'])
@pytest.mark.parametrize(
  'cell, spiking', [c[1:] for c in CELLS], ids=[c[0] for c in CELLS]
)
def test_todense_matches_jacfwd(x64, key, cell, spiking, mode):
  params, carry, x = setup(cell, key, (3, IN))
  actual, expected = dense_pair(cell, params, carry, x, mode)
  check_realistic(cell, params, carry, x, expected, spiking)
  assert_trees_close(actual[0], expected[0])
  assert_trees_close(actual[1], expected[1])


@pytest.mark.parametrize(
  'cell, self_loops',
  [
    (fe.LIF(FEATURES, recurrent=True), False),  # diag(W_rec) masked to 0
    (CubaLIF(FEATURES), True),
    (GaussALIF(FEATURES), True),
  ],
  ids=['lif', 'cuba_lif_k3', 'custom_jvp_alif'],
)
def test_eprop_drops_recurrent_path_exact_keeps_it(x64, key, cell, self_loops):
  params, carry, x = setup(cell, key, (3, IN))

  @jax.jit
  def both_modes(params, carry, x):
    eprop_p, eprop_c = sparse_jacfwd(cell.apply)(params, carry, x)
    exact = sparse_jacfwd(cell.apply, mode='exact')
    exact_p, exact_c = exact(params, carry, x)
    assert isinstance(eprop_c, CarryJacobian)
    assert isinstance(exact_c, DenseCarryJacobian)
    dense = lambda *jacs: [j.todense() for j in jacs]
    return dense(eprop_p, eprop_c), dense(exact_p, exact_c)

  (eprop_p, eprop_c), (exact_p, exact_c) = both_modes(params, carry, x)
  # One step: the parameter Jacobian has no path through the old carry.
  assert_trees_close(eprop_p, exact_p)
  # Carry: e-prop is block diagonal over neurons, exact is not.
  eye = jnp.eye(FEATURES, dtype=bool)[None, :, None, :]
  eprop_dense = jax.tree.leaves(eprop_c)
  exact_dense = jax.tree.leaves(exact_c)
  off_eprop = [jnp.where(eye, 0.0, d) for d in eprop_dense]
  off_exact = [jnp.where(eye, 0.0, d) for d in exact_dense]
  assert not is_nonzero(off_eprop)
  assert is_nonzero(off_exact), 'the recurrent path is missing in exact mode'
  # Without self-loops the neuron-local parts agree; a self-loop
  # W_rec[n, n] is a synapse too, so e-prop drops it.
  local_eprop = [jnp.where(eye, d, 0.0) for d in eprop_dense]
  local_exact = [jnp.where(eye, d, 0.0) for d in exact_dense]
  if self_loops:  # same layout, and the diagonals differ by more than noise
    assert jax.tree.structure(local_eprop) == jax.tree.structure(local_exact)
    gap = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(local_eprop, local_exact)
    )
    assert gap > 1e-3, f'e-prop kept the self-loop path (gap {gap:.1e})'
  else:
    assert_trees_close(local_eprop, local_exact)


def test_eprop_equals_exact_without_recurrence(x64, key):
  cell = fe.ALIF(FEATURES, recurrent=False)
  params, carry, x = setup(cell, key, (3, IN))

  @jax.jit
  def both(params, carry, x):
    eprop = sparse_jacfwd(cell.apply)(params, carry, x)
    exact = sparse_jacfwd(cell.apply, mode='exact')(params, carry, x)
    return [j.todense() for j in eprop], [j.todense() for j in exact]

  eprop, exact = both(params, carry, x)
  assert is_nonzero([jac[1] for jac in exact])
  assert_trees_close(eprop, exact)


def test_structured_shapes(x64, key):
  batch, k, r = (2, 3), 3, 1  # ALIF carry (v, a, z), output z
  cell = fe.ALIF(FEATURES, learn_tau_mem=True, use_bias=True)
  params, carry, x = setup(cell, key, (*batch, IN))
  jacobians = sparse_jacfwd(cell.apply)
  jac_p, jac_c = jax.eval_shape(jacobians, params, carry, x)
  assert isinstance(jac_p, ParamJacobian)
  assert isinstance(jac_c, CarryJacobian)
  assert jac_c.blocks.shape == (*batch, k + r, k, FEATURES)
  # Synapses in program order: input (in = IN), recurrent (in = FEATURES).
  assert [p.shape for p in jac_p.post] == [(*batch, k + r, FEATURES)] * 2
  assert [p.shape for p in jac_p.pre] == [(*batch, IN), (*batch, FEATURES)]
  # Per-neuron parameters (bias, tau_mem): diagonal.
  assert [d.shape for d in jac_p.direct] == [(*batch, k + r, FEATURES)] * 2
  # Nothing stored is per-synapse and per-example.
  n = math.prod(batch)
  bound = max(n * (k + r) * k * FEATURES, n * IN, FEATURES * FEATURES)
  for leaf in jax.tree.leaves((jac_p, jac_c)):
    assert math.prod(leaf.shape) <= bound, leaf.shape


def test_lif_factors_by_hand(x64, key):
  cell = fe.LIF(FEATURES, tau_mem=10.0)
  params, carry, x = setup(cell, key, (3, IN))
  jac_p, jac_c = sparse_jacfwd(cell.apply)(params, carry, x)
  new, _ = cell.apply(params, carry, x)
  alpha = math.exp(-1.0 / 10.0)
  psi = 0.3 * jnp.maximum(0.0, 1.0 - jnp.abs(new.v - 1.0))  # triangle
  v, z, y = 0, 1, 2  # rows (new v, new z, output z); columns (v, z)
  blocks = jac_c.blocks
  np.testing.assert_allclose(blocks[:, v, v], alpha, rtol=1e-12)
  np.testing.assert_allclose(blocks[:, v, z], 0.0)  # detached reset
  np.testing.assert_allclose(blocks[:, z, v], psi * alpha, rtol=1e-12)
  np.testing.assert_allclose(blocks[:, y, v], psi * alpha, rtol=1e-12)
  (post,), (pre,) = jac_p.post, jac_p.pre
  np.testing.assert_allclose(post[:, v], 1 - alpha, rtol=1e-12)
  np.testing.assert_allclose(post[:, z], psi * (1 - alpha), rtol=1e-12)
  np.testing.assert_allclose(pre, x)
  assert bool(jnp.any(psi > 0))


@pytest.mark.parametrize(
  'cell',
  [fe.LIF(FEATURES, recurrent=True), fe.ALIF(FEATURES)],
  ids=['lif', 'alif'],
)
def test_float32(key, cell):
  x = jax.random.normal(key, (3, IN))
  with jax.enable_x64(True):
    params, carry, _ = setup(cell, key, (3, IN))
  params, carry = jax.tree.map(lambda a: a.astype(jnp.float32), (params, carry))
  with jax.default_matmul_precision('highest'):
    actual, expected = dense_pair(cell, params, carry, x, 'eprop')
  check_realistic(cell, params, carry, x, expected, True)
  assert jax.tree.leaves(actual)[0].dtype == jnp.float32
  assert_trees_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_under_jit(x64, key):
  cell = fe.ALIF(FEATURES)
  params, carry, x = setup(cell, key, (3, IN))
  eager = sparse_jacfwd(cell.apply)(params, carry, x)
  jitted = jax.jit(sparse_jacfwd(cell.apply))(params, carry, x)
  eager = [j.todense() for j in eager]
  assert is_nonzero([jac[1] for jac in eager])
  assert_trees_close([j.todense() for j in jitted], eager)


def test_single_argnum_returns_one_jacobian(x64, key):
  cell = fe.LIF(FEATURES, recurrent=True)
  params, carry, x = setup(cell, key, (3, IN))
  jac_c = sparse_jacfwd(cell.apply, argnums=1)(params, carry, x)
  (jac_p,) = sparse_jacfwd(cell.apply, argnums=(0,))(params, carry, x)
  ref = reference_step(cell, 'eprop')
  expected = [jax.jacfwd(ref, a)(params, carry, x) for a in (0, 1)]
  check_realistic(cell, params, carry, x, expected, True)
  assert_trees_close(jac_p.todense(), expected[0])
  assert_trees_close(jac_c.todense(), expected[1])


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'mode': 'foo'}, "mode: expected 'eprop' or 'exact', got 'foo'"),
    ({'argnums': 2}, r'argnums: expected 0 \(params\), 1 \(carry\)'),
    ({'argnums': (0, 2)}, r'argnums: expected 0 \(params\), 1 \(carry\)'),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sparse_jacfwd(fe.LIF(2).apply, **kwargs)


# Property test: random sizes, batch shapes (including none) and seeds.

PROPERTY_CELLS = {
  'lif': lambda f: fe.LIF(f, recurrent=True),
  'alif': lambda f: fe.ALIF(f, learn_tau_mem=True),
  'cuba_lif_k3': CubaLIF,
  'where_jit_lif': WhereLIF,
}


SHAPES = dict(
  name=st.sampled_from(sorted(PROPERTY_CELLS)),
  features=st.integers(1, 6),
  in_features=st.integers(1, 5),
  batch=st.sampled_from([(), (1,), (4,), (2, 3)]),
  seed=st.integers(0, 2**31 - 1),
  mode=st.sampled_from(['eprop', 'exact']),
)


@pytest.mark.slow
@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(**SHAPES)
def test_property_random_shapes(name, features, in_features, batch, seed, mode):
  check_random_shapes(name, features, in_features, batch, seed, mode)


@pytest.mark.slow
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(**SHAPES)
def test_property_random_shapes_many(
  name, features, in_features, batch, seed, mode
):
  check_random_shapes(name, features, in_features, batch, seed, mode)


def check_random_shapes(name, features, in_features, batch, seed, mode):
  cell = PROPERTY_CELLS[name](features)
  with jax.enable_x64(True):
    key = jax.random.key(seed)
    params, carry, x = setup(cell, key, (*batch, in_features))
    actual, expected = dense_pair(cell, params, carry, x, mode)
    check_realistic(cell, params, carry, x, expected, True)
    assert_trees_close(actual, expected)
