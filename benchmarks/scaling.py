"""Scaling benchmark: online e-prop vs BPTT, naive dense e-prop and RTRL.

Run from the repository root::

  python -m benchmarks.scaling [--quick] [--out DIR] [--reps N]
      [--kinds lif alif cuba] [--sections headline time features dense]

For each configuration every method is compiled once (its working memory
is the compiled program's ``temp_size_in_bytes``), then timed in
interleaved repetitions (method A, B, C, A, B, C, ...), so that the ratios
compare calls made under the same load. Reported: the median time per
training step (one call over the whole sequence), the median of the
per-repetition ratios to the library's BPTT and to a user's BPTT, the
working memory and the layer's spike rate. Every method returns all it
computes (loss, gradients, the advanced state), which the timing keeps
live: XLA drops work whose result is discarded.

Sections:

* ``headline``: 700 -> 256 recurrent, batch 32, T = 100 (the targets of
  DESIGN.md section 5), e-prop at several chunks and as one call from rest
  (``eprop_from_rest``: no state passed, nothing kept);
* ``time``: T from 10 to 4000 at 128 neurons (memory flat in T for e-prop,
  linear for BPTT);
* ``features``: 32 to 1024 neurons at T = 1000;
* ``dense``: a small layer where naive dense e-prop (`benchmarks.naive`)
  and RTRL (``OnlineGrad(mode='exact')``) fit in memory.

Writes ``results.md`` (a Markdown table per section), ``results.json`` and
PNG plots (matplotlib, Agg backend) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import jax

from benchmarks import models, naive, plots

COLUMNS = (
  'section', 'kind', 'in', 'features', 'batch', 'T', 'method', 'chunk',
  'time_ms', 'vs_bptt', 'vs_user_bptt', 'memory_mb', 'spike_rate',
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
  """One problem size and the methods measured on it."""

  section: str
  kind: str
  in_features: int
  features: int
  batch: int
  time: int
  chunks: tuple[int, ...]
  dense: bool = False  # naive dense e-prop and RTRL too


def configs(
  quick: bool, kinds, sections, times=(10, 100, 250, 1000, 4000),
  features=(32, 128, 512, 1024),
) -> list[Config]:  # fmt: skip
  """The configurations of each section. ``quick``: small sizes, and the
  ``time`` and ``features`` sweeps for the first kind only."""
  out = []
  for n, kind in enumerate(kinds):
    if quick:
      sweep = n == 0
      table = dict(
        headline=[Config('headline', kind, 100, 64, 8, 50, (10, 50))],
        time=[Config('time', kind, 32, 32, 4, t, (10,)) for t in (20, 80)],
        features=[
          Config('features', kind, 32, f, 4, 40, (20,)) for f in (16, 64)
        ],
        dense=[Config('dense', kind, 8, 16, 2, 10, (10,), dense=True)],
      )
      table['time'] = table['time'] * sweep
      table['features'] = table['features'] * sweep
    else:
      table = dict(
        headline=[Config('headline', kind, 700, 256, 32, 100, (25, 50, 100))],
        time=[Config('time', kind, 140, 128, 16, t, (50,)) for t in times],
        features=[
          Config('features', kind, 140, f, 16, 1000, (50,)) for f in features
        ],
        dense=[Config('dense', kind, 32, 128, 2, 20, (20,), dense=True)],
      )
    for section in sections:
      out += table[section]
  return out


def methods(cfg: Config, p: models.Problem) -> dict[str, tuple]:
  """``name -> (step function, chunk or None)`` for one configuration."""
  found = {
    'bptt': (models.bptt_step(p), None),
    'user_bptt': (models.user_bptt_step(p), None),
  }
  for c in cfg.chunks:
    found[f'eprop/{c}'] = (models.eprop_step(p, min(c, cfg.time)), c)
  if cfg.section == 'headline':
    found['eprop_from_rest'] = (models.sequence_step(p), cfg.time)
  if cfg.dense:
    found['naive_dense'] = (naive.naive_step(p), None)
    exact = models.problem(
      cfg.kind, cfg.features, cfg.in_features, cfg.batch, cfg.time,
      mode='exact',
    )  # fmt: skip
    rtrl = models.eprop_step(exact, cfg.time)
    found['rtrl'] = (_with_state(rtrl, exact), cfg.time)
  return found


def _with_state(step: Callable, p: models.Problem) -> Callable:
  """``step`` run on ``p``'s own state (RTRL's traces differ in shape)."""
  return lambda params, state, xs, ys: step(params, p.state, xs, ys)


def compile_all(fns: dict, args) -> dict:
  """``name -> (compiled, working memory in MB)``."""
  out = {}
  for name, fn in fns.items():
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis().temp_size_in_bytes / 2**20
    out[name] = (compiled, memory)
  return out


def interleaved(compiled: dict, args, reps: int) -> dict[str, list[float]]:
  """Seconds per call of each function, ``reps`` interleaved rounds after
  one warm-up round; every output is waited for."""
  times = {name: [] for name in compiled}
  for r in range(reps + 1):
    for name, fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      if r:
        times[name].append(time.perf_counter() - start)
  return times


def measure(cfg: Config, reps: int) -> list[dict]:
  """The table rows of one configuration."""
  p = models.problem(
    cfg.kind, cfg.features, cfg.in_features, cfg.batch, cfg.time
  )
  found = methods(cfg, p)
  args = (p.params, p.state, p.xs, p.ys)
  compiled = compile_all({k: f for k, (f, _) in found.items()}, args)
  times = interleaved({k: c for k, (c, _) in compiled.items()}, args, reps)
  rate = models.spike_rate(p)
  ratio = lambda name, ref: statistics.median(
    a / b for a, b in zip(times[name], times[ref])
  )
  rows = []
  for name, (_, chunk) in found.items():
    rows.append(
      dict(
        section=cfg.section,
        kind=cfg.kind,
        features=cfg.features,
        batch=cfg.batch,
        T=cfg.time,
        method=name.split('/')[0],
        chunk=chunk,
        time_ms=1e3 * statistics.median(times[name]),
        vs_bptt=ratio(name, 'bptt'),
        vs_user_bptt=ratio(name, 'user_bptt'),
        memory_mb=compiled[name][1],
        spike_rate=rate,
        **{'in': cfg.in_features},
      )
    )
  return rows


def markdown(rows: list[dict]) -> str:
  """One Markdown table per section."""
  fmt = dict(
    time_ms='{:.3g}', vs_bptt='{:.2f}x', vs_user_bptt='{:.2f}x',
    memory_mb='{:.3g}', spike_rate='{:.3f}',
  )  # fmt: skip
  cell = lambda k, v: '-' if v is None else fmt.get(k, '{}').format(v)
  lines = []
  for section in dict.fromkeys(r['section'] for r in rows):
    lines += [f'### {section}', '', '| ' + ' | '.join(COLUMNS) + ' |']
    lines.append('|' + '---|' * len(COLUMNS))
    for r in rows:
      if r['section'] == section:
        lines.append('| ' + ' | '.join(cell(k, r[k]) for k in COLUMNS) + ' |')
    lines.append('')
  return '\n'.join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='small sizes')
  parser.add_argument('--out', default='benchmark-results')
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--kinds', nargs='+', default=list(models.KINDS))
  parser.add_argument(
    '--sections',
    nargs='+',
    default=['headline', 'time', 'features', 'dense'],
  )
  parser.add_argument(
    '--times',
    nargs='+',
    type=int,
    default=[10, 100, 250, 1000, 4000],
    help='sequence lengths of the time section (full mode)',
  )
  parser.add_argument(
    '--features',
    nargs='+',
    type=int,
    default=[32, 128, 512, 1024],
    help='layer sizes of the features section (full mode)',
  )
  args = parser.parse_args(argv)
  if args.reps < 1:
    parser.error(f'--reps: expected a positive int, got {args.reps}.')
  os.makedirs(args.out, exist_ok=True)
  rows = []
  found = configs(
    args.quick, args.kinds, args.sections, args.times, args.features
  )
  for cfg in found:
    start = time.perf_counter()
    rows += measure(cfg, args.reps)
    print(
      f'{cfg.section} {cfg.kind} in={cfg.in_features} F={cfg.features} '
      f'B={cfg.batch} T={cfg.time}: {time.perf_counter() - start:.1f} s',
      flush=True,
    )
    _write(args.out, rows)
  print(markdown(rows))
  return rows


def _write(out: str, rows: list[dict]) -> None:
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown(rows))
  plots.write(out, rows)


if __name__ == '__main__':
  main()
