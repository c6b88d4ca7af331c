"""Soak harness: a trainer killed at random and restarted, and a sidecar.

`run_trainer_with_kills` runs `crash_child.py` (a training job that restores
its last checkpoint and saves every step) on one model directory again and
again, SIGKILLing each run at a random instant, until a last run trains to the
final step. Every other run checkpoints asynchronously. Meanwhile a `Sidecar`,
the installed `ckpt-export watch` running `watch_command.py` on each export,
follows the directory in its own process.
"""

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from typing import List, Optional, Set, Tuple

import crash_child
from helpers import child_command
from helpers import child_env
from helpers import CKPT_EXPORT



def _saved_steps(lines: List[str]) -> List[int]:
  return [int(line.split()[1]) for line in lines if line.startswith('SAVED ')]


class _Trainer:
  """A `crash_child.py` run, started ahead and waiting for its go line."""

  def __init__(self, model_dir: str, max_to_keep: int, final_step: int,
               enable_async: bool, stderr_path: str):
    self.enable_async = enable_async
    self.final_step = final_step
    self.stderr_path = stderr_path
    with open(stderr_path, 'w') as stderr:
      self.proc = subprocess.Popen(
          [sys.executable, crash_child.__file__, '--model_dir', model_dir,
           '--total_steps', str(final_step), '--save_every', '1',
           '--max_to_keep', str(max_to_keep), '--wait_for_go'] +
          (['--enable_async'] if enable_async else []),
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
          text=True, env=child_env())

  def error(self, what: str) -> RuntimeError:
    """An error saying what went wrong, with the end of the run's stderr."""
    with open(self.stderr_path) as f:
      return RuntimeError(f'Trainer {self.proc.pid} {what}; stderr:\n'
                          f'{f.read()[-4000:]}')

  def start(self) -> int:
    """Sends the go line; returns the step it restored."""
    if self.proc.stdout.readline() != 'READY\n':
      raise self.error('did not print READY')
    self.proc.stdin.write('go\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line.startswith('RESTORED '):
      raise self.error(f'printed {line!r} instead of RESTORED')
    return int(line.split()[1])

  def kill_after(self, saves: int, delay: float) -> Tuple[List[int], bool]:
    """SIGKILLs the run `delay` s after its `saves`-th save.

    Args:
      saves: How many saves to let return first.
      delay: Seconds to wait after that one, into the next save.

    Returns:
      The steps of the saves that returned, and whether the run was killed
      (else it finished first).
    """
    lines = [self.proc.stdout.readline() for _ in range(saves)]
    if not all(line.startswith('SAVED ') for line in lines):
      raise self.error(f'printed {lines} instead of {saves} SAVED lines')
    time.sleep(delay)
    killed = self.proc.poll() is None
    if killed:
      self.proc.send_signal(signal.SIGKILL)
    lines += self.finish()
    if not killed:
      self.check_done(lines)
    return _saved_steps(lines), killed

  def finish(self) -> List[str]:
    """Waits for the run to end; returns the lines it printed since start."""
    lines = self.proc.stdout.read().splitlines()
    # Reap it: a zombie's pid still looks alive to ckpt_export's recovery.
    self.proc.wait()
    self.proc.stdout.close()
    self.proc.stdin.close()
    return lines

  def check_done(self, lines: List[str]) -> None:
    """Raises unless the run exited with 0 after printing its DONE line."""
    if self.proc.returncode or lines[-1:] != [f'DONE {self.final_step}']:
      raise self.error(f'ended with {self.proc.returncode} after {lines[-3:]}')


@dataclasses.dataclass
class TrainerRuns:
  """What `run_trainer_with_kills` did.

  Attributes:
    saves: The saves that returned, over all runs.
    kills: The runs SIGKILLed.
    async_runs: The runs that checkpointed asynchronously.
    durable_steps: The steps of the saves that returned in a synchronous run
      or in a run that finished: those that must survive unless garbage
      collected (an async save that returned may still be lost to a kill).
  """
  saves: int = 0
  kills: int = 0
  async_runs: int = 0
  durable_steps: Set[int] = dataclasses.field(default_factory=set)


def run_trainer_with_kills(model_dir: str, log_dir: str, final_step: int,
                           max_to_keep: int, rng: random.Random,
                           saves_per_run: Tuple[int, int],
                           max_delay: float) -> TrainerRuns:
  """Trains to `final_step` with random SIGKILLs, then runs to the end.

  Each run trains towards `final_step` and is killed at a random instant after
  a random number of saves (the instant, not the count, is what matters; the
  count keeps restarts, which cost a TensorFlow import each, few), until a run
  restores within `max_to_keep` steps of `final_step`: that one finishes, so
  that the kept exports are written, and a start follows the last kill. Every
  second run checkpoints asynchronously. The next run is started ahead, so
  that it imports TensorFlow while the current one trains.

  Args:
    model_dir: The model directory.
    log_dir: Where each run's stderr goes.
    final_step: The step the last run finishes at.
    max_to_keep: The trainer's `max_to_keep`.
    rng: The source of randomness.
    saves_per_run: The range (inclusive) of saves before a run's kill.
    max_delay: Kills come uniformly in [0, max_delay] s after those saves.

  Returns:
    What the runs did.
  """
  done = TrainerRuns()
  started = 0

  def new_trainer() -> _Trainer:
    nonlocal started
    started += 1
    return _Trainer(model_dir, max_to_keep, final_step, started % 2 == 0,
                    os.path.join(log_dir, f'trainer{started}.stderr'))

  spare: Optional[_Trainer] = new_trainer()
  trainer: Optional[_Trainer] = None
  try:
    while True:
      trainer, spare = spare, new_trainer()
      done.async_runs += trainer.enable_async
      restored = trainer.start()
      if restored + max_to_keep >= final_step:
        lines = trainer.finish()
        trainer.check_done(lines)
        steps, killed = _saved_steps(lines), False
      else:
        steps, killed = trainer.kill_after(
            min(rng.randint(*saves_per_run),
                final_step - max_to_keep - restored),
            rng.uniform(0, max_delay))
      done.saves += len(steps)
      done.kills += killed
      if not (trainer.enable_async and killed):
        done.durable_steps.update(steps)
      if not killed:
        return done
  finally:
    for proc in (trainer, spare):
      if proc is not None and proc.proc.poll() is None:
        proc.proc.kill()
        proc.finish()


class Sidecar:
  """The installed `ckpt-export watch`, running `watch_command.py` per export.

  It runs in its own process (and session, to kill it with its COMMAND), with
  a state file, until it has handled `until_step`. Its COMMAND loads each
  export and checks that it serves its own step, logging `start <step>`, then
  `done <step>` or `bad <step> <why>` (see `watch_command.py`).
  """

  def __init__(self, model_dir: str, log_dir: str, until_step: int):
    self.log = os.path.join(log_dir, 'sidecar.log')
    self.state_file = os.path.join(log_dir, 'sidecar_state.json')
    self.stderr_path = os.path.join(log_dir, 'sidecar.stderr')
    with open(self.stderr_path, 'w') as stderr:
      self.proc = subprocess.Popen(
          [CKPT_EXPORT, 'watch', model_dir, '--state-file', self.state_file,
           '--seconds-to-sleep', '0.05', '--until-step', str(until_step),
           '--',
           *child_command('watch_command.py', self.log, '{path}', '{step}')],
          stdout=subprocess.DEVNULL, stderr=stderr,
          env=child_env(tf_log_level=None),
          start_new_session=True)

  def wait(self, timeout: float = 900) -> int:
    """Waits for the watch to end (killing it after `timeout` s); its code."""
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      return self.proc.returncode

  def kill(self) -> None:
    """SIGKILLs the watch and its COMMAND, if still running."""
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()

  def logged(self) -> List[Tuple[str, int]]:
    """The (kind, step) of each line of the COMMAND's log."""
    if not os.path.exists(self.log):
      return []
    with open(self.log) as f:
      return [(line.split()[0], int(line.split()[1]))
              for line in f.read().splitlines()]

  def stderr(self) -> str:
    with open(self.stderr_path) as f:
      return f.read()
