"""The SHD/SSC recipe: CLI, both algorithms, checkpoints, bad input."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from helpers import assert_trees_close
from recipe_helpers import (
  assert_bitwise_equal,
  latest_state,
  metrics_without_timing,
  tiny_args,
)

from recipes import shd
from recipes.checkpoint import (
  CorruptCheckpointWarning,
  IncompatibleCheckpointError,
)
from recipes.config import Config
from recipes.model import Network, rest_state
from recipes.pipeline import DataError
from recipes.steps import make_value_and_grad
from recipes.train import NonFiniteError


def test_help_lists_every_option_with_its_default(capsys):
  with pytest.raises(SystemExit) as exit_:
    shd.main(['--help'])
  assert exit_.value.code == 0
  text = ' '.join(capsys.readouterr().out.split())
  for flag in ('--dataset', '--train-file', '--test-file', '--valid-file',
               '--epochs', '--algorithm', '--seed', '--evaluate',
               '--workdir'):  # fmt: skip
    assert flag in text
  for field in dataclasses.fields(Config):
    flag = '--' + field.name.replace('_', '-')
    assert flag in text, flag
    help_start = text.index(field.metadata['help'].split()[0], text.index(flag))
    assert f'(default: {field.default})' in text[help_start:], flag


@pytest.mark.slow
@pytest.mark.parametrize('algorithm', ['eprop', 'bptt'])
def test_smoke_both_algorithms(tmp_path, capsys, algorithm):
  summary = shd.main(tiny_args(tmp_path, algorithm=algorithm, plots=True))
  workdir = tmp_path / 'run'
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(x) for x in lines]
  kinds = [r['kind'] for r in records]
  assert kinds[0] == 'init' and kinds[-1] == 'test' and 'epoch' in kinds
  assert records[0]['rate_hz'] > 1  # the network spikes from the start
  assert summary['initial_rate_hz'] == records[0]['rate_hz']
  assert summary['algorithm'] == algorithm and summary['steps'] == 4
  assert 0 <= summary['test_accuracy'] <= 1
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  for name in ('curves.png', 'raster.png', 'confusion.png', 'summary.json'):
    assert (workdir / name).stat().st_size > 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads((workdir / 'summary.json').read_text())
  # --evaluate takes the options the run was trained with.
  evaluated = shd.main(['--workdir', str(workdir), '--evaluate'])
  assert evaluated['test_accuracy'] == summary['test_accuracy']


def _model_and_batch(**options):
  config = Config(pool=10, features=16, **options)
  model = Network(config, num_classes=20)
  rng = np.random.default_rng(0)
  x = rng.poisson(0.5, (4, 30, 70)).astype(np.uint8)
  mask = np.arange(30)[None] < np.array([30, 25, 20, 30])[:, None]
  batch = {'x': x, 'y': np.arange(4, dtype=np.int32), 'mask': mask}
  params = model.init(jax.random.key(0), x, mask=mask)['params']
  return config, model, params, batch


@pytest.mark.parametrize(
  'readout',
  [
    dict(readout='Dense', filtered_signal=False),
    dict(readout='LI', filtered_signal=True),
  ],
)
def test_eprop_equals_bptt_where_eprop_is_exact(readout):
  """A feed-forward layer with a memoryless readout, or with a leaky
  readout and the filtered signal: e-prop == BPTT."""
  options = dict(recurrent=False, neuron='LIF', **readout)
  grads = {}
  for algorithm in ('eprop', 'bptt'):
    config, model, params, batch = _model_and_batch(
      algorithm=algorithm, **options
    )
    state = rest_state(model, params, batch['x'], batch['mask'])
    f = jax.jit(make_value_and_grad(model, config, 30))
    (loss, aux), grads[algorithm] = f(params, state, batch)
    assert aux['output_sum']['spikes_0']['output_sum'] > 0
  for leaf in jax.tree.leaves(grads['bptt']):
    assert np.abs(leaf).max() > 0
  assert_trees_close(grads['eprop'], grads['bptt'], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
  reference = tmp_path / 'reference'
  shd.main(tiny_args(tmp_path, reference, epochs=2))
  workdir = tmp_path / 'run'
  shd.main(tiny_args(tmp_path, workdir, epochs=2))
  newest = workdir / 'checkpoints' / '8'  # the last; 4 and 6 are kept too
  for path in (newest / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'\x00garbage' * 3)
  with pytest.warns(CorruptCheckpointWarning, match='checkpoints/8 cannot be'):
    shd.main(tiny_args(tmp_path, workdir, epochs=2))  # resumes from step 6
  assert (workdir / 'corrupt' / 'latest' / '8' / 'state').is_dir()  # kept
  assert_bitwise_equal(latest_state(workdir)[1], latest_state(reference)[1])
  assert metrics_without_timing(workdir) == metrics_without_timing(reference)


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused_before_writing(tmp_path):
  workdir = tmp_path / 'run'
  shd.main(tiny_args(tmp_path, workdir))
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  with pytest.raises(IncompatibleCheckpointError) as error:
    shd.main(tiny_args(tmp_path, workdir, features=24))
  message = str(error.value)
  assert "['layer_0']['input']['kernel']" in message
  assert '(70, 16)' in message and '(70, 24)' in message
  after = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  assert after == before


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'file'
  path.write_text('not a directory')
  with pytest.raises(NotADirectoryError, match='is a file'):
    shd.main(tiny_args(tmp_path, path))


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write anywhere')
def test_workdir_not_writable(tmp_path):
  path = tmp_path / 'locked'
  path.mkdir()
  path.chmod(0o500)
  try:
    with pytest.raises(PermissionError, match='not writable'):
      shd.main(tiny_args(tmp_path, path))
  finally:
    path.chmod(0o700)


def test_missing_data_file(tmp_path):
  args = tiny_args(tmp_path)
  args[args.index('--test-file') + 1] = str(tmp_path / 'nope.h5')
  with pytest.raises(DataError, match='--test-file .*nope.h5: no such file'):
    shd.main(args)


def test_corrupt_data_file_error_names_the_option(tmp_path):
  bad = tmp_path / 'bad.h5'
  bad.write_bytes(b'not hdf5')
  args = tiny_args(tmp_path)
  args[args.index('--test-file') + 1] = str(bad)
  with pytest.raises(DataError, match='--test-file .*bad.h5: .*corrupt'):
    shd.main(args)


def test_batch_larger_than_the_data(tmp_path):
  with pytest.raises(ValueError, match='--batch-size 512 is larger than'):
    shd.main(tiny_args(tmp_path, batch_size=512))


def test_bad_option_is_named(tmp_path):
  with pytest.raises(SystemExit, match='--layers=4: expected 1, 2 or 3'):
    shd.main(tiny_args(tmp_path, layers=4))


def test_filtered_signal_needs_the_leaky_readout():
  with pytest.raises(ValueError, match='--filtered-signal=True: expected'):
    Config(readout='Dense', filtered_signal=True)
  assert not Config(readout='Dense').filtered_signal  # off by default


@pytest.mark.slow
def test_nonfinite_step_stops_and_keeps_the_last_good_state(tmp_path):
  workdir = tmp_path / 'run'
  # A first step of size ~1e38 leaves finite params whose activity overflows.
  with pytest.raises(NonFiniteError, match='step 2 .*non-finite loss'):
    shd.main(tiny_args(tmp_path, workdir, learning_rate=1e38))
  step, state = latest_state(workdir)
  assert step == 1  # the params after step 1, before the refused step
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
  summary = shd.main(
    tiny_args(tmp_path, learning_rate=1e38, on_nonfinite='skip')
  )
  assert summary['steps'] == 4 and summary['skipped_steps'] == 3
