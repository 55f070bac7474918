"""Lazy imports of the optional ``data`` dependencies, with a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType

_INSTALL = "pip install 'flax-eprop[data]'"


def require(module: str) -> ModuleType:
  """Imports an optional dependency of ``flax_eprop.data``.

  Args:
    module: the module name, e.g. ``'h5py'`` or ``'datasets'``.

  Returns:
    The imported module.

  Raises:
    ImportError: naming the module and the command that installs it.
  """
  try:
    return importlib.import_module(module)
  except ImportError as err:
    raise ImportError(
      f'flax_eprop.data needs {module!r}, which is not installed; '
      f'install the data extra: {_INSTALL}'
    ) from err
