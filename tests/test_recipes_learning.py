"""The default recipe learns synthetic-shd (the README's main command)."""

import pytest

from recipes import shd


@pytest.mark.slow
def test_default_recipe_beats_chance_by_far(tmp_path):
  summary = shd.main([
    '--workdir', str(tmp_path / 'run'), '--data-dir', str(tmp_path / 'data'),
    '--epochs', '10', '--no-progress', '--no-plots',
  ])  # fmt: skip
  assert summary['dataset'] == 'synthetic-shd'
  assert summary['algorithm'] == 'eprop' and summary['epochs'] == 10
  assert summary['initial_rate_hz'] > 1  # spikes from the first step
  assert summary['test_accuracy'] > 0.5  # chance: 0.05 (20 classes)
  assert summary['best_valid_accuracy'] > 0.5
