"""A training job feeding a serving view, which `test_serving.py` kills.

Usage:
  python tests/children/serving_child.py MODEL_DIR SERVING_DIR MAX_VERSIONS \
      [async]

Restores from MODEL_DIR, then saves a checkpoint with its export at every step
(the module's weights all equal the step) and publishes the latest export
into the view after each save, forever. Prints `SAVED <step>` (flushed) after
each publication.
"""

import os
import sys

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

# pylint: disable=g-import-not-at-top
import tensorflow as tf

from ckpt_export import manager as manager_lib
from ckpt_export import serving
from helpers import N_FEATURES
from helpers import Scale
# pylint: enable=g-import-not-at-top


def main(model_dir: str, serving_dir: str, max_versions: str,
         *mode: str) -> None:
  module = Scale()
  step = tf.Variable(0, dtype=tf.int64)
  manager = manager_lib.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=module, step=step), model_dir, max_to_keep=3,
      modules_to_export={'scale': module})
  manager.restore_or_initialize()
  view = serving.ServingView(serving_dir, max_versions=int(max_versions))
  options = tf.train.CheckpointOptions(enable_async=mode == ('async',))
  while True:
    step.assign_add(1)
    module.w.assign(tf.fill([N_FEATURES], float(step.numpy())))
    manager.save(checkpoint_number=step, options=options)
    view.publish_latest(model_dir)
    print(f'SAVED {int(step.numpy())}', flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
