"""Presynaptic traces (`flax_eprop.sparse.compression`) are exact.

The reference is written here from the definition and shares no code with
the library: per-example dense Jacobians of the cell step (`jax.jacfwd`,
the recurrent input stop-gradiented) propagate a dense eligibility trace
``eps: (batch, K * F, P)`` over every cell parameter, step by step. The
library's gradient (compressed layout, and the uncompressed one obtained by
switching the detection off) and its final traces must equal it (float64,
1e-10) for cells where the compression applies and where it must switch
itself off.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from sparse_cells import (
  CubaLIF,
  TwoCompartmentLIF,
  _stop_recurrent_input,
  zero_state,
)

import flax_eprop as fe
from flax_eprop.online import lifted
from flax_eprop.sparse import make_plan
from flax_eprop.sparse.compression import carry_pattern, presynaptic_rows

BATCH, IN, F, T = 3, 4, 5, 11
STATE = ['carry', 'eligibility']
OFF_DIAGONAL = 1 - np.eye(F)  # (post, pre) of a recurrent trace
KERNEL = nn.initializers.normal(6.0 / math.sqrt(IN))


class CoupledState(NamedTuple):
  d: jax.Array
  v: jax.Array
  z: jax.Array


class CoupledLIF(nn.RNNCellBase):
  """Two coupled compartments with a learnable per-neuron coupling ``g``:
  the per-neuron block ``[[0.8, 0.1], [g, 0.85]]`` is not diagonal and
  differs between neurons (no presynaptic trace)."""

  features: int

  @nn.compact
  def __call__(self, carry: CoupledState, x):
    g = self.param('g', nn.initializers.constant(0.1), (self.features,))
    rec = nn.Dense(self.features, use_bias=False, name='recurrent')
    d = 0.8 * carry.d + 0.1 * carry.v + nn.Dense(self.features, name='input')(x)
    d = d + rec(carry.z)
    g = jnp.broadcast_to(g, carry.d.shape)
    v = g * carry.d + 0.85 * carry.v - jax.lax.stop_gradient(carry.z)
    z = fe.surrogates.triangle(v - 1.0)
    return CoupledState(d, v, z), z

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return CoupledState(*zero_state(input_shape, self.features, 3))

  @property
  def num_feature_axes(self):
    return 1


def _lif(**kw):
  return fe.LIF(
    F, recurrent=True, kernel_init=KERNEL, param_dtype=jnp.float64, **kw
  )


# name -> (cell, expected presynaptic core positions)
CELLS = {
  'lif': (_lif(), (0,)),
  'lif_tau_per_neuron': (_lif(learn_tau_mem=True), ()),
  'lif_reset_zero': (_lif(reset='zero'), ()),
  'lif_reset_not_detached': (_lif(detach_reset=False), ()),
  'alif': (fe.ALIF(F, kernel_init=KERNEL, param_dtype=jnp.float64), (0,)),
  'current_based_lif': (CubaLIF(F), (0, 1)),
  'current_based_lif_reset_not_detached': (
    CubaLIF(F, detach_reset=False),
    (0,),
  ),
  'spike_of_current_and_v': (
    CubaLIF(F, spike_current=0.2, detach_reset=False),
    (0,),
  ),
  'two_compartments': (TwoCompartmentLIF(F), (0, 1)),
  'coupled_per_neuron': (CoupledLIF(F), ()),
}


def _data(key):
  k_x, k_y = jax.random.split(key)
  xs = 3.0 * jax.random.bernoulli(k_x, 0.5, (BATCH, T, IN))
  targets = jax.random.normal(k_y, (BATCH, T, F))
  return xs.astype(jnp.float64), targets


def _loss(output, target):  # the learning signal is target / BATCH
  return jnp.sum(output * target)


def _init(cell, key, xs):
  layer = fe.OnlineGrad(cell, trace_dtype=jnp.float64)
  variables = layer.init(key, xs[:, :1])
  variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
  params = variables.pop('params')
  return layer, params, dict(variables)


def reference(cell, cell_params, carry, xs, targets):
  """Dense step-by-step e-prop from rest: ``(grads, eps, outputs)``;
  ``eps: (batch, K * F, P)`` in the order of `ravel_pytree`."""
  theta, unravel_p = ravel_pytree(cell_params)
  h0, unravel_h = ravel_pytree(jax.tree.map(lambda a: a[0], carry))

  def step(th, h, x):
    with nn.intercept_methods(_stop_recurrent_input):
      new, y = cell.apply({'params': unravel_p(th)}, unravel_h(h), x)
    return ravel_pytree(new)[0], y

  jac = jax.vmap(jax.jacfwd(step, argnums=(0, 1)), in_axes=(None, 0, 0))
  h = jnp.broadcast_to(h0, (BATCH, h0.size))
  eps = jnp.zeros((BATCH, h0.size, theta.size))
  grad = jnp.zeros_like(theta)
  ys = []
  for t in range(T):
    ((jt_h, jh_h), (jt_y, jh_y)) = jac(theta, h, xs[:, t])
    signal = targets[:, t] / BATCH
    grad = grad + jnp.einsum('by,byp->p', signal, jh_y @ eps + jt_y)
    eps = jh_h @ eps + jt_h
    h, y = jax.vmap(step, in_axes=(None, 0, 0))(theta, h, xs[:, t])
    ys.append(y)
  return unravel_p(grad), eps, jnp.stack(ys)


def _reference_traces(eps, unravel_p, k):
  """Reference traces per parameter: kernels ``(batch, K, F, in)``,
  per-neuron parameters ``(batch, K, F)``."""
  rows = jax.vmap(jax.vmap(unravel_p))(eps)  # leaves (batch, K*F, *shape)
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(rows):
    name = '/'.join(str(p.key) for p in path)
    if leaf.ndim == 4:  # a kernel: (batch, K*F, in, F)
      full = leaf.reshape(BATCH, k, F, leaf.shape[-2], F)
      out[name] = jnp.einsum('bknmn->bknm', full)
    else:  # (batch, K*F, F)
      out[name] = jnp.einsum('bknn->bkn', leaf.reshape(BATCH, k, F, F))
  return out


def _library_traces(traces, plan, pre):
  """The library's traces in the reference layout, core rows only:
  ``(batch, K', F, in)`` per kernel (presynaptic rows broadcast),
  ``(batch, K', F)`` per per-neuron parameter."""
  out = dict(traces.get('direct', {}))
  synapses = traces.get('synapses', {})
  presynaptic = traces.get('presynaptic', {})
  for name in {**synapses, **presynaptic}:
    rows = []
    if name in synapses:  # (batch, rows, in, F) -> (batch, F, in) per row
      rows = list(synapses[name].transpose(1, 0, 3, 2))
    full = []
    for p in range(len(plan.core)):
      if p in pre:
        ebar = presynaptic[name][:, pre.index(p)]  # (batch, in)
        full.append(jnp.broadcast_to(ebar[:, None], (BATCH, F, ebar.shape[-1])))
      else:
        full.append(rows.pop(0))
    out[name] = jnp.stack(full, axis=1)
  return out


def _plan_and_pre(cell, params, carry, xs):
  step = lambda p, c, x: cell.apply(p, c, x)
  c0 = jax.tree.map(lambda a: a, carry)
  plan = make_plan(step, {'params': params}, c0, xs[:, 0])
  return plan, presynaptic_rows(plan, {'params': params}, c0, xs[:, 0])


def _assert_close(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(np.max(np.abs(b)), 1e-30)
  err = np.max(np.abs(a - b)) / scale
  assert err < 1e-10, f'{what}: relative error {err:.2e}'


@pytest.mark.parametrize(
  ('name', 'compress'),
  [
    *((name, False) for name in sorted(CELLS)),
    ('lif', True),  # the dense reference of every layout: slow
    *(
      pytest.param(name, True, marks=pytest.mark.slow)
      for name in sorted(CELLS)
      if name != 'lif'
    ),
  ],
)
def test_layouts_equal_dense_reference(name, compress, key, x64, monkeypatch):
  cell, expected_pre = CELLS[name]
  k_init, k_data = jax.random.split(key)
  xs, targets = _data(k_data)
  if not compress:
    monkeypatch.setattr(lifted, 'presynaptic_rows', lambda *a: ())
  layer, params, state = _init(cell, k_init, xs)
  carry = state['carry']['state']
  plan, pre = _plan_and_pre(cell, params['cell'], carry, xs)
  assert pre == expected_pre
  if not compress:
    pre = ()
  f = jax.jit(fe.online_value_and_grad(layer.apply, _loss, chunk=4))
  (_, aux), grads, new_state = f(params, state, xs, targets)
  ref_grads, eps, ys = reference(cell, params['cell'], carry, xs, targets)
  assert float(jnp.sum(ys)) > 0, 'the cell never spikes: a vacuous test'
  if name != 'two_compartments':
    assert float(jnp.mean(ys)) < 0.6, 'the cell spikes at every step'

  for (path, got), want in zip(
    jax.tree_util.tree_leaves_with_path(grads['cell']),
    jax.tree.leaves(ref_grads),
  ):
    _assert_close(got, want, f'gradient {jax.tree_util.keystr(path)}')
  unravel_p = ravel_pytree(params['cell'])[1]
  want = _reference_traces(eps, unravel_p, plan.num_carry)
  core = np.asarray(plan.core)
  got = _library_traces(new_state['eligibility'], plan, pre)
  assert sorted(got) == sorted(want)
  for trace_name in want:
    a, b = got[trace_name], want[trace_name][:, core]
    if trace_name == 'recurrent/kernel':  # fe cells mask diag(W_rec) in W
      a, b = np.asarray(a) * OFF_DIAGONAL, np.asarray(b) * OFF_DIAGONAL
    _assert_close(a, b, trace_name)


@pytest.mark.parametrize(
  ('name', 'core', 'derived'),
  [
    ('lif', (0,), (1,)),
    ('alif', (0, 1), (2,)),
    # z_t = H(v_t - 1) with v_t reading i_t: z is derived through v_t alone
    ('current_based_lif', (0, 1), (2,)),
    ('current_based_lif_reset_not_detached', (0, 1), (2,)),
    # z_t reads i_t and v_t, and v_t reads i_t: nothing is derived
    ('spike_of_current_and_v', (0, 1, 2), ()),
  ],
)
def test_derived_leaves(name, core, derived, key, x64):
  cell = CELLS[name][0]
  xs, _ = _data(key)
  _, params, state = _init(cell, key, xs)
  plan, _ = _plan_and_pre(cell, params['cell'], state['carry']['state'], xs)
  assert (plan.core, plan.derived) == (core, derived)


@pytest.mark.parametrize('name', ['lif_tau_per_neuron', 'alif'])
def test_all_factors_stored_equal_dense_reference(name, key, x64, monkeypatch):
  """With every entry of the local Jacobian block stored per step (no
  `carry_pattern`), gradients and traces still equal the reference."""
  monkeypatch.setattr(lifted, 'carry_pattern', lambda *a: None)
  test_layouts_equal_dense_reference(name, False, key, x64, monkeypatch)


V, C, Z = 'vary', 'const', 'zero'


@pytest.mark.parametrize(
  ('name', 'first_rows'),
  [
    ('lif', ((C, Z),)),  # v reads v (alpha) and not the detached z
    ('lif_reset_zero', ((V, V),)),  # the reset multiplies v by (1 - z)
    ('alif', ((C, Z, Z), (Z, C, C))),  # v; a = rho a + (1 - rho) z
  ],
)
def test_carry_pattern(name, first_rows, key, x64):
  """The entries stored per step are the ones that read the carry or the
  input; structural zeros are never stored; spike and output rows vary."""
  cell, _ = CELLS[name]
  k_init, k_data = jax.random.split(key)
  xs, _ = _data(k_data)
  _, params, state = _init(cell, k_init, xs)
  carry = state['carry']['state']
  plan, _ = _plan_and_pre(cell, params['cell'], carry, xs)
  pattern = carry_pattern(plan, {'params': params['cell']}, carry, xs[:, 0])
  assert pattern[: len(first_rows)] == first_rows
  assert all(kind == V for row in pattern[len(first_rows) :] for kind in row)


@pytest.mark.parametrize('name', ['lif', 'alif', 'current_based_lif'])
def test_sequence_from_rest_equals_chunked(name, key, x64):
  """One call without a state (a sequence from rest that ends with the
  call: no start term, no final trace update) has the gradient of the
  chunked run from the rest state (start traces non-zero, last chunk
  uneven)."""
  cell, _ = CELLS[name]
  k_init, k_data = jax.random.split(key)
  xs, targets = _data(k_data)
  layer, params, state = _init(cell, k_init, xs)

  def loss(p):
    outputs = layer.apply({'params': p}, xs)
    return jnp.sum(jax.vmap(jax.vmap(_loss))(outputs, targets)) / BATCH

  whole = jax.jit(jax.grad(loss))(params)
  chunked = jax.jit(fe.online_value_and_grad(layer.apply, _loss, chunk=4))
  _, grads, _ = chunked(params, state, xs, targets)
  assert_all = jax.tree_util.tree_leaves_with_path(grads)
  for (path, want), got in zip(assert_all, jax.tree.leaves(whole)):
    assert np.any(np.asarray(want) != 0)
    _assert_close(got, want, f'gradient {jax.tree_util.keystr(path)}')


def test_describe_traces_names_each_kind(key):
  xs = jnp.ones((2, 1, IN))
  lif = fe.OnlineGrad(fe.LIF(F, recurrent=True)).init(key, xs)
  text = fe.describe_traces(lif['eligibility'])
  assert 'per-synapse' not in text  # LIF: presynaptic traces only
  assert f'input/kernel      presynaptic           (2, 1, {IN})' in text
  tau = fe.OnlineGrad(fe.LIF(F, learn_tau_mem=True)).init(key, xs)
  text = fe.describe_traces({'layer': tau['eligibility']})
  lines = text.splitlines()
  assert lines[1].split()[:3] == ['layer', 'input/kernel', 'per-synapse']
  assert 'per-neuron' in text and 'presynaptic' not in text
  assert lines[-1].startswith('total') and lines[-1].endswith('B')


def test_describe_traces_lists_the_readout_filter(key):
  """A filtered layer keeps its own rows and the filter's, none dropped."""
  xs = jnp.ones((2, 1, IN))
  layer = fe.OnlineGrad(fe.ALIF(F), readout_decay=0.9)
  eligibility = layer.init(key, xs)['eligibility']
  text = fe.describe_traces({'layer': eligibility})
  lines = text.splitlines()[1:-1]
  rows = {(line.split()[1], ' '.join(line.split()[2:4])) for line in lines}
  assert ('input/kernel', 'per-synapse (2,') in rows  # the layer's own
  assert ('input/kernel', 'readout filter') in rows
  assert ('recurrent/kernel', 'readout filter') in rows
  assert ('previous_filtered_output', 'readout filter') in rows
  assert len(lines) == len(jax.tree.leaves(eligibility))  # none dropped
