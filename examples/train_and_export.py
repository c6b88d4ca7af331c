r"""Trains a small regressor, checkpointing and exporting it as it goes.

The "main job" of ckpt_export: a short training run of a two-layer tf_keras
MLP on synthetic regression data (made with a fixed seed, no downloads). Every
`--save_every` steps, `ckpt_export.SavedModelCheckpointManager` writes a
checkpoint and, before it, a SavedModel export of the model with a
`serving_default` signature, under

    <model_dir>/ckpt-<step>                              checkpoint
    <model_dir>/ckpt-<step>_saved_modules/regressor/     SavedModel

and keeps the last `--max_to_keep` of each, in step with each other. Run it
again with the same `--model_dir` and a higher `--train_steps` to resume from
the latest checkpoint. At the end it loads the latest export and checks that it
serves the same predictions as the model in memory.

Usage:

  python examples/train_and_export.py --model_dir=/tmp/regressor
  python examples/train_and_export.py --model_dir=/tmp/regressor \
      --train_steps=400   # resumes at step 200

Logging is limited to warnings and errors; `--verbosity=0` shows absl's INFO
lines too (ckpt_export's "Removing export" messages among them), and
TF_CPP_MIN_LOG_LEVEL=0 TensorFlow's C++ ones.
"""

import os
import tempfile
from typing import List

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF loads.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
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
_SAVE_EVERY = flags.DEFINE_integer(
    'save_every', 50, 'Checkpoint and export every this many steps (and at '
    'the last step).', lower_bound=1)
_MAX_TO_KEEP = flags.DEFINE_integer(
    'max_to_keep', 3, 'How many checkpoints (with their exports) to keep.',
    lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Training batch size.',
                                   lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 0.01,
                                    'Adam learning rate.')


def main(argv: List[str]) -> None:
  """Trains, saving and exporting as it goes, then checks the export."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  regression.quiet_logging()
  model_dir = _MODEL_DIR.value or tempfile.mkdtemp(prefix='train_and_export_')
  print(f'Model directory: {model_dir}')

  tf.keras.utils.set_random_seed(regression.DATA_SEED)
  features, targets = regression.make_dataset()
  model = regression.Regressor()
  optimizer = tf_keras.optimizers.Adam(_LEARNING_RATE.value)
  # Create all variables up front, so restore() fills them in immediately.
  model(features[:1])
  optimizer.build(model.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')

  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
  manager = ckpt_export.SavedModelCheckpointManager(
      checkpoint,
      directory=model_dir,
      max_to_keep=_MAX_TO_KEEP.value,
      modules_to_export={regression.MODULE_NAME: model})
  restored = manager.restore_or_initialize()
  if restored:
    print(f'Resumed from {restored} at step {int(step.numpy())}.')
  else:
    print('No checkpoint found: starting from step 0.')

  @tf.function
  def train_step() -> tf.Tensor:
    # The batch depends only on the step, so a resumed run sees the same
    # batches as an uninterrupted one.
    seed = tf.stack([tf.constant(regression.DATA_SEED, tf.int64), step])
    idx = tf.random.stateless_uniform(
        [_BATCH_SIZE.value], seed=seed, maxval=regression.NUM_EXAMPLES,
        dtype=tf.int32)
    x, y = tf.gather(features, idx), tf.gather(targets, idx)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    step.assign_add(1)
    return loss

  train_steps = _TRAIN_STEPS.value
  while int(step.numpy()) < train_steps:
    loss = train_step()
    current = int(step.numpy())
    if current % _SAVE_EVERY.value == 0 or current == train_steps:
      path = manager.save(checkpoint_number=current)
      print(f'step {current:5d}  loss {float(loss):.4f}  saved {path}')

  current = int(step.numpy())
  latest = manager.latest_savedmodel
  if latest is None or ckpt_export.parse_export_step(latest) != current:
    # Nothing trained in this run and nothing to resume from (e.g.
    # --train_steps=0): save so the export matches the model in memory.
    manager.save(checkpoint_number=current)

  regression.print_summary(model_dir, current, manager.checkpoints,
                           manager.savedmodels)
  # Do what the summary says, and check the export serves the trained model.
  regression.check_latest_export(model_dir, model, features)


if __name__ == '__main__':
  app.run(main)
