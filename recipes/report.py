"""What a run leaves in its workdir: ``metrics.jsonl`` and PNG plots.

``metrics.jsonl`` holds one JSON object per line, each with the global
``step`` it belongs to and a ``kind``: ``'train'`` (a window of
``log_every`` steps), ``'epoch'`` (a finished epoch: training means and the
validation result), ``'init'`` (the network before training) and
``'test'``. Timing fields (``time``, ``steps_per_s``, ``seconds``) are the
only ones that differ between an interrupted-and-resumed run and an
uninterrupted one: on resume, the lines after the restored step are
dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TIMING_FIELDS = ('time', 'steps_per_s', 'seconds')


class MetricsLog:
  """Appends JSON lines to ``<workdir>/metrics.jsonl``.

  Args:
    path: the file.
    keep_through_step: on resume, keep lines with ``step`` up to this (the
      restored checkpoint's step) and drop the rest (and any torn last
      line); None: start a new file.
    enabled: False on processes other than the first.
  """

  def __init__(self, path: Path, keep_through_step: int | None, enabled=True):
    self.path, self.enabled = Path(path), enabled
    if not enabled:
      return
    kept = []
    if keep_through_step is not None and self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          break  # a line torn by a kill
        if record.get('step', 0) > keep_through_step:
          break
        if record.get('kind') == 'test':  # written again at the end
          continue
        kept.append(line)
    tmp = self.path.with_name(self.path.name + '.tmp')
    tmp.write_text(''.join(line + '\n' for line in kept))
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()


def read_metrics(path: Path) -> list[dict]:
  """The records of a ``metrics.jsonl``."""
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_curves(records: list[dict], path: Path) -> None:
  """Learning curves: loss and accuracy per epoch, train and validation."""
  plt = _pyplot()
  epochs = [r for r in records if r['kind'] == 'epoch']
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  e = [r['epoch'] for r in epochs]
  for split in ('train', 'valid'):
    ax_loss.plot(e, [r[f'{split}_loss'] for r in epochs], 'o-', label=split)
    ax_acc.plot(e, [r[f'{split}_accuracy'] for r in epochs], 'o-', label=split)
  ax_loss.set(xlabel='epoch', ylabel='loss (cross-entropy per step)')
  ax_acc.set(xlabel='epoch', ylabel='accuracy', ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_raster(x, spikes: list, logits, label: int, dt: float, path: Path):
  """One sample: input spikes, each layer's spikes, readout over time.

  Args:
    x: ``(T, C)`` input counts.
    spikes: per layer ``(T, features)``.
    logits: ``(T, classes)`` readout.
    label: the true class.
    dt: the time step (s).
    path: the PNG file.
  """
  plt = _pyplot()
  rows = 2 + len(spikes)
  fig, axes = plt.subplots(rows, 1, figsize=(8, 2.2 * rows), sharex=True)
  t = np.arange(len(x)) * dt
  for ax, arr, name in zip(
    axes, [x, *spikes], ['input'] + [f'layer {i}' for i in range(len(spikes))]
  ):
    steps, units = np.nonzero(np.asarray(arr))
    ax.scatter(t[steps], units, s=1, c='k', marker='|')
    ax.set_ylabel(f'{name}\nunit')
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  for k in range(probs.shape[1]):
    style = dict(lw=2, c='C3', label=f'class {k} (true)') if k == label else (
      dict(lw=0.5, c='0.6'))  # fmt: skip
    axes[-1].plot(t, probs[:, k], **style)
  axes[-1].set(xlabel='time (s)', ylabel='readout\nsoftmax', ylim=(0, 1))
  axes[-1].legend(loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_confusion(labels, preds, num_classes: int, path: Path) -> None:
  """The test confusion matrix (rows: true class, columns: predicted)."""
  plt = _pyplot()
  m = np.zeros((num_classes, num_classes), int)
  np.add.at(m, (np.asarray(labels), np.asarray(preds)), 1)
  fig, ax = plt.subplots(figsize=(6, 5))
  im = ax.imshow(m, cmap='Blues')
  fig.colorbar(im, ax=ax)
  acc = np.trace(m) / max(m.sum(), 1)
  ax.set(xlabel='predicted', ylabel='true', title=f'test accuracy {acc:.3f}')
  ticks = np.arange(0, num_classes, max(1, num_classes // 10))
  ax.set_xticks(ticks)
  ax.set_yticks(ticks)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
