"""The scaling benchmark's quick mode runs and reports every column."""

import json

import pytest

from benchmarks import scaling


@pytest.mark.slow
def test_quick_mode_writes_every_column(tmp_path):
  rows = scaling.main(['--quick', '--reps', '7', '--out', str(tmp_path)])
  table = (tmp_path / 'results.md').read_text()
  header = '| ' + ' | '.join(scaling.COLUMNS) + ' |'
  for section in ('headline', 'time', 'features', 'dense'):
    assert f'### {section}' in table
  assert header in table
  assert json.loads((tmp_path / 'results.json').read_text()) == rows
  for row in rows:
    assert set(row) == set(scaling.COLUMNS)
    assert row['time_ms'] > 0 and row['memory_mb'] > 0
    assert row['spike_rate'] > 0, f'silent network: {row}'
  methods = {r['method'] for r in rows}
  assert {'bptt', 'user_bptt', 'eprop', 'naive_dense', 'rtrl'} <= methods
  assert {r['kind'] for r in rows} == {'lif', 'alif', 'cuba'}
  for name in ('time_time_ms', 'time_memory_mb', 'features_time_ms'):
    assert (tmp_path / f'{name}.png').stat().st_size > 0
