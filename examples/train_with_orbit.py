r"""Trains the example regressor with orbit, Model Garden style.

An `orbit.Controller` drives an `orbit.StandardTrainer` and an
`orbit.StandardEvaluator`, and checkpoints through
`ckpt_export.SavedModelCheckpointManager`: every `--checkpoint_interval` steps
(checked after each loop of `--steps_per_loop` steps) and at the end, it writes

    <model_dir>/ckpt-<step>                              checkpoint
    <model_dir>/ckpt-<step>_saved_modules/regressor/     SavedModel

and keeps the last `--max_to_keep` of each. With `--async_checkpointing` the
checkpoints are written in the background (orbit's
`enable_async_checkpointing`); the exports are kept all the same. Run it again
with the same `--model_dir` and a higher `--train_steps`: the Controller
restores the latest checkpoint and training resumes from there. At the end it
loads the latest export and checks that it serves the trained model.

Usage:

  python examples/train_with_orbit.py --model_dir=/tmp/orbit_regressor
  python examples/train_with_orbit.py --model_dir=/tmp/orbit_regressor \
      --train_steps=400 --async_checkpointing   # resumes at step 200

Logging is limited to warnings and errors, besides orbit's own progress lines;
`--verbosity=0` shows absl's INFO lines too.
"""

import os
import tempfile
from typing import Dict, List

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF loads.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import orbit
import tensorflow as tf
import tf_keras

import ckpt_export
import regression

_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None,
    'Where to write checkpoints and exports (local path or gs://...). '
    'Default: a fresh temporary directory.')
_TRAIN_STEPS = flags.DEFINE_integer(
    'train_steps', 200, 'Train until the global step reaches this.',
    lower_bound=0)
_STEPS_PER_LOOP = flags.DEFINE_integer(
    'steps_per_loop', 10, 'Training steps per orbit inner loop.',
    lower_bound=1)
_CHECKPOINT_INTERVAL = flags.DEFINE_integer(
    'checkpoint_interval', 50, 'Checkpoint and export when at least this many '
    'steps have passed since the last checkpoint (and at the end).',
    lower_bound=1)
_MAX_TO_KEEP = flags.DEFINE_integer(
    'max_to_keep', 3, 'How many checkpoints (with their exports) to keep.',
    lower_bound=1)
_ASYNC_CHECKPOINTING = flags.DEFINE_bool(
    'async_checkpointing', False, 'Write checkpoints in the background.')
_EVAL_INTERVAL = flags.DEFINE_integer(
    'eval_interval', 100, 'Evaluate every this many training steps (and at '
    'the end).', lower_bound=1)
_EVAL_STEPS = flags.DEFINE_integer(
    'eval_steps', -1, 'Evaluation batches; -1 evaluates the whole eval set.',
    lower_bound=-1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size.',
                                   lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 0.01,
                                    'Adam learning rate.')

# The last examples are held out for evaluation.
NUM_EVAL_EXAMPLES = 128


class RegressionTrainer(orbit.StandardTrainer):
  """Minimizes the mean squared error with Adam."""

  def __init__(self, model: regression.Regressor,
               optimizer: tf_keras.optimizers.Optimizer,
               global_step: tf.Variable, dataset: tf.data.Dataset):
    self.model = model
    self.optimizer = optimizer
    self.global_step = global_step
    self.train_loss = tf_keras.metrics.Mean('loss')
    super().__init__(train_dataset=dataset)

  def train_loop_begin(self) -> None:
    self.train_loss.reset_states()

  def train_step(self, iterator) -> None:
    features, targets = next(iterator)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(
          tf.square(self.model(features, training=True) - targets))
    grads = tape.gradient(loss, self.model.trainable_variables)
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
    self.train_loss.update_state(loss)
    self.global_step.assign_add(1)

  def train_loop_end(self) -> Dict[str, tf.Tensor]:
    return {'loss': self.train_loss.result()}


class RegressionEvaluator(orbit.StandardEvaluator):
  """Reports the mean squared error on the held-out examples."""

  def __init__(self, model: regression.Regressor, dataset: tf.data.Dataset):
    self.model = model
    self.eval_loss = tf_keras.metrics.MeanSquaredError('loss')
    # A Python loop over the steps, so that -1 runs to the end of the data.
    super().__init__(
        eval_dataset=dataset,
        options=orbit.StandardEvaluatorOptions(use_tf_while_loop=False))

  def eval_begin(self) -> None:
    self.eval_loss.reset_states()

  def eval_step(self, iterator) -> None:
    features, targets = next(iterator)
    self.eval_loss.update_state(targets, self.model(features, training=False))

  def eval_end(self) -> Dict[str, tf.Tensor]:
    return {'loss': self.eval_loss.result()}


def main(argv: List[str]) -> None:
  """Trains and evaluates with orbit, then checks the latest export."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  regression.quiet_logging()
  model_dir = _MODEL_DIR.value or tempfile.mkdtemp(prefix='train_with_orbit_')
  print(f'Model directory: {model_dir}')

  tf.keras.utils.set_random_seed(regression.DATA_SEED)
  features, targets = regression.make_dataset()
  split = regression.NUM_EXAMPLES - NUM_EVAL_EXAMPLES
  train_data = tf.data.Dataset.from_tensor_slices(
      (features[:split], targets[:split])).repeat().shuffle(
          split, seed=regression.DATA_SEED).batch(_BATCH_SIZE.value)
  eval_data = tf.data.Dataset.from_tensor_slices(
      (features[split:], targets[split:])).batch(_BATCH_SIZE.value)

  model = regression.Regressor()
  optimizer = tf_keras.optimizers.Adam(_LEARNING_RATE.value)
  # Create all variables up front, so restore() fills them in immediately.
  model(features[:1])
  optimizer.build(model.trainable_variables)
  global_step = orbit.utils.create_global_step()

  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model, optimizer=optimizer,
                          global_step=global_step),
      directory=model_dir,
      max_to_keep=_MAX_TO_KEEP.value,
      modules_to_export={regression.MODULE_NAME: model},
      step_counter=global_step,
      checkpoint_interval=_CHECKPOINT_INTERVAL.value)
  # Restores the latest checkpoint, if any.
  controller = orbit.Controller(
      global_step=global_step,
      trainer=RegressionTrainer(model, optimizer, global_step, train_data),
      evaluator=RegressionEvaluator(model, eval_data),
      steps_per_loop=_STEPS_PER_LOOP.value,
      checkpoint_manager=manager,
      enable_async_checkpointing=_ASYNC_CHECKPOINTING.value)
  if manager.latest_checkpoint:
    print(f'Resumed from {manager.latest_checkpoint} at step '
          f'{int(global_step.numpy())}.')
  else:
    print('No checkpoint found: starting from step 0.')

  controller.train_and_evaluate(
      train_steps=_TRAIN_STEPS.value, eval_steps=_EVAL_STEPS.value,
      eval_interval=_EVAL_INTERVAL.value)
  # The Controller has saved the last step (unless it was restored as is).
  regression.print_summary(model_dir, int(global_step.numpy()),
                           manager.checkpoints, manager.savedmodels)
  # Do what the summary says, and check the export serves the trained model.
  regression.check_latest_export(model_dir, model, features)


if __name__ == '__main__':
  app.run(main)
