"""Cells: golden traces, parameters, nn.RNN, gradients and input checks."""

import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

import flax_eprop as fe

HALF_LIFE = 1.0 / math.log(2.0)  # tau with exp(-dt / tau) = 0.5 at dt = 1


def run_steps(cell, params, xs):
  """Steps ``cell`` over ``xs: (time, *batch, in)``; stacks the carries."""
  carry = cell.initialize_carry(None, xs.shape[1:])
  carries = []
  for x in xs:
    carry, _ = cell.apply(params, carry, x)
    carries.append(carry)
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *carries)


def unit_input_params(features=1, **extra):
  kernel = jnp.ones((1, features), jnp.float64)
  return {'params': {'input': {'kernel': kernel}, **extra}}


def constant_input(value, steps):
  return jnp.full((steps, 1, 1), value, jnp.float64)


# Golden traces, by hand: alpha = rho = 0.5, (1 - alpha) * I = 0.75.


def test_lif_golden_trace(x64):
  cell = fe.LIF(1, tau_mem=HALF_LIFE, param_dtype=jnp.float64)
  out = run_steps(cell, unit_input_params(), constant_input(1.5, 6))
  # v_t = 0.5 v_{t-1} + 0.75 - z_{t-1}; z_t = v_t > 1
  v = [0.75, 1.125, 0.3125, 0.90625, 1.203125, 0.3515625]
  z = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
  assert out.r is None
  assert_trees_close(out.v[:, 0, 0], np.array(v))
  assert_trees_close(out.z[:, 0, 0], np.array(z))


def test_lif_reset_to_zero_golden(x64):
  cell = fe.LIF(1, tau_mem=HALF_LIFE, reset='zero', param_dtype=jnp.float64)
  out = run_steps(cell, unit_input_params(), constant_input(1.5, 5))
  # v_t = 0.5 v_{t-1} (1 - z_{t-1}) + 0.75
  assert_trees_close(out.v[:, 0, 0], np.array([0.75, 1.125, 0.75, 1.125, 0.75]))
  assert_trees_close(out.z[:, 0, 0], np.array([0.0, 1.0, 0.0, 1.0, 0.0]))


def test_lif_refractory_golden(x64):
  cell = fe.LIF(1, tau_mem=HALF_LIFE, refractory=2, param_dtype=jnp.float64)
  out = run_steps(cell, unit_input_params(), constant_input(3.0, 7))
  # (1 - alpha) I = 1.5; spikes are blocked for 2 steps, v keeps integrating
  v = [1.5, 1.25, 2.125, 2.5625, 1.78125, 2.390625, 2.6953125]
  assert_trees_close(out.v[:, 0, 0], np.array(v))
  assert_trees_close(out.z[:, 0, 0], np.array([1.0, 0, 0, 1, 0, 0, 1]))
  assert_trees_close(out.r[:, 0, 0], np.array([2.0, 1, 0, 2, 1, 0, 2]))


def test_alif_adaptation_golden(x64):
  cell = fe.ALIF(
    1,
    tau_mem=HALF_LIFE,
    tau_adapt=HALF_LIFE,
    beta=1.0,
    recurrent=False,
    param_dtype=jnp.float64,
  )
  out = run_steps(cell, unit_input_params(), constant_input(1.5, 7))
  # a_t = 0.5 a_{t-1} + z_{t-1}; A_t = 1 + a_t; z_t = v_t > A_t. LIF would
  # spike at t = 5 (v = 1.203125 > 1); the raised threshold 1.25 delays it.
  v = [0.75, 1.125, 0.3125, 0.90625, 1.203125, 1.3515625, 0.42578125]
  a = [0.0, 0.0, 1.0, 0.5, 0.25, 0.125, 1.0625]
  z = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  assert_trees_close(out.v[:, 0, 0], np.array(v))
  assert_trees_close(out.a[:, 0, 0], np.array(a))
  assert_trees_close(out.z[:, 0, 0], np.array(z))


def test_li_golden(x64):
  cell = fe.LI(1, tau_mem=HALF_LIFE, param_dtype=jnp.float64)
  carry = cell.initialize_carry(None, (1, 1))
  params = unit_input_params()
  vs = []
  for _ in range(3):
    carry, y = cell.apply(params, carry, jnp.full((1, 1), 2.0))
    assert y is carry.v
    vs.append(float(y[0, 0]))
  assert vs == [1.0, 1.5, 1.75]


def test_li_bellec_golden(x64):
  # y_t = kappa y_{t-1} + W x_t + b: kappa = 0.5, W = 1, b = 0.25, x = 2.
  cell = fe.LI(
    1, tau_mem=HALF_LIFE, use_bias=True, form='bellec', param_dtype=jnp.float64
  )
  carry = cell.initialize_carry(None, (1, 1))
  params = unit_input_params()
  params['params']['input']['bias'] = jnp.full((1,), 0.25, jnp.float64)
  vs = []
  for _ in range(3):
    carry, y = cell.apply(params, carry, jnp.full((1, 1), 2.0))
    assert y is carry.v
    vs.append(float(y[0, 0]))
  assert vs == [2.25, 3.375, 3.9375]
  # the scaled form on the same input: 0.5 * (2 + 0.25) per step
  scaled = fe.LI(1, tau_mem=HALF_LIFE, use_bias=True, param_dtype=jnp.float64)
  carry = scaled.initialize_carry(None, (1, 1))
  carry, y = scaled.apply(params, carry, jnp.full((1, 1), 2.0))
  assert float(y[0, 0]) == 1.125


def test_li_forms_match_with_dt_in_ms(x64, key):
  """Over a sequence, at dt = 10 ms and tau = 20 ms (kappa = exp(-0.5)): the
  hand-written recursions of both forms."""
  xs = jax.random.bernoulli(key, 0.3, (4, 2, 5)).astype(jnp.float64)
  kappa = math.exp(-10.0 / 20.0)
  for form, scale in (('scaled', 1 - kappa), ('bellec', 1.0)):
    cell = fe.LI(3, tau_mem=20.0, dt=10.0, use_bias=True, form=form,
                 bias_init=nn.initializers.normal(1.0),
                 param_dtype=jnp.float64)  # fmt: skip
    carry = cell.initialize_carry(None, xs.shape[1:])
    params = cell.init(jax.random.key(1), carry, xs[0])
    w = params['params']['input']['kernel']
    b = params['params']['input']['bias']
    v, expected = jnp.zeros((2, 3)), []
    for x in xs:
      v = kappa * v + scale * (x @ w + b[None])
      expected.append(v)
    assert_trees_close(run_steps(cell, params, xs).v, jnp.stack(expected))


# Surrogate derivative and reset paths, by forward mode through one step.


def step_fn(cell, params, x):
  return lambda carry: cell.apply(params, carry, x)[0]


@pytest.mark.parametrize('threshold', [1.0, 2.0])
def test_psi_is_triangle_over_threshold(x64, threshold):
  """dz_t/dv_{t-1} = alpha * psi_t, psi_t = 0.3 max(0, 1-|v_t-thr|/thr)/thr."""
  cell = fe.LIF(4, threshold=threshold, param_dtype=jnp.float64)
  params = unit_input_params(4)
  x = jnp.zeros((1, 1))
  v_prev = jnp.array([[0.5, 1.7, 2.9, 4.5]])
  carry = fe.LIFState(v_prev, jnp.zeros((1, 4)))
  tangent = fe.LIFState(jnp.ones((1, 4)), jnp.zeros((1, 4)))
  new, new_dot = jax.jvp(step_fn(cell, params, x), (carry,), (tangent,))
  alpha = math.exp(-1 / 20.0)
  v = np.asarray(new.v)
  psi = 0.3 * np.maximum(0, 1 - np.abs(v - threshold) / threshold) / threshold
  assert psi.max() > 0
  assert_trees_close(new_dot.z, alpha * psi)
  assert_trees_close(new_dot.v, np.full((1, 4), alpha))


@pytest.mark.parametrize('detach_reset', [True, False])
@pytest.mark.parametrize('reset', ['subtract', 'zero'])
def test_reset_gradient_is_detached_by_default(x64, detach_reset, reset):
  cell = fe.LIF(
    1,
    threshold=2.0,
    reset=reset,
    detach_reset=detach_reset,
    param_dtype=jnp.float64,
  )
  x = jnp.zeros((1, 1))
  carry = fe.LIFState(jnp.full((1, 1), 0.5), jnp.ones((1, 1)))
  jac = jax.jacfwd(step_fn(cell, unit_input_params(), x))(carry)
  dv_dz = float(jac.v.z.squeeze())
  alpha_v = math.exp(-1 / 20.0) * 0.5
  expected = {'subtract': -2.0, 'zero': -alpha_v}[reset]
  assert dv_dz == pytest.approx(0.0 if detach_reset else expected, abs=1e-12)


def test_alif_adaptation_path_keeps_gradient(x64):
  cell = fe.ALIF(1, recurrent=False, param_dtype=jnp.float64)
  carry = fe.ALIFState(*(jnp.zeros((1, 1)),) * 3)
  jac = jax.jacfwd(step_fn(cell, unit_input_params(), jnp.zeros((1, 1))))(carry)
  assert float(jac.a.z.squeeze()) == 1.0  # a_t = rho a + z_{t-1}
  rho = math.exp(-1 / 200.0)
  assert float(jac.a.a.squeeze()) == pytest.approx(rho, rel=1e-12)


# Parameters.


def param_shapes(cell, in_features=3):
  x = jnp.ones((2, in_features))
  carry = cell.initialize_carry(jax.random.key(0), x.shape)
  params = cell.init(jax.random.key(1), carry, x)
  return jax.tree.map(jnp.shape, params['params'])


def test_parameter_names_and_shapes():
  assert param_shapes(fe.LIF(5)) == {'input': {'kernel': (3, 5)}}
  assert param_shapes(fe.LIF(5, use_bias=True, recurrent=True)) == {
    'input': {'kernel': (3, 5), 'bias': (5,)},
    'recurrent': {'kernel': (5, 5)},
  }
  assert param_shapes(fe.ALIF(5)) == {
    'input': {'kernel': (3, 5)},
    'recurrent': {'kernel': (5, 5)},
  }
  assert param_shapes(
    fe.ALIF(5, recurrent=False, learn_tau_mem=True, learn_tau_adapt=True)
  ) == {'input': {'kernel': (3, 5)}, 'tau_mem': (5,), 'tau_adapt': (5,)}
  assert param_shapes(fe.LI(2, learn_tau_mem=True)) == {
    'input': {'kernel': (3, 2)},
    'tau_mem': (2,),
  }


def test_learnable_tau_initial_value_and_equivalence(key):
  fixed = fe.ALIF(4, tau_mem=15.0, tau_adapt=150.0)
  learned = fe.ALIF(
    4, tau_mem=15.0, tau_adapt=150.0, learn_tau_mem=True, learn_tau_adapt=True
  )
  xs = jax.random.normal(key, (2, 20, 3))
  params = nn.RNN(learned).init(jax.random.key(1), xs)
  cell_params = params['params']['cell']
  assert_trees_close(cell_params['tau_mem'], np.full(4, 15.0, np.float32))
  assert_trees_close(cell_params['tau_adapt'], np.full(4, 150.0, np.float32))
  fixed_params = {
    'params': {
      'cell': {k: v for k, v in cell_params.items() if not k.startswith('tau')}
    }
  }
  assert_trees_close(
    nn.RNN(learned).apply(params, xs), nn.RNN(fixed).apply(fixed_params, xs)
  )


def test_recurrent_diagonal_is_masked(x64):
  cell = fe.LIF(2, recurrent=True, param_dtype=jnp.float64)
  params = unit_input_params(
    2, recurrent={'kernel': jnp.full((2, 2), 4.0, jnp.float64)}
  )
  carry = fe.LIFState(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]))
  new, _ = cell.apply(params, carry, jnp.zeros((1, 1)))
  # neuron 0 spiked: neuron 1 gets 4 * (1 - alpha), neuron 0 only its reset
  one_minus_alpha = 1 - math.exp(-1 / 20.0)
  assert_trees_close(new.v, np.array([[-1.0, 4.0 * one_minus_alpha]]))

  def v_sum(p):
    return cell.apply(p, carry, jnp.zeros((1, 1)))[0].v.sum()

  grad = jax.grad(v_sum)(params)['params']['recurrent']['kernel']
  assert_trees_close(grad, np.array([[0.0, one_minus_alpha], [0.0, 0.0]]))


# Sequences through nn.RNN, and BPTT gradients.


@pytest.mark.parametrize(
  'make_cell',
  [
    fe.LIF,
    pytest.param(fe.ALIF, marks=pytest.mark.slow),
    pytest.param(fe.LI, marks=pytest.mark.slow),
  ],
)
def test_rnn_batch_major_and_time_major(key, make_cell):
  cell = make_cell(6)
  xs = jax.random.normal(key, (3, 12, 4)) * 3.0  # (batch, time, in)
  rnn, rnn_tm = nn.RNN(cell), nn.RNN(cell, time_major=True)
  params = rnn.init(jax.random.key(1), xs)
  ys = rnn.apply(params, xs)
  ys_tm = rnn_tm.apply(params, jnp.swapaxes(xs, 0, 1))
  assert ys.shape == (3, 12, 6)
  assert_trees_close(jnp.swapaxes(ys_tm, 0, 1), ys)
  carry, _ = rnn.apply(params, xs, return_carry=True)
  assert all(leaf.shape == (3, 6) for leaf in jax.tree.leaves(carry))


def test_rnn_several_batch_axes(key):
  rnn = nn.RNN(fe.ALIF(5, refractory=1))
  xs = jax.random.normal(key, (2, 3, 10, 4))  # (*batch, time, in)
  params = rnn.init(jax.random.key(1), xs)
  carry, ys = rnn.apply(params, xs, return_carry=True)
  assert ys.shape == (2, 3, 10, 5)
  assert carry.r.shape == (2, 3, 5)


class SpikingNet(nn.Module):
  """Recurrent ALIF layer and a leaky readout: the BPTT reference model."""

  hidden: int = 16
  spike_fn: object = fe.surrogates.triangle

  @nn.compact
  def __call__(self, xs):
    cell = fe.ALIF(
      self.hidden,
      kernel_init=nn.initializers.normal(1.0),
      spike_fn=self.spike_fn,
    )
    zs = nn.RNN(cell)(xs)
    return nn.RNN(fe.LI(2, use_bias=True))(zs), zs


@pytest.mark.parametrize(
  'spike_fn',
  [
    fe.surrogates.triangle,
    pytest.param(
      functools.partial(fe.surrogates.fast_sigmoid, slope=5.0),
      marks=pytest.mark.slow,
    ),
    pytest.param(
      functools.partial(fe.surrogates.arctan, alpha=3.0),
      marks=pytest.mark.slow,
    ),
  ],
  ids=['triangle', 'fast_sigmoid', 'arctan'],
)
def test_bptt_gradient_is_finite_nonzero_and_network_spikes(key, spike_fn):
  k_x, k_y, k_init = jax.random.split(key, 3)
  xs = jax.random.bernoulli(k_x, 0.3, (4, 40, 8)).astype(jnp.float32)
  targets = jax.random.normal(k_y, (4, 40, 2))
  net = SpikingNet(spike_fn=spike_fn)
  params = net.init(k_init, xs)

  def loss_fn(params):
    ys, zs = net.apply(params, xs)
    return jnp.mean((ys - targets) ** 2), zs

  (loss, zs), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(loss)
  assert zs.sum() > 0, 'the test network must spike'
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.any(g != 0), f'zero gradient at {jax.tree_util.keystr(path)}'


def test_carry_keeps_its_dtype_under_x64(x64, key):
  rnn = nn.RNN(fe.ALIF(3))  # float32 params and carry, float64 input
  xs = jax.random.normal(key, (2, 5, 4), jnp.float64)
  params = rnn.init(jax.random.key(1), xs)
  carry, ys = rnn.apply(params, xs, return_carry=True)
  assert ys.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(carry))


def test_float64_end_to_end(x64, key):
  rnn = nn.RNN(fe.LIF(3, param_dtype=jnp.float64))
  xs = jax.random.normal(key, (2, 5, 4), jnp.float64)
  ys = rnn.apply(rnn.init(jax.random.key(1), xs), xs)
  assert ys.dtype == jnp.float64


# Bad configuration and bad input.


@pytest.mark.parametrize(
  'make,field,value',
  [
    (lambda: fe.LIF(4, tau_mem=0.0), 'tau_mem', '0.0'),
    (lambda: fe.LIF(4, tau_mem=-5.0), 'tau_mem', '-5.0'),
    (lambda: fe.LI(4, tau_mem=-1.0), 'tau_mem', '-1.0'),
    (lambda: fe.ALIF(4, tau_adapt=0.0), 'tau_adapt', '0.0'),
    (lambda: fe.LIF(4, dt=0.0), 'dt', '0.0'),
    (lambda: fe.LIF(4, threshold=0.0), 'threshold', '0.0'),
    (lambda: fe.ALIF(4, threshold=-1.0), 'threshold', '-1.0'),
    (lambda: fe.LIF(4, refractory=-1), 'refractory', '-1'),
    (lambda: fe.LIF(4, refractory=1.5), 'refractory', '1.5'),
    (lambda: fe.LIF(4, reset='hard'), 'reset', "'hard'"),
    (lambda: fe.LI(4, form='unscaled'), 'form', "'unscaled'"),
    (lambda: fe.LIF(0), 'features', '0'),
  ],
)
def test_bad_configuration_names_field_value_expectation(make, field, value):
  with pytest.raises(ValueError) as info:
    make()
  message = str(info.value)
  assert f'{field}={value}' in message
  assert 'expected' in message


def init_lif(features=4, in_features=3, batch=(2,)):
  cell = fe.LIF(features)
  x = jnp.ones(batch + (in_features,))
  carry = cell.initialize_carry(None, x.shape)
  return cell, cell.init(jax.random.key(0), carry, x), carry, x


def test_non_float_input_is_a_type_error():
  cell, params, carry, x = init_lif()
  with pytest.raises(TypeError, match=r'input x must be floating.*int32'):
    cell.apply(params, carry, x.astype(jnp.int32))


def test_scalar_input_is_a_value_error():
  cell, params, _, _ = init_lif()
  carry = cell.initialize_carry(None, (3,))
  with pytest.raises(ValueError, match=r'\(\*batch, in_features\)'):
    cell.apply(params, carry, jnp.float32(1.0))


def test_input_rank_mismatching_carry_is_a_value_error():
  cell, params, carry, x = init_lif()
  with pytest.raises(
    ValueError,
    match=r'carry\.v has shape \(2, 4\).*'
    r'expected \(1, 2, 4\)',
  ):
    cell.apply(params, carry, x[None])


def test_carry_feature_size_mismatch_is_a_value_error():
  cell, params, _, x = init_lif()
  carry = fe.LIF(5).initialize_carry(None, x.shape)
  with pytest.raises(ValueError, match=r'carry\.v has shape \(2, 5\)'):
    cell.apply(params, carry, x)


def test_input_features_mismatching_params_is_a_value_error():
  cell, params, carry, _ = init_lif(in_features=3)
  with pytest.raises(ValueError, match=r'x has 7 features.*expects 3'):
    cell.apply(params, carry, jnp.ones((2, 7)))


def test_initialize_carry_needs_a_feature_axis():
  with pytest.raises(ValueError, match='input_shape'):
    fe.LIF(3).initialize_carry(None, ())


def test_subclass_without_step_is_not_implemented():
  class Empty(fe.SpikingCell):
    State = fe.LIState

  cell = Empty(2)
  x = jnp.ones((1, 3))
  with pytest.raises(NotImplementedError, match='Empty must implement step'):
    cell.init(jax.random.key(0), cell.initialize_carry(None, x.shape), x)


def test_num_feature_axes_and_carry_init():
  cell = fe.ALIF(3, carry_init=nn.initializers.ones_init())
  assert cell.num_feature_axes == 1
  carry = cell.initialize_carry(jax.random.key(0), (7, 2))
  assert isinstance(carry, fe.ALIFState) and carry.r is None
  assert_trees_close(carry.a, np.ones((7, 3), np.float32))


def primitive_names(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from primitive_names(sub)


@pytest.mark.parametrize(
  'cell',
  [
    fe.LIF(3, recurrent=True, refractory=2, reset='zero'),
    fe.ALIF(3, learn_tau_mem=True, learn_tau_adapt=True, use_bias=True),
    fe.LI(3, learn_tau_mem=True),
  ],
  ids=['LIF', 'ALIF', 'LI'],
)
def test_step_is_elementwise_around_matmuls(cell):
  """No reductions, control flow, randomness or custom_vjp in a step."""
  x = jnp.ones((2, 4))
  carry = cell.initialize_carry(None, x.shape)
  params = cell.init(jax.random.key(0), carry, x)
  jaxpr = jax.make_jaxpr(cell.apply)(params, carry, x).jaxpr
  names = set(primitive_names(jaxpr))
  forbidden = {'cond', 'while', 'scan', 'custom_vjp_call', 'random_bits'}
  assert not names & forbidden
  assert not any(name.startswith(('reduce', 'argm', 'cum')) for name in names)
  spiking = not isinstance(cell, fe.LI)
  assert ('custom_jvp_call' in names) == spiking


# The unscaled (Bellec) readout under OnlineGrad: e-prop is exact for it.


@pytest.mark.slow
def test_li_bellec_online_gradient_equals_bptt(x64, key):
  cell = fe.LI(
    3,
    tau_mem=20.0,
    dt=10.0,
    use_bias=True,
    form='bellec',
    learn_tau_mem=True,  # kernel, bias and tau_mem all get gradients
    param_dtype=jnp.float64,
  )
  k_x, k_y, k_p = jax.random.split(key, 3)
  xs = jax.random.bernoulli(k_x, 0.3, (2, 9, 4)).astype(jnp.float64)
  labels = jax.random.randint(k_y, (2, 9), 0, 3)
  assert xs.sum() > 0
  layer = fe.OnlineGrad(cell, trace_dtype=jnp.float64)
  variables = layer.init(k_p, xs)
  params = variables.pop('params')

  def step_loss(y, label):
    return -jax.nn.log_softmax(y)[label]

  online = fe.online_value_and_grad(layer.apply, step_loss, chunk=4)
  (loss, _), grads, _ = online(params, variables, xs, labels)

  def bptt(params):  # jax.grad through nn.RNN: the independent reference
    ys = nn.RNN(cell).apply({'params': params}, xs)  # same params tree
    per_step = jax.vmap(jax.vmap(step_loss))(ys, labels)
    return jnp.sum(per_step) / xs.shape[0]

  want_loss, want = jax.value_and_grad(bptt)(params)
  assert_trees_close(loss, want_loss, rtol=1e-10)
  assert_trees_close(grads, want, rtol=1e-10, atol=1e-12)
  for leaf in jax.tree.leaves(want):
    assert np.all(np.asarray(leaf) != 0)
