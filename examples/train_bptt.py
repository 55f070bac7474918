"""Train a recurrent ALIF network with BPTT on a toy memory task.

Two groups of input channels fire at different rates for the first 20 steps
(the cue); after a 30-step silence the network must say which group fired
more. Prints the loss and accuracy as they improve. Runs in a minute on a
laptop CPU: ``python examples/train_bptt.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import flax_eprop as fe

BATCH, CUE, DELAY, CHANNELS = 64, 20, 30, 20


def make_batch(key):
  """xs: (batch, time, channels) spikes; labels: (batch,) in {0, 1}."""
  k_label, k_spikes = jax.random.split(key)
  labels = jax.random.bernoulli(k_label, 0.5, (BATCH,)).astype(jnp.int32)
  group = jnp.arange(CHANNELS) < CHANNELS // 2  # (channels,)
  high = group[None, :] == (labels[:, None] == 0)  # (batch, channels)
  rates = jnp.where(high, 0.4, 0.05)[:, None, :]
  cue = jax.random.bernoulli(k_spikes, rates, (BATCH, CUE, CHANNELS))
  silence = jnp.zeros((BATCH, DELAY, CHANNELS), bool)
  return jnp.concatenate([cue, silence], axis=1).astype(jnp.float32), labels


class Net(nn.Module):
  @nn.compact
  def __call__(self, xs):  # (batch, time, channels) -> (batch, time, 2)
    zs = nn.RNN(fe.ALIF(64, tau_adapt=100.0, beta=0.1))(xs)
    return nn.RNN(fe.LI(2, use_bias=True))(zs)


def loss_fn(params, xs, labels):
  logits = Net().apply(params, xs)[:, -5:].mean(axis=1)  # last 5 steps
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss.mean(), (logits.argmax(-1) == labels).mean()


def main(steps=300, seed=0):
  key, init_key = jax.random.split(jax.random.key(seed))
  params = Net().init(init_key, make_batch(key)[0])
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, key):
    xs, labels = make_batch(key)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, accuracy), grads = grad_fn(params, xs, labels)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  for step in range(steps + 1):
    key, batch_key = jax.random.split(key)
    params, opt_state, loss, accuracy = train_step(params, opt_state, batch_key)
    if step % 25 == 0:
      print(f'step {step:4d}  loss {loss:.4f}  accuracy {accuracy:.2f}')
  return float(loss), float(accuracy)


if __name__ == '__main__':
  main()
