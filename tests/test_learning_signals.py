"""Learning-signal options: random feedback and firing-rate regularisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close

import flax_eprop as fe

F64 = jnp.float64


def test_random_feedback_forward_params_and_input_cotangent(key, x64):
  k_init, k_x, k_bar = jax.random.split(key, 3)
  wrapped = fe.RandomFeedback(nn.Dense(3, param_dtype=F64))
  x = jax.random.normal(k_x, (4, 5), F64)
  y_bar = jax.random.normal(k_bar, (4, 3), F64)
  variables = wrapped.init(k_init, x)
  b = variables['feedback']['kernel']
  w = variables['params']['module']['kernel']
  bias = variables['params']['module']['bias']
  assert b.shape == w.shape == (5, 3)

  def loss(params, x):
    y = wrapped.apply({'params': params, 'feedback': variables['feedback']}, x)
    return jnp.sum(y * y_bar)

  p_bar, x_bar = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
  assert_trees_close(wrapped.apply(variables, x), x @ w + bias[None])
  # Parameter gradients are the ordinary ones (hand formula for a Dense)...
  assert_trees_close(p_bar['module']['kernel'], x.T @ y_bar)
  assert_trees_close(p_bar['module']['bias'], y_bar.sum(0))
  # ...but the input gets y_bar @ B^T instead of y_bar @ W^T.
  assert_trees_close(x_bar, y_bar @ b.T)
  assert float(jnp.max(jnp.abs(x_bar - y_bar @ w.T))) > 1e-3


def test_random_feedback_needs_its_collection(key):
  wrapped = fe.RandomFeedback(nn.Dense(3))
  x = jnp.ones((2, 5))
  variables = wrapped.init(key, x)
  with pytest.raises(ValueError, match="'feedback' collection"):
    wrapped.apply({'params': variables['params']}, x)


class RateNet(nn.Module):
  online: bool
  target: float = 0.05
  coefficient: float = 3.0

  @nn.compact
  def __call__(self, xs):
    cell = fe.LIF(6, param_dtype=F64, kernel_init=nn.initializers.normal(8.0))
    if self.online:
      zs = fe.OnlineGrad(
        cell,
        trace_dtype=F64,
        target_rate=self.target,
        rate_coefficient=self.coefficient,
      )(xs)
    else:
      zs = nn.RNN(cell)(xs)
    return nn.Dense(3, param_dtype=F64)(zs), zs


@pytest.mark.slow
def test_firing_rate_penalty_matches_hand_written_bptt(key, x64):
  """Online gradient with the penalty == BPTT of loss + penalty by hand."""
  k_x, k_y, k_init = jax.random.split(key, 3)
  xs = jax.random.bernoulli(k_x, 0.3, (4, 15, 5)).astype(F64)
  labels = jax.random.randint(k_y, (4, 15), 0, 3)
  online = RateNet(online=True)
  variables = online.init(k_init, xs)
  params = variables.pop('params')

  def apply(v, xs, **kw):
    (logits, _), state = online.apply(v, xs, **kw)
    return logits, state

  step_loss = optax.softmax_cross_entropy_with_integer_labels
  f = fe.online_value_and_grad(apply, step_loss, chunk=15)
  (loss, aux), grads, _ = f(params, variables, xs, labels)

  reference = RateNet(online=False)

  def reference_loss(p):
    logits, zs = reference.apply({'params': p}, xs)
    ce = step_loss(logits, labels).sum() / xs.shape[0]
    rate = zs.mean(axis=(0, 1))  # per neuron
    return ce + 0.5 * 3.0 * jnp.sum((rate - 0.05) ** 2), zs

  (ref_loss, zs), ref_grads = jax.value_and_grad(reference_loss, has_aux=True)(
    params
  )
  assert float(zs.sum()) > 0, 'the test network must spike'
  rate = zs.mean(axis=(0, 1))
  assert_trees_close(aux['penalty'], 1.5 * jnp.sum((rate - 0.05) ** 2))
  assert_trees_close(loss, ref_loss)
  assert_trees_close(grads, ref_grads)
  assert float(aux['penalty']) > 0


def test_firing_rate_penalty_rejects_bad_target(key, x64):
  xs = jnp.ones((2, 3, 5))
  with pytest.raises(ValueError, match=r'target_rate must be in \[0, 1\]'):
    RateNet(online=True, target=2.0).init(key, xs)
  with pytest.raises(ValueError, match='rate_coefficient >= 0; got 0.05 and'):
    RateNet(online=True, coefficient=-1.0).init(key, xs)
