"""The README example and the example scripts run and learn."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_example_runs_and_loss_falls():
  readme = (ROOT / 'README.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', readme, re.DOTALL)
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)
  losses = namespace['losses']
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_train_bptt_example_learns(capsys):
  path = ROOT / 'examples' / 'train_bptt.py'
  spec = importlib.util.spec_from_file_location('train_bptt', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  loss, accuracy = module.main(steps=250)
  assert loss < 0.1 and accuracy > 0.9
  assert 'accuracy' in capsys.readouterr().out


@pytest.mark.slow
def test_train_eprop_example_learns(capsys):
  path = ROOT / 'examples' / 'train_eprop.py'
  spec = importlib.util.spec_from_file_location('train_eprop', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  loss, accuracy = module.main(steps=200)
  assert loss < 0.1 and accuracy > 0.9
  assert 'accuracy' in capsys.readouterr().out
