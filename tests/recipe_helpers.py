"""Tiny data and readers for the recipe tests: ``from recipe_helpers import``."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax_eprop import data
from recipes.report import TIMING_FIELDS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_files(directory, train=48, test=16) -> tuple[str, str]:
  """A small synthetic-shd train/test pair written in the SHD layout."""
  directory = pathlib.Path(directory)
  paths = [
    data.make_synthetic(split, num_samples=n, directory=directory)
    for split, n in (('train', train), ('test', test))
  ]
  return str(paths[0]), str(paths[1])


def tiny_args(tmp_path, workdir=None, **options) -> list[str]:
  """CLI arguments of a tiny, fast run (70 channels, T=30, 16 neurons)."""
  train, test = tiny_files(tmp_path / 'files')
  values = {
    'train_file': train,
    'test_file': test,
    'data_dir': str(tmp_path / 'data'),
    'max_time': 0.3,
    'pool': 10,
    'features': 16,
    'batch_size': 8,
    'eval_batch_size': 16,
    'epochs': 1,
    'checkpoint_every': 2,
    'log_every': 2,
    'valid_fraction': 0.2,
    'learning_rate': 0.01,
    'progress': False,
    'plots': False,
  }
  values.update(options)
  args = ['--workdir', str(workdir or tmp_path / 'run')]
  for key, value in values.items():
    flag = '--' + key.replace('_', '-')
    if isinstance(value, bool):
      args.append(flag if value else '--no-' + flag[2:])
    else:
      args += [flag, str(value)]
  return args


def latest_state(workdir) -> tuple[int, dict]:
  """The newest checkpoint's step and arrays (numpy), read with orbax."""
  root = pathlib.Path(workdir) / 'checkpoints'
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  path = root / str(steps[-1]) / 'state'
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
  )  # on one device, whatever the mesh it was saved from
  return steps[-1], checkpointer.restore(path, target)


def metrics_without_timing(workdir) -> list[dict]:
  """The records of ``metrics.jsonl`` without their timing fields."""
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return [
    {k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records
  ]


def assert_bitwise_equal(a: dict, b: dict) -> None:
  """Every leaf of two nested dicts of arrays is bit-for-bit the same."""
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(flat_a) == len(flat_b)
  for path, leaf in flat_a:
    other = flat_b[path]
    assert np.asarray(leaf).tobytes() == np.asarray(other).tobytes(), (
      f'{jax.tree_util.keystr(path)} differs'
    )
