r"""Evaluates the exports of examples/train_and_export.py as they appear.

An evaluator "sidecar": it runs beside the trainer (or after it), needs no
checkpoint and no training code, and only reads the model directory. Each new
export is loaded, scored on the example's synthetic regression data (mean
squared and absolute error of its `serving_default` signature), and

    <model_dir>/eval_exports/events.out.tfevents.*   TensorBoard scalars
    <model_dir>/eval_exports/metrics.json            metrics of every step
    <model_dir>/best_export/ckpt-<step>_saved_modules/regressor/
    <model_dir>/best_export/best.json                the best export so far

are updated. Each export being evaluated is leased, so the trainer's garbage
collection never deletes it meanwhile; the best export is a copy that garbage
collection never touches. Killed and started again, the sidecar goes on after
the last step it recorded.

Usage:

  python examples/train_and_export.py --model_dir=/tmp/regressor &
  python examples/eval_sidecar.py --model_dir=/tmp/regressor --until_step=200

With `--latest_only`, a sidecar slower than the trainer evaluates the newest
export each time instead of every one. It stops after `--until_step` is
evaluated, or when no new export appeared for `--timeout` seconds.
"""

import os
import sys
from typing import Any, Dict, List

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF loads.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

import ckpt_export
from ckpt_export import evaluation
# The model and data of the training examples, beside this file.
import regression

_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'The model directory the trainer writes.')

_METRIC = flags.DEFINE_enum(
    'metric', 'mse', ['mse', 'mae'], 'The metric that picks the best export.')
_HIGHER_IS_BETTER = flags.DEFINE_bool(
    'higher_is_better', False, 'Whether a higher --metric is better.')
_LATEST_ONLY = flags.DEFINE_bool(
    'latest_only', False, 'Evaluate only the newest export at each look, '
    'skipping older ones not evaluated yet.')
_TIMEOUT = flags.DEFINE_float(
    'timeout', 60.0, 'Stop when no new export appeared for this many seconds.',
    lower_bound=0.0)
_UNTIL_STEP = flags.DEFINE_integer(
    'until_step', None, 'Stop once an export of this step or later has been '
    "evaluated (the trainer's --train_steps).", lower_bound=0)


def main(argv: List[str]) -> None:
  """Evaluates exports until --until_step or --timeout, then summarizes."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  regression.quiet_logging()
  model_dir = _MODEL_DIR.value
  if not model_dir:
    raise app.UsageError('--model_dir is required: the directory the trainer '
                         'writes.')
  features, targets = regression.make_dataset()
  best = ckpt_export.BestExport(model_dir, _METRIC.value,
                                higher_is_better=_HIGHER_IS_BETTER.value)
  if best.best is not None:
    print(f'Best export so far: step {best.best[0]}.')
  evaluated = []

  def eval_fn(modules: Dict[str, Any], step: int) -> Dict[str, tf.Tensor]:
    serve = modules[regression.MODULE_NAME].signatures['serving_default']
    errors = serve(features=features)['prediction'] - targets
    metrics = {'mse': tf.reduce_mean(tf.square(errors)),
               'mae': tf.reduce_mean(tf.abs(errors))}
    evaluated.append(step)
    # The same comparison BestExport.update makes right after.
    mark = '  (best so far)' if best.is_better(
        {k: float(v) for k, v in metrics.items()}) else ''
    print(f'step {step:5d}  mse {float(metrics["mse"]):.4f}  '
          f'mae {float(metrics["mae"]):.4f}{mark}', flush=True)
    return metrics

  print(f'Evaluating the exports in {model_dir} as they appear...', flush=True)
  recorded = evaluation.evaluate_exports(
      model_dir, eval_fn, best=best, latest_only=_LATEST_ONLY.value,
      timeout=_TIMEOUT.value, until_step=_UNTIL_STEP.value)

  print(f'\nEvaluated {len(evaluated)} step(s) in this run, '
        f'{len(recorded)} in all.')
  for step, info in sorted(recorded.skipped.items()):
    print(f'Step {step} not evaluated: {info["message"]}.')
  if best.best is None:
    sys.exit(f'ERROR: no export found in {model_dir}.')
  step, metrics = best.best
  print(f'Best export: step {step} with {_METRIC.value} '
        f'{metrics[_METRIC.value]:.4f}, at\n  {best.best_export}')
  summary_dir = os.path.join(model_dir, evaluation.SUMMARY_SUBDIR)
  print(f'Metrics per step: {os.path.join(summary_dir, "metrics.json")}')
  print(f'TensorBoard: tensorboard --logdir {summary_dir}')


if __name__ == '__main__':
  app.run(main)
