"""The small regression task the examples train, and what they show at the end.

A two-layer tf_keras MLP on synthetic data made with a fixed seed (no
downloads), exported as `MODULE_NAME` with a `serving_default` signature
(features -> {'prediction'}), plus the examples' closing summary and their
check that the latest export serves what the trained model computes.
"""

import os
import sys
import textwrap
from typing import Any, Callable, Dict, Iterable, Tuple

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

import ckpt_export

NUM_FEATURES = 8
NUM_EXAMPLES = 1024
DATA_SEED = 42
MODULE_NAME = 'regressor'


def quiet_logging() -> None:
  """Logs warnings and errors only, unless --verbosity was given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel('WARNING')


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


def print_summary(model_dir: str, step: int, checkpoints: Iterable[str],
                  exports: Iterable[str]) -> None:
  """Prints what is kept in `model_dir`, and how to load the latest export."""
  print(f'\nTrained to step {step}. Kept in {model_dir}:')
  print('  checkpoints:', ', '.join(os.path.basename(p) for p in checkpoints))
  print('  exports:')
  for path in exports:
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


def check_latest_export(model_dir: str, model: Regressor,
                        features: tf.Tensor) -> None:
  """Loads the latest export as a user would; exits unless it serves `model`."""
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
