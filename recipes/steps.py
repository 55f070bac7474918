"""Jitted training and evaluation steps, data parallel on a device mesh.

The batch is sharded on the mesh axis ``'data'``; params and optimizer state
are replicated, so XLA sums the gradients across devices. With one device
this is plain `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flax_eprop as fe
from recipes.config import Config
from recipes.model import PROBS, Network, rest_state, spike_counts

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  """A 1-D mesh over every device (all hosts), axis ``'data'``."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def to_global(batch: dict, mesh: Mesh) -> dict:
  """A host's copy of the global batch -> arrays sharded on ``'data'``.

  Every process holds the same global batch (same seed, same order) and
  contributes its own rows.
  """
  sharding = batch_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()

  def put(a):
    a = np.asarray(a)
    rows = a.shape[0] // count
    local = a[index * rows : (index + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, a.shape)

  return {k: put(v) for k, v in batch.items()}


def make_optimizer(config: Config, total_steps: int):
  """Adam(W) with warmup and cosine decay, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0 if config.warmup_steps else config.learning_rate,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=max(total_steps, config.warmup_steps + 1),
    end_value=0.0,
  )
  if config.weight_decay:
    adam = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    adam = optax.adam(schedule)
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


def step_loss(logits: jax.Array, label: jax.Array) -> jax.Array:
  """Cross-entropy of ONE example at ONE step.

  Args:
    logits: ``(classes,)``.
    label: ``()`` int, the class.

  The training functions average it over each sequence's valid steps
  (``time_reduction='mean'``: the loss does not grow with T) and over the
  batch.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def _labels(batch):
  """``y: (B,)`` -> ``(B, T)``, the label at every step."""
  return jnp.broadcast_to(batch['y'][:, None], batch['mask'].shape)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def make_value_and_grad(model: Network, config: Config, steps: int):
  """``f(params, state, batch) -> ((loss, aux), grads)`` of one batch.

  ``config.algorithm`` picks `fe.online_value_and_grad` (e-prop, chunks of
  ``config.chunk`` steps, or the whole sequence ``steps`` when it is 0) or
  `fe.bptt_value_and_grad`; both on the same model and params.
  """
  if config.algorithm == 'eprop':
    value_and_grad = fe.online_value_and_grad(
      model.apply,
      step_loss,
      chunk=config.chunk or steps,
      time_reduction='mean',
    )
  else:
    value_and_grad = fe.bptt_value_and_grad(
      model.apply, step_loss, time_reduction='mean'
    )

  def f(params, state, batch):
    (loss, aux), grads, _ = value_and_grad(
      params, state, batch['x'], _labels(batch), batch['mask']
    )
    return (loss, aux), grads

  return f


def make_train_step(model: Network, config: Config, tx, mesh: Mesh, steps: int):
  """``step(params, opt_state, state, batch) -> (params, opt_state,
  metrics)``: one optimizer step on one batch, from rest.

  ``steps`` is the sequence length T. A step whose loss or gradient is not
  finite is refused: params and optimizer state come back unchanged and
  ``metrics['ok']`` is False.
  """
  value_and_grad = make_value_and_grad(model, config, steps)

  def step(params, opt_state, state, batch):
    (loss, aux), grads = value_and_grad(params, state, batch)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(ok, n, o), new, old
    )
    prob_sum = aux['output_sum'][PROBS]
    metrics = {
      'loss': loss,
      'penalty': aux['penalty'],
      'correct': jnp.sum(jnp.argmax(prob_sum, -1) == batch['y']),
      'spikes': spike_counts(aux, config.layers),
      'valid_steps': jnp.sum(batch['mask']),
      'grad_norm': optax.tree.norm(grads),
      'ok': ok,
    }
    return keep(new_params, params), keep(new_opt, opt_state), metrics

  repl = replicated(mesh)
  return jax.jit(step, out_shardings=(repl, repl, repl))


def make_eval_step(model: Network, config: Config, mesh: Mesh):
  """``step(params, state, batch) -> metrics``: forward pass from rest.

  ``batch`` has a ``weight: (B,)`` column, 0 for padding rows. Returns
  per-example ``pred: (B,)`` and sums over the weighted examples.
  """

  def step(params, state, batch):
    variables = {'params': params, **state}
    with fe.gradient_mode('bptt'):  # a plain forward scan, no traces
      logits, out = model.apply(
        variables,
        batch['x'],
        mask=batch['mask'],
        mutable=[*state, fe.METRICS],
      )
    mask = batch['mask']
    per_step = jax.vmap(jax.vmap(step_loss))(logits, _labels(batch))
    length = jnp.maximum(jnp.sum(mask, axis=1), 1)
    losses = jnp.sum(jnp.where(mask, per_step, 0), axis=1) / length
    metrics = out[fe.METRICS]
    pred = jnp.argmax(metrics[PROBS], -1)
    weight = batch['weight']
    spikes = sum(
      metrics[f'spikes_{i}']['output_sum'] for i in range(config.layers)
    )
    return {
      'pred': pred,
      'loss_sum': jnp.sum(losses * weight),
      'correct': jnp.sum((pred == batch['y']) * weight),
      'count': jnp.sum(weight),
      'spikes': spikes,
      'valid_steps': jnp.sum(batch['mask'] * weight[:, None]),
    }

  return jax.jit(step, out_shardings=replicated(mesh))


def rest_state_for(model: Network, params, batch_shape, mesh: Mesh) -> dict:
  """A rest state for batches ``(B, T, C)``, sharded on ``'data'``."""
  xs = jnp.zeros(batch_shape, jnp.float32)
  mask = jnp.ones(batch_shape[:2], bool)
  make = jax.jit(
    lambda p: rest_state(model, p, xs, mask), out_shardings=batch_sharded(mesh)
  )
  return make(params)
