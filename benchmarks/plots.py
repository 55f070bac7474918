"""PNG plots of the scaling benchmark (matplotlib, Agg backend).

Time per training step and working memory over the sequence length
(``time`` section) and over the number of neurons (``features`` section),
one panel per cell kind, one line per method; log-log axes.
"""

from __future__ import annotations

import os

AXES = {'time': 'T', 'features': 'features'}
VALUES = {'time_ms': 'time per step (ms)', 'memory_mb': 'working memory (MB)'}


def write(out: str, rows: list[dict]) -> list[str]:
  """Writes ``{section}_{value}.png`` for each swept section; returns the
  paths written."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  for section, x in AXES.items():
    sel = [r for r in rows if r['section'] == section]
    kinds = list(dict.fromkeys(r['kind'] for r in sel))
    if not sel:
      continue
    for value, label in VALUES.items():
      fig, axes = plt.subplots(
        1, len(kinds), figsize=(4 * len(kinds), 3.4), squeeze=False
      )
      for ax, kind in zip(axes[0], kinds):
        _panel(ax, [r for r in sel if r['kind'] == kind], x, value)
        ax.set_title(kind)
        ax.set_xlabel(x)
        ax.set_ylabel(label)
      axes[0][0].legend(fontsize=7)
      fig.tight_layout()
      path = os.path.join(out, f'{section}_{value}.png')
      fig.savefig(path, dpi=110)
      plt.close(fig)
      paths.append(path)
  return paths


def _panel(ax, rows, x, value):
  lines = {}
  for r in rows:
    name = r['method'] + (f' (chunk {r["chunk"]})' if r['chunk'] else '')
    lines.setdefault(name, []).append((r[x], r[value]))
  for name, points in lines.items():
    points.sort()
    ax.plot(*zip(*points), marker='o', label=name)
  ax.set_xscale('log')
  ax.set_yscale('log')
