"""The API reference documents every public name, and only real ones.

The reference pages (``docs/reference/*.md``) hold one mkdocstrings entry,
``::: flax_eprop.NAME``, per public name. The lists of public names are read
from ``__all__`` when the test runs, so a name added to the package without
a reference entry fails here.
"""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = ROOT / 'docs' / 'reference'
ENTRY = re.compile(r'^::: ([\w.]+)\s*$', re.M)
MODULES = ['flax_eprop', 'flax_eprop.surrogates', 'flax_eprop.data']


def entries() -> dict[str, pathlib.Path]:
  found = {}
  for page in sorted(REFERENCE.glob('*.md')):
    for name in ENTRY.findall(page.read_text()):
      assert name not in found, (
        f'{name} has two entries ({found[name].name}, {page.name})'
      )
      found[name] = page
  return found


@pytest.mark.parametrize('module_name', MODULES)
def test_every_public_name_has_a_reference_entry(module_name):
  module = importlib.import_module(module_name)
  documented = entries()
  missing = [
    f'::: {module_name}.{name}'
    for name in module.__all__
    if f'{module_name}.{name}' not in documented
  ]
  assert not missing, (
    f'{module_name}.__all__ names without a reference entry; add these lines '
    f'to a page under docs/reference/: {missing}'
  )


def test_every_entry_names_a_public_object():
  for name, page in entries().items():
    module_name, _, attr = name.rpartition('.')
    if name in MODULES:
      continue
    module = importlib.import_module(module_name)
    assert attr in module.__all__, (
      f'docs/reference/{page.name}: {name} is not in {module_name}.__all__.'
    )
    assert getattr(module, attr, None) is not None


def test_reference_pages_are_in_the_nav():
  nav = (ROOT / 'mkdocs.yml').read_text()
  for page in REFERENCE.glob('*.md'):
    assert f'reference/{page.name}' in nav
