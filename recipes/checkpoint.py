"""Checkpoints with `orbax.checkpoint.CheckpointManager`.

Two managers in the workdir: ``checkpoints/`` (async saves, the last
``keep_checkpoints`` kept) holds everything a run needs to resume exactly;
``best/`` holds the parameters with the best validation accuracy. Each save
is a ``Composite`` of ``state`` (a ``StandardSave`` of ``{'params',
'opt_state', 'step'}``, sharded arrays included) and ``meta`` (a
``JsonSave`` of the iterator's position, counters, the config and the
library version). Every training step runs whole sequences from rest, so no
online state (carry, traces) is ever live between steps: there is none to
save.

Restoring checks the stored parameter shapes against the model first (an
`IncompatibleCheckpointError` names the differing leaf and both shapes) and
skips a newest checkpoint that cannot be read, with a warning naming it; the
unreadable one is moved to ``corrupt/`` (never deleted) so later saves do not
collide with it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

# Errors that mean a bug, not an unreadable checkpoint: never skip on these.
_PROGRAMMING_ERRORS = (AttributeError, TypeError, NameError, KeyError)


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model."""


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint could not be read and was skipped."""


def _manager(directory: Path, keep: int, async_save: bool = True):
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.LatestN(keep),
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
    create=True,
  )
  handlers = {
    'state': ocp.StandardCheckpointHandler(),
    'meta': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(
    directory.resolve(), options=options, item_handlers=handlers
  )


def _paths(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): leaf for p, leaf in flat}


def check_compatible(stored, expected, where: Path) -> None:
  """Raises `IncompatibleCheckpointError` unless the params trees match.

  Args:
    stored: the checkpoint's params metadata tree (leaves with ``.shape``).
    expected: the model's params (arrays or shape structs).
    where: the checkpoint directory (for the message).
  """
  got, want = _paths(stored), _paths(expected)
  for path in sorted(set(got) | set(want)):
    if path not in got or path not in want:
      which = 'the checkpoint' if path in got else 'the model'
      raise IncompatibleCheckpointError(
        f'{where}: the checkpoint is of a different model: params{path} is '
        f'only in {which}. Use another --workdir, or the options the '
        'checkpoint was trained with.'
      )
    if tuple(got[path].shape) != tuple(want[path].shape):
      raise IncompatibleCheckpointError(
        f'{where}: the checkpoint is of a different model: params{path} has '
        f'shape {tuple(got[path].shape)} in the checkpoint and '
        f'{tuple(want[path].shape)} in this model. Use another --workdir, '
        'or the options the checkpoint was trained with.'
      )


class Checkpoints:
  """The workdir's checkpoint managers.

  Args:
    workdir: the run's directory.
    keep: how many recent checkpoints to keep.
  """

  def __init__(self, workdir: Path, keep: int):
    self.workdir = Path(workdir)
    self.keep = keep
    self.latest = _manager(self.workdir / 'checkpoints', keep)
    self.best = _manager(self.workdir / 'best', 1, async_save=False)

  def save(self, step: int, state: dict, meta: dict) -> None:
    """Saves ``state`` (arrays) and ``meta`` (JSON) at ``step`` (async)."""
    if step in self.latest.all_steps():
      return
    self.latest.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
    )

  def save_best(self, step: int, params, meta: dict) -> None:
    """Saves the params with the best validation accuracy so far."""
    if step in self.best.all_steps():  # the same step, redone after a resume
      return
    self.best.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': params}),
        meta=ocp.args.JsonSave(meta),
      ),
      force=True,
    )

  def restore_latest(self, abstract: dict):
    """The newest readable checkpoint: ``(state, meta)``, or None.

    Args:
      abstract: ``{'params', 'opt_state', 'step'}`` of shape structs (with
        shardings) for the current model.
    """
    return self._restore('latest', abstract)

  def restore_best(self, abstract_params):
    """The best-by-validation params and meta, or None."""
    return self._restore('best', {'params': abstract_params})

  def _restore(self, which: str, abstract: dict):
    manager = getattr(self, which)
    bad = []
    result = None
    for step in sorted(manager.all_steps(), reverse=True):
      where = Path(manager.directory) / str(step)
      try:
        stored = manager.item_metadata(step)['state'].tree['params']
      except _PROGRAMMING_ERRORS:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable file
        bad.append((step, where, e))
        continue
      check_compatible(stored, abstract['params'], where)
      try:
        restored = manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore(),
          ),
        )
      except _PROGRAMMING_ERRORS:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable file
        bad.append((step, where, e))
        continue
      result = restored['state'], restored['meta']
      break
    for step, where, error in bad:
      self._move_aside(which, step, where, error, result)
    return result

  def _move_aside(self, which, step, where, error, result):
    manager = getattr(self, which)
    target = self.workdir / 'corrupt' / which / str(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      target = target.with_name(f'{step}-{len(list(target.parent.iterdir()))}')
    used = 'none' if result is None else str(result[1].get('step'))
    warnings.warn(
      f'checkpoint {where} cannot be read ({type(error).__name__}: '
      f'{str(error)[:200]}); skipped, moved to {target}; using checkpoint '
      f'step {used} instead.',
      CorruptCheckpointWarning,
      stacklevel=3,
    )
    shutil.move(str(where), str(target))
    manager.reload()

  def wait(self) -> None:
    """Waits for async saves to finish."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
