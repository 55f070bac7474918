"""OnlineGrad and the training functions: user mistakes raise clear errors.

Each message must name the offending thing (the layer, the argument), the
expected value and the fix.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from sparse_cells import CubaLIF

import flax_eprop as fe

MUTABLE = [fe.CARRY, fe.ELIGIBILITY]
XS = jnp.ones((2, 5, 3))  # (batch, time, in)
YS = jnp.zeros((2, 5, 4))


def squared_error(output, target):
  return jnp.sum((output - target) ** 2)


@functools.cache
def layer_and_variables(cell=None):
  layer = fe.OnlineGrad(cell or fe.LIF(4), name='lower')
  variables = jax.jit(layer.init)(jax.random.key(0), XS)
  return layer, variables


def split(variables):
  return {'params': variables['params']}, {c: variables[c] for c in MUTABLE}


# OnlineGrad


@pytest.mark.parametrize('shape', [(3,), ()])
def test_input_rank(shape):
  layer, variables = layer_and_variables()
  match = (
    r"OnlineGrad 'lower': inputs must be an array of shape \(\*batch, time, "
    rf'in_features\).*got {re.escape(str(shape))}'
  )
  xs = jnp.ones(shape)
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match=match):
    layer.apply(variables, xs, mutable=MUTABLE)


def test_input_not_an_array():
  layer, variables = layer_and_variables()
  with pytest.raises(
    ValueError, match="OnlineGrad 'lower'.*got <class 'list'>"
  ):
    layer.apply(variables, [[[1.0] * 3] * 5] * 2, mutable=MUTABLE)


def test_input_features_spiking_cell():
  layer, variables = layer_and_variables()
  match = (
    r"OnlineGrad 'lower'.*\(2, 5, 4\).*input x has 4 features but the stored "
    r'input/kernel expects 3; pass x of shape \(\*batch, 3\)'
  )
  with pytest.raises(ValueError, match=match):
    layer.apply(variables, jnp.ones((2, 5, 4)), mutable=MUTABLE)


def test_input_features_custom_cell():
  layer, variables = layer_and_variables(CubaLIF(4))
  match = r"OnlineGrad 'lower'.*\(2, 5, 4\).*input.*\(3, 4\)"
  with pytest.raises(ValueError, match=match):
    layer.apply(variables, jnp.ones((2, 5, 4)), mutable=MUTABLE)


@pytest.mark.parametrize(
  ('shape', 'batch'), [((3, 5, 3), r'\(3,\)'), ((5, 3), r'\(\)')]
)
def test_batch_shape_differs_from_state(shape, batch):
  layer, variables = layer_and_variables()
  match = (
    rf"OnlineGrad 'lower': the input batch shape {batch} differs from the "
    r'stored state batch shape \(2,\).*fe.rest_state'
  )
  with pytest.raises(ValueError, match=match):
    layer.apply(variables, jnp.ones(shape), mutable=MUTABLE)


def test_state_not_passed():
  layer, variables = layer_and_variables()
  params, state = split(variables)
  with pytest.raises(ValueError, match="'lower': no 'carry' collection"):
    layer.apply(params, XS, mutable=MUTABLE)
  only_carry = {**params, fe.CARRY: state[fe.CARRY]}
  with pytest.raises(ValueError, match="no 'eligibility' collection.*init"):
    layer.apply(only_carry, XS, mutable=MUTABLE)


def test_state_not_mutable():
  layer, variables = layer_and_variables()
  match = r"'lower': the 'carry' collection must be mutable.*mutable=\["
  with pytest.raises(ValueError, match=match):
    layer.apply(variables, XS)
  with pytest.raises(ValueError, match="the 'eligibility' collection must be"):
    layer.apply(variables, XS, mutable=[fe.CARRY])


def test_stored_traces_do_not_fit():
  layer, variables = layer_and_variables()
  params, state = split(variables)
  state[fe.ELIGIBILITY] = jax.tree.map(
    lambda t: t[..., :2], state[fe.ELIGIBILITY]
  )
  match = (
    r"OnlineGrad 'lower': the stored 'eligibility' traces do not fit.*"
    r"Expected \['derived'\]: \(2, 1, 1, 4\), \['presynaptic'\]\['input/kernel'\]"
    r": \(2, 1, 3\), got \['derived'\]: \(2, 1, 1, 2\).*fe.rest_state"
  )
  with pytest.raises(fe.online.engine.StateError, match=match):
    layer.apply({**params, **state}, XS, mutable=MUTABLE)
  # a layout from another cell (here: the traces of an RTRL layer)
  state[fe.ELIGIBILITY] = {'rtrl': jnp.zeros((2, 8, 19))}
  with pytest.raises(
    fe.online.engine.StateError, match=r"got \['rtrl'\]: \(2, 8, 19\)"
  ):
    layer.apply({**params, **state}, XS, mutable=MUTABLE)


def test_layer_mask_shape():
  layer, variables = layer_and_variables()
  mask = jnp.ones((2, 4), bool)
  with pytest.raises(ValueError, match=r"'lower': mask must have shape \(2, 5"):
    layer.apply(variables, XS, mask=mask, mutable=MUTABLE)
  time_major = fe.OnlineGrad(fe.LIF(4), time_major=True, name='lower')
  xs = jnp.swapaxes(XS, 0, 1)
  with pytest.raises(ValueError, match=r'mask must have shape \(5, 2\)'):
    time_major.apply(
      variables, xs, mask=jnp.ones((2, 5), bool), mutable=MUTABLE
    )


def test_reset_state_where_shape():
  _, variables = layer_and_variables()
  _, state = split(variables)
  match = r'where: expected a bool mask of the batch shape \(2,\), got shape'
  with pytest.raises(ValueError, match=match):
    fe.reset_state(state, where=jnp.array([True, False, True]))


def test_gradient_mode_name():
  with pytest.raises(ValueError, match="mode: expected 'online' or 'bptt'"):
    with fe.gradient_mode('exact'):
      pass


# online_value_and_grad, bptt_value_and_grad, online_update


@pytest.mark.parametrize('chunk', [0, -3, 2.5, None, True, '4'])
def test_bad_chunk(chunk):
  layer, _ = layer_and_variables()
  match = r'chunk: expected a positive int \(steps\), got'
  with pytest.raises(ValueError, match=match):
    fe.online_value_and_grad(layer.apply, squared_error, chunk=chunk)
  with pytest.raises(ValueError, match=match):
    fe.online_update(layer.apply, squared_error, optax.sgd(0.1), chunk=chunk)


def training_functions():
  layer, variables = layer_and_variables()
  params, state = variables['params'], split(variables)[1]
  optimizer = optax.sgd(0.1)
  online = fe.online_value_and_grad(layer.apply, squared_error, chunk=2)
  bptt = fe.bptt_value_and_grad(layer.apply, squared_error)
  update = fe.online_update(layer.apply, squared_error, optimizer, chunk=2)
  opt_state = optimizer.init(params)
  return {
    'online': lambda *a: online(params, state, *a),
    'bptt': lambda *a: bptt(params, state, *a),
    'update': lambda *a: update(params, opt_state, state, *a),
  }


@pytest.mark.parametrize('name', ['online', 'bptt', 'update'])
def test_sequence_shapes(name):
  f = training_functions()[name]
  with pytest.raises(ValueError, match=r'xs: expected shape \(batch, time, in'):
    f(jnp.ones((5, 3)), YS[0])
  match = r'ys: every leaf must start with \(batch, time\) = \(2, 5\), got'
  with pytest.raises(ValueError, match=match):
    f(XS, YS[:, :4])
  with pytest.raises(ValueError, match=match):
    f(XS, {'a': YS, 'b': jnp.zeros((3, 5))})
  match = r'mask: expected shape \(batch, time\) = \(2, 5\), got \(2, 4\)'
  with pytest.raises(ValueError, match=match):
    f(XS, YS, jnp.ones((2, 4), bool))


def test_loss_fn_not_scalar():
  layer, variables = layer_and_variables()
  _, state = split(variables)
  per_element = lambda o, y: (o - y) ** 2
  f = fe.online_value_and_grad(layer.apply, per_element, chunk=2)
  match = r'loss_fn: must return a scalar for one example and step; got shape'
  with pytest.raises(ValueError, match=match):
    f(variables['params'], state, XS, YS)


def test_state_missing_in_training():
  layer, variables = layer_and_variables()
  f = fe.online_value_and_grad(layer.apply, squared_error, chunk=2)
  with pytest.raises(ValueError, match="'lower': no 'carry' collection"):
    f(variables['params'], {}, XS, YS)


def test_input_without_time_axis():
  layer, variables = layer_and_variables()
  match = (
    r"OnlineGrad 'lower': the inputs of shape \(2, 3\) have no time axis.*"
    r'\(\*batch, time, in_features\)'
  )
  with pytest.raises(ValueError, match=match):
    layer.apply(variables, jnp.ones((2, 3)), mutable=MUTABLE)


def test_seq_lengths_is_checked():
  # seq_lengths (nn.RNN's keyword) is the mask arange(time) < seq_lengths
  layer, variables = layer_and_variables()
  with pytest.raises(ValueError, match=r"'lower': seq_lengths must be an int"):
    layer.apply(
      variables, XS, seq_lengths=jnp.array([5.0, 3.0]), mutable=MUTABLE
    )
  with pytest.raises(ValueError, match=r"'lower': seq_lengths must be an int"):
    layer.apply(variables, XS, seq_lengths=jnp.array([5]), mutable=MUTABLE)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.int32])
def test_mask_must_be_bool(dtype):
  layer, variables = layer_and_variables()
  mask = jnp.ones((2, 5), dtype)
  match = rf"'lower': mask must be a bool array.*got dtype {jnp.dtype(dtype)}"
  with pytest.raises(TypeError, match=match):
    layer.apply(variables, XS, mask=mask, mutable=MUTABLE)
  f = training_functions()['online']
  with pytest.raises(TypeError, match='mask: expected a bool array'):
    f(XS, YS, mask)


def test_unnamed_layer_is_named_by_its_cell():
  layer = fe.OnlineGrad(fe.LIF(4))
  with pytest.raises(ValueError, match=r'^OnlineGrad\(LIF\): mask must'):
    layer.init(jax.random.key(0), XS, mask=jnp.ones((2, 4), bool))


class UnevenCarry(fe.LIF):
  """A cell whose carry leaves differ in shape (the input is fine)."""

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    state = super().initialize_carry(rng, input_shape)
    return state._replace(z=state.z[..., :2])


def test_cell_error_is_not_blamed_on_the_input():
  layer = fe.OnlineGrad(UnevenCarry(4))
  with pytest.raises(ValueError) as info:
    layer.init(jax.random.key(0), XS)
  message = str(info.value)
  assert message.startswith('OnlineGrad(UnevenCarry): its cell UnevenCarry')
  assert 'rejected' not in message and 'None' not in message
  assert 'z' in message  # the cell's own message names the bad leaf
