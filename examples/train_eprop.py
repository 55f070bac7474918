"""Train a recurrent ALIF network online with e-prop on a toy memory task.

The task of ``train_bptt.py`` with a recall cue (as in Bellec et al.'s
store-recall task): two groups of input channels fire at different rates for
the first 20 steps; after a 30-step delay a recall channel group fires for 5
steps, during which the network must say which group fired more. The ALIF
layer is wrapped in ``fe.OnlineGrad`` and ``fe.online_update`` feeds each
sequence in chunks, updating the weights after every chunk. Prints the loss
and accuracy as they improve: ``python examples/train_eprop.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import flax_eprop as fe

BATCH, CUE, DELAY, RECALL, CHANNELS = 64, 20, 25, 5, 20
TIME = CUE + DELAY + RECALL
WEIGHT = (jnp.arange(TIME) >= TIME - RECALL).astype(jnp.float32)


def make_batch(key):
  """xs: (batch, time, channels + 10) spikes; labels: (batch,) in {0, 1}."""
  k_label, k_spikes = jax.random.split(key)
  labels = jax.random.bernoulli(k_label, 0.5, (BATCH,)).astype(jnp.int32)
  group = jnp.arange(CHANNELS) < CHANNELS // 2  # (channels,)
  high = group[None, :] == (labels[:, None] == 0)  # (batch, channels)
  cue = (
    jnp.where(high, 0.4, 0.05)[:, None, :]
    * (jnp.arange(TIME) < CUE)[None, :, None]
  )
  recall = jnp.broadcast_to(WEIGHT[None, :, None] * 0.4, (BATCH, TIME, 10))
  rates = jnp.concatenate([cue + 0.01, recall], axis=-1)
  return jax.random.bernoulli(k_spikes, rates).astype(jnp.float32), labels


class Net(nn.Module):
  @nn.compact
  def __call__(self, xs):  # (batch, time, channels) -> (batch, time, 2)
    zs = fe.OnlineGrad(fe.ALIF(64, tau_adapt=100.0, beta=0.1))(xs)
    return nn.Dense(2)(zs)


def step_loss(logits, target):  # one example, one step
  label, weight = target
  return weight * optax.softmax_cross_entropy_with_integer_labels(logits, label)


def main(steps=300, seed=0, chunk=25):
  key, init_key = jax.random.split(jax.random.key(seed))
  variables = Net().init(init_key, make_batch(key)[0])
  params = variables.pop('params')
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)
  update = fe.online_update(Net().apply, step_loss, optimizer, chunk=chunk)

  @jax.jit
  def train_step(params, opt_state, key):
    xs, labels = make_batch(key)
    targets = (
      jnp.repeat(labels[:, None], TIME, 1),
      jnp.broadcast_to(WEIGHT, (len(labels), TIME)),
    )
    state = fe.reset_state(variables)  # each sequence starts from rest
    (loss, aux), params, opt_state, _ = update(
      params, opt_state, state, xs, targets
    )
    logits = Net().apply({'params': params, **state}, xs, mutable=True)[0]
    accuracy = (logits[:, -5:].mean(1).argmax(-1) == labels).mean()
    return params, opt_state, loss / 5, accuracy

  for step in range(steps + 1):
    key, batch_key = jax.random.split(key)
    params, opt_state, loss, accuracy = train_step(params, opt_state, batch_key)
    if step % 25 == 0:
      print(f'step {step:4d}  loss {loss:.4f}  accuracy {accuracy:.2f}')
  return float(loss), float(accuracy)


if __name__ == '__main__':
  main()
