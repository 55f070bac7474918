"""Models, data and plain-jnp references for the OnlineGrad tests.

Not a test module. `Net` stacks spiking layers and an ``nn.Dense`` readout
applied to every step, either with `fe.OnlineGrad` (``mode='online'``) or
with a plain ``nn.RNN`` (``mode='rnn'``). The references never use the code
under test: `jax.grad` through the ``nn.RNN`` model (`rnn_value_and_grad`),
and Bellec's ALIF e-prop written from the math of DESIGN.md section 2
(`alif_eprop`, `eprop_grads`, `readout_signal`).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_eprop as fe

STATE = (fe.CARRY, fe.ELIGIBILITY)
RECURRENT = 'recurrent'
sg = jax.lax.stop_gradient


class Net(nn.Module):
  """Spiking layers (one per factory in ``cells``) + a Dense readout.

  Attributes:
    cells: factories ``make(name=...) -> cell``, bottom layer first.
    n_out: readout classes.
    mode: ``'online'`` (`fe.OnlineGrad`) or ``'rnn'`` (``nn.RNN``, which
      ignores the mask).
    trace_dtype: `fe.OnlineGrad`'s trace dtype.
    param_dtype: the readout's parameter dtype.
  """

  cells: Sequence[Callable[..., nn.Module]]
  n_out: int = 3
  mode: str = 'online'
  trace_dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, mask=None):
    h = xs
    for i, make in enumerate(self.cells):
      cell = make(name=f'cell{i}')
      if self.mode == 'online':
        h = fe.OnlineGrad(cell, trace_dtype=self.trace_dtype)(h, mask=mask)
      else:
        h = nn.RNN(cell)(h)
    readout = nn.Dense(self.n_out, param_dtype=self.param_dtype, name='out')
    return readout(h)


def shifted_normal(mean: float, std: float):
  """Kernel initializer ``mean + std * N(0, 1)`` (cells that spike)."""

  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)

  return init


def cross_entropy(output, label):
  """Loss of one example at one step: ``output: (classes,)``, ``label: ()``."""
  return optax.softmax_cross_entropy_with_integer_labels(output, label)


def sequence_loss(outputs, labels):
  """Sum over steps of the cross-entropy, averaged over the batch."""
  per_step = jax.vmap(jax.vmap(cross_entropy))(outputs, labels)
  return jnp.sum(per_step) / outputs.shape[0]


def rnn_value_and_grad(model: Net, stop_recurrent: bool = False):
  """Jitted ``(params, xs, labels) -> ((loss, spikes), grads)``: `jax.grad`
  (BPTT) through the ``nn.RNN`` model (``model.mode == 'rnn'``).

  ``spikes`` lists every spiking layer's outputs ``(batch, time, features)``.
  With ``stop_recurrent`` the recurrent input of every synapse named
  ``recurrent`` is stop-gradiented (`stop_recurrent_input`).
  """

  def loss(params, xs, labels):
    with nn.intercept_methods(
      stop_recurrent_input if stop_recurrent else _no_interception
    ):
      outputs, inter = model.apply(
        {'params': params},
        xs,
        capture_intermediates=_is_rnn,
        mutable=['intermediates'],
      )
    inter = inter['intermediates']
    spikes = [inter[f'RNN_{i}']['__call__'][0] for i in range(len(model.cells))]
    return sequence_loss(outputs, labels), spikes

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.cache
def online_fn(model: Net, chunk: int):
  """Jitted `fe.online_value_and_grad` of ``model`` (cached: compiled once)."""
  return jax.jit(fe.online_value_and_grad(model.apply, cross_entropy, chunk))


@functools.cache
def init_fn(model: Net):
  """Jitted ``model.init`` (cached)."""
  return jax.jit(model.init)


def _is_rnn(module, method_name):
  return isinstance(module, nn.RNN) and method_name == '__call__'


def _no_interception(next_fun, args, kwargs, context):
  return next_fun(*args, **kwargs)


def data(key, batch, time, features, *, rate=0.3, amplitude=2.0, dtype=None):
  """Random input spikes ``(batch, time, features)`` and labels in 0..2."""
  k_x, k_y = jax.random.split(key)
  spikes = jax.random.bernoulli(k_x, rate, (batch, time, features))
  labels = jax.random.randint(k_y, (batch, time), 0, 3)
  return amplitude * spikes.astype(dtype or jnp.float32), labels


def toy_task(key, batch, time, features, *, amplitude=2.0, dtype=None):
  """A class ``c`` in 0..2 per example, the label of every step; input
  channels ``i`` with ``i % 3 == c`` fire at rate 0.6, the others at 0.05.
  """
  k_c, k_x = jax.random.split(key)
  classes = jax.random.randint(k_c, (batch,), 0, 3)
  own = (jnp.arange(features) % 3)[None, :] == classes[:, None]
  rates = jnp.where(own, 0.6, 0.05)[:, None, :]  # (batch, 1, features)
  spikes = jax.random.bernoulli(k_x, rates, (batch, time, features))
  labels = jnp.broadcast_to(classes[:, None], (batch, time))
  return amplitude * spikes.astype(dtype or jnp.float32), labels


def split_variables(variables):
  """``(params, state)`` of the dict returned by ``init``."""
  return variables['params'], {c: variables[c] for c in STATE}


def to_dtype(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def assert_spiking(z, low=0.02, high=0.4):
  """Spikes occur: the fraction of spiking neuron-steps is in (low, high)."""
  z = np.asarray(z)
  assert z.sum() > 0, 'the network never spikes: the test would be vacuous'
  rate = float(z.mean())
  assert low < rate < high, f'spike rate {rate:.3f} not in ({low}, {high})'


def assert_all_nonzero(grads):
  """Every gradient leaf has a non-zero entry (no vacuous comparison)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.any(np.asarray(leaf) != 0), f'gradient {name} is all zero'


def stop_recurrent_input(next_fun, args, kwargs, context):
  """Method interceptor: ``sg`` on the input of every ``recurrent`` synapse.

  ``with nn.intercept_methods(stop_recurrent_input): ...`` gives the e-prop
  oracle model of DESIGN.md section 2 (the recurrent input ``z_{t-1} @
  W_rec`` stop-gradiented).
  """
  if context.module.name == RECURRENT and context.method_name == '__call__':
    args = sg(args)
  return next_fun(*args, **kwargs)


# Bellec's ALIF e-prop, written from the math of DESIGN.md section 2.


class Alif(NamedTuple):
  """Hyper-parameters of an (A)LIF layer for `alif_eprop` (LIF: beta 0)."""

  tau_mem: float = 20.0
  tau_adapt: float = 200.0
  beta: float = 0.0
  threshold: float = 1.0
  dampening: float = 0.3


class AlifRun(NamedTuple):
  """The forward pass and eligibility traces of a layer, time-major.

  Attributes:
    z: ``(T, B, F)`` spikes.
    psi: ``(T, B, F)`` surrogate derivatives ``dz_t / dv_t``.
    e: per synapse name (``'in'``, ``'rec'``, ``'bias'``) the eligibility
      traces ``e_t``: ``(T, B, F, I)`` for a kernel ``W[i, j]`` (post j, pre
      i), ``(T, B, F)`` for the bias.
  """

  z: jax.Array
  psi: jax.Array
  e: dict


def alif_eprop(hp: Alif, w_in, w_rec, bias, xs) -> AlifRun:
  """Forward pass and e-prop eligibility traces of an ALIF layer.

  With ``xs: (T, B, I)``, ``w_in: (I, F)``, ``w_rec: (F, F)`` or None (no
  recurrence; its diagonal is masked), ``bias: (F,)``::

    v_t = alpha v_{t-1} + (1 - alpha) I_t - threshold z_{t-1}   (z detached)
    a_t = rho a_{t-1} + z_{t-1}
    z_t = H(v_t - threshold - beta a_t)
    psi_t = dampening max(0, 1 - |v_t - threshold - beta a_t| / threshold)
            / threshold

  and per synapse ``(j, i)`` with presynaptic activity ``u_t`` (``x_t``,
  ``z_{t-1}`` or 1)::

    eps_v_t = alpha eps_v_{t-1} + (1 - alpha) u_t
    eps_a_t = psi_{t-1} eps_v_{t-1} + (rho - psi_{t-1} beta) eps_a_{t-1}
    e_t     = psi_t (eps_v_t - beta eps_a_t)
  """
  alpha = math.exp(-1.0 / hp.tau_mem)
  rho = math.exp(-1.0 / hp.tau_adapt)
  thr, beta = hp.threshold, hp.beta
  n_in, n = w_in.shape
  batch = xs.shape[1]
  zeros = lambda *shape: jnp.zeros((batch, *shape), xs.dtype)
  v, a, z, psi = zeros(n), zeros(n), zeros(n), zeros(n)
  shapes = {'in': (n, n_in), 'rec': (n, n), 'bias': (n,)}
  if w_rec is None:
    del shapes['rec']
  eps = {k: (zeros(*s), zeros(*s)) for k, s in shapes.items()}
  out = {'z': [], 'psi': [], **{k: [] for k in shapes}}
  for x in xs:
    current = x @ w_in + bias[None, :]
    if w_rec is not None:
      current = current + z @ (w_rec * (1 - jnp.eye(n)))
    v_new = alpha * v + (1 - alpha) * current - thr * z
    a_new = rho * a + z
    dist = v_new - thr - beta * a_new
    z_new = (dist > 0).astype(xs.dtype)
    psi_new = hp.dampening * jnp.maximum(0.0, 1 - jnp.abs(dist) / thr) / thr
    pre = {'in': x[:, None, :], 'rec': z[:, None, :], 'bias': 1.0}
    for k in shapes:
      per_post = (lambda p: p) if k == 'bias' else (lambda p: p[:, :, None])
      eps_v, eps_a = eps[k]
      eps_a = per_post(psi) * eps_v + per_post(rho - psi * beta) * eps_a
      eps_v = alpha * eps_v + (1 - alpha) * pre[k]
      eps[k] = (eps_v, eps_a)
      out[k].append(per_post(psi_new) * (eps_v - beta * eps_a))
    v, a, z, psi = v_new, a_new, z_new, psi_new
    out['z'].append(z)
    out['psi'].append(psi)
  e = {k: jnp.stack(out[k]) for k in shapes}
  return AlifRun(jnp.stack(out['z']), jnp.stack(out['psi']), e)


def eprop_grads(run: AlifRun, signal):
  """``grad = sum_t L_t e_t`` for the learning signal ``L: (T, B, F)``.

  Returns a dict like ``run.e``: ``'in'``: ``(I, F)``, ``'rec'``: ``(F,
  F)`` (zero on the masked diagonal), ``'bias'``: ``(F,)``.
  """
  grads = {}
  for k, e in run.e.items():
    if k == 'bias':
      grads[k] = jnp.einsum('tbj,tbj->j', signal, e)
    else:
      grads[k] = jnp.einsum('tbj,tbji->ij', signal, e)
  if 'rec' in grads:
    grads['rec'] = grads['rec'] * (1 - jnp.eye(grads['rec'].shape[0]))
  return grads


def readout_signal(w_out, b_out, z, labels):
  """Dense readout of ``z: (T, B, F)``, per-step cross-entropy / batch.

  Returns ``(loss, L, grad_w_out, grad_b_out)`` where ``L: (T, B, F)`` is
  ``dE / dz_t`` through the readout of the same step (the learning signal).
  """
  logits = z @ w_out + b_out[None, None, :]  # (T, B, C)
  onehot = jax.nn.one_hot(labels, w_out.shape[1], dtype=z.dtype)
  log_p = jax.nn.log_softmax(logits)
  batch = z.shape[1]
  loss = -jnp.sum(onehot * log_p) / batch
  delta = (jnp.exp(log_p) - onehot) / batch  # dE / dlogits
  grad_w = jnp.einsum('tbf,tbc->fc', z, delta)
  return loss, delta @ w_out.T, grad_w, jnp.sum(delta, axis=(0, 1))


# The tests' networks: every one spikes on `data` (5-30% of neuron-steps).

IN, FEATURES, UPPER = 8, 6, 5
F64, F32 = jnp.float64, jnp.float32
DRIVE = shifted_normal(0.3, 0.5)
ALIF_HP = Alif(tau_mem=10.0, tau_adapt=30.0, beta=0.3)
UPPER_HP = Alif(tau_mem=5.0)  # an LIF: beta = 0


@functools.cache
def lif(dtype):
  """A non-recurrent `fe.LIF` layer factory."""
  return functools.partial(
    fe.LIF, FEATURES, tau_mem=5.0, kernel_init=DRIVE, param_dtype=dtype
  )


@functools.cache
def alif(dtype):
  """A recurrent `fe.ALIF` layer factory (hyper-parameters ``ALIF_HP``)."""
  return functools.partial(
    fe.ALIF,
    FEATURES,
    tau_mem=ALIF_HP.tau_mem,
    tau_adapt=ALIF_HP.tau_adapt,
    beta=ALIF_HP.beta,
    use_bias=True,
    kernel_init=DRIVE,
    recurrent_kernel_init=nn.initializers.normal(0.5),
    bias_init=nn.initializers.normal(0.1),
    param_dtype=dtype,
  )


@functools.cache
def stacked(dtype):
  """Recurrent ALIF -> recurrent LIF (``UPPER_HP``) -> Dense readout."""
  upper = functools.partial(
    fe.LIF,
    UPPER,
    tau_mem=UPPER_HP.tau_mem,
    recurrent=True,
    kernel_init=shifted_normal(3.0, 0.5),
    recurrent_kernel_init=nn.initializers.normal(0.5),
    param_dtype=dtype,
  )
  return Net((alif(dtype), upper), trace_dtype=dtype, param_dtype=dtype)
