"""OnlineGrad as an nn.RNN drop-in: the call interface, Flax's cells, and
the differences that remain.

References: ``nn.RNN`` itself (outputs, carries, params trees, and
``jax.grad`` through it: BPTT) and, for e-prop on Flax's cells, BPTT of the
same cell with the recurrent input ``h_{t-1}`` stop-gradiented (DESIGN.md
oracle 2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

import flax_eprop as fe

F64 = jnp.float64
STATE = ['carry', 'eligibility']
BATCH, TIME, IN, FEATURES = 2, 5, 3, 4
KERNELS = dict(
  kernel_init=nn.initializers.normal(1.0),
  recurrent_kernel_init=nn.initializers.normal(1.0),
)


def cell_of(name, dtype=F64, features=FEATURES):
  """One of Flax's cells, with kernels large enough to leave the linear
  regime."""
  if name == 'ConvLSTMCell':
    return nn.ConvLSTMCell(2, (3, 3), param_dtype=dtype)
  cls = getattr(nn, name)
  return cls(features, param_dtype=dtype, **KERNELS)


def inputs(name='LSTMCell', dtype=F64, batch=BATCH, time=TIME, seed=1):
  shape = (3, 3, 2) if name == 'ConvLSTMCell' else (IN,)
  return jax.random.normal(jax.random.key(seed), (batch, time, *shape), dtype)


def loss(ys):
  """A loss that weighs every output differently."""
  w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
  return jnp.sum(w * ys) + 0.5 * jnp.sum(ys**2)


def grads(model, params, xs, **kwargs):
  f = lambda p: loss(model.apply({'params': p}, xs, **kwargs))
  return jax.grad(f)(params)


# nn.Bidirectional


@pytest.mark.slow
@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell'])
def test_bidirectional_equals_nn_rnn(name):
  xs = inputs(name, jnp.float32)
  make = lambda cls: nn.Bidirectional(
    cls(cell_of(name, jnp.float32)), cls(cell_of(name, jnp.float32))
  )
  online, reference = make(fe.OnlineGrad), make(nn.RNN)
  variables = online.init(jax.random.key(0), xs)
  params = variables['params']
  assert_trees_close(
    params, reference.init(jax.random.key(0), xs)['params'], rtol=0, atol=0
  )
  expected = reference.apply({'params': params}, xs)
  assert_trees_close(online.apply({'params': params}, xs), expected)
  # with the state (one call = the whole sequence from rest)
  state = {c: variables[c] for c in STATE}
  ys, _ = online.apply({'params': params, **state}, xs, mutable=STATE)
  assert_trees_close(ys, expected)


@pytest.mark.slow  # ~15-45 s on 2 shared cores
@pytest.mark.usefixtures('x64')
def test_bidirectional_exact_gradient_equals_bptt():
  xs = inputs()
  exact = lambda: fe.OnlineGrad(
    cell_of('LSTMCell'), mode='exact', trace_dtype=F64
  )
  online = nn.Bidirectional(exact(), exact())
  reference = nn.Bidirectional(
    nn.RNN(cell_of('LSTMCell')), nn.RNN(cell_of('LSTMCell'))
  )
  params = reference.init(jax.random.key(0), xs)['params']
  assert_trees_close(
    online.apply({'params': params}, xs),
    reference.apply({'params': params}, xs),
  )
  assert_trees_close(
    grads(online, params, xs), grads(reference, params, xs), rtol=1e-10
  )


# Flax's cells in both modes

CELLS = ['LSTMCell', 'GRUCell', 'MGUCell', 'SimpleCell']


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize(
  'name',
  [
    pytest.param('LSTMCell', marks=pytest.mark.slow),
    *CELLS[1:],
    'OptimizedLSTMCell',
    pytest.param('ConvLSTMCell', marks=pytest.mark.slow),
  ],
)
def test_exact_mode_equals_bptt(name):
  xs = inputs(name)
  online = fe.OnlineGrad(cell_of(name), mode='exact', trace_dtype=F64)
  reference = nn.RNN(cell_of(name))
  params = reference.init(jax.random.key(0), xs)['params']
  ys = online.apply({'params': params}, xs)
  assert_trees_close(ys, reference.apply({'params': params}, xs))
  assert np.abs(ys).max() > 0.1  # not a degenerate, silent run
  assert_trees_close(
    grads(online, params, xs), grads(reference, params, xs), rtol=1e-10
  )


class CutRecurrent(nn.RNNCellBase):
  """The cell with the recurrent input ``h_{t-1}`` of its kernels
  stop-gradiented and its neuron-local paths kept: BPTT through it is the
  e-prop gradient of the cell. LSTM: ``c_{t-1}`` stays; GRU / MGU: the
  update gate's ``z * h_{t-1}`` stays (added back as ``z * (h - sg(h))``,
  which is zero in value)."""

  cell: nn.RNNCellBase

  def __call__(self, carry, x):
    if isinstance(self.cell, nn.LSTMCell):
      c, h = carry
      return self.cell((c, jax.lax.stop_gradient(h)), x)
    cut = jax.lax.stop_gradient(carry)
    new_h, _ = self.cell(cut, x)
    if isinstance(self.cell, nn.GRUCell | nn.MGUCell):
      i, r = ('iz', 'hz') if isinstance(self.cell, nn.GRUCell) else ('if', 'hf')
      p = self.cell.variables['params']
      gate = self.cell.gate_fn(
        x @ p[i]['kernel'] + p[i]['bias'][None] + cut @ p[r]['kernel']
      )
      new_h = new_h + gate * (carry - cut)
    return new_h, new_h

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return self.cell.initialize_carry(rng, input_shape)

  @property
  def num_feature_axes(self):
    return 1


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize(
  'name',
  [
    pytest.param('SimpleCell', marks=pytest.mark.slow),
    pytest.param('LSTMCell', marks=pytest.mark.slow),
    pytest.param('GRUCell', marks=pytest.mark.slow),
    'MGUCell',
  ],
)
def test_eprop_on_flax_cells_equals_cut_bptt(name):
  xs = inputs(name)
  online = fe.OnlineGrad(cell_of(name), trace_dtype=F64)
  reference = nn.RNN(CutRecurrent(cell_of(name)))
  params = online.init(jax.random.key(0), xs)['params']
  nested = {'cell': {'cell': params['cell']}}
  assert_trees_close(
    online.apply({'params': params}, xs),
    reference.apply({'params': nested}, xs),
  )
  expected = grads(reference, nested, xs)['cell']
  got = grads(online, params, xs)
  assert_trees_close(got, {'cell': expected['cell']}, rtol=1e-10)
  # and e-prop is an approximation here: the recurrent paths are dropped
  exact = grads(nn.RNN(cell_of(name)), params, xs)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, exact)
  assert max(jax.tree.leaves(diff)) > 1e-3


def test_lstm_cell_is_the_alternative_to_optimized_lstm_cell():
  # the refusal below points to nn.LSTMCell: same params tree, same outputs
  xs = inputs(dtype=jnp.float32)
  fused = nn.RNN(cell_of('OptimizedLSTMCell', jnp.float32))
  params = fused.init(jax.random.key(0), xs)['params']
  online = fe.OnlineGrad(cell_of('LSTMCell', jnp.float32))
  own = online.init(jax.random.key(0), xs)['params']
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, params)
  assert_trees_close(
    online.apply({'params': params}, xs), fused.apply({'params': params}, xs)
  )


def test_eprop_refuses_fused_and_convolutional_cells():
  xs = inputs(dtype=jnp.float32)
  cell = cell_of('OptimizedLSTMCell', jnp.float32)
  with pytest.raises(ValueError, match=r'OptimizedLSTMCell.*nn\.LSTMCell'):
    fe.OnlineGrad(cell).init(jax.random.key(0), xs)
  xs = inputs('ConvLSTMCell', jnp.float32)
  cell = cell_of('ConvLSTMCell', jnp.float32)
  with pytest.raises(ValueError, match=r"convolutional.*mode='exact'"):
    fe.OnlineGrad(cell).init(jax.random.key(0), xs)


# the call interface


def test_init_returns_the_chunk_output_and_stores_the_rest_state():
  xs = inputs(dtype=jnp.float32)
  layer = fe.OnlineGrad(cell_of('LSTMCell', jnp.float32), return_carry=True)
  (carry, ys), variables = layer.init_with_output(jax.random.key(0), xs)
  params = variables['params']
  expected = nn.RNN(cell_of('LSTMCell', jnp.float32), return_carry=True)
  assert_trees_close((carry, ys), expected.apply({'params': params}, xs))
  rest = fe.rest_state(layer.apply, params, xs)
  assert_trees_close({c: variables[c] for c in STATE}, rest, rtol=0, atol=0)


def test_seq_lengths_is_a_mask_and_padded_steps_output_zeros():
  xs = inputs(dtype=jnp.float32)
  lengths = jnp.array([2, 4])
  layer = fe.OnlineGrad(cell_of('LSTMCell', jnp.float32), return_carry=True)
  reference = nn.RNN(cell_of('LSTMCell', jnp.float32), return_carry=True)
  params = layer.init(jax.random.key(0), xs)['params']
  carry, ys = layer.apply({'params': params}, xs, seq_lengths=lengths)
  mask = jnp.arange(TIME)[None, :] < lengths[:, None]
  assert_trees_close(
    (carry, ys), layer.apply({'params': params}, xs, mask=mask), rtol=0, atol=0
  )
  ref_carry, ref_ys = reference.apply(
    {'params': params}, xs, seq_lengths=lengths
  )
  valid = np.asarray(mask)
  # the same final carry (the last valid step's) and valid outputs ...
  assert_trees_close(carry, ref_carry)
  assert_trees_close(ys[valid], ref_ys[valid])
  # ... but padded steps: OnlineGrad outputs zeros, nn.RNN keeps computing
  assert np.all(np.asarray(ys)[~valid] == 0)
  assert np.all(np.abs(np.asarray(ref_ys)[~valid]) > 0)
  with pytest.raises(ValueError, match='either mask or seq_lengths'):
    layer.apply({'params': params}, xs, mask=mask, seq_lengths=lengths)
  with pytest.raises(ValueError, match=r'seq_lengths must be an int array'):
    layer.apply({'params': params}, xs, seq_lengths=jnp.array([2.0, 4.0]))


@pytest.mark.parametrize('keep_order', [False, True])
def test_reverse_with_seq_lengths_as_nn_rnn(keep_order):
  xs = inputs(dtype=jnp.float32)
  lengths = jnp.array([3, 5])
  kwargs = dict(reverse=True, keep_order=keep_order, return_carry=True)
  layer = fe.OnlineGrad(cell_of('GRUCell', jnp.float32), **kwargs)
  reference = nn.RNN(cell_of('GRUCell', jnp.float32), **kwargs)
  params = layer.init(jax.random.key(0), xs)['params']
  carry, ys = layer.apply({'params': params}, xs, seq_lengths=lengths)
  ref_carry, ref_ys = reference.apply(
    {'params': params}, xs, seq_lengths=lengths
  )
  valid = np.arange(TIME)[None, :] < np.asarray(lengths)[:, None]
  assert_trees_close(carry, ref_carry)
  assert_trees_close(ys[valid], ref_ys[valid])  # padding stays at the end


@pytest.mark.slow
def test_initial_carry_and_init_key():
  xs = inputs(dtype=jnp.float32)
  cell = lambda: nn.LSTMCell(
    FEATURES, carry_init=nn.initializers.normal(1.0), **KERNELS
  )
  layer = fe.OnlineGrad(cell(), return_carry=True)
  reference = nn.RNN(cell(), return_carry=True)
  key = jax.random.key(7)
  out, variables = layer.init_with_output(jax.random.key(0), xs, init_key=key)
  params = variables['params']
  assert_trees_close(out, reference.apply({'params': params}, xs, init_key=key))
  rest = cell().initialize_carry(key, xs[:, 0].shape)
  assert_trees_close(variables['carry']['rest'], rest, rtol=0, atol=0)
  # initial_carry: from rest (no state) and with a state (a new sequence
  # from that carry: traces from zero, so the same gradient)
  start = jax.tree.map(lambda a: a + 0.5, rest)
  expected = reference.apply({'params': params}, xs, initial_carry=start)
  assert_trees_close(
    layer.apply({'params': params}, xs, initial_carry=start), expected
  )
  state = {c: variables[c] for c in STATE}
  state = jax.tree.map(lambda a: a + 1.0, state)  # any stored state
  out, new_state = layer.apply(
    {'params': params, **state}, xs, initial_carry=start, mutable=STATE
  )
  assert_trees_close(out, expected)
  assert_trees_close(new_state['carry']['state'], expected[0])

  def stateless(p):
    return loss(layer.apply({'params': p}, xs, initial_carry=start)[1])

  def stateful(p):
    out, _ = layer.apply(
      {'params': p, **state}, xs, initial_carry=start, mutable=STATE
    )
    return loss(out[1])

  assert_trees_close(jax.grad(stateful)(params), jax.grad(stateless)(params))
  with pytest.raises(ValueError, match='initial_carry must have'):
    layer.apply({'params': params}, xs, initial_carry=start[0])


@pytest.mark.slow  # ~20-55 s on 2 shared cores
@pytest.mark.usefixtures('x64')
def test_reverse_across_chunks():
  # chunks fed last first, each reversed = the whole sequence reversed
  xs = inputs(time=7)
  layer = fe.OnlineGrad(
    cell_of('LSTMCell'), reverse=True, return_carry=True, trace_dtype=F64
  )
  variables = layer.init(jax.random.key(0), xs)
  params, rest = variables['params'], {c: variables[c] for c in STATE}

  def run(p, pieces):
    state, outs, total = rest, [], 0.0
    for piece in pieces:
      (_, ys), state = layer.apply({'params': p, **state}, piece, mutable=STATE)
      outs.append(ys)
      total = total + jnp.sum(jnp.sin(3 * ys))  # the same for every cut
    return total, (jnp.concatenate(outs, axis=1), state)

  whole = jax.value_and_grad(run, has_aux=True)(params, [xs])
  cut = jax.value_and_grad(run, has_aux=True)(
    params, [xs[:, 4:], xs[:, 2:4], xs[:, :2]]
  )
  (_, (ys_whole, state_whole)), g_whole = whole
  (_, (ys_cut, state_cut)), g_cut = cut
  assert_trees_close(ys_cut, ys_whole)
  assert_trees_close(state_cut, state_whole, rtol=1e-10, atol=1e-14)
  assert_trees_close(g_cut, g_whole, rtol=1e-10, atol=1e-14)


@pytest.mark.usefixtures('x64')
def test_online_value_and_grad_refuses_reverse_across_chunks():
  """fe.online_value_and_grad feeds chunks first to last: a reversed layer
  would read each chunk backwards, so it refuses; one chunk of the whole
  sequence is a whole reversed sequence and runs."""
  xs = inputs(time=6)
  layer = fe.OnlineGrad(cell_of('LSTMCell'), reverse=True, trace_dtype=F64)
  variables = layer.init(jax.random.key(0), xs)
  params, state = variables['params'], {c: variables[c] for c in STATE}
  targets = jnp.zeros(xs.shape[:2] + (FEATURES,), F64)
  step_loss = lambda y, t: jnp.sum((y - t) ** 2)
  chunked = fe.online_value_and_grad(layer.apply, step_loss, chunk=4)
  with pytest.raises(ValueError, match='reverse=True.*chunk'):
    chunked(params, state, xs, targets)
  whole = fe.online_value_and_grad(layer.apply, step_loss, chunk=6)
  (loss_value, _), _, _ = whole(params, state, xs, targets)
  ys = nn.RNN(cell_of('LSTMCell'), reverse=True).apply({'params': params}, xs)
  assert_trees_close(loss_value, jnp.sum(ys**2) / xs.shape[0])


@pytest.mark.slow
def test_call_overrides_and_unroll():
  xs = inputs(dtype=jnp.float32)
  layer = fe.OnlineGrad(cell_of('LSTMCell', jnp.float32))
  params = layer.init(jax.random.key(0), xs)['params']
  ys = layer.apply({'params': params}, xs)
  tm = layer.apply({'params': params}, jnp.swapaxes(xs, 0, 1), time_major=True)
  assert_trees_close(jnp.swapaxes(tm, 0, 1), ys, rtol=0, atol=0)
  unrolled = fe.OnlineGrad(cell_of('LSTMCell', jnp.float32), unroll=3)
  assert_trees_close(unrolled.apply({'params': params}, xs), ys)
  with fe.gradient_mode('bptt'):  # the plain scan takes unroll
    assert_trees_close(
      grads(unrolled, params, xs),
      grads(nn.RNN(cell_of('LSTMCell', jnp.float32)), params, xs),
    )


def test_scan_options():
  xs = inputs(dtype=jnp.float32)
  defaults = dict(
    unroll=1,
    variable_axes={},
    variable_broadcast='params',
    variable_carry=False,
    split_rngs={'params': False},
  )
  layer = fe.OnlineGrad(cell_of('SimpleCell', jnp.float32), **defaults)
  params = layer.init(jax.random.key(0), xs)['params']
  expected = nn.RNN(cell_of('SimpleCell', jnp.float32), **defaults)
  assert_trees_close(
    layer.apply({'params': params}, xs), expected.apply({'params': params}, xs)
  )
  refused = [
    ('unroll', 0),
    ('variable_axes', {'intermediates': 0}),
    ('variable_broadcast', False),
    ('variable_carry', 'batch_stats'),
    ('split_rngs', {'params': False, 'dropout': True}),
  ]
  for name, value in refused:
    bad = fe.OnlineGrad(cell_of('SimpleCell', jnp.float32), **{name: value})
    with pytest.raises(ValueError, match=rf'{name}.*(nn.RNN|OnlineGrad)'):
      bad.init(jax.random.key(0), xs)


def test_exact_mode_memory_check():
  xs = inputs(dtype=jnp.float32)
  layer = fe.OnlineGrad(cell_of('LSTMCell', jnp.float32), mode='exact')
  variables = layer.init(jax.random.key(0), xs)
  trace = variables['eligibility']['rtrl']
  need = fe.online.rtrl.memory_bytes(
    variables['params'], variables['carry']['state'], 1, TIME, jnp.float32
  )
  assert need['trace'] == trace.nbytes
  one_step = fe.online.rtrl.memory_bytes(
    variables['params'], variables['carry']['state'], 1, 1, jnp.float32
  )['total']
  small = fe.OnlineGrad(
    cell_of('LSTMCell', jnp.float32), mode='exact', exact_max_bytes=one_step
  )
  small.init(jax.random.key(0), xs)  # init: the trace and one step
  with pytest.raises(fe.TraceTooLargeError, match=f'{need["total"]:,} bytes'):
    small.apply(variables, xs, mutable=STATE)
  # the LSTMCell(265) on (2, 10, 6): refused before allocating
  big = fe.OnlineGrad(nn.LSTMCell(265), mode='exact')
  with pytest.raises(fe.TraceTooLargeError, match='exact_max_bytes'):
    jax.eval_shape(big.init, jax.random.key(0), jnp.ones((2, 10, 6)))
