"""The recipe's network: spiking layers under `fe.OnlineGrad` and a readout.

One model for both algorithms: e-prop differentiates it with
`fe.online_value_and_grad`, BPTT with `fe.bptt_value_and_grad`, on the same
params tree (so a checkpoint serves both).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import flax_eprop as fe
from recipes.config import Config

PROBS = 'prob_sum'  # sown into fe.METRICS: the softmax summed over time


def _normal(scale: float, fan_in: int):
  return nn.initializers.normal(scale / math.sqrt(fan_in))


class Network(nn.Module):
  """Spiking layers and a readout, ``xs: (batch, time, channels)`` ->
  ``logits: (batch, time, classes)``.

  Sows, into ``fe.METRICS``, ``prob_sum: (batch, classes)``: the readout's
  softmax summed over the valid steps (the prediction is its argmax).

  Attributes:
    config: the recipe's options (model fields).
    num_classes: the number of classes.
  """

  config: Config
  num_classes: int

  @nn.compact
  def __call__(self, xs: jax.Array, mask: jax.Array | None = None):
    c = self.config
    dt_ms = c.dt * 1000.0
    x = jnp.asarray(xs, jnp.float32)  # spike counts arrive as uint8
    rate = None if c.target_rate_hz is None else c.target_rate_hz * c.dt
    for i in range(c.layers):
      fan_in = x.shape[-1]
      kwargs = dict(
        recurrent=c.recurrent,
        dt=dt_ms,
        tau_mem=c.tau_mem_ms,
        kernel_init=_normal(c.input_scale, fan_in),
        recurrent_kernel_init=_normal(c.recurrent_scale, c.features),
        name=f'layer_{i}',
      )
      if c.neuron == 'ALIF':
        kwargs.update(tau_adapt=c.tau_adapt_ms, beta=c.beta)
      cell = (fe.ALIF if c.neuron == 'ALIF' else fe.LIF)(c.features, **kwargs)
      decay = None  # the top layer's filter: the LI readout's decay
      if i == c.layers - 1 and c.readout == 'LI' and c.filtered_signal:
        decay = math.exp(-dt_ms / c.tau_readout_ms)
      layer = fe.OnlineGrad(
        cell,
        readout_decay=decay,
        target_rate=rate,
        rate_coefficient=c.rate_coefficient,
        name=f'spikes_{i}',
      )
      x = layer(x, mask=mask)
    readout_init = _normal(c.readout_scale, c.features)
    if c.readout == 'LI':
      cell = fe.LI(
        self.num_classes,
        dt=dt_ms,
        tau_mem=c.tau_readout_ms,
        form=c.readout_form,
        use_bias=True,
        kernel_init=readout_init,
        name='readout',
      )
      logits = fe.OnlineGrad(cell, name='leaky_readout')(x, mask=mask)
    else:
      logits = nn.Dense(self.num_classes, kernel_init=readout_init,
                        name='readout')(x)  # fmt: skip
    probs = jax.nn.softmax(logits)
    if mask is not None:
      probs = probs * mask[..., None]
    add = dict(init_fn=lambda: 0.0, reduce_fn=lambda a, b: a + b)
    self.sow(fe.METRICS, PROBS, jnp.sum(probs, axis=-2), **add)
    return logits


def spike_counts(aux: dict, layers: int) -> jax.Array:
  """The hidden layers' total spike count from a training step's ``aux``."""
  sums = aux['output_sum']
  return sum(sums[f'spikes_{i}']['output_sum'] for i in range(layers))


def rest_state(model: Network, params, xs, mask=None) -> dict:
  """The carry and traces at rest for a batch shaped like ``xs``.

  Args:
    model: the network.
    params: its parameters.
    xs: ``(batch, time, channels)`` inputs (only the shape matters).
    mask: optional ``(batch, time)``.

  Returns:
    ``{'carry': ..., 'eligibility': ...}`` (`fe.rest_state`).
  """
  return fe.rest_state(model.apply, params, xs, mask=mask)
