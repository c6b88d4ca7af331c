"""The command line of each subcommand; imports no TensorFlow.

Each `add_<name>` adds the parser of subcommand <name>, implemented by the
module `ckpt_export.cli.<name>`, which `main` imports only to run it: `--help`
and bad arguments are answered without loading TensorFlow. A parser may set
`check=<function of the parsed arguments>`, run before that import, for the
checks that need no TensorFlow (raising `_common.UsageError`).
"""

import argparse
import re
import shutil
from typing import Any

from ckpt_export import paths
from ckpt_export.cli import _common

# Argument types: each raises argparse.ArgumentTypeError naming the bad value.


def _seconds(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 <= value < float('inf'):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a non-negative number of seconds')
  return value


def _positive_seconds(text: str) -> float:
  value = _seconds(text)
  if value == 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be more than 0 seconds')
  return value


def _step(text: str) -> int:
  if not re.fullmatch(r'[0-9]+', text):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a step (a non-negative integer)')
  return int(text)


def _checkpoint_name(text: str) -> str:
  try:
    return paths.validate_component('checkpoint name', text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _max_versions(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(
        f'--max-versions must be a positive integer, got {text!r}')
  return value


# Arguments that several subcommands take.


def add_verbose_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
  """Adds -v, taken before and after the subcommand."""
  parser.add_argument('-v', '--verbose', action='store_true',
                      help='log what is done (absl INFO logging)', **kwargs)


def _add_subcommand(subparsers: Any, name: str,
                    **kwargs) -> argparse.ArgumentParser:
  """Adds subcommand `name` with MODEL_DIR, --checkpoint-name and -v."""
  parser = subparsers.add_parser(name, **kwargs)
  parser.add_argument('model_dir', metavar='MODEL_DIR',
                      help='the model directory (local path or URL)')
  parser.add_argument('--checkpoint-name', type=_checkpoint_name,
                      default='ckpt',
                      help='the checkpoint name of the exports (default: '
                      '%(default)s)')
  add_verbose_argument(parser, default=argparse.SUPPRESS)
  parser.set_defaults(subcommand=name)
  return parser


def _add_no_lease_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      '--no-lease', action='store_true',
      help='read without leases, for a MODEL_DIR this process may not write '
      '(a read-only bucket). Risk: the trainer\'s garbage collection may '
      'delete an export while it is read, which then fails to load')


def _add_polling_arguments(parser: argparse.ArgumentParser, timeout_help: str,
                           sleep_help: str) -> None:
  """Adds --timeout and --seconds-to-sleep, for subcommands that poll."""
  parser.add_argument('--timeout', type=_seconds, default=None,
                      help=timeout_help)
  parser.add_argument('--seconds-to-sleep', type=_positive_seconds,
                      default=1.0, help=sleep_help)


# The subcommands, in the order `--help` lists them.


def add_ls(subparsers: Any) -> None:
  _add_subcommand(
      subparsers, 'ls', help='list the steps of a model directory',
      description='Prints a table of the steps in MODEL_DIR: whether each has '
      'its checkpoint and a published export (or only part of one, left by a '
      'write in progress or a crash), its modules, its size on disk (checkpoint'
      ' and export), the age of its newest entry, and the readers holding a '
      'lease on its export (count: holder@host:pid).')


def add_verify(subparsers: Any) -> None:
  parser = _add_subcommand(
      subparsers, 'verify',
      help='load every published export and check its signatures',
      description='Loads each module of every published export in MODEL_DIR '
      'with tf.saved_model.load and checks that it has a serving signature, '
      'holding a lease on the export meanwhile (unless --no-lease). Prints a '
      'table; exits 1 if any export is broken, 2 if MODEL_DIR cannot be '
      'accessed.')
  _add_no_lease_argument(parser)


def _check_watch(args: argparse.Namespace) -> None:
  if not args.command:
    raise _common.UsageError("watch needs a COMMAND after '--'")
  if shutil.which(args.command[0]) is None:
    raise _common.UsageError(f'COMMAND {args.command[0]} not found')


def add_watch(subparsers: Any) -> None:
  """Adds `watch`, which takes `-- COMMAND [ARGS...]` (in `args.command`)."""
  parser = _add_subcommand(
      subparsers, 'watch', help='run a command for each new export',
      usage=f'{_common.PROG} watch MODEL_DIR [options] -- COMMAND [ARGS...]',
      description='Runs COMMAND once for each new published export of '
      'MODEL_DIR, in step order, never through a shell. The export\'s path and '
      'step are in the environment variables CKPT_EXPORT_PATH and '
      'CKPT_EXPORT_STEP (and MODEL_DIR in CKPT_EXPORT_MODEL_DIR), and replace '
      'the words {path} and {step} in ARGS. The export is leased while COMMAND '
      'runs (unless --no-lease): the trainer does not delete it meanwhile. '
      'COMMAND runs in its own process group, killed when it ends and when '
      'the watch ends or is killed (even by SIGKILL, through a parent-death '
      'signal). A failing COMMAND is reported on stderr and the watch goes '
      'on, unless --stop-on-failure; the failures recorded in --state-file '
      'are reported at every start, and the exit code is 1 while one stands '
      '(until --retry-failed succeeds on it). One watch per state file at a '
      'time: a second one is refused, naming the first.')
  _add_polling_arguments(
      parser, timeout_help='end the watch (exit 0) after this many seconds '
      'without a new export (default: wait forever)',
      sleep_help='seconds between looks for a new export (default: '
      '%(default)s)')
  parser.add_argument('--latest-only', action='store_true',
                      help='run COMMAND only on the newest export each time, '
                      'skipping older unseen ones (for a COMMAND slower than '
                      'the trainer)')
  parser.add_argument('--state-file',
                      help='file recording the last step handled, written '
                      'after each step; a restarted watch with the same file '
                      'resumes after that step')
  parser.add_argument('--stop-on-failure', action='store_true',
                      help='stop at the first failing COMMAND, with its exit '
                      'code; its step is not recorded as handled')
  parser.add_argument('--until-step', type=_step, default=None,
                      help='stop after handling a step at or above this one')
  parser.add_argument('--retry-failed', action='store_true',
                      help='first run COMMAND again on the steps recorded as '
                      'failed in --state-file (a step whose export is gone '
                      'is dropped, said so)')
  _add_no_lease_argument(parser)
  parser.set_defaults(check=_check_watch, takes_command=True)


def add_export(subparsers: Any) -> None:
  parser = _add_subcommand(
      subparsers, 'export', help='export each new checkpoint (trainer writes '
      'checkpoints only)',
      description='The decoupled mode: the trainer writes checkpoints only '
      '(a plain tf.train.CheckpointManager), and this process exports each new '
      'checkpoint of MODEL_DIR as <name>-<step>_saved_modules/<module>/ '
      'through the same commit protocol, and deletes exports whose checkpoint '
      'is gone (unless a reader leases them). BUILD_FN is '
      '"package.module:function", returning (tf.train.Checkpoint, '
      "{module name: module}) shaped like the trainer's checkpoint.")
  parser.add_argument('--build-fn', required=True, metavar='BUILD_FN',
                      help='package.module:function building the checkpoint '
                      'and the modules to export')
  _add_polling_arguments(
      parser, timeout_help='stop after this many seconds without a new '
      'checkpoint (default: wait forever)',
      sleep_help='seconds between looks for a new checkpoint (default: '
      '%(default)s)')


def _check_serve(args: argparse.Namespace) -> None:
  if not (args.latest_dir or args.best_dir):
    raise _common.UsageError('serve needs --latest-dir or --best-dir (or both)')


def add_serve(subparsers: Any) -> None:
  parser = _add_subcommand(
      subparsers, 'serve',
      help='publish exports as versions TF Serving can watch',
      description='Publishes the latest export of MODEL_DIR into --latest-dir '
      'and/or the best one (kept by BestExport) into --best-dir, each module '
      'as <dir>/<module>/<step>/, the version layout TensorFlow Serving '
      'watches. A version appears complete or not at all (hard links on '
      'local disk), the newest --max-versions per module are kept (and '
      'versions a reader leases), and <dir>/models.config lists them for '
      "TF Serving's --model_config_file (required on object stores, where a "
      'version directory is visible while it is copied).')
  parser.add_argument('--latest-dir', help='the view fed with the latest '
                      'export')
  parser.add_argument('--best-dir', help='the view fed with the best export')
  parser.add_argument('--max-versions', type=_max_versions, default=2,
                      help='versions kept per module (default: %(default)s)')
  parser.add_argument('--follow', action='store_true',
                      help='keep publishing new exports as they appear')
  _add_polling_arguments(
      parser, timeout_help='with --follow, stop after this many seconds '
      'without a new version (default: never)',
      sleep_help='with --follow, seconds between looks (default: '
      '%(default)s)')
  parser.set_defaults(check=_check_serve)
