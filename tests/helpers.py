"""Test helpers shared by the test modules: ``from helpers import ...``."""

import jax
import numpy as np

# Tolerances of STYLE.md, keyed by the dtype of the expected leaf.
TOLERANCES = {
  np.dtype(np.float64): (1e-10, 0.0),
  np.dtype(np.float32): (1e-4, 1e-5),
}


def assert_trees_close(actual, expected, rtol=None, atol=None):
  """Asserts two pytrees have the same structure and close leaves.

  Args:
    actual: a pytree of arrays.
    expected: a pytree of arrays with the same structure.
    rtol: relative tolerance; default by dtype (float64 1e-10, float32 1e-4).
    atol: absolute tolerance; default by dtype (float64 0, float32 1e-5).

  Raises:
    AssertionError: naming the first differing leaf path, its max absolute
      and relative error, or the structure mismatch.
  """
  actual_paths = jax.tree_util.tree_flatten_with_path(actual)[0]
  expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
  actual_def = jax.tree_util.tree_structure(actual)
  if actual_def != expected_def:
    raise AssertionError(
      f'tree structures differ:\n  actual:   {actual_def}\n'
      f'  expected: {expected_def}'
    )
  for (path, a), b in zip(actual_paths, expected_leaves, strict=True):
    name = jax.tree_util.keystr(path) or '<root>'
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
      raise AssertionError(f'leaf {name}: shape {a.shape} != {b.shape}')
    default_rtol, default_atol = TOLERANCES.get(b.dtype, (1e-4, 1e-5))
    r = default_rtol if rtol is None else rtol
    t = default_atol if atol is None else atol
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if np.allclose(a64, b64, rtol=r, atol=t, equal_nan=True):
      continue
    abs_err = np.abs(a64 - b64)
    rel_err = abs_err / np.maximum(np.abs(b64), np.finfo(np.float64).tiny)
    worst = np.unravel_index(np.argmax(abs_err - r * np.abs(b64)), a.shape)
    raise AssertionError(
      f'leaf {name} differs (rtol={r}, atol={t}): max abs error '
      f'{abs_err.max():.3e}, max rel error {rel_err.max():.3e}; worst at '
      f'index {tuple(int(i) for i in worst)}: actual {a64[worst]!r}, '
      f'expected {b64[worst]!r}'
    )
