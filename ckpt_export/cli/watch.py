"""`ckpt-export watch`: runs a COMMAND for each new export, never twice."""

import argparse
import contextlib
import re
import shlex
import sys

from absl import logging

from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export.cli import _command
from ckpt_export.cli import _common
from ckpt_export.cli import _model_dir
from ckpt_export.cli import _watch_state


def _substitute(word: str, export_dir: str, step: int) -> str:
  values = {'path': export_dir, 'step': str(step)}
  return re.sub(r'\{(path|step)\}', lambda m: values[m.group(1)], word)


def _run_step(args: argparse.Namespace, export_dir: str, step: int,
              state: _watch_state.WatchState, advance: bool = True) -> int:
  """Runs COMMAND on one export and records the outcome; returns its code."""
  command = args.command[:1] + [
      _substitute(word, export_dir, step) for word in args.command[1:]]
  logging.info('Step %d: running %s', step, shlex.join(command))
  env = dict(args.environ, CKPT_EXPORT_PATH=export_dir,
             CKPT_EXPORT_STEP=str(step), CKPT_EXPORT_MODEL_DIR=args.model_dir)
  code = _command.run(command, env, lambda pid: state.start(
      step, pid, args.model_dir))
  if code:
    print(f'{_common.PROG}: step {step}: {command[0]} '
          f'{_command.describe_exit(code)}', file=sys.stderr)
  if not (code and args.stop_on_failure):
    state.finish(step, code, advance)
  return code


def _retry_failed(args: argparse.Namespace,
                  state: _watch_state.WatchState) -> None:
  """Runs COMMAND again on each recorded failed step whose export remains.

  The export is leased meanwhile, unless --no-lease (then it only has to be
  published when the retry starts).
  """
  for step in sorted(map(int, state.failed)):
    export_dir = paths.export_path(args.model_dir, args.checkpoint_name, step)
    lease = _model_dir.lease(export_dir, args)
    if lease is None or not commit.is_published(export_dir):
      print(f'{_common.PROG}: step {step}: cannot retry, its export is gone; '
            'dropping its failure', file=sys.stderr)
      state.finish(step, 0, advance=False)
      continue
    with lease:
      _run_step(args, export_dir, step, state, advance=False)


def _report_earlier_failures(args: argparse.Namespace,
                             state: _watch_state.WatchState) -> None:
  """Says which steps failed in earlier runs; retries them if asked."""
  print(f'{_common.PROG}: failed in earlier runs: step(s) '
        f'{", ".join(sorted(state.failed, key=int))}'
        f'{"; retrying" if args.retry_failed else " (--retry-failed)"}',
        file=sys.stderr)
  if args.retry_failed:
    _retry_failed(args, state)


def _watch_new_exports(args: argparse.Namespace,
                       state: _watch_state.WatchState) -> int:
  """Runs COMMAND on each export after the last step handled, in order."""
  exports = readers.savedmodels_iterator(
      args.model_dir, timeout=args.timeout,
      seconds_to_sleep=args.seconds_to_sleep,
      checkpoint_name=args.checkpoint_name, latest_only=args.latest_only,
      after_step=state.last_step,
      lease_seconds=None if args.no_lease else float(
          leases.DEFAULT_LEASE_SECONDS))
  with contextlib.closing(exports):
    for export_dir in exports:
      step = paths.parse_export_step(export_dir, args.checkpoint_name)
      code = _run_step(args, export_dir, step, state)
      if code and args.stop_on_failure:
        return code if code > 0 else 128 - code
      if args.until_step is not None and step >= args.until_step:
        break
  return 1 if state.failed else 0


def run(args: argparse.Namespace) -> int:
  """Runs COMMAND for each new export, in step order, never twice."""
  _model_dir.list_model_dir(args.model_dir)
  state = _watch_state.WatchState(args.state_file, args.model_dir,
                                  args.checkpoint_name)
  with contextlib.closing(state), _common.sigterm_raises():
    if state.running is not None:
      _command.kill_orphans(state.running)
    if state.failed:
      _report_earlier_failures(args, state)
    if args.until_step is not None and state.last_step >= args.until_step:
      print(f'{_common.PROG}: step {state.last_step} was already handled; '
            'nothing to do', file=sys.stderr)
      return 1 if state.failed else 0
    return _watch_new_exports(args, state)
