"""Data parallel over 4 (forced host) devices == one device."""

import json
import os
import subprocess
import sys

import pytest
from helpers import assert_trees_close
from recipe_helpers import ROOT, latest_state, tiny_args


def _run(args, devices):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )
  done = subprocess.run(
    [sys.executable, '-m', 'recipes.shd', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_four_devices_give_the_params_of_one(tmp_path):
  results = {}
  for devices in (1, 4):
    workdir = tmp_path / f'devices-{devices}'
    summary = _run(tiny_args(tmp_path, workdir), devices)
    assert summary['devices'] == devices and summary['steps'] == 4
    results[devices] = latest_state(workdir)[1]
  assert_trees_close(
    results[4]['params'], results[1]['params'], rtol=1e-4, atol=1e-5
  )
