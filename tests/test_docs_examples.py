"""Every ```python block of the documentation runs.

Each page's blocks run in order in one fresh namespace (so a page reads top
to bottom as a script), in a temporary directory with ``$FLAX_EPROP_DATA``
pointing there. A block that needs the network or real data files starts
with the visible line ``# Not run by the tests: <reason>``; such a block is
run too, with the network cut and an empty data directory, and must fail
with a missing-data error (so the marker is used only where it must be).

Page markers (HTML comments, invisible on the site):

* ``<!-- docs-test: slow -->``: the page is marked slow;
* ``<!-- docs-test: devices=N -->``: the page runs in a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (and is checked to
  see N devices).
"""

from __future__ import annotations

import copy
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
FENCE = re.compile(
  r'^([ \t]*)```([\w+-]*)[^\n]*\n(.*?)^\1```[ \t]*$', re.M | re.S
)
SKIP = re.compile(r'\A# Not run by the tests: (\S.*)$', re.M)
SLOW = '<!-- docs-test: slow -->'
DEVICES = re.compile(r'<!-- docs-test: devices=(\d+) -->')
LANGUAGES = {'python', 'bash', 'text', ''}


def pages() -> list[pathlib.Path]:
  return sorted(DOCS.rglob('*.md'))


def blocks(path: pathlib.Path) -> list[tuple[int, str, str]]:
  """``(line, language, code)`` of every fenced block (indented ones too)."""
  text = path.read_text()
  out = []
  for m in FENCE.finditer(text):
    line = text.count('\n', 0, m.start()) + 2  # first line of the code
    out.append((line, m.group(2), textwrap.dedent(m.group(3))))
  return out


def python_blocks(path):
  return [(line, code) for line, lang, code in blocks(path) if lang == 'python']


def skip_reason(code: str) -> str | None:
  m = SKIP.match(code)
  return m.group(1) if m else None


def _compile(code: str, rel: pathlib.Path, line: int):
  """Compiles a block as a user's script (no ``__future__`` flags of ours)."""
  return compile(code, f'{rel}:{line}', 'exec', dont_inherit=True)


def run_page(path: pathlib.Path) -> dict:
  """Runs a page's runnable blocks in order in one namespace; returns it.

  Runs with JAX's default rank promotion (as a user's script would, where
  the test suite raises) and restores JAX's x64 and matmul-precision
  settings afterwards (a page may switch them).
  """
  saved = {
    name: getattr(jax.config, name)
    for name in ('jax_enable_x64', 'jax_default_matmul_precision')
  }
  namespace = {'__name__': f'docs_{path.stem.replace("-", "_")}'}
  rel = path.relative_to(ROOT)
  try:
    with jax.numpy_rank_promotion('allow'):
      for line, code in python_blocks(path):
        if skip_reason(code) is None:
          exec(_compile(code, rel, line), namespace)
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
  return namespace


def _page_param(path):
  marks = []
  text = path.read_text()
  if SLOW in text:
    marks.append(pytest.mark.slow)
  return pytest.param(path, id=str(path.relative_to(DOCS)), marks=marks)


IN_PROCESS = [
  _page_param(p)
  for p in pages()
  if python_blocks(p) and not DEVICES.search(p.read_text())
]
SUBPROCESS = [_page_param(p) for p in pages() if DEVICES.search(p.read_text())]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
  """A temporary working and data directory, and no network."""
  monkeypatch.setattr(socket.socket, 'connect', _no_network)
  monkeypatch.setattr(socket, 'create_connection', _no_network)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('FLAX_EPROP_DATA', str(tmp_path / 'data'))
  return tmp_path


@pytest.mark.parametrize('path', IN_PROCESS)
def test_page_runs(path, sandbox):
  run_page(path)


@pytest.mark.parametrize('path', SUBPROCESS)
def test_page_runs_on_several_devices(path, tmp_path):
  count = int(DEVICES.search(path.read_text()).group(1))
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f'--xla_force_host_platform_device_count={count}',
    JAX_PLATFORMS='cpu',
    FLAX_EPROP_DATA=str(tmp_path / 'data'),
    PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]),
  )
  script = textwrap.dedent(f"""
    import pathlib, jax
    from tests.test_docs_examples import run_page
    run_page(pathlib.Path({str(path)!r}))
    print('devices', len(jax.devices()))
  """)
  done = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  assert f'devices {count}' in done.stdout


def _no_network(*args, **kwargs):
  raise OSError('network disabled by the docs test')


@pytest.mark.parametrize(
  'path',
  [
    _page_param(p)
    for p in pages()
    if any(skip_reason(c) for _, c in python_blocks(p))
  ],
)
def test_skipped_blocks_really_need_data(path, sandbox, monkeypatch):
  """A skipped block fails offline with an empty data directory."""
  from flax_eprop import data

  namespace = {'__name__': 'docs_skipped'}
  rel = path.relative_to(ROOT)
  for line, code in python_blocks(path):
    compiled = _compile(code, rel, line)
    with jax.numpy_rank_promotion('allow'):
      if skip_reason(code) is None:
        exec(compiled, namespace)
        continue
      missing = (data.DatasetNotFoundError, FileNotFoundError)
      with pytest.raises(missing):
        exec(compiled, copy.copy(namespace))


def test_code_blocks_have_known_languages():
  """Blocks are ```python (run), or ```bash / ```text (not Python)."""
  for path in pages():
    for line, lang, _ in blocks(path):
      assert lang in LANGUAGES, (
        f'{path.relative_to(ROOT)}:{line}: code block language {lang!r}; use '
        f'one of {sorted(LANGUAGES)} (```python blocks are run by the tests).'
      )


def test_skip_marker_states_a_reason_and_is_rare():
  """The marker only opens a block, and names what the block needs."""
  for path in pages():
    for line, code in python_blocks(path):
      reason = skip_reason(code)
      if reason is None:
        assert 'Not run by the tests' not in code, (
          f'{path.relative_to(ROOT)}:{line}: the skip marker must be the '
          "block's first line."
        )
        continue
      assert re.search(r'network|download|files?|data', reason), (
        f'{path.relative_to(ROOT)}:{line}: say what the block needs '
        f'(network, data files), got {reason!r}.'
      )
