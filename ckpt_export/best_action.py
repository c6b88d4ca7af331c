"""An orbit eval Action that keeps the best export by the evaluator's metric.

orbit Actions are plain callables, so nothing here imports orbit:

    best = ckpt_export.BestExport(model_dir, 'accuracy')
    controller = orbit.Controller(
        ..., checkpoint_manager=manager,
        eval_actions=[ckpt_export.BestExportAction(best, manager,
                                                    trainer.global_step)])

After each evaluation, the Controller calls the action with the evaluator's
output; the action offers the export of the current global step, with those
metrics, to `BestExport.update`.
"""

import numbers
import os
from typing import Any, Callable, Dict, Mapping, Union

from absl import logging
import tensorflow as tf

from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import paths


def flatten_scalars(output: Mapping[str, Any]) -> Dict[str, float]:
  """Returns the real scalars of a (nested) eval output, as 'a/b' names.

  The rule of `best.as_metrics` (nested dicts named as orbit names their
  summaries, a Keras metric object an error), except that values that are not
  real scalars (e.g. arrays of predictions) are left out.
  """
  return best_lib.as_metrics(output, 'the eval output', drop_non_scalars=True)


class BestExportAction:
  """Offers the export of the evaluated step to a `BestExport`.

  The export of the current global step must exist when the Controller calls
  the action, so the manager's `checkpoint_interval` must divide the
  `eval_interval` of `Controller.train_and_evaluate` (orbit saves after its
  final evaluation, so the last step needs an interval boundary too). With
  ckpt_export's manager the export is published before the checkpoint is
  written, so async checkpointing needs no waiting. A step without an export
  is skipped with a warning.
  """

  def __init__(self,
               best: best_lib.BestExport,
               manager_or_model_dir: Union[str, os.PathLike, Any],
               global_step: Union[tf.Variable, Callable[[], Any]],
               checkpoint_name: str = 'ckpt'):
    """Initializes the action.

    Args:
      best: Where to keep the best export.
      manager_or_model_dir: The checkpoint manager writing the exports, or its
        directory.
      global_step: The step variable of the trainer (`trainer.global_step`), or
        a function returning the current step.
      checkpoint_name: The checkpoint name of the exports.

    Raises:
      ValueError: For a bad argument.
    """
    if not isinstance(best, best_lib.BestExport):
      raise ValueError(f'best must be a BestExport, got {best!r}.')
    if isinstance(manager_or_model_dir, (str, os.PathLike)):
      self._model_dir = os.fspath(manager_or_model_dir)
    elif isinstance(getattr(manager_or_model_dir, 'directory', None), str):
      self._model_dir = manager_or_model_dir.directory
    else:
      raise ValueError('manager_or_model_dir must be a checkpoint manager or a '
                       f'directory, got {manager_or_model_dir!r}.')
    if not (callable(global_step) or tf.is_tensor(global_step) or
            isinstance(global_step, tf.Variable)):
      raise ValueError('global_step must be a variable or a function returning '
                       f'the step, got {global_step!r}.')
    paths.validate_component('checkpoint_name', checkpoint_name)
    self._best = best
    self._global_step = global_step
    self._checkpoint_name = checkpoint_name

  def _step(self) -> int:
    step = self._global_step
    if callable(step):
      step = step()
    if tf.is_tensor(step) or isinstance(step, tf.Variable):
      step = step.numpy()
    step = getattr(step, 'item', lambda: step)()  # NumPy scalars.
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
      raise ValueError(f'The global step must be an integer, got {step!r}.')
    return int(step)

  def __call__(self, output: Mapping[str, Any]) -> None:
    """Offers the current step's export with the metrics in `output`.

    Args:
      output: What the evaluator returned (a dict, possibly nested).

    Raises:
      ValueError: If `output` has no scalar named like the best metric.
    """
    metrics = flatten_scalars(output)
    if self._best.metric not in metrics:
      raise ValueError(f'The eval output has no scalar {self._best.metric!r} '
                       f'to rank exports by; it has {sorted(metrics)}.')
    step = self._step()
    export_dir = paths.export_path(self._model_dir, self._checkpoint_name, step)
    if not commit.is_published(export_dir):
      logging.warning(
          'No export of step %d to offer as the best one (%s): is the '
          "manager's checkpoint_interval a divisor of the eval interval?",
          step, export_dir)
      return
    if self._best.update(step, export_dir, metrics):
      logging.info('Step %d is the best so far: %s=%g', step,
                   self._best.metric, metrics[self._best.metric])
