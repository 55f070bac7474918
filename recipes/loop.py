"""The training loop: epochs of jitted steps, metrics, checkpoints, resume."""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings

import jax
import numpy as np
from tqdm import tqdm

import flax_eprop as fe
from recipes import pipeline
from recipes.checkpoint import Checkpoints
from recipes.report import MetricsLog
from recipes.steps import (
  make_optimizer,
  make_train_step,
  replicated,
  rest_state_for,
  to_global,
)
from recipes.train import NonFiniteError, Run, fe_data
from recipes.visualize import write_plots

_ACC_KEYS = ('steps', 'loss', 'penalty', 'correct', 'examples', 'spikes', 'valid_steps',
             'grad_norm')  # fmt: skip
# Options that may change between a run and its resumption without changing
# the numbers it computes.
_COSMETIC = ('progress', 'plots', 'log_every', 'checkpoint_every',
             'keep_checkpoints', 'eval_batch_size', 'distributed', 'data_dir')  # fmt: skip


def _zeros() -> dict:
  return {k: 0 for k in _ACC_KEYS}


def _say(message: str) -> None:
  tqdm.write(message, file=sys.stderr)


class Trainer:
  """Trains ``run.model`` on ``run.splits`` as ``run.config`` says."""

  def __init__(self, run: Run):
    self.run, c = run, run.config
    self.config = c
    self.it = fe_data().BatchIterator(
      run.splits.train,
      c.batch_size,
      seed=c.seed,
      drop_remainder=True,
      transform=pipeline.augmentation(c),  # seeded from (seed, epoch, cursor)
    )
    self.steps_per_epoch = self.it.num_batches
    self.total_steps = c.epochs * self.steps_per_epoch
    self.tx = make_optimizer(c, self.total_steps)
    self.train_step = make_train_step(
      run.model, c, self.tx, run.mesh, run.shape[0]
    )
    self.rest = rest_state_for(
      run.model, run.params, (c.batch_size, *run.shape), run.mesh
    )
    self.neurons = c.layers * c.features
    self.step_times: list[float] = []

  def fit(self) -> dict:
    start = time.perf_counter()
    checkpoints = Checkpoints(self.run.workdir, self.config.keep_checkpoints)
    try:
      params, opt_state, meta = self._restore_or_start(checkpoints)
      if self.run.lead:  # the options --evaluate starts from
        path = self.run.workdir / 'config.json'
        path.write_text(json.dumps(self.config.to_dict(), indent=1))
      params, opt_state, meta = self._train(
        checkpoints, params, opt_state, meta
      )
      checkpoints.wait()
      return self._finish(checkpoints, meta, time.perf_counter() - start)
    finally:
      checkpoints.wait()
      checkpoints.close()

  def _fresh_meta(self) -> dict:
    c = self.config
    return {
      'step': 0,
      'epoch': 0,
      'iterator': self.it.state_dict(),
      'rng': np.asarray(jax.random.key_data(jax.random.key(c.seed))).tolist(),
      'window': _zeros(),
      'epoch_sums': _zeros(),
      'best_valid_accuracy': None,
      'best_epoch': None,
      'skipped_steps': 0,
      'initial_rate_hz': None,
      'peak_rate_hz': 0.0,
      'config': c.to_dict(),
      'version': fe.__version__,
    }

  def _restore_or_start(self, checkpoints: Checkpoints):
    run, c = self.run, self.config
    opt_state = jax.jit(self.tx.init, out_shardings=replicated(run.mesh))(
      run.params
    )
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {'params': run.params, 'opt_state': opt_state},
    )
    restored = checkpoints.restore_latest(abstract)
    path = run.workdir / 'metrics.jsonl'
    if restored is None:
      meta = self._fresh_meta()
      self.log = MetricsLog(path, None, enabled=run.lead)
      init = run.evaluate_split(run.params, run.splits.valid)
      meta['initial_rate_hz'] = init['rate_hz']
      meta['peak_rate_hz'] = init['rate_hz']
      self.log.write({
        'kind': 'init', 'step': 0, 'valid_loss': init['loss'],
        'valid_accuracy': init['accuracy'], 'rate_hz': init['rate_hz'],
      })  # fmt: skip
      _say(
        f'initial firing rate {init["rate_hz"]:.1f} Hz (validation set, '
        f'before training); validation: {run.splits.valid_source}'
      )
      return run.params, opt_state, meta
    state, meta = restored
    changed = {
      k: (meta['config'].get(k), v)
      for k, v in c.to_dict().items()
      if k not in _COSMETIC and meta['config'].get(k) != v
    }
    if changed:
      warnings.warn(
        f'resuming a run saved with other options {changed} '
        '(saved, now): the result will differ from an uninterrupted run.',
        stacklevel=2,
      )
    self.it.load_state_dict(meta['iterator'])
    self.log = MetricsLog(path, meta['step'], enabled=run.lead)
    _say(f'resumed from step {meta["step"]} (epoch {meta["epoch"]})')
    return state['params'], state['opt_state'], meta

  def _train(self, checkpoints, params, opt_state, meta):
    c = self.config
    while meta['epoch'] < c.epochs:
      epoch = meta['epoch']
      done = self.it.cursor // c.batch_size
      bar = tqdm(
        total=self.steps_per_epoch,
        initial=done,
        desc=f'epoch {epoch + 1}/{c.epochs}',
        unit='step',
        disable=not (c.progress and self.run.lead),
        file=sys.stderr,
        dynamic_ncols=True,
      )
      with bar:
        while self.it.epoch == epoch:
          params, opt_state = self._step(
            checkpoints, params, opt_state, meta, bar
          )
          if self.it.epoch != epoch:
            self._end_epoch(checkpoints, params, meta)
          if self._save_now(meta) or self.it.epoch != epoch:
            self._save(checkpoints, params, opt_state, meta)
    return params, opt_state, meta

  def _save_now(self, meta) -> bool:
    every = self.config.checkpoint_every
    return bool(every) and meta['step'] % every == 0

  def _save(self, checkpoints, params, opt_state, meta, iterator=None):
    # A deep copy: the save is asynchronous and ``meta`` changes next step.
    meta = copy.deepcopy(dict(meta, iterator=iterator or self.it.state_dict()))
    checkpoints.save(
      meta['step'], {'params': params, 'opt_state': opt_state}, meta
    )

  def _step(self, checkpoints, params, opt_state, meta, bar):
    c = self.config
    t0 = time.perf_counter()
    epoch = self.it.epoch
    position = self.it.state_dict()
    batch = next(self.it)
    new_params, new_opt, m = self.train_step(
      params, opt_state, self.rest, to_global(batch, self.run.mesh)
    )
    m = jax.device_get(m)
    self.step_times.append(time.perf_counter() - t0)
    if not m['ok']:
      what = f'loss {float(m["loss"])}, gradient norm {float(m["grad_norm"])}'
      if c.on_nonfinite == 'stop':
        self._save(checkpoints, params, opt_state, meta, iterator=position)
        checkpoints.wait()
        raise NonFiniteError(
          f'step {meta["step"] + 1} (epoch {epoch + 1}): non-finite {what}; '
          f'the step was refused and the last good state saved as checkpoint '
          f'step {meta["step"]}. Lower --learning-rate or --clip-norm, or '
          'pass --on-nonfinite skip to skip such steps.'
        )
      meta['skipped_steps'] += 1
      _say(
        f'step {meta["step"] + 1}: non-finite {what}; step refused, state '
        f'kept ({meta["skipped_steps"]} skipped so far).'
      )
    meta['step'] += 1
    if m['ok']:
      for sums in (meta['window'], meta['epoch_sums']):
        sums['steps'] += 1
        sums['loss'] += float(m['loss']) - float(m['penalty'])
        sums['penalty'] += float(m['penalty'])
        sums['correct'] += int(m['correct'])
        sums['examples'] += len(batch['y'])
        sums['spikes'] += float(m['spikes'])
        sums['valid_steps'] += int(m['valid_steps'])
        sums['grad_norm'] += float(m['grad_norm'])
    if meta['step'] % c.log_every == 0:
      self._log_window(meta)
    bar.update(1)
    w = meta['epoch_sums']
    if w['steps']:
      bar.set_postfix(
        loss=f'{w["loss"] / w["steps"]:.3f}',
        acc=f'{w["correct"] / w["examples"]:.3f}',
        rate=f'{self._rate(w):.1f}Hz',
        refresh=False,
      )
    return new_params, new_opt

  def _rate(self, sums) -> float:
    steps = max(sums['valid_steps'], 1) * self.neurons
    return sums['spikes'] / steps / self.config.dt

  def _means(self, sums) -> dict:
    n = max(sums['steps'], 1)
    return {
      'loss': sums['loss'] / n,
      'penalty': sums['penalty'] / n,
      'accuracy': sums['correct'] / max(sums['examples'], 1),
      'rate_hz': self._rate(sums),
      'grad_norm': sums['grad_norm'] / n,
    }

  def _log_window(self, meta) -> None:
    w = meta['window']
    if w['steps']:
      means = self._means(w)
      meta['peak_rate_hz'] = max(meta['peak_rate_hz'], means['rate_hz'])
      recent = self.step_times[-w['steps'] :][1:] or self.step_times[-1:]
      self.log.write({
        'kind': 'train', 'step': meta['step'], 'epoch': meta['epoch'] + 1,
        **{f'train_{k}': v for k, v in means.items()},
        'skipped_steps': meta['skipped_steps'],
        'steps_per_s': len(recent) / max(sum(recent), 1e-9),
      })  # fmt: skip
    meta['window'] = _zeros()

  def _end_epoch(self, checkpoints, params, meta) -> None:
    run = self.run
    self._log_window(meta)
    valid = run.evaluate_split(params, run.splits.valid)
    train = self._means(meta['epoch_sums'])
    meta['peak_rate_hz'] = max(meta['peak_rate_hz'], train['rate_hz'])
    epoch = meta['epoch'] + 1
    best = meta['best_valid_accuracy']
    if best is None or valid['accuracy'] > best:
      meta['best_valid_accuracy'], meta['best_epoch'] = valid['accuracy'], epoch
      checkpoints.save_best(
        meta['step'],
        params,
        {'step': meta['step'], 'epoch': epoch,
         'valid_accuracy': valid['accuracy'],
         'config': self.config.to_dict(), 'version': fe.__version__},
      )  # fmt: skip
    self.log.write({
      'kind': 'epoch', 'step': meta['step'], 'epoch': epoch,
      **{f'train_{k}': v for k, v in train.items()},
      'valid_loss': valid['loss'], 'valid_accuracy': valid['accuracy'],
      'valid_rate_hz': valid['rate_hz'],
      'best_valid_accuracy': meta['best_valid_accuracy'],
      'skipped_steps': meta['skipped_steps'],
    })  # fmt: skip
    _say(
      f'epoch {epoch}: train loss {train["loss"]:.4f} accuracy '
      f'{train["accuracy"]:.3f} rate {train["rate_hz"]:.1f} Hz | valid '
      f'accuracy {valid["accuracy"]:.3f} (best {meta["best_valid_accuracy"]:.3f})'
    )
    meta['epoch'] = epoch
    meta['epoch_sums'] = _zeros()

  def _finish(self, checkpoints, meta, wall) -> dict:
    run, c = self.run, self.config
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      run.params,
    )
    restored = checkpoints.restore_best(abstract)
    params = restored[0]['params']
    test = run.evaluate_split(params, run.splits.test)
    self.log.write({
      'kind': 'test', 'step': meta['step'], 'test_loss': test['loss'],
      'test_accuracy': test['accuracy'], 'test_rate_hz': test['rate_hz'],
      'best_epoch': meta['best_epoch'],
    })  # fmt: skip
    times = self.step_times[1:]  # the first step of a process compiles
    summary = {
      'dataset': 'files' if c.train_file else c.dataset,
      'algorithm': c.algorithm,
      'test_accuracy': test['accuracy'],
      'best_valid_accuracy': meta['best_valid_accuracy'],
      'best_epoch': meta['best_epoch'],
      'epochs': meta['epoch'],
      'steps': meta['step'],
      'wall_time_s': wall,
      'seconds_per_epoch': (
        float(np.mean(times)) * self.steps_per_epoch if times else None
      ),
      'initial_rate_hz': meta['initial_rate_hz'],
      'peak_rate_hz': meta['peak_rate_hz'],
      'test_rate_hz': test['rate_hz'],
      'skipped_steps': meta['skipped_steps'],
      'devices': run.mesh.size,
    }
    if run.lead:
      if c.plots:
        write_plots(run, params, test['pred'])
      (run.workdir / 'summary.json').write_text(json.dumps(summary, indent=1))
      print(json.dumps(summary), flush=True)
    return summary
