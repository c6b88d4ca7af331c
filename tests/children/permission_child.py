"""Saves while the model directory turns read-only, for `test_faults.py`.

Usage (as a user whom file permissions apply to, i.e. not root):
  python tests/children/permission_child.py --model_dir D \
      --when {before,mid_publish}

Saves step 1, then saves step 2 with the model directory made read-only
(mode 0555) either before that save, or while it writes its export: the
second module's signatures are looked up after the first module is written
into the work directory, and that lookup takes away the write permission, so
the export's files all get written but it cannot be published. Prints one
JSON line: the error step 2's save raised (type and message), or null.
"""

import argparse
import json
import os
import sys

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import tensorflow as tf  # pylint: disable=g-import-not-at-top

import ckpt_export  # pylint: disable=g-import-not-at-top
import helpers  # pylint: disable=g-import-not-at-top


class Scale(helpers.Scale):
  """A `helpers.Scale` that runs a hook when asked for its signatures."""

  def __init__(self, hook=None) -> None:
    super().__init__()
    self._hook = hook

  @property
  def saved_model_signatures(self):
    if self._hook is not None:
      self._hook()
    return super().saved_model_signatures


def _save(model_dir: str, step: int, hook=None) -> None:
  first, second = Scale(), Scale(hook)
  for module in (first, second):
    module.w.assign(tf.fill([helpers.N_FEATURES], float(step)))
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(first=first, second=second), model_dir,
      max_to_keep=5, modules_to_export={'first': first, 'second': second})
  manager.save(checkpoint_number=step)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--when', choices=['before', 'mid_publish'],
                      required=True)
  args = parser.parse_args()

  def make_read_only() -> None:
    os.chmod(args.model_dir, 0o555)

  _save(args.model_dir, 1)
  if args.when == 'before':
    make_read_only()
  try:
    _save(args.model_dir, 2,
          make_read_only if args.when == 'mid_publish' else None)
    error = None
  except Exception as e:  # pylint: disable=broad-except
    error = {'type': type(e).__name__, 'message': str(e)}
  print(json.dumps(error), flush=True)


if __name__ == '__main__':
  main()
