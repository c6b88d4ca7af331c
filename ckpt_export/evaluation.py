"""Evaluating exports as they appear: metrics, TensorBoard summaries, best.

`evaluate_exports` is an evaluator's loop. For each published export, in step
order, it loads the modules, calls the user's `eval_fn(modules, step)`, writes
the metrics as TensorBoard scalars at that step, optionally offers the export
to a `BestExport`, and records the metrics in `<summary_dir>/metrics.json`
(written atomically). Recording comes last, so a restarted evaluator skips
exactly the steps it finished and evaluates again one it was killed during.
"""

import json
import numbers
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from absl import logging
import tensorflow as tf

from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import readers

SUMMARY_SUBDIR = 'eval_exports'
METRICS_FILE = 'metrics.json'

Metrics = Dict[str, float]
EvalFn = Callable[[Dict[str, Any], int], Mapping[str, Any]]


def read_metrics(summary_dir: str) -> Dict[int, Metrics]:
  """Returns the metrics recorded in `<summary_dir>/metrics.json`, by step.

  Raises:
    ValueError: If the file exists but is not a metrics record.
  """
  path = os.path.join(summary_dir, METRICS_FILE)
  try:
    with tf.io.gfile.GFile(path) as f:
      content = f.read()
  except tf.errors.NotFoundError:
    return {}
  try:
    record = json.loads(content)['metrics']
    return {int(step): dict(metrics) for step, metrics in
            sorted(record.items(), key=lambda item: int(item[0]))}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{path} is not a metrics record of ckpt_export ({e}); '
                     'move it away to evaluate again.') from None


def _write_metrics(summary_dir: str, checkpoint_name: str,
                   metrics: Dict[int, Metrics]) -> None:
  record = {'checkpoint_name': checkpoint_name,
            'metrics': {str(step): metrics[step] for step in sorted(metrics)}}
  commit.write_file_atomically(os.path.join(summary_dir, METRICS_FILE),
                               json.dumps(record, indent=1, sort_keys=True))


def _module_names(export_dir: str) -> Sequence[str]:
  """The modules of an export: its subdirectories holding a SavedModel."""
  return [name for name in readers.list_directory(export_dir)
          if tf.io.gfile.exists(os.path.join(export_dir, name,
                                             'saved_model.pb'))]


def load_modules(export_dir: str, modules: Optional[Sequence[str]] = None
                ) -> Dict[str, Any]:
  """Loads the modules of an export with `tf.saved_model.load`, by name.

  Args:
    export_dir: A published export.
    modules: The names of the modules to load; None loads them all.

  Returns:
    The loaded modules, by name.

  Raises:
    ValueError: If a requested module is not in the export.
    tf.errors.NotFoundError: If the export is deleted meanwhile.
  """
  available = _module_names(export_dir)
  names = available if modules is None else modules
  missing = sorted(set(names) - set(available))
  if missing or not names:
    raise ValueError(f'Export {export_dir!r} has no module {missing or names} '
                     f'to load; it has {sorted(available)}.')
  return {name: tf.saved_model.load(os.path.join(export_dir, name))
          for name in names}


def _check_arguments(eval_fn: Any, modules: Any, best: Any,
                     until_step: Any) -> None:
  if not callable(eval_fn):
    raise ValueError(f'eval_fn must be callable, got {eval_fn!r}.')
  if modules is not None:
    if isinstance(modules, str) or not isinstance(modules, Sequence) or (
        not modules):
      raise ValueError('modules must be a non-empty list of module names or '
                       f'None, got {modules!r}.')
    for name in modules:
      paths.validate_component('module name', name)
  if best is not None and not isinstance(best, best_lib.BestExport):
    raise ValueError(f'best must be a BestExport or None, got {best!r}.')
  if until_step is not None and (
      isinstance(until_step, bool) or
      not isinstance(until_step, numbers.Integral) or until_step < 0):
    raise ValueError('until_step must be a non-negative integer or None, got '
                     f'{until_step!r}.')


def evaluate_exports(model_dir: str,
                     eval_fn: EvalFn,
                     *,
                     checkpoint_name: str = 'ckpt',
                     modules: Optional[Sequence[str]] = None,
                     best: Optional[best_lib.BestExport] = None,
                     latest_only: bool = False,
                     timeout: Optional[float] = None,
                     timeout_fn: Optional[Callable[[], bool]] = None,
                     seconds_to_sleep: float = 1.0,
                     min_interval_secs: float = 0,
                     summary_dir: Optional[str] = None,
                     until_step: Optional[int] = None
                    ) -> Dict[int, Metrics]:
  """Evaluates the exports of `model_dir` as they appear.

  Each published export (with `latest_only`, the newest one at each look)
  after the last step in the metrics record is loaded and passed to
  `eval_fn`. Its metrics are
  written as TensorBoard scalars under `summary_dir`, offered to `best`, then
  recorded in `<summary_dir>/metrics.json`. A restart resumes after the last
  recorded step. An export deleted by the trainer before it is loaded is
  skipped with a warning.

  Args:
    model_dir: The model directory the trainer writes.
    eval_fn: Called as `eval_fn(modules, step)` with the loaded modules by name
      (`tf.saved_model.load` objects); returns a non-empty dict of metric
      names to real scalars (Python, NumPy or scalar tensors).
    checkpoint_name: The checkpoint name of the exports.
    modules: The names of the modules to load; None loads all of each export.
    best: Keeps the best export by its metric, which every evaluation must
      then return.
    latest_only: Evaluate only the newest export at each look, skipping older
      unevaluated ones (for an evaluator slower than the trainer).
    timeout: The maximum number of seconds to wait for a new export; None
      waits forever.
    timeout_fn: Called after a timeout; evaluation ends if it returns True
      (or if there is none), and goes on waiting otherwise.
    seconds_to_sleep: Seconds between looks for a new export.
    min_interval_secs: The minimum number of seconds between evaluations.
    summary_dir: Where to write summaries and `metrics.json`; by default
      `<model_dir>/eval_exports`.
    until_step: Stop once an export of this step or a later one is evaluated
      (e.g. the last training step); None goes on until the timeout.

  Returns:
    All recorded metrics by step, those of earlier runs included.

  Raises:
    ValueError: For a bad argument, or metrics from `eval_fn` that are not a
      dict of names to real scalars (or lack `best`'s metric); the message
      names the step. That step is not recorded.
  """
  _check_arguments(eval_fn, modules, best, until_step)
  summary_dir = os.fspath(summary_dir or os.path.join(model_dir,
                                                      SUMMARY_SUBDIR))
  commit.remove_stale_files(summary_dir, METRICS_FILE,
                            readers.list_directory(summary_dir))
  recorded = read_metrics(summary_dir)
  if until_step is not None and recorded and max(recorded) >= until_step:
    logging.info('Step %d >= %d already evaluated.', max(recorded), until_step)
    return recorded
  writer = tf.summary.create_file_writer(summary_dir)
  try:
    for export_dir in readers.savedmodels_iterator(
        model_dir, min_interval_secs=min_interval_secs, timeout=timeout,
        timeout_fn=timeout_fn, seconds_to_sleep=seconds_to_sleep,
        checkpoint_name=checkpoint_name, latest_only=latest_only,
        after_step=max(recorded, default=-1)):
      step = paths.parse_export_step(export_dir, checkpoint_name)
      try:
        loaded = load_modules(export_dir, modules)
      except (tf.errors.NotFoundError, ValueError):
        if commit.is_published(export_dir):
          raise
        logging.warning('Export %s was deleted before it could be loaded; '
                        'skipping it.', export_dir)
        continue
      metrics = best_lib.as_metrics(eval_fn(loaded, step),
                                    f'step {step} (from eval_fn)')
      if best is not None and best.metric not in metrics:
        raise ValueError(f'eval_fn returned no {best.metric!r} for step '
                         f'{step}, which best ranks exports by; it returned '
                         f'{sorted(metrics)}.')
      with writer.as_default(step=step):
        for name, value in metrics.items():
          tf.summary.scalar(name, value)
      writer.flush()
      if best is not None:
        best.update(step, export_dir, metrics, holds_lease=True)
      recorded[step] = metrics
      _write_metrics(summary_dir, checkpoint_name, recorded)
      logging.info('Evaluated step %d: %s', step, metrics)
      if until_step is not None and step >= until_step:
        break
  finally:
    writer.close()
  return recorded
