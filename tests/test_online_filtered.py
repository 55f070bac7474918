"""Learning through a leaky readout: Bellec's filtered eligibility traces.

A layer with ``readout_decay=kappa`` below ``fe.OnlineGrad(fe.LI(...))``.
References, independent of the code under test: `jax.grad` through plain
``nn.RNN`` models (the recurrent input stop-gradiented: `StopGradALIF`), and
Bellec's filtered e-prop hand-written in plain jnp from `alif_eprop`'s
traces. Every network spikes (asserted).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from online_models import (
  ALIF_HP,
  F64,
  UPPER,
  UPPER_HP,
  alif,
  alif_eprop,
  assert_all_nonzero,
  assert_spiking,
  cross_entropy,
  data,
  shifted_normal,
)

import flax_eprop as fe

BATCH, TIME, CLASSES = 3, 14, 3
slow = pytest.mark.slow
TAU_OUT = 8.0
KAPPA = math.exp(-1.0 / TAU_OUT)


class StopGradALIF(fe.ALIF):
  """`fe.ALIF` with the recurrent input ``z_{t-1} @ W_rec`` stop-gradiented
  (the reset is detached by default): BPTT through it is the oracle."""

  def synaptic_input(self, x, z=None):
    return super().synaptic_input(
      x, None if z is None else jax.lax.stop_gradient(z)
    )


def upper_lif(**kwargs):
  return fe.LIF(
    UPPER,
    tau_mem=UPPER_HP.tau_mem,
    recurrent=True,
    kernel_init=shifted_normal(3.0, 0.5),
    recurrent_kernel_init=nn.initializers.normal(0.5),
    param_dtype=F64,
    **kwargs,
  )


class Model(nn.Module):
  """ALIF layer(s) -> leaky readout.

  Attributes:
    form: the readout's `fe.LI` form.
    mode: ``'online'`` (`fe.OnlineGrad`, the top spiking layer filtered),
      ``'rnn'`` (``nn.RNN``, the recurrent input stop-gradiented) or
      ``'rnn_full'`` (``nn.RNN``, plain).
    stacked: an upper recurrent LIF layer between the ALIF and the readout.
    lower_decay: the lower layer's ``readout_decay`` when ``stacked``.
    exact: `fe.OnlineGrad`'s mode ``'exact'`` (RTRL).
    readout: ``'LI'``, ``'learnable'`` (LI learning its tau) or ``'Dense'``.
    decay: the declared ``readout_decay`` of the top layer.
    feedback: wrap the readout in `fe.RandomFeedback`.
  """

  form: str = 'bellec'
  mode: str = 'online'
  stacked: bool = False
  lower_decay: float | None = None
  exact: bool = False
  readout: str = 'LI'
  decay: float = KAPPA
  feedback: bool = False
  target_rate: float | None = None

  @nn.compact
  def __call__(self, xs, mask=None):
    make = alif(F64)
    if self.mode == 'rnn':
      make = functools.partial(StopGradALIF, *make.args, **make.keywords)
    cells = [make(name='layer0')]
    if self.stacked:
      cells.append(upper_lif(name='layer1'))
    for i, cell in enumerate(cells):
      top = i == len(cells) - 1
      if self.mode == 'online':
        decay = self.decay if top else self.lower_decay
        xs = fe.OnlineGrad(
          cell,
          mode='exact' if self.exact else 'eprop',
          trace_dtype=F64,
          readout_decay=decay,
          target_rate=self.target_rate if top else None,
          rate_coefficient=3.0,
          name=f'spikes{i}',
        )(xs, mask=mask)
      else:
        xs = nn.RNN(cell, name=f'spikes{i}')(xs)
    if self.readout == 'Dense':
      return nn.Dense(CLASSES, param_dtype=F64, name='readout')(xs)
    readout = fe.LI(
      CLASSES,
      tau_mem=TAU_OUT,
      form=self.form,
      use_bias=True,
      learn_tau_mem=self.readout == 'learnable',
      kernel_init=nn.initializers.normal(1.0),
      bias_init=nn.initializers.normal(0.3),
      param_dtype=F64,
      name='readout',
    )
    if self.mode == 'online':
      layer = fe.OnlineGrad(readout, trace_dtype=F64, name='leaky')
    else:
      layer = nn.RNN(readout, name='leaky')
    if self.feedback:
      layer = fe.RandomFeedback(layer, name='feedback')
    return layer(xs)


@functools.cache
def online_fn(model: Model, chunk: int):
  return jax.jit(fe.online_value_and_grad(model.apply, cross_entropy, chunk))


def rnn_cross_entropy(model: Model, params, xs, labels):
  """The ``nn.RNN`` model's cross-entropy (summed over time, averaged over
  the batch) and its spiking layers' outputs, in layer order."""
  logits, inter = model.apply(
    {'params': params},
    xs,
    capture_intermediates=lambda m, name: isinstance(m, nn.RNN),
    mutable=['intermediates'],
  )
  per_step = jax.vmap(jax.vmap(cross_entropy))(logits, labels)
  inter = inter['intermediates']
  spikes = [inter[k]['__call__'][0] for k in sorted(inter) if k != 'leaky']
  return jnp.sum(per_step) / xs.shape[0], spikes


def rnn_grad(model: Model, params, xs, labels):
  """`jax.grad` (BPTT) of the ``nn.RNN`` model; aux: the layers' spikes."""
  loss = lambda p: rnn_cross_entropy(model, p, xs, labels)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def setup(model: Model, seed: int = 0):
  k_data, k_init = jax.random.split(jax.random.key(seed))
  xs, labels = data(k_data, BATCH, TIME, 8, dtype=F64)
  variables = model.init(k_init, xs)
  params = variables.pop('params')
  return params, dict(variables), xs, labels


@pytest.mark.parametrize(
  'form, chunk',
  [
    pytest.param('bellec', 7, marks=slow),
    pytest.param('scaled', TIME, marks=slow),
    pytest.param('bellec', 1, marks=slow),
    pytest.param('bellec', TIME, marks=slow),
    pytest.param('scaled', 1, marks=slow),
    pytest.param('scaled', 7, marks=slow),
  ],
)
def test_filtered_equals_bptt_with_recurrent_input_stopped(x64, form, chunk):
  """Oracle: ALIF + leaky readout, per-step cross-entropy: the online
  gradient == BPTT with ``sg(z_{t-1})`` on the synaptic and reset paths,
  for any chunk length (the filter's state crosses chunks)."""
  model = Model(form=form)
  params, state, xs, labels = setup(model)
  (loss, aux), grads, new_state = online_fn(model, chunk)(
    params, state, xs, labels
  )
  (ref_loss, spikes), ref_grads = rnn_grad(
    Model(form=form, mode='rnn'), params, xs, labels
  )
  assert_spiking(spikes[0])
  assert float(aux['output_sum']['spikes0']['output_sum']) > 0
  assert_all_nonzero(grads)
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads, ref_grads)
  if chunk == 7:
    check_state(model, params, xs, state, new_state)


def test_rate_regulariser_reads_the_unfiltered_output(x64):
  """With a firing-rate regulariser on the filtered layer: online ==
  BPTT (recurrent input stopped) of the cross-entropy plus the penalty
  written by hand; the penalty's cotangent meets the plain traces."""
  model = Model(target_rate=0.05)
  params, state, xs, labels = setup(model)
  (loss, aux), grads, _ = online_fn(model, TIME)(params, state, xs, labels)
  reference = Model(mode='rnn')

  def ref_loss(p):
    ce, (zs,) = rnn_cross_entropy(reference, p, xs, labels)
    rate = zs.mean(axis=(0, 1))
    return ce + 1.5 * jnp.sum((rate - 0.05) ** 2), zs

  (expected, zs), ref_grads = jax.value_and_grad(ref_loss, has_aux=True)(params)
  assert_spiking(zs)
  assert float(aux['penalty']) > 0
  assert_trees_close(loss, expected)
  assert_trees_close(grads, ref_grads)


def check_state(model, params, xs, state, new_state):
  """The filter's state: its keys and shapes, non-zero after a run; zero
  after `fe.reset_state`, as `fe.rest_state` and ``init`` make it."""
  filt = new_state[fe.ELIGIBILITY]['spikes0']['readout_filter']
  assert set(filt) == {'previous_filtered_output', 'synapses', 'direct'}
  assert filt['previous_filtered_output'].shape == (BATCH, 6)
  assert filt['synapses']['input/kernel'].shape == (BATCH, 8, 6)  # (in, F)
  assert filt['synapses']['recurrent/kernel'].shape == (BATCH, 6, 6)
  assert filt['direct']['input/bias'].shape == (BATCH, 6)
  for leaf in jax.tree.leaves(filt):
    assert float(jnp.abs(leaf).sum()) > 0
  reset = fe.reset_state(new_state)
  rest = fe.rest_state(model.apply, params, xs)
  assert_trees_close(reset[fe.ELIGIBILITY], rest[fe.ELIGIBILITY])
  assert_trees_close(rest[fe.ELIGIBILITY], state[fe.ELIGIBILITY])
  for leaf in jax.tree.leaves(rest[fe.ELIGIBILITY]['spikes0']):
    assert float(jnp.abs(leaf).sum()) == 0


@slow
def test_without_the_filter_the_layer_gradient_differs(x64):
  """The filter is what makes it exact: without it the readout's memory is
  invisible to the layer below."""
  plain = Model(decay=None)
  params, state, xs, labels = setup(plain)
  grads = online_fn(plain, 7)(params, state, xs, labels)[1]
  ref_grads = rnn_grad(Model(mode='rnn'), params, xs, labels)[1]
  assert_trees_close(grads['readout'], ref_grads['readout'])
  error = np.abs(
    grads['layer0']['input']['kernel'] - ref_grads['layer0']['input']['kernel']
  ).max()
  assert error > 1e-3


@slow
def test_filtered_exact_mode_equals_full_bptt(x64):
  """RTRL with the filter: the exact gradient of layer + readout."""
  model = Model(exact=True)
  params, state, xs, labels = setup(model)
  (loss, _), grads, _ = online_fn(model, 7)(params, state, xs, labels)
  (ref_loss, spikes), ref_grads = rnn_grad(
    Model(mode='rnn_full'), params, xs, labels
  )
  assert_spiking(spikes[0])
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads, ref_grads)


@slow
def test_bptt_mode_runs_the_plain_cell(x64):
  """`fe.bptt_value_and_grad` of the filtered model is plain BPTT."""
  model = Model()
  params, state, xs, labels = setup(model)
  f = jax.jit(fe.bptt_value_and_grad(model.apply, cross_entropy))
  (loss, _), grads, new_state = f(params, state, xs, labels)
  (ref_loss, _), ref_grads = rnn_grad(
    Model(mode='rnn_full'), params, xs, labels
  )
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads, ref_grads)
  assert_trees_close(new_state[fe.ELIGIBILITY], state[fe.ELIGIBILITY])


# Hand-written references.


def readout_forward(form, w, b, zs, labels):
  """Leaky readout of ``zs: (T, B, F)``; per-step cross-entropy / batch.

  Returns ``(loss, ybar: (T, B, C))``, ``ybar`` the cotangent of each
  output ``y_t`` (not through later steps).
  """
  c = 1.0 if form == 'bellec' else 1.0 - KAPPA
  y, outs = jnp.zeros((zs.shape[1], w.shape[1]), zs.dtype), []
  for z in zs:
    y = KAPPA * y + c * (z @ w + b[None])
    outs.append(y)
  logits = jnp.stack(outs)
  onehot = jax.nn.one_hot(labels, w.shape[1], dtype=zs.dtype)
  log_p = jax.nn.log_softmax(logits)
  loss = -jnp.sum(onehot * log_p) / zs.shape[1]
  return loss, (jnp.exp(log_p) - onehot) / zs.shape[1]


def low_pass(e):
  """``ebar_t = KAPPA ebar_{t-1} + e_t`` over the leading time axis."""
  out, acc = [], jnp.zeros_like(e[0])
  for e_t in e:
    acc = KAPPA * acc + e_t
    out.append(acc)
  return jnp.stack(out)


def contract(run, signal, filtered):
  """``sum_t L_t . e_t`` (or ``. ebar_t``) per synapse of `alif_eprop`."""
  grads = {}
  for k, e in run.e.items():
    e = low_pass(e) if filtered else e
    spec = 'tbj,tbj->j' if k == 'bias' else 'tbj,tbji->ij'
    grads[k] = jnp.einsum(spec, signal, e)
  if 'rec' in grads:
    grads['rec'] = grads['rec'] * (1 - jnp.eye(grads['rec'].shape[0]))
  return grads


def cell_grads(cell_params, hand):
  out = {'input': {'kernel': hand['in']}}
  if 'bias' in cell_params.get('input', {}):
    out['input']['bias'] = hand['bias']
  if 'recurrent' in cell_params:
    out['recurrent'] = {'kernel': hand['rec']}
  return out


@slow
@pytest.mark.parametrize('form', ['bellec', 'scaled'])
def test_random_feedback_filtered_against_hand_written(x64, form):
  """``fe.RandomFeedback`` around the leaky readout: the layer's gradient
  is ``sum_t (ybar_t B^T) . ebar_t`` (written by hand)."""
  model = Model(form=form, feedback=True)
  params, state, xs, labels = setup(model)
  (loss, _), grads, _ = online_fn(model, 7)(params, state, xs, labels)
  p = params['layer0']
  run = alif_eprop(
    ALIF_HP,
    p['input']['kernel'],
    p['recurrent']['kernel'],
    p['input']['bias'],
    jnp.swapaxes(xs, 0, 1),
  )
  assert_spiking(run.z)
  ro = params['readout']['input']
  ref_loss, ybar = readout_forward(
    form, ro['kernel'], ro['bias'], run.z, labels.T
  )
  b = state[fe.FEEDBACK]['feedback']['kernel']
  hand = contract(run, ybar @ b.T, filtered=True)
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads['layer0'], cell_grads(p, hand))
  symmetric = contract(run, ybar @ ro['kernel'].T, filtered=True)
  assert np.abs(hand['in'] - symmetric['in']).max() > 1e-3


@pytest.mark.parametrize('lower_filtered', [True, False])
@slow
def test_stacked_layers_against_hand_written(x64, lower_filtered):
  """ALIF -> LIF (filtered) -> leaky readout. The rule: the upper layer
  gets Bellec's filtered gradient; the lower layer gets the instantaneous
  signal through the upper layer's step, ``L1_t = (psi2_t (1 - alpha2)
  L2_t) W2_in^T``, contracted with its own traces, filtered by ``kappa``
  when it declares ``readout_decay`` too."""
  model = Model(stacked=True, lower_decay=KAPPA if lower_filtered else None)
  params, state, xs, labels = setup(model)
  (loss, _), grads, _ = online_fn(model, 7)(params, state, xs, labels)
  p1, p2 = params['layer0'], params['layer1']
  lower = alif_eprop(
    ALIF_HP,
    p1['input']['kernel'],
    p1['recurrent']['kernel'],
    p1['input']['bias'],
    jnp.swapaxes(xs, 0, 1),
  )
  upper = alif_eprop(
    UPPER_HP,
    p2['input']['kernel'],
    p2['recurrent']['kernel'],
    jnp.zeros(UPPER, F64),
    lower.z,
  )
  assert_spiking(lower.z)
  assert_spiking(upper.z)
  ro = params['readout']['input']
  ref_loss, ybar = readout_forward(
    'bellec', ro['kernel'], ro['bias'], upper.z, labels.T
  )
  signal2 = ybar @ ro['kernel'].T
  hand2 = contract(upper, signal2, filtered=True)
  alpha2 = math.exp(-1.0 / UPPER_HP.tau_mem)
  signal1 = (upper.psi * (1 - alpha2) * signal2) @ p2['input']['kernel'].T
  hand1 = contract(lower, signal1, filtered=lower_filtered)
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads['layer1'], cell_grads(p2, hand2))
  assert_trees_close(grads['layer0'], cell_grads(p1, hand1))


# Refusals.


def refused(model, match):
  params, state, xs, labels = setup(model)
  f = fe.online_value_and_grad(model.apply, cross_entropy, 8)
  with pytest.raises(ValueError, match=match):
    f(params, state, xs, labels)


def test_refuses_a_mismatched_decay(x64):
  refused(Model(decay=math.exp(-1.0 / 20.0)), 'matches no leaky readout')


def test_refuses_a_learnable_readout_tau(x64):
  refused(Model(readout='learnable'), 'learns its tau_mem')


def test_refuses_a_readout_that_is_not_leaky(x64):
  refused(Model(readout='Dense'), 'no leaky readout')


@pytest.mark.parametrize('decay', [0.0, 1.0, 1.5, -0.2, True, '0.9'])
def test_refuses_a_bad_decay(decay):
  layer = fe.OnlineGrad(fe.LIF(3), readout_decay=decay)
  with pytest.raises(ValueError, match='readout_decay must be'):
    layer.init(jax.random.key(0), jnp.ones((2, 4, 3)))


def test_refuses_a_state_without_the_filter():
  xs = jnp.ones((2, 4, 3))
  plain = fe.OnlineGrad(fe.LIF(3))
  variables = plain.init(jax.random.key(0), xs)
  filtered = fe.OnlineGrad(fe.LIF(3), readout_decay=0.9)
  with pytest.raises(ValueError, match="no 'readout_filter' entry"):
    filtered.apply(variables, xs, mutable=['carry', 'eligibility'])


class ScaledOutput(fe.LIF):
  """An LIF whose output is not its carry leaf ``z``."""

  def step(self, state, x):
    new, z = super().step(state, x)
    return new, 2.0 * z


def test_refuses_a_cell_whose_output_is_not_a_carry_leaf():
  layer = fe.OnlineGrad(ScaledOutput(3), readout_decay=0.9)
  with pytest.raises(ValueError, match='one of its carry leaves'):
    layer.init(jax.random.key(0), jnp.ones((2, 4, 3)))
