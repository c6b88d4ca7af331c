"""An evaluator sidecar that `test_evaluation_processes.py` runs and kills.

Usage:
  python tests/children/eval_child.py --model_dir D --until_step N [--latest_only] \
      [--eval_seconds S] [--target T]
  python tests/children/eval_child.py --model_dir D --until_step 0 --update_forever

Evaluates the exports `crash_child.py` writes into `D` with
`ckpt_export.evaluation.evaluate_exports`, keeping the best export by
`score = -(step - T)**2` (every step is a new best when T is large). Each
evaluation checks that the export serves the weights of its own step.

With `--update_forever`, it instead offers the exports already there to
`BestExport.update` in turn, forever, each with a higher score than any
before, so that every update publishes a new best copy.

Lines printed (flushed) for the parent:
  READY        TensorFlow is imported.
  START <s>    eval_fn called for step `s`.
  EVAL <s>     eval_fn returns for step `s`.
  DONE         evaluate_exports returned.
  UPDATED <s> <score>   BestExport.update made step `s` the best.
"""

import argparse
import itertools
import os
import sys
import time

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from ckpt_export import best as best_lib  # pylint: disable=g-import-not-at-top
from ckpt_export import evaluation  # pylint: disable=g-import-not-at-top
from ckpt_export import paths  # pylint: disable=g-import-not-at-top
from ckpt_export import readers  # pylint: disable=g-import-not-at-top

WIDTH = 4  # crash_child.py's model width.


def _say(line: str) -> None:
  print(line, flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--until_step', type=int, required=True)
  parser.add_argument('--latest_only', action='store_true')
  parser.add_argument('--eval_seconds', type=float, default=0.0)
  parser.add_argument('--target', type=float, default=1e9)
  parser.add_argument('--timeout', type=float, default=300.0)
  parser.add_argument('--update_forever', action='store_true')
  args = parser.parse_args()
  _say('READY')

  def eval_fn(modules, step):
    _say(f'START {step}')
    out = modules['model'].signatures['serving_default'](x=tf.ones([WIDTH]))
    served_step = int(out['step'].numpy())
    y = out['y'].numpy().tolist()
    if served_step != step or y != [2.0 * step] * WIDTH:
      raise RuntimeError(f'Export of step {step} serves step {served_step}, '
                         f'y={y}.')
    time.sleep(args.eval_seconds)
    _say(f'EVAL {step}')
    return {'score': -(step - args.target) ** 2, 'y': y[0]}

  best = best_lib.BestExport(args.model_dir, 'score')
  if args.update_forever:
    exports = readers.list_savedmodels(args.model_dir)
    for export_dir in itertools.cycle(exports):
      step = paths.parse_export_step(export_dir)
      score = float(time.time_ns())
      if not best.update(step, export_dir, {'score': score}):
        raise RuntimeError(f'Score {score} did not beat {best.best}.')
      _say(f'UPDATED {step} {score!r}')
  evaluation.evaluate_exports(
      args.model_dir, eval_fn, best=best, latest_only=args.latest_only,
      timeout=args.timeout, seconds_to_sleep=0.05, until_step=args.until_step)
  _say('DONE')


if __name__ == '__main__':
  main()
