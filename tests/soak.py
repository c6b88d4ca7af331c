"""Soak harness: a trainer killed at random and restarted, and a reader.

`run_trainer_with_kills` runs `crash_child.py` (a training job that restores
its last checkpoint and saves every step) on one model directory again and
again, SIGKILLing each run at a random instant, until at least `min_saves`
saves have returned, then runs it once more to completion. Meanwhile an
`ExportReader` follows the directory with `readers.savedmodels_iterator` and
loads every export it is given. Anything else that must keep working while the
trainer crashes (an evaluator, a sidecar) can be run beside them.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import readers
import crash_child

ENDLESS_STEPS = 10**9


class _Trainer:
  """A `crash_child.py` run, started ahead and waiting for its go line."""

  def __init__(self, model_dir: str, max_to_keep: int, total_steps: int,
               stderr_path: str):
    self.stderr_path = stderr_path
    with open(stderr_path, 'w') as stderr:
      self.proc = subprocess.Popen(
          [sys.executable, crash_child.__file__, '--model_dir', model_dir,
           '--total_steps', str(total_steps), '--save_every', '1',
           '--max_to_keep', str(max_to_keep), '--wait_for_go'],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
          text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))

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

  def kill_after(self, saves: int, delay: float) -> int:
    """SIGKILLs the run `delay` s after its `saves`-th save; returns its saves.

    Args:
      saves: How many saves to let return first.
      delay: Seconds to wait after that one, into the next save.

    Returns:
      The number of saves that returned before the kill.
    """
    for _ in range(saves):
      line = self.proc.stdout.readline()
      if not line.startswith('SAVED '):
        raise self.error(f'printed {line!r} instead of SAVED')
    time.sleep(delay)
    if self.proc.poll() is not None:
      raise self.error(f'exited with {self.proc.returncode} before the kill')
    self.proc.send_signal(signal.SIGKILL)
    return saves + sum(line.startswith('SAVED ') for line in self.finish())

  def finish(self) -> List[str]:
    """Waits for the run to end; returns the lines it printed since start."""
    lines = self.proc.stdout.read().splitlines()
    # Reap it: a zombie's pid still looks alive to ckpt_export's recovery.
    self.proc.wait()
    self.proc.stdout.close()
    self.proc.stdin.close()
    return lines


def run_trainer_with_kills(model_dir: str, log_dir: str, min_saves: int,
                           max_to_keep: int, rng: random.Random,
                           saves_per_run: Tuple[int, int],
                           max_delay: float) -> Tuple[int, int, int]:
  """Trains with random SIGKILLs until `min_saves` saves, then to the end.

  Each run is killed at a random instant after a random number of saves (the
  instant, not the count, is what matters; the count keeps restarts, which
  cost a TensorFlow import each, few). The next run is started ahead, so that
  it imports TensorFlow while the current one trains.

  Args:
    model_dir: The model directory.
    log_dir: Where each run's stderr goes.
    min_saves: Saves (that returned) to reach before the last run.
    max_to_keep: The trainer's `max_to_keep`.
    rng: The source of randomness.
    saves_per_run: The range (inclusive) of saves before a run's kill.
    max_delay: Kills come uniformly in [0, max_delay] s after those saves.

  Returns:
    The number of saves, of kills, and the step the last run finished at.
  """
  saves = kills = 0
  runs = 0

  def new_trainer(total_steps: int) -> _Trainer:
    nonlocal runs
    runs += 1
    return _Trainer(model_dir, max_to_keep, total_steps,
                    os.path.join(log_dir, f'trainer{runs}.stderr'))

  spare: Optional[_Trainer] = new_trainer(ENDLESS_STEPS)
  try:
    while saves < min_saves:
      trainer, spare = spare, new_trainer(ENDLESS_STEPS)
      trainer.start()
      saves += trainer.kill_after(rng.randint(*saves_per_run),
                                  rng.uniform(0, max_delay))
      kills += 1
    spare.proc.kill()
    spare.finish()
    latest = tf.train.latest_checkpoint(model_dir)
    restored_step = paths.parse_checkpoint_step(latest) if latest else 0
    final_step = restored_step + max_to_keep
    spare = new_trainer(final_step)
    if spare.start() != restored_step:
      raise spare.error(f'did not restore step {restored_step}')
    lines = spare.finish()
    if spare.proc.returncode or lines[-1:] != [f'DONE {final_step}']:
      raise spare.error(f'did not finish at step {final_step}: {lines[-3:]}')
    spare = None
    return saves, kills, final_step
  finally:
    if spare is not None and spare.proc.poll() is None:
      spare.proc.kill()
      spare.finish()


def serves_its_step(export_dir: str) -> int:
  """Loads a `crash_child` export; asserts it serves its step, returns it."""
  step = paths.parse_export_step(export_dir)
  loaded = tf.saved_model.load(os.path.join(export_dir,
                                            crash_child.MODULE_NAME))
  x = np.arange(crash_child.WIDTH, dtype=np.float32)
  out = loaded.signatures['serving_default'](tf.constant(x))
  np.testing.assert_array_equal(out['y'].numpy(), step * (x + 1),
                                err_msg=export_dir)
  assert int(out['step'].numpy()) == step, export_dir
  return step


class ExportReader(threading.Thread):
  """Follows a model directory as an evaluator would, loading every export.

  An export may be deleted by the trainer's garbage collection before or while
  it is loaded; that is `gone`, not an error, if it is no longer published
  when the load fails. Anything else (a load that fails while the export is
  still published, or wrong values) is an error.
  """

  def __init__(self, model_dir: str, seconds_to_sleep: float = 0.02):
    super().__init__(daemon=True)
    self._model_dir = model_dir
    self._seconds_to_sleep = seconds_to_sleep
    self._done = threading.Event()
    self.served: List[int] = []
    self.gone: List[int] = []
    self.errors: List[str] = []

  def run(self) -> None:
    for path in readers.savedmodels_iterator(
        self._model_dir, timeout=0.2, timeout_fn=self._done.is_set,
        seconds_to_sleep=self._seconds_to_sleep):
      self._read(path)

  def _read(self, path: str) -> None:
    # A failed load is tried again once: the export may have been replaced
    # (the same step saved again after a restart) while it was read.
    for attempt in (1, 2):
      try:
        self.served.append(serves_its_step(path))
        return
      except AssertionError as e:  # Wrong values: never acceptable.
        self.errors.append(f'{path}: {e}')
        return
      except (tf.errors.OpError, OSError, ValueError) as e:
        if not commit.is_published(path):
          self.gone.append(paths.parse_export_step(path))
          return
        if attempt == 2:
          self.errors.append(f'{path}: {e!r}')

  def stop(self) -> None:
    """Ends the reader after its next timeout and waits for it."""
    self._done.set()
    self.join()
