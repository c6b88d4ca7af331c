"""The COMMAND that `ckpt-export watch` runs in test_cli_watch.py and soak.py.

Usage:
  python tests/children/watch_command.py LOG {path} {step} \
      [--wait_for_gc DONE_FILE] [--hold_step N --hold_file F]

Appends `start <step>` to LOG, waits as asked, then loads the export (the
module of `crash_child.py`), checks that it serves the values of its own step
and that the watch passed the same path and step in its environment, and
appends `done <step>`. On any mismatch it appends `bad <step> <why>` and exits
with code 3.

--wait_for_gc: before loading, wait until the trainer deleted checkpoint
  <step> (its garbage collection then wants the export gone too) or
  DONE_FILE exists (the trainer finished).
--hold_step/--hold_file: at step N, wait until F exists before loading (the
  test kills the watch meanwhile).
"""

import argparse
import os
import sys
import time

import crash_child


def _append(log: str, line: str) -> None:
  with open(log, 'a') as f:
    f.write(line + '\n')


def _wait_until(condition) -> None:
  while not condition():
    time.sleep(0.05)


def _check(export_dir: str, step: int) -> str:
  """Returns what is wrong with the export, or ''."""
  if os.environ.get('CKPT_EXPORT_PATH') != export_dir:
    return f'CKPT_EXPORT_PATH={os.environ.get("CKPT_EXPORT_PATH")}'
  if os.environ.get('CKPT_EXPORT_STEP') != str(step):
    return f'CKPT_EXPORT_STEP={os.environ.get("CKPT_EXPORT_STEP")}'
  if os.environ.get('CKPT_EXPORT_MODEL_DIR') != os.path.dirname(export_dir):
    return f'CKPT_EXPORT_MODEL_DIR={os.environ.get("CKPT_EXPORT_MODEL_DIR")}'
  try:
    served = crash_child.served_step(export_dir)
  except AssertionError as e:
    return str(e)
  return '' if served == step else f'serves step {served}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('log')
  parser.add_argument('export_dir')
  parser.add_argument('step', type=int)
  parser.add_argument('--wait_for_gc', metavar='DONE_FILE')
  parser.add_argument('--hold_step', type=int)
  parser.add_argument('--hold_file')
  args = parser.parse_args()

  _append(args.log, f'start {args.step}')
  if args.wait_for_gc:
    index = (args.export_dir[:-len('_saved_modules')] + '.index')
    _wait_until(lambda: not os.path.exists(index) or
                os.path.exists(args.wait_for_gc))
  if args.step == args.hold_step:
    _wait_until(lambda: os.path.exists(args.hold_file))
  problem = _check(args.export_dir, args.step)
  if problem:
    _append(args.log, f'bad {args.step} {problem}')
    sys.exit(3)
  _append(args.log, f'done {args.step}')


if __name__ == '__main__':
  main()
