"""The PNG plots of a finished run: curves, a raster, a confusion matrix."""

from __future__ import annotations

import jax
import numpy as np

import flax_eprop as fe
from recipes.model import rest_state
from recipes.report import (
  plot_confusion,
  plot_curves,
  plot_raster,
  read_metrics,
)


def write_plots(run, params, test_pred) -> list:
  """Writes ``curves.png``, ``raster.png`` and ``confusion.png``.

  Args:
    run: the `recipes.train.Run`.
    params: the evaluated (best) params.
    test_pred: ``(num_test,)`` predicted classes.

  Returns:
    The paths written.
  """
  workdir, c = run.workdir, run.config
  paths = [workdir / n for n in ('curves.png', 'raster.png', 'confusion.png')]
  plot_curves(read_metrics(workdir / 'metrics.jsonl'), paths[0])
  sample = run.splits.test[0]
  x = np.asarray(sample['x'])[None]
  mask = np.asarray(sample['mask'])[None]
  state = rest_state(run.model, params, x, mask)
  with fe.gradient_mode('bptt'):
    logits, variables = run.model.apply(
      {'params': jax.device_get(params), **state},
      x,
      mask=mask,
      mutable=[*state, 'intermediates'],
      capture_intermediates=lambda mdl, _: (
        mdl.name and mdl.name.startswith('spikes_')
      ),
    )
  inter = variables['intermediates']
  spikes = [
    np.asarray(inter[f'spikes_{i}']['__call__'][0][0]) for i in range(c.layers)
  ]
  plot_raster(
    x[0], spikes, np.asarray(logits[0]), int(sample['y']), c.dt, paths[1]
  )
  labels = np.asarray(run.splits.test['y'])
  plot_confusion(labels, test_pred, run.splits.num_classes, paths[2])
  return paths
