"""OnlineGrad on sequences: the oracles of DESIGN.md section 2.

Every reference is independent of the code under test: `jax.grad` through a
plain ``nn.RNN`` of the same cell (with the recurrent input stop-gradiented
for recurrent cells), and Bellec's ALIF e-prop hand-written in plain jnp
(`online_models.alif_eprop`). Every network spikes (asserted).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from online_models import (
  ALIF_HP,
  DRIVE,
  F32,
  F64,
  FEATURES,
  IN,
  UPPER_HP,
  Net,
  alif,
  alif_eprop,
  assert_all_nonzero,
  assert_spiking,
  cross_entropy,
  data,
  eprop_grads,
  init_fn,
  lif,
  online_fn,
  readout_signal,
  rnn_value_and_grad,
  split_variables,
  stacked,
  to_dtype,
)
from sparse_cells import CubaLIF, TauLIF

import flax_eprop as fe

BATCH, TIME = 3, 13
SEEDS = (0, 1, 2)


@functools.cache
def alif_sg(dtype):
  same = alif(dtype)
  return functools.partial(StopGradALIF, *same.args, **same.keywords)


class StopGradALIF(fe.ALIF):
  """`fe.ALIF` with the recurrent input ``z_{t-1} @ W_rec`` stop-gradiented:
  BPTT through it is the e-prop oracle (DESIGN.md section 2, oracle 2)."""

  def synaptic_input(self, x, z=None):
    return super().synaptic_input(
      x, None if z is None else jax.lax.stop_gradient(z)
    )


@functools.cache
def bptt_fn(model: Net):
  return jax.jit(fe.bptt_value_and_grad(model.apply, cross_entropy))


@functools.cache
def reference_fn(model: Net, stop_recurrent: bool = False):
  return rnn_value_and_grad(model, stop_recurrent)


@functools.cache
def models(cells: tuple, dtype, stop_gradient_cells: tuple | None = None):
  """``(online model, nn.RNN model)`` sharing one params tree."""
  online = Net(cells, trace_dtype=dtype, param_dtype=dtype)
  reference = Net(stop_gradient_cells or cells, mode='rnn', param_dtype=dtype)
  return online, reference


def setup(model: Net, seed: int, dtype):
  """``(params, state, xs, labels)`` for ``seed``."""
  k_data, k_init = jax.random.split(jax.random.key(seed))
  xs, labels = data(k_data, BATCH, TIME, IN, dtype=dtype)
  params, state = split_variables(init_fn(model)(k_init, xs))
  return params, state, xs, labels


def check_against(f, online: Net, reference_grads, seeds=SEEDS):
  """``f(params, state, xs, labels)`` == ``reference_grads(params, xs,
  labels)`` (loss and grads) and spike counts match the reference's."""
  dtype = online.param_dtype
  for seed in seeds:
    params, state, xs, labels = setup(online, seed, dtype)
    (loss, aux), grads, _ = f(params, state, xs, labels)
    (ref_loss, spikes), ref_grads = reference_grads(params, xs, labels)
    for z in spikes:
      assert_spiking(z)
    counts = [float(c['output_sum']) for c in aux['output_sum'].values()]
    np.testing.assert_allclose(counts, [float(np.sum(z)) for z in spikes])
    assert_all_nonzero(ref_grads)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


def test_params_tree_is_nn_rnn_s(key):
  xs = jnp.ones((2, 5, 3))
  for cell in (fe.LIF(4), fe.ALIF(4, use_bias=True), CubaLIF(4), TauLIF(4)):
    online = jax.eval_shape(fe.OnlineGrad(cell).init, key, xs)
    rnn = jax.eval_shape(nn.RNN(cell).init, key, xs)
    assert jax.tree.map(jnp.shape, online['params']) == jax.tree.map(
      jnp.shape, rnn['params']
    )
  for cells in ((alif(F32),), stacked(F32).cells):
    online, reference = models(cells, F32)
    online = jax.eval_shape(online.init, key, xs)
    reference = jax.eval_shape(reference.init, key, xs)
    assert sorted(online) == ['carry', 'eligibility', 'params']
    assert jax.tree.map(jnp.shape, online['params']) == jax.tree.map(
      jnp.shape, reference['params']
    )


def test_params_values_are_nn_rnn_s(key):
  """The same init key gives the same parameter values as nn.RNN."""
  xs = jnp.ones((2, 5, 3))
  online = fe.OnlineGrad(fe.ALIF(4, use_bias=True)).init(key, xs)['params']
  rnn = nn.RNN(fe.ALIF(4, use_bias=True)).init(key, xs)['params']
  assert_trees_close(online, rnn, rtol=0, atol=0)


# Oracle 1: a non-recurrent layer, memoryless readout: online == BPTT.


@pytest.mark.parametrize(
  'chunk', [pytest.param(1, marks=pytest.mark.slow), 5, TIME]
)
def test_oracle1_lif_float64(x64, chunk):
  online, reference = models((lif(F64),), F64)
  check_against(online_fn(online, chunk), online, reference_fn(reference))


def test_oracle1_lif_float32():
  online, reference = models((lif(F32),), F32)
  with jax.default_matmul_precision('highest'):
    check_against(online_fn(online, 5), online, reference_fn(reference))


def test_oracle1_bptt_value_and_grad_is_bptt(x64):
  online, reference = models((lif(F64),), F64)
  check_against(bptt_fn(online), online, reference_fn(reference), SEEDS[:1])


# Oracle 2: a recurrent ALIF layer.


def test_oracle2_alif_equals_stop_gradient_bptt(x64):
  online, reference = models((alif(F64),), F64, (alif_sg(F64),))
  check_against(online_fn(online, 5), online, reference_fn(reference))
  # The recurrent path matters here: full BPTT differs, and
  # bptt_value_and_grad is that full BPTT.
  _, full = models((alif(F64),), F64)
  params, state, xs, labels = setup(online, SEEDS[0], F64)
  _, sg_grads = reference_fn(reference)(params, xs, labels)
  (_, _), full_grads = reference_fn(full)(params, xs, labels)
  w_sg = sg_grads['cell0']['input']['kernel']
  w_full = full_grads['cell0']['input']['kernel']
  assert np.max(np.abs(w_sg - w_full)) > 1e-3 * np.max(np.abs(w_full))
  _, bptt_grads, _ = bptt_fn(online)(params, state, xs, labels)
  assert_trees_close(bptt_grads, full_grads)


@pytest.mark.parametrize('chunk', [pytest.param(1, marks=pytest.mark.slow), 5])
def test_oracle2_alif_equals_bellec_eprop(x64, chunk):
  online, _ = models((alif(F64),), F64)
  f = online_fn(online, chunk)
  for seed in SEEDS:
    params, state, xs, labels = setup(online, seed, F64)
    (loss, _), grads, _ = f(params, state, xs, labels)
    p, out = params['cell0'], params['out']
    run = alif_eprop(
      ALIF_HP,
      p['input']['kernel'],
      p['recurrent']['kernel'],
      p['input']['bias'],
      jnp.swapaxes(xs, 0, 1),
    )
    assert_spiking(run.z)
    ref_loss, signal, g_out, g_out_bias = readout_signal(
      out['kernel'], out['bias'], run.z, labels.T
    )
    g = eprop_grads(run, signal)
    expected = {
      'cell0': {
        'input': {'kernel': g['in'], 'bias': g['bias']},
        'recurrent': {'kernel': g['rec']},
      },
      'out': {'kernel': g_out, 'bias': g_out_bias},
    }
    assert_all_nonzero(expected)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, expected)


@pytest.mark.slow  # float32: test_oracle1_lif_float32 is the fast one
def test_oracle2_alif_float32():
  online, reference = models((alif(F32),), F32, (alif_sg(F32),))
  with jax.default_matmul_precision('highest'):
    check_against(online_fn(online, 5), online, reference_fn(reference))


# The same oracle for neurons nobody hand-derived.


@functools.cache
def alif_learnable(dtype):
  return functools.partial(
    alif(dtype), learn_tau_mem=True, learn_tau_adapt=True
  )


CUSTOM = {
  # a synaptic current state (K = 3), recurrent, input bias
  'cuba': functools.partial(CubaLIF, FEATURES, recurrent=True),
  # outputs the potential (a carry leaf that is not the spike), or a value
  # that is no carry leaf's
  'cuba_v': functools.partial(CubaLIF, FEATURES, output='v'),
  'cuba_smooth': functools.partial(CubaLIF, FEATURES, output='smooth'),
  # learnable per-neuron tau_mem and bias, reset not detached, recurrent
  'tau': functools.partial(TauLIF, FEATURES, recurrent=True),
  # fe.ALIF with learnable tau_mem, tau_adapt and a bias
  'alif_tau': alif_learnable(F64),
}
# the spikes behind a layer output that is not the spike (H(v - 1))
SPIKES_OF_OUTPUT = {
  'cuba_v': lambda v: v > 1.0,
  'cuba_smooth': lambda y: y != 0,
}
CUSTOM_INPUT_SCALE = {
  'cuba': 0.3,
  'cuba_v': 0.3,
  'cuba_smooth': 0.3,
  'tau': 1.0,
  'alif_tau': 1.0,
}


@pytest.mark.parametrize(
  'name',
  [
    'cuba',
    'cuba_v',
    'cuba_smooth',
    pytest.param('tau', marks=pytest.mark.slow),
    pytest.param('alif_tau', marks=pytest.mark.slow),
  ],
)
def test_custom_cell_equals_stop_gradient_bptt(x64, name):
  online, reference = models((CUSTOM[name],), F64)
  f = online_fn(online, 4)
  ref = reference_fn(reference, stop_recurrent=True)
  for seed in SEEDS[:2]:
    params, state, xs, labels = setup(online, seed, F64)
    params = to_dtype(params, F64)
    kernel = params['cell0']['input']['kernel']
    k = jax.random.key(100 + seed)
    scale = CUSTOM_INPUT_SCALE[name]
    params['cell0']['input']['kernel'] = scale * DRIVE(k, kernel.shape, F64)
    (loss, _), grads, _ = f(params, state, xs, labels)
    (ref_loss, outputs), ref_grads = ref(params, xs, labels)
    assert_spiking(SPIKES_OF_OUTPUT.get(name, lambda z: z)(outputs[0]))
    assert_all_nonzero(ref_grads)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


# Stacking: the lower layer's learning signal is the instantaneous one.


@pytest.mark.slow
def test_stacked_lower_layer_gets_instantaneous_signal(x64):
  model = stacked(F64)
  f = online_fn(model, 5)
  alpha_upper = np.exp(-1.0 / UPPER_HP.tau_mem)
  for seed in SEEDS[:2]:
    params, state, xs, labels = setup(model, seed, F64)
    (loss, _), grads, _ = f(params, state, xs, labels)
    p0, p1, out = params['cell0'], params['cell1'], params['out']
    zero_bias = lambda p: jnp.zeros(p['input']['kernel'].shape[1], F64)
    lower = alif_eprop(
      ALIF_HP,
      p0['input']['kernel'],
      p0['recurrent']['kernel'],
      p0['input']['bias'],
      jnp.swapaxes(xs, 0, 1),
    )
    upper = alif_eprop(
      UPPER_HP,
      p1['input']['kernel'],
      p1['recurrent']['kernel'],
      zero_bias(p1),
      lower.z,
    )
    assert_spiking(lower.z)
    assert_spiking(upper.z)
    ref_loss, signal, g_out, g_out_bias = readout_signal(
      out['kernel'], out['bias'], upper.z, labels.T
    )
    # dz^1_t -> v^2_t -> z^2_t of the same step only
    lower_signal = jnp.einsum(
      'tbj,tbj,ij->tbi',
      signal,
      upper.psi,
      (1 - alpha_upper) * p1['input']['kernel'],
    )
    g0, g1 = eprop_grads(lower, lower_signal), eprop_grads(upper, signal)
    expected = {
      'cell0': {
        'input': {'kernel': g0['in'], 'bias': g0['bias']},
        'recurrent': {'kernel': g0['rec']},
      },
      'cell1': {
        'input': {'kernel': g1['in']},
        'recurrent': {'kernel': g1['rec']},
      },
      'out': {'kernel': g_out, 'bias': g_out_bias},
    }
    assert_all_nonzero(expected)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, expected)
