"""The `ckpt-export` command: list, verify, watch and make a model's exports.

    ckpt-export ls MODEL_DIR
    ckpt-export verify MODEL_DIR
    ckpt-export watch MODEL_DIR [options] -- COMMAND [ARGS...]
    ckpt-export export MODEL_DIR --build-fn package.module:function
    ckpt-export serve MODEL_DIR --latest-dir DIR [--best-dir DIR]

Exit codes: 0 success; 1 a broken export, a failed COMMAND or an unexpected
error; 2 bad arguments, or a MODEL_DIR that cannot be accessed (missing,
unreadable, or a lease directory this process may not write: see
`--no-lease`). Every error is one line on stderr, never a traceback. `watch
--stop-on-failure` exits with the failed COMMAND's own code.

TensorFlow is imported only once a subcommand runs, after its C++ logging is
turned down to errors (`TF_CPP_MIN_LOG_LEVEL=2`) and GPUs are hidden
(`CUDA_VISIBLE_DEVICES=`), unless the user set these: `--help` is fast, output
is not buried in TensorFlow's start-up lines, and a command never takes GPU
memory from a trainer on the same machine. COMMANDs run by `watch` get the
environment as it was, without these two.

The parsers live in `_parsers` (no TensorFlow); subcommand <name> runs as
`ckpt_export.cli.<name>.run(args)`, its module imported only then. Adding a
subcommand: write `add_<name>(subparsers)` in `_parsers` (see there), list it
in `_SUBCOMMANDS`, and write the module `<name>.py` with `run`, a function of
the parsed arguments returning the exit code. A subcommand that takes
`-- COMMAND [ARGS...]` sets `takes_command=True` and finds the words in
`args.command`.
"""

import argparse
import importlib
import os
import shlex
import signal
import sys
from typing import Callable, Optional, Sequence

from absl import logging

from ckpt_export.cli import _common
from ckpt_export.cli import _parsers

PROG = _common.PROG
# Set for this process unless the user set them; see the module docstring.
_ENV_DEFAULTS = {'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': ''}
_SUBCOMMANDS: Sequence[Callable[..., None]] = (
    _parsers.add_ls, _parsers.add_verify, _parsers.add_watch,
    _parsers.add_export, _parsers.add_serve)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description='Inspect, verify and watch the checkpoints and SavedModel '
      'exports of a model directory written by ckpt_export (or by Model '
      "Garden's SavedModelCheckpointManager).")
  _parsers.add_verbose_argument(parser)
  subparsers = parser.add_subparsers(metavar='COMMAND', required=True)
  for add in _SUBCOMMANDS:
    add(subparsers)
  return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  """Parses `argv`; the words after `--` go to `args.command` (or None)."""
  argv, command = list(argv), None
  if '--' in argv:
    command = argv[argv.index('--') + 1:]
    argv = argv[:argv.index('--')]
  parser = _parser()
  args = parser.parse_args(argv)
  if command is not None and not getattr(args, 'takes_command', False):
    parser.error(f'unrecognized arguments: -- {shlex.join(command)}')
  args.command = command
  return args


def _run(args: argparse.Namespace) -> int:
  """Checks the arguments, then imports the subcommand's module to run it."""
  if hasattr(args, 'check'):
    args.check(args)
  _common.check_model_dir(args.model_dir)
  module = importlib.import_module(f'{__name__}.{args.subcommand}')
  return module.run(args)


def _error(message: str, code: int) -> int:
  print(f'{PROG}: error: {_common.one_line(message)}', file=sys.stderr)
  return code


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line `argv` (default: sys.argv[1:]); returns its code."""
  args = _parse(sys.argv[1:] if argv is None else argv)
  args.environ = dict(os.environ)
  for key, value in _ENV_DEFAULTS.items():
    os.environ.setdefault(key, value)
  if args.verbose:
    logging.set_verbosity(logging.INFO)
  try:
    return _run(args)
  except (_common.UsageError, ValueError) as e:  # ValueError: a bad value.
    return _error(str(e), 2)
  except _common.Terminated:
    return 128 + signal.SIGTERM
  except KeyboardInterrupt:
    return 128 + signal.SIGINT
  except Exception as e:  # pylint: disable=broad-except
    tf = sys.modules.get('tensorflow')
    if tf is not None and isinstance(e, tf.errors.PermissionDeniedError):
      # Cannot access MODEL_DIR (or write leases there): exit code 2.
      return _error(e.message, 2)
    if tf is not None and isinstance(e, tf.errors.OpError):
      return _error(e.message, 1)
    return _error(f'{type(e).__name__}: {e}', 1)
