"""A training job under a tf.distribute strategy, for `test_distribute.py`.

Usage:
  python tests/children/distribute_job.py --strategy {mirrored,multi_worker} \
      --model_dir D --total_steps T --save_every K --max_to_keep M [--async]

`mirrored` runs MirroredStrategy over two logical CPUs of this process;
`multi_worker` runs MultiWorkerMirroredStrategy as the task TF_CONFIG names.
Every process runs this same script, as a user runs their training script on
each host.

After training step `s`, the mirrored weights all equal `s`, and the SyncOnRead
counter, to which every replica adds 1 per step, sums to `replicas * s`: saving
it needs every worker's part. The export serves `y = x * w + counter`, so an
export of step `s` serves `(1 + replicas) * s` for `x = 1`.

Lines printed for the parent: `RESTORED <step>`, then `SAVED <step> <latest
checkpoint>` per save, then `EXPORTS <full> <fast> <linked>` (this process's
counts), then `DONE <replicas>`. With `--full_export_dir`, a full export of
the last step's values (`tf.saved_model.save` under the strategy) is written
there at the end, to compare the manager's exports with.
"""

import argparse
import os
import sys
from typing import Dict

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import tensorflow as tf  # pylint: disable=g-import-not-at-top

import ckpt_export  # pylint: disable=g-import-not-at-top
from ckpt_export import savedmodel  # pylint: disable=g-import-not-at-top

MODULE_NAME = 'model'
WIDTH = 4


class CountingModel(tf.Module):
  """Mirrored weights set to the step, and a SyncOnRead per-replica counter."""

  def __init__(self) -> None:
    super().__init__()
    self.step = tf.Variable(0, dtype=tf.int64, name='step')
    self.w = tf.Variable(tf.zeros([WIDTH]), name='w')
    self.counter = tf.Variable(
        0.0, name='counter',
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM)

  @tf.function(input_signature=[tf.TensorSpec([None, WIDTH], tf.float32)])
  def serve(self, x: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {'y': x * self.w + self.counter}

  @property
  def saved_model_signatures(self):
    return {'serving_default': self.serve}


def _make_strategy(name: str) -> tf.distribute.Strategy:
  if name == 'mirrored':
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  return tf.distribute.MultiWorkerMirroredStrategy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--strategy', choices=['mirrored', 'multi_worker'],
                      required=True)
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--total_steps', type=int, required=True)
  parser.add_argument('--save_every', type=int, required=True)
  parser.add_argument('--max_to_keep', type=int, required=True)
  parser.add_argument('--async', dest='use_async', action='store_true')
  parser.add_argument('--full_export_dir')
  args = parser.parse_args()

  strategy = _make_strategy(args.strategy)
  with strategy.scope():
    model = CountingModel()
  # Built outside the scope, as Model Garden does: the manager finds the
  # strategy from the checkpoint's variables.
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model), args.model_dir,
      max_to_keep=args.max_to_keep, modules_to_export={MODULE_NAME: model})
  manager.restore_or_initialize()
  step = int(model.step.numpy())
  print(f'RESTORED {step}', flush=True)

  @tf.function
  def count() -> None:
    strategy.run(lambda: model.counter.assign_add(1.0))

  options = tf.train.CheckpointOptions(enable_async=args.use_async)
  while step < args.total_steps:
    count()
    step = int(model.step.assign_add(1).numpy())
    model.w.assign(tf.fill([WIDTH], float(step)))
    if step % args.save_every == 0:
      manager.save(checkpoint_number=step, options=options)
      print(f'SAVED {step} {manager.latest_checkpoint}', flush=True)
  manager.sync()
  module, = manager._exporter.modules  # pylint: disable=protected-access
  print(f'EXPORTS {module.full_exports} {module.fast_exports} '
        f'{module.linked_exports}', flush=True)
  if args.full_export_dir:
    savedmodel.write_module(MODULE_NAME, model, args.full_export_dir)
  print(f'DONE {strategy.num_replicas_in_sync}', flush=True)


if __name__ == '__main__':
  main()
