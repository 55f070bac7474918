"""The README example and the example scripts run and learn."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_readme_example_runs_and_loss_falls():
  readme = (ROOT / 'README.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', readme, re.DOTALL)
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)
  losses = namespace['losses']
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize(
  'name, steps', [('train_bptt', 250), ('train_eprop', 200)]
)
def test_example_script_learns(capsys, name, steps):
  path = ROOT / 'examples' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  loss, accuracy = module.main(steps=steps)
  assert loss < 0.1 and accuracy > 0.9
  assert 'accuracy' in capsys.readouterr().out
