"""A tiny training job that `test_crash_kill.py` kills at random instants.

Also the trainer that `test_cli_watch.py` runs beside `ckpt-export watch`.

Usage:
  python tests/children/crash_child.py --model_dir D --total_steps T \
      --save_every K --max_to_keep M [--wait_for_go] [--enable_async] \
      [--seconds_between_saves S] [--pace_file F] [--kill_at STEP]

After training step `s` every weight of the model equals `float(s)`, so any
checkpoint or export reveals the step it was made at: the serving signature
returns `y = x * w + b` (that is `s * (x + 1)`) and the model's own step.
The job restores from `D` (or starts at step 0), checks that the restored
weights match the restored step, then trains to step `T`, saving every `K`
steps with `checkpoint_number=step` and keeping `M` checkpoints. With
`--pace_file`, each save after its first waits until `F` has the line
`start <step of its previous save>` (written by a reader), so that the reader
is always busy with the export the save's garbage collection wants to delete.

Lines printed (flushed) for the parent:
  READY          TensorFlow is imported and the model built; `D` untouched.
  RESTORED <s>   Restored (or initialized) at step `s`; the save loop starts.
  SAVED <s>      `save()` of step `s` returned.
  DONE <s>       Finished at step `s`.
"""

import argparse
import os
import signal
import sys
import time
from typing import Dict

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import tensorflow as tf  # pylint: disable=g-import-not-at-top

import ckpt_export  # pylint: disable=g-import-not-at-top
from ckpt_export import commit  # pylint: disable=g-import-not-at-top
from ckpt_export import fast_export  # pylint: disable=g-import-not-at-top
from ckpt_export import paths  # pylint: disable=g-import-not-at-top
from ckpt_export import savedmodel  # pylint: disable=g-import-not-at-top

MODULE_NAME = 'model'
WIDTH = 4


class StepModel(tf.Module):
  """A model whose weights are all `float(step)` after training step `step`."""

  def __init__(self) -> None:
    super().__init__()
    self.step = tf.Variable(0, dtype=tf.int64, name='step')
    self.w = tf.Variable(tf.zeros([WIDTH]), name='w')
    self.b = tf.Variable(0.0, name='b')

  @tf.function(input_signature=[tf.TensorSpec([WIDTH], tf.float32)])
  def serve(self, x: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Returns `x * w + b` and the step of the weights."""
    return {'y': x * self.w + self.b, 'step': tf.identity(self.step)}

  @property
  def saved_model_signatures(
      self) -> Dict[str, tf.types.experimental.PolymorphicFunction]:
    return {'serving_default': self.serve}

  def train_step(self) -> int:
    """Advances one step and sets every weight to the new step; returns it."""
    step = int(self.step.assign_add(1).numpy())
    self.w.assign(tf.fill([WIDTH], float(step)))
    self.b.assign(float(step))
    return step


# Steps of an export or of an old export's deletion (--kill_at): the object
# and function name, whether the kill comes before or after the call, and at
# which call. The second call of a step of a linked fast export or of a
# deletion; the first call of a step of the first
# export of a run, which is a restarted run's (`FIRST_EXPORT_POINTS`): the
# full save (on the training thread in sync mode, in the checkpoint's write
# callback in async mode), and (async only, `ASYNC_ONLY_POINTS`) the export
# written from the checkpoint's values after it.
# pylint: disable=protected-access
KILL_POINTS = {
    'data_written': (fast_export.Exporter, '_export_checkpoint', 'before', 2),
    'hard_link': (os, 'link', 'after', 2),
    'export_written': (fast_export._Template, 'write_linked', 'after', 2),
    'published': (commit.AtomicRenamePublisher, 'publish', 'after', 2),
    'first_full_save': (savedmodel, 'write_module', 'after', 1),
    'first_traced_written': (fast_export._Template, 'write', 'after', 1),
    # An old export renamed away by garbage collection, its files not removed.
    'unpublished': (commit, 'remove_now', 'before', 2),
}
# The steps of a fast export and of its deletion on gs://, where exports are
# published with a commit marker (`commit.CommitMarkerPublisher`) and the
# variables are a server-side copy, as in `KILL_POINTS`; a fifth item, if
# any, tells the calls that count (by their arguments).
GCS_KILL_POINTS = {
    'data_written': KILL_POINTS['data_written'],
    'server_side_copy': (fast_export._GcsRewrites, 'share', 'after', 2),
    'publish_started': (commit, '_mark_incomplete', 'after', 2),
    'files_moved': (commit, '_move_files', 'after', 2),
    'committed': (commit, 'write_new_file', 'after', 2,
                  lambda path, _: path.endswith('/' + paths.COMMIT_MARKER)),
    'published': (commit.CommitMarkerPublisher, 'publish', 'after', 2),
    'gc_unpublished': (commit, '_walk_files', 'before', 2),
    'gc_files_removed': (tf.io.gfile, 'rmtree', 'before', 2,
                         lambda path: path.endswith('_saved_modules')),
}
# pylint: enable=protected-access
FIRST_EXPORT_POINTS = frozenset(
    point for point, (_, _, _, call, *_) in KILL_POINTS.items() if call == 1)
ASYNC_ONLY_POINTS = frozenset(['first_traced_written'])


def served_step(export_dir: str) -> int:
  """Loads an export of this job; asserts it serves one step's weights.

  Returns:
    The step the export serves: its step variable's, which its weights match.
  """
  loaded = tf.saved_model.load(os.path.join(export_dir, MODULE_NAME))
  out = loaded.signatures['serving_default'](
      tf.range(WIDTH, dtype=tf.float32))
  step, y = int(out['step'].numpy()), out['y'].numpy().tolist()
  assert y == [step * (x + 1.0) for x in range(WIDTH)], (
      f'{export_dir} serves y={y} at step {step}')
  return step


def _kill_at(point: str, model_dir: str) -> None:
  """SIGKILLs this process at a step of saving.

  Args:
    point: The name of the step, in `GCS_KILL_POINTS` for a gs:// `model_dir`,
      else in `KILL_POINTS`.
    model_dir: The model directory.
  """
  points = (GCS_KILL_POINTS if model_dir.startswith('gs://') else
            KILL_POINTS)
  if point not in points:
    raise ValueError(f'--kill_at {point} is not a step of saving to '
                     f'{model_dir}: use one of {sorted(points)}.')
  owner, name, when, call, *only = points[point]
  counts = only[0] if only else lambda *args, **kwargs: True
  function = getattr(owner, name)
  calls = [0]

  def wrapper(*args, **kwargs):
    counted = counts(*args, **kwargs)
    calls[0] += counted
    kill = counted and calls[0] == call
    if kill and when == 'before':
      os.kill(os.getpid(), signal.SIGKILL)
    result = function(*args, **kwargs)
    if kill and when == 'after':
      os.kill(os.getpid(), signal.SIGKILL)
    return result

  setattr(owner, name, wrapper)


def _say(line: str) -> None:
  print(line, flush=True)


def _wait_for_line(path: str, line: str) -> None:
  while True:
    if os.path.exists(path):
      with open(path) as f:
        if line in f.read().splitlines():
          return
    time.sleep(0.05)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--total_steps', type=int, required=True)
  parser.add_argument('--save_every', type=int, required=True)
  parser.add_argument('--max_to_keep', type=int, required=True)
  parser.add_argument('--wait_for_go', action='store_true',
                      help='After READY, wait for a line on stdin before '
                      'touching --model_dir.')
  parser.add_argument('--enable_async', action='store_true',
                      help='Save with CheckpointOptions(enable_async=True).')
  parser.add_argument('--seconds_between_saves', type=float, default=0.0)
  parser.add_argument('--kill_at',
                      choices=sorted({*KILL_POINTS, *GCS_KILL_POINTS}),
                      help='SIGKILL this process at this step of an export '
                      'or deletion (see KILL_POINTS, GCS_KILL_POINTS).')
  parser.add_argument('--pace_file',
                      help='Before each save but the first, wait until this '
                      'file has the line "start <previous saved step>".')
  args = parser.parse_args()
  options = tf.train.CheckpointOptions(enable_async=args.enable_async)
  if args.kill_at:
    _kill_at(args.kill_at, args.model_dir)

  model = StepModel()
  _say('READY')
  if args.wait_for_go:
    sys.stdin.readline()

  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model), args.model_dir,
      max_to_keep=args.max_to_keep, modules_to_export={MODULE_NAME: model})
  manager.restore_or_initialize()
  step = int(model.step.numpy())
  weights = [*model.w.numpy().tolist(), float(model.b.numpy())]
  if step % args.save_every or weights != [float(step)] * (WIDTH + 1):
    raise RuntimeError(f'Restored weights {weights} do not match the restored '
                       f'step {step}.')
  _say(f'RESTORED {step}')
  last_saved = None
  while step < args.total_steps:
    step = model.train_step()
    if step % args.save_every == 0:
      if args.pace_file and last_saved is not None:
        _wait_for_line(args.pace_file, f'start {last_saved}')
      manager.save(checkpoint_number=step, options=options)
      last_saved = step
      _say(f'SAVED {step}')
      time.sleep(args.seconds_between_saves)
  manager.sync()  # As orbit does: the async write and its cleanup finish.
  _say(f'DONE {step}')


if __name__ == '__main__':
  main()
