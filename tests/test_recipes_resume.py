"""SIGKILL at any moment, restart: the same params and metrics, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from recipe_helpers import (
  ROOT,
  assert_bitwise_equal,
  latest_state,
  metrics_without_timing,
  tiny_args,
)

OPTIONS = dict(
  epochs=4, checkpoint_every=1, keep_checkpoints=2, log_every=1,
  features=48, max_time=1.0,
)  # fmt: skip


def _start(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen(
    [sys.executable, '-m', 'recipes.shd', *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(process):
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _train_lines(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return [r for r in lines if r['kind'] == 'train']


def _kill_when(process, condition, what):
  deadline = time.monotonic() + 300
  while not condition():
    assert process.poll() is None, f'the run ended before {what}'
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
  process.send_signal(signal.SIGKILL)
  process.communicate()  # reaps it and closes its pipes


@pytest.mark.slow
def test_sigkill_mid_epoch_and_during_save_resumes_exactly(tmp_path):
  reference = tmp_path / 'reference'
  expected = _finish(_start(tiny_args(tmp_path, reference, **OPTIONS)))
  assert expected['steps'] == 16  # 4 steps per epoch

  workdir = tmp_path / 'run'
  args = tiny_args(tmp_path, workdir, **OPTIONS)
  process = _start(args)
  _kill_when(  # mid-epoch: just after step 2 of 4 was logged
    process,
    lambda: any(r['step'] >= 2 for r in _train_lines(workdir)),
    'step 2',
  )
  killed_at = max(r['step'] for r in _train_lines(workdir))
  assert killed_at % 4 != 0  # inside the first epoch

  checkpoints = workdir / 'checkpoints'

  def saving():
    try:
      names = os.listdir(checkpoints)
    except FileNotFoundError:
      return False
    return any('tmp' in name for name in names)

  process = _start(args)
  _kill_when(process, saving, 'a save in progress')
  assert saving()  # a half-written checkpoint is left behind

  result = _finish(_start(args))
  assert result['steps'] == expected['steps']
  assert result['test_accuracy'] == expected['test_accuracy']
  assert result['best_valid_accuracy'] == expected['best_valid_accuracy']
  step, state = latest_state(workdir)
  ref_step, ref_state = latest_state(reference)
  assert step == ref_step == 16
  assert_bitwise_equal(state, ref_state)
  assert metrics_without_timing(workdir) == metrics_without_timing(reference)
