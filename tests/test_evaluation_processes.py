"""A trainer process and an evaluator sidecar process, killed at random.

The trainer is `crash_child.py` (after step s its weights all equal s, so an
export shows the step it was made at); the sidecar is `eval_child.py`, which
runs `evaluate_exports` with a `BestExport` and fails if an export serves
another step than its own.
"""

import os
import random
import select
import signal
import subprocess
import sys
import time
from typing import List, Optional

import pytest

import crash_child
from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import evaluation
from ckpt_export import paths
from helpers import child_command
from helpers import child_env
from helpers import finish

pytestmark = pytest.mark.slow

SEED = int(os.environ.get('EVAL_KILL_SEED', '20251121'))
SAVE_EVERY = 2
WAIT_SECONDS = 600
_children: List[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_children():
  """Kills the children a failed test leaves running."""
  yield
  while _children:
    proc = _children.pop()
    proc.kill()
    proc.wait()


def _trainer(model_dir: str, total_steps: int, max_to_keep: int,
             tmp_path) -> subprocess.Popen:
  cmd = [sys.executable, crash_child.__file__, '--model_dir', model_dir,
         '--total_steps', str(total_steps), '--save_every', str(SAVE_EVERY),
         '--max_to_keep', str(max_to_keep)]
  _children.append(subprocess.Popen(
      cmd, stdout=subprocess.PIPE, text=True, env=child_env(),
      stderr=open(tmp_path / 'trainer.err', 'a')))
  return _children[-1]


def _evaluator(model_dir: str, until_step: int, tmp_path,
               *flags: str) -> subprocess.Popen:
  cmd = child_command('eval_child.py', '--model_dir', model_dir,
              '--until_step', str(until_step), *flags)
  _children.append(subprocess.Popen(
      cmd, stdout=subprocess.PIPE, text=True, env=child_env(),
      stderr=open(tmp_path / 'evaluator.err', 'a')))
  return _children[-1]


def _finish(proc: subprocess.Popen, tmp_path, name: str) -> List[str]:
  """Waits for a child to exit with status 0; returns its output lines."""
  [(out, _)] = finish([proc], WAIT_SECONDS, [tmp_path / f'{name}.err'])
  return out.splitlines()


def _read_until(proc: subprocess.Popen, tmp_path, name: str,
                *prefixes: str) -> List[str]:
  """Reads a child's lines up to the first starting with one of `prefixes`.

  Reads the pipe a byte at a time, so that `communicate` gets the rest, and
  fails the test with the child's stderr if it exits or stays silent first.
  """
  deadline = time.monotonic() + WAIT_SECONDS
  fd, lines, line = proc.stdout.fileno(), [], b''
  while not (lines and lines[-1].startswith(prefixes)):
    left = max(deadline - time.monotonic(), 0)
    byte = os.read(fd, 1) if select.select([fd], [], [], left)[0] else None
    if not byte:
      proc.kill()
      with open(tmp_path / f'{name}.err') as f:
        pytest.fail(f'{name} printed no line starting with {prefixes} '
                    + (f'within {WAIT_SECONDS} s' if byte is None else
                       f'before exiting with {proc.wait()}')
                    + f'; stdout:\n{lines}\nstderr:\n{f.read()[-4000:]}')
    line += byte
    if byte == b'\n':
      lines.append(line.decode().strip())
      line = b''
  return lines


def _steps(lines: List[str], kind: str) -> List[int]:
  return [int(line.split()[1]) for line in lines
          if line.startswith(kind + ' ')]


def _check_best(model_dir: str) -> Optional[int]:
  """What a reader relies on: best.json names a copy serving its step."""
  info = best_lib.read_best(model_dir)
  if info is None:
    return None
  assert commit.is_published(info['path'])
  assert paths.parse_export_step(info['path']) == info['step']
  assert crash_child.served_step(info['path']) == info['step']
  return info['step']


def _check_recovered_best(model_dir: str, step: int) -> None:
  """After recovery: exactly one copy, of `step`, and best.json naming it."""
  with best_lib.BestExport(model_dir, 'score') as best:
    assert best.best[0] == step
  # .ckpt_export holds the writer lease.
  copies = [n for n in os.listdir(best.directory)
            if n not in ('best.json', '.ckpt_export', 'offered.json')]
  assert copies == [f'ckpt-{step}_saved_modules']
  assert _check_best(model_dir) == step


def _record(model_dir: str):
  return evaluation.read_metrics(os.path.join(model_dir, 'eval_exports'))


def test_sidecar_sees_every_export_once_in_order(tmp_path):
  model_dir = str(tmp_path / 'model')
  evaluator = _evaluator(model_dir, 20, tmp_path, '--target', '10')
  trainer = _trainer(model_dir, 20, 100, tmp_path)
  _finish(trainer, tmp_path, 'trainer')
  lines = _finish(evaluator, tmp_path, 'evaluator')
  every = list(range(2, 21, 2))
  assert _steps(lines, 'START') == every
  assert _steps(lines, 'EVAL') == every
  assert sorted(_record(model_dir)) == every
  assert _record(model_dir)[10] == {'score': 0.0, 'y': 20.0}
  _check_recovered_best(model_dir, 10)


@pytest.mark.parametrize('mode', ['latest_only', 'every'])
def test_sidecar_never_fails_when_the_trainer_deletes(tmp_path, mode):
  model_dir = str(tmp_path / 'model')
  flags = ['--eval_seconds', '0.3'] + (
      ['--latest_only'] if mode == 'latest_only' else [])
  evaluator = _evaluator(model_dir, 30, tmp_path, *flags)
  trainer = _trainer(model_dir, 30, 1, tmp_path)
  _finish(trainer, tmp_path, 'trainer')
  lines = _finish(evaluator, tmp_path, 'evaluator')
  evaluated = _steps(lines, 'EVAL')
  assert _steps(lines, 'START') == evaluated
  assert evaluated == sorted(set(evaluated)) and evaluated[-1] == 30
  assert set(evaluated) <= set(range(2, 31, 2))
  assert sorted(_record(model_dir)) == evaluated
  _check_recovered_best(model_dir, 30)  # Every step beats the one before.


def test_trainer_killed_and_restarted_while_the_sidecar_evaluates(tmp_path):
  rng = random.Random(SEED)
  model_dir = str(tmp_path / 'model')
  target = 17  # Steps 16 and 18 tie; the first evaluated wins.
  evaluator = _evaluator(model_dir, 30, tmp_path, '--eval_seconds', '0.1',
                         '--target', str(target))
  trainer = _trainer(model_dir, 30, 1, tmp_path)
  _read_until(trainer, tmp_path, 'trainer', 'SAVED')
  time.sleep(rng.uniform(0.0, 1.5))
  trainer.send_signal(signal.SIGKILL)
  trainer.wait()
  _finish(_trainer(model_dir, 30, 1, tmp_path), tmp_path, 'trainer')
  lines = _finish(evaluator, tmp_path, 'evaluator')
  evaluated = _steps(lines, 'EVAL')
  assert _steps(lines, 'START') == evaluated
  assert evaluated == sorted(set(evaluated)) and evaluated[-1] == 30
  expected = max(evaluated, key=lambda s: (-(s - target) ** 2, -s))
  _check_recovered_best(model_dir, expected)


def test_sidecar_killed_at_random_resumes_and_keeps_the_best(tmp_path):
  rng = random.Random(SEED)
  model_dir = str(tmp_path / 'model')
  every = list(range(2, 31, 2))
  _finish(_trainer(model_dir, 30, 100, tmp_path), tmp_path, 'trainer')
  started = set()
  for _ in range(4):
    before = _record(model_dir)
    evaluator = _evaluator(model_dir, 30, tmp_path, '--eval_seconds', '0.02')
    lines = _read_until(evaluator, tmp_path, 'evaluator', 'START', 'DONE')
    time.sleep(rng.uniform(0.0, 1.0))
    evaluator.send_signal(signal.SIGKILL)
    lines += evaluator.communicate(timeout=WAIT_SECONDS)[0].splitlines()
    starts = _steps(lines, 'START')
    # Resumed after the recorded steps, none evaluated again.
    remaining = [s for s in every if s not in before]
    assert starts == remaining[:len(starts)]
    after = _record(model_dir)
    assert set(before) <= set(after) <= set(before) | set(starts)
    started |= set(starts)
    _check_best(model_dir)  # As a reader sees it, before any recovery.
    if after:  # Every step is a new best, offered before it is recorded.
      best_step = best_lib.BestExport(model_dir, 'score').best[0]
      assert max(after) <= best_step and best_step in started
  before = _record(model_dir)
  lines = _finish(_evaluator(model_dir, 30, tmp_path), tmp_path, 'evaluator')
  assert _steps(lines, 'START') == [s for s in every if s not in before]
  assert sorted(_record(model_dir)) == every
  _check_recovered_best(model_dir, 30)


def test_best_export_updates_killed_at_random_instants(tmp_path):
  rng = random.Random(SEED + 1)
  model_dir = str(tmp_path / 'model')
  _finish(_trainer(model_dir, 8, 100, tmp_path), tmp_path, 'trainer')
  last = None  # (step, score) of the last update known to have returned.
  for _ in range(6):
    updater = _evaluator(model_dir, 0, tmp_path, '--update_forever')
    assert _read_until(updater, tmp_path, 'evaluator', 'READY') == ['READY']
    time.sleep(rng.uniform(0.0, 1.5))
    updater.send_signal(signal.SIGKILL)
    lines = updater.communicate(timeout=WAIT_SECONDS)[0].splitlines()
    updates = [line.split() for line in lines if line.startswith('UPDATED ')]
    if updates:
      last = int(updates[-1][1]), float(updates[-1][2])
    _check_best(model_dir)  # As a reader sees it, before any recovery.
    if last is None:
      continue
    with best_lib.BestExport(model_dir, 'score') as best:
      step, metrics = best.best
    # The last returned update, or one after it that got published.
    assert metrics['score'] >= last[1]
    assert metrics['score'] > last[1] or step == last[0]
    _check_recovered_best(model_dir, step)
  assert last is not None
