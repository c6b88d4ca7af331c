"""An orbit eval Action that keeps the best export by the evaluator's metric.

orbit Actions are plain callables, so nothing here imports orbit:

    best = ckpt_export.BestExport(model_dir, 'accuracy')
    controller = orbit.Controller(
        ..., checkpoint_manager=manager,
        eval_actions=[ckpt_export.BestExportAction(best, manager,
                                                    trainer.global_step)])

    if best_action.unevaluated_step() is not None:
      controller.evaluate(steps=eval_steps)  # A kill lost its candidacy.
    controller.train_and_evaluate(...)
    best_action.offer_pending()  # The final step, exported after its eval.

After each evaluation, the Controller calls the action with the evaluator's
output; the action offers the export of the current global step, with those
metrics, to `BestExport.update`.
"""

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from absl import logging
import tensorflow as tf

from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import validate


def flatten_scalars(output: Mapping[str, Any]) -> Dict[str, float]:
  """Returns the real scalars of a (nested) eval output, as 'a/b' names.

  The rule of `best.as_metrics` (nested dicts named as orbit names their
  summaries, a Keras metric object an error), except that values that are not
  real scalars (e.g. arrays of predictions) are left out.
  """
  return best_lib.as_metrics(output, 'the eval output', drop_non_scalars=True)


class BestExportAction:
  """Offers the export of the evaluated step to a `BestExport`.

  The export of the current global step should exist when the Controller
  calls the action, so the interval of the exports (the manager's
  `checkpoint_interval`, or `ExportSavedModel`'s `export_interval`) should
  divide the `eval_interval` of `Controller.train_and_evaluate`. With
  ckpt_export's manager the export is published before the checkpoint is
  written, so async checkpointing needs no waiting. The metrics of a step
  without an export are kept, with a warning, and offered once its export is
  published: at the next call, or at `offer_pending()`. orbit saves after its
  final evaluation, so call `offer_pending()` after `train_and_evaluate` for
  the final step to be a candidate.

  A kill during the Controller's evaluation loses no step: the restarted
  Controller restores the last checkpoint's step, whose export was never
  offered (`BestExport.last_offered` is recorded on disk);
  `unevaluated_step()` names it, and one `controller.evaluate()` offers it.
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
    if best.checkpoint_name != checkpoint_name:
      raise ValueError(
          f'best keeps the best of the {best.checkpoint_name!r} exports, not '
          f'of the {checkpoint_name!r} ones offered; make it with '
          f'checkpoint_name={checkpoint_name!r}.')
    if isinstance(manager_or_model_dir, (str, os.PathLike)):
      self._interval = (f'the interval of the {checkpoint_name!r} exports '
                        "(ExportSavedModel's export_interval, or a manager's "
                        'checkpoint_interval)')
    else:
      self._interval = "the manager's checkpoint_interval"
    self._pending: Optional[Tuple[int, Dict[str, float]]] = None
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
    if not validate.is_integer(step):
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
    self.offer_pending()
    step = self._step()
    if not commit.is_published(self._export_dir(step)):
      logging.warning(
          'No export of step %d yet to offer as the best one (%s); offered '
          'once published (at the next evaluation, or offer_pending()). Is %s '
          'a divisor of the eval interval?', step, self._export_dir(step),
          self._interval)
      self._pending = step, metrics
      return
    self._offer(step, metrics)

  def _export_dir(self, step: int) -> str:
    return paths.export_path(self._model_dir, self._checkpoint_name, step)

  def _offer(self, step: int, metrics: Dict[str, float]) -> bool:
    if self._best.update(step, self._export_dir(step), metrics):
      logging.info('Step %d is the best so far: %s=%g', step,
                   self._best.metric, metrics[self._best.metric])
      return True
    return False

  def offer_pending(self) -> bool:
    """Offers the last evaluated step without an export, once it has one.

    Returns:
      Whether it became the best export; False if there is none pending or
      its export is still not published (it stays pending).
    """
    if self._pending is None or not commit.is_published(
        self._export_dir(self._pending[0])):
      return False
    (step, metrics), self._pending = self._pending, None
    return self._offer(step, metrics)

  def unevaluated_step(self) -> Optional[int]:
    """The current step, if its export exists and was never offered.

    After a restart, the Controller has restored the last checkpoint's step:
    if a kill during its evaluation lost its candidacy, this returns it, and
    one `controller.evaluate()` (which calls this action) offers it.
    """
    step = self._step()
    if step > self._best.last_offered and commit.is_published(
        self._export_dir(step)):
      return step
    return None
