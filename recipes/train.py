"""`train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Every random choice derives from ``(seed, epoch, step)``: the initial params
from ``seed``, the batch order from ``(seed, epoch)``, the augmentation of a
batch from ``(seed, epoch, cursor)``. The training step is a pure function of
the state and the batch. So a run restored from a checkpoint continues with
exactly the numbers of a run that never stopped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from recipes import pipeline
from recipes.checkpoint import Checkpoints
from recipes.config import Config
from recipes.model import Network
from recipes.steps import (
  make_eval_step,
  make_mesh,
  replicated,
  rest_state_for,
  to_global,
)


class NonFiniteError(RuntimeError):
  """A NaN/Inf loss or gradient with ``on_nonfinite='stop'``."""


def check_workdir(workdir) -> Path:
  """Creates ``workdir`` if needed; a clear error if it cannot be used."""
  path = Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(
      f'--workdir {workdir}: is a file, not a directory; give a directory '
      '(it is created if missing).'
    )
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PermissionError(f'--workdir {workdir}: cannot be created: {e}') from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(
      f'--workdir {workdir}: is not writable; give a directory you can '
      'write to.'
    )
  return path


class Run:
  """The pieces shared by training and evaluation."""

  def __init__(self, config: Config, workdir):
    self.config = config
    self.workdir = check_workdir(workdir)
    if config.distributed:
      jax.distributed.initialize()
    self.lead = jax.process_index() == 0
    self.splits = pipeline.load_splits(config, progress=config.progress)
    self.mesh = make_mesh()
    self._check_batch_sizes()
    self.model = Network(config, self.splits.num_classes)
    self.shape = (self.splits.steps, self.splits.channels)
    self.params = self._init_params()
    self.eval_step = make_eval_step(self.model, config, self.mesh)
    self.eval_state = rest_state_for(
      self.model, self.params, (config.eval_batch_size, *self.shape), self.mesh
    )

  def _check_batch_sizes(self) -> None:
    c, n = self.config, len(self.splits.train)
    devices = self.mesh.size
    if c.batch_size > n:
      raise ValueError(
        f'--batch-size {c.batch_size} is larger than the {n} training '
        'examples; lower it.'
      )
    for name in ('batch_size', 'eval_batch_size'):
      if getattr(c, name) % devices:
        raise ValueError(
          f'--{name.replace("_", "-")} {getattr(c, name)} must be a multiple '
          f'of the {devices} devices (the batch is split across them).'
        )

  def _init_params(self):
    xs = np.zeros((1, *self.shape), np.float32)
    mask = np.ones((1, self.shape[0]), bool)
    key = jax.random.fold_in(jax.random.key(self.config.seed), 0)
    params = jax.jit(
      lambda k: self.model.init(k, xs, mask=mask)['params'],
      out_shardings=replicated(self.mesh),
    )(key)
    return params

  def evaluate_split(self, params, dataset) -> dict:
    """Loss, accuracy, firing rate and predictions over a whole split."""
    c = self.config
    it = fe_data().BatchIterator(
      dataset, c.eval_batch_size, shuffle=False, columns=('x', 'y', 'mask')
    )
    preds, totals = [], {}
    for batch in it.iter_epoch():
      n = len(batch['y'])
      batch = _pad(batch, c.eval_batch_size)
      out = self.eval_step(params, self.eval_state, to_global(batch, self.mesh))
      preds.append(np.asarray(out.pop('pred'))[:n])
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    neurons = c.layers * c.features
    return {
      'loss': totals['loss_sum'] / totals['count'],
      'accuracy': totals['correct'] / totals['count'],
      'rate_hz': totals['spikes'] / (totals['valid_steps'] * neurons) / c.dt,
      'pred': np.concatenate(preds),
    }


def fe_data():
  from flax_eprop import data

  return data


def _pad(batch: dict, size: int) -> dict:
  n = len(batch['y'])
  out = {'weight': np.zeros(size, np.float32)}
  out['weight'][:n] = 1
  for k, v in batch.items():
    pad = np.zeros((size - n, *v.shape[1:]), v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


def train_and_evaluate(config: Config, workdir) -> dict:
  """Trains as ``config`` says, resuming from the workdir's checkpoint.

  Writes ``metrics.jsonl``, checkpoints and plots to ``workdir``, and
  evaluates the best-by-validation params on the test split at the end.

  Args:
    config: the options.
    workdir: the run's directory (created if missing).

  Returns:
    The summary (also printed as one JSON line and saved as
    ``summary.json``).
  """
  from recipes.loop import Trainer

  return Trainer(Run(config, workdir)).fit()


def evaluate(config: Config, workdir) -> dict:
  """Loads the best checkpoint of ``workdir`` and reports test accuracy."""
  run = Run(config, workdir)
  checkpoints = Checkpoints(run.workdir, config.keep_checkpoints)
  try:
    abstract = jax.tree.map(_abstract, run.params)
    restored = checkpoints.restore_best(abstract)
    if restored is None:
      raise FileNotFoundError(
        f'--workdir {workdir}: no best checkpoint (best/) to evaluate; train '
        'first (without --evaluate).'
      )
    state, meta = restored
    result = run.evaluate_split(state['params'], run.splits.test)
  finally:
    checkpoints.close()
  summary = {
    'test_accuracy': result['accuracy'],
    'test_loss': result['loss'],
    'valid_accuracy': meta['valid_accuracy'],
    'step': meta['step'],
    'epoch': meta['epoch'],
    'rate_hz': result['rate_hz'],
  }
  if run.lead:
    print(json.dumps(summary), file=sys.stdout, flush=True)
  return summary


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
