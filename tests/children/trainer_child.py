"""A trainer that writes checkpoints only, for the decoupled exporter's test.

Usage:
  python tests/children/trainer_child.py MODEL_DIR STEPS MAX_TO_KEEP SECONDS

Sets the weights of a `helpers.Scale` module to `step` and saves checkpoint
`step` with a plain `tf.train.CheckpointManager`, every SECONDS, then prints
DONE. The weights are overwritten right after each save.
"""

import os
import sys
import time

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from helpers import N_FEATURES, Scale  # pylint: disable=g-import-not-at-top


def main(model_dir: str, steps: int, max_to_keep: int, seconds: float) -> None:
  scale = Scale()
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(module=scale),
                                       model_dir, max_to_keep)
  for step in range(1, steps + 1):
    scale.w.assign(tf.fill([N_FEATURES], float(step)))
    manager.save(checkpoint_number=step)
    scale.w.assign(tf.fill([N_FEATURES], -1.0))
    time.sleep(seconds)
  print('DONE', flush=True)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
