"""Train a spiking network on SHD, SSC, synthetic-shd or your own files.

Run from the repository root::

  python -m recipes.shd --workdir runs/demo                      # synthetic-shd
  python -m recipes.shd --workdir runs/shd --dataset shd          # real SHD
  python -m recipes.shd --workdir runs/mine \\
      --train-file train.h5 --test-file test.h5                  # SHD layout
  python -m recipes.shd --workdir runs/demo --evaluate           # test accuracy
                                                # (options: the run's own)

Training resumes from the workdir's latest checkpoint when there is one (kill
it at any time and run the same command again). The workdir gets
``metrics.jsonl``, ``checkpoints/``, ``best/``, PNG plots and
``summary.json``; the last line on stdout is the summary as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from recipes.config import Config


def _type_of(field):
  hint = typing.get_type_hints(Config)[field.name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  base = args[0] if isinstance(hint, types.UnionType) or args else hint
  return base, type(None) in typing.get_args(hint)


def _parser_type(base, optional):
  def parse(text: str):
    if optional and text.lower() == 'none':
      return None
    return base(text)

  parse.__name__ = base.__name__
  return parse


def build_parser() -> argparse.ArgumentParser:
  """The CLI: ``--workdir``, ``--evaluate`` and one option per config field."""
  parser = argparse.ArgumentParser(
    prog='python -m recipes.shd',
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=(
      'Every option is a field of recipes.config.Config; '
      'train_and_evaluate(config, workdir) runs the same from Python.'
    ),
  )
  parser.add_argument(
    '--workdir', required=True,
    help='directory for checkpoints, metrics and plots (created if missing; '
    'an existing run there is resumed)',
  )  # fmt: skip
  parser.add_argument(
    '--evaluate',
    action='store_true',
    help='load the best checkpoint of --workdir and report test accuracy '
    '(default: False: train)',
  )
  for field in dataclasses.fields(Config):
    flag = '--' + field.name.replace('_', '-')
    help_text = f'{field.metadata["help"]} (default: {field.default})'
    base, optional = _type_of(field)
    if base is bool:
      parser.add_argument(
        flag,
        dest=field.name,
        action=argparse.BooleanOptionalAction,
        default=field.default,
        help=help_text,
      )
      continue
    parser.add_argument(
      flag,
      dest=field.name,
      type=_parser_type(base, optional),
      default=field.default,
      choices=field.metadata.get('choices'),
      metavar=field.name.upper() if 'choices' not in field.metadata else None,
      help=help_text,
    )
  return parser


def _given(argv) -> set[str]:
  """The config options given explicitly on the command line."""
  parser = build_parser()
  for action in parser._actions:
    action.default = argparse.SUPPRESS
  return set(vars(parser.parse_args(argv))) - {'workdir', 'evaluate'}


def main(argv: list[str] | None = None) -> dict:
  """Parses ``argv``, then trains (or evaluates); returns the summary.

  With ``--evaluate``, the options default to those the run in
  ``--workdir`` was trained with (its ``config.json``).
  """
  args = vars(build_parser().parse_args(argv))
  workdir, evaluate_only = args.pop('workdir'), args.pop('evaluate')
  saved = Path(workdir) / 'config.json'
  if evaluate_only and saved.is_file():
    given = _given(argv)
    trained = json.loads(saved.read_text())
    args = {k: args[k] if k in given else trained.get(k, v)
            for k, v in args.items()}  # fmt: skip
  try:
    config = Config(**args)
  except ValueError as e:
    sys.exit(f'error: {e}')
  from recipes import train

  if evaluate_only:
    return train.evaluate(config, workdir)
  return train.train_and_evaluate(config, workdir)


def _cli() -> None:
  from recipes.checkpoint import IncompatibleCheckpointError
  from recipes.pipeline import DataError
  from recipes.train import NonFiniteError

  known = (DataError, IncompatibleCheckpointError, NonFiniteError,
           NotADirectoryError, PermissionError, FileNotFoundError,
           ValueError)  # fmt: skip
  try:
    main()
  except KeyboardInterrupt:
    sys.exit('interrupted: run the same command again to resume.')
  except known as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _cli()
