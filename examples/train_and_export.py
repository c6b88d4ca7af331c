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
import sys
import tempfile
import textwrap
from typing import Any, Callable, Dict, List, Tuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF loads.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

import ckpt_export

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

NUM_FEATURES = 8
NUM_EXAMPLES = 1024
DATA_SEED = 42
MODULE_NAME = 'regressor'


class Regressor(tf_keras.Model):
  """A two-layer MLP mapping `NUM_FEATURES` features to one value."""

  def __init__(self, hidden_units: int = 32):
    super().__init__(name=MODULE_NAME)
    self.hidden = tf_keras.layers.Dense(hidden_units, activation='relu')
    self.head = tf_keras.layers.Dense(1)

  def call(self, features: tf.Tensor, training: bool = False) -> tf.Tensor:
    return self.head(self.hidden(features))

  @tf.function(input_signature=[
      tf.TensorSpec([None, NUM_FEATURES], tf.float32, name='features')])
  def serve(self, features: tf.Tensor) -> Dict[str, tf.Tensor]:
    """The serving function: features -> {'prediction': [batch, 1]}."""
    return {'prediction': self(features, training=False)}

  @property
  def saved_model_signatures(self) -> Dict[str, Callable[..., Any]]:
    """Signatures for export; read by ckpt_export at each save."""
    return {'serving_default': self.serve}


def make_dataset() -> Tuple[tf.Tensor, tf.Tensor]:
  """Returns synthetic (features, targets): a noisy nonlinear function."""
  rng = np.random.default_rng(DATA_SEED)
  x = rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32)
  w = rng.normal(size=(NUM_FEATURES, 1)).astype(np.float32)
  y = np.tanh(x @ w) + 0.5 * x[:, :1] ** 2
  y += 0.05 * rng.normal(size=y.shape).astype(np.float32)
  return tf.constant(x), tf.constant(y)


def main(argv: List[str]) -> None:
  """Trains, saving and exporting as it goes, then checks the export."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel('WARNING')
  model_dir = _MODEL_DIR.value or tempfile.mkdtemp(prefix='train_and_export_')
  print(f'Model directory: {model_dir}')

  tf.keras.utils.set_random_seed(DATA_SEED)
  features, targets = make_dataset()
  model = Regressor()
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
      modules_to_export={MODULE_NAME: model})
  restored = manager.restore_or_initialize()
  if restored:
    print(f'Resumed from {restored} at step {int(step.numpy())}.')
  else:
    print('No checkpoint found: starting from step 0.')

  @tf.function
  def train_step() -> tf.Tensor:
    # The batch depends only on the step, so a resumed run sees the same
    # batches as an uninterrupted one.
    seed = tf.stack([tf.constant(DATA_SEED, tf.int64), step])
    idx = tf.random.stateless_uniform(
        [_BATCH_SIZE.value], seed=seed, maxval=NUM_EXAMPLES, dtype=tf.int32)
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
    latest = manager.latest_savedmodel

  print(f'\nTrained to step {current}. Kept in {model_dir}:')
  print('  checkpoints:', ', '.join(
      os.path.basename(p) for p in manager.checkpoints))
  print('  exports:')
  for path in manager.savedmodels:
    print(f'    step {ckpt_export.parse_export_step(path):5d}  '
          f'{os.path.join(path, MODULE_NAME)}')

  print('\nTo load the latest export (from any process, no trainer needed):\n')
  print(textwrap.indent(textwrap.dedent(f"""\
      import tensorflow as tf
      import ckpt_export

      export = ckpt_export.latest_savedmodel({model_dir!r})
      regressor = tf.saved_model.load(export + '/{MODULE_NAME}')
      serve = regressor.signatures['serving_default']
      print(serve(features=tf.zeros([2, {NUM_FEATURES}]))['prediction'])
      """), '    '))

  # Do just that, and check the export serves what the model in memory does.
  serve = tf.saved_model.load(
      os.path.join(ckpt_export.latest_savedmodel(model_dir), MODULE_NAME)
  ).signatures['serving_default']
  batch = features[:16]
  served = serve(features=batch)['prediction'].numpy()
  expected = model(batch, training=False).numpy()
  max_diff = float(np.max(np.abs(served - expected)))
  if not np.allclose(served, expected, rtol=1e-6, atol=1e-6):
    sys.exit(f'ERROR: the latest export serves different predictions than the '
             f'trained model (max abs difference {max_diff:g}).')
  print(f'Loaded the latest export and served {len(batch)} examples: '
        f'predictions match the trained model (max abs difference '
        f'{max_diff:g}).')


if __name__ == '__main__':
  app.run(main)
