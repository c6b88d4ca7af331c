"""orbit Actions that export SavedModels and keep the best one.

An orbit Action is any callable taking the output of a train or eval loop, so
nothing here imports orbit.

`ExportSavedModel`, a train action, replaces `orbit.actions.ExportSavedModel`,
which writes straight into the final directory: its exports are staged and
published like the manager's (`commit.py`), named
`<directory>/<export_name>-<step>_saved_modules/<module>/`, and read with the
readers given `checkpoint_name=export_name`:

    export_action = orbit_actions.ExportSavedModel(
        {'classifier': model}, directory=model_dir,
        global_step=trainer.global_step, export_interval=1000)
    controller = orbit.Controller(..., train_actions=[export_action])
    ...
    ckpt_export.latest_savedmodel(model_dir, checkpoint_name='export')

With a `SavedModelCheckpointManager` on the same directory, the two coexist as
long as their names differ: each sees, recovers and deletes only the entries
of its own name, so neither ever deletes the other's exports. The action
refuses a name under which the directory holds checkpoints, since that
manager would delete the action's exports as exports without a checkpoint.

`BestExportAction` (also `ckpt_export.BestExportAction`), an eval action,
keeps the best export by the evaluator's metric:

    best = ckpt_export.BestExport(model_dir, 'accuracy')
    best_action = ckpt_export.BestExportAction(best, manager,
                                               trainer.global_step)
    controller = orbit.Controller(
        ..., checkpoint_manager=manager, eval_actions=[best_action])

    if best_action.unevaluated_step() is not None:
      controller.evaluate(steps=eval_steps)  # A kill lost its candidacy.
    controller.train_and_evaluate(...)
    best_action.offer_pending()  # The final step, exported after its eval.

After each evaluation, the Controller calls it with the evaluator's output; it
offers the export of the current global step, with those metrics, to
`BestExport.update`.
"""

import os
from typing import (Any, Callable, Dict, List, Mapping, Optional, Set, Tuple,
                    Union)

from absl import logging
import tensorflow as tf

from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import housekeeping
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import savedmodel
from ckpt_export import validate


def _check_step_variable(global_step: Any) -> None:
  if (not isinstance(global_step, tf.Variable) or
      not global_step.dtype.is_integer or global_step.shape.rank != 0):
    raise ValueError('global_step must be a scalar integer tf.Variable, got '
                     f'{global_step!r}.')


class ExportSavedModel:
  """An orbit Action exporting modules on multiples of `export_interval`.

  Each export is published atomically as
  `<directory>/<export_name>-<step>_saved_modules/`, `<step>` being
  `global_step` when called, and the newest `max_to_keep` of this action's
  exports are kept, as well as older ones readers lease until they release
  them (`leases.py`). Steps run in one direction: an export at step N deletes
  this action's exports of steps above N, which a run that was restored from
  an earlier checkpoint has abandoned. One action writes a given directory and
  name at a time.
  """

  def __init__(self,
               modules_to_export: Mapping[str, tf.Module],
               directory: str,
               global_step: tf.Variable,
               export_interval: Optional[int] = None,
               max_to_keep: Optional[int] = 5,
               export_name: str = 'export',
               options: Optional[tf.saved_model.SaveOptions] = None):
    """Validates the arguments and cleans up after crashed exports.

    Args:
      modules_to_export: The modules to export, by name; each is saved as
        `<export dir>/<name>/` with its signatures (see `savedmodel.py`).
      directory: Where to write the exports (local path or URL).
      global_step: The integer step variable, e.g. `trainer.global_step`.
      export_interval: Export at the first call at or after each multiple of
        this many steps (the step reached a multiple since this action's
        latest export), as orbit's summary_interval goes; at
        the first call if this action has no export yet. None exports at
        every call.
      max_to_keep: How many of this action's exports to keep; None keeps all.
      export_name: The prefix of the export names; must differ from the
        checkpoint name of a manager writing the same directory.
      options: Passed to `tf.saved_model.save`.

    Raises:
      ValueError: For a bad argument, or if `directory` holds checkpoints
        named `export_name`; nothing is written then.
    """
    if not modules_to_export:
      raise ValueError('modules_to_export must name at least one module, got '
                       f'{modules_to_export!r}.')
    savedmodel.validate_modules(modules_to_export)
    self._directory = paths.validate_location(directory, 'export_name',
                                              export_name)
    _check_step_variable(global_step)
    validate.integer('export_interval', export_interval, 1, allow_none=True)
    validate.integer('max_to_keep', max_to_keep, 1, allow_none=True)
    self._modules_to_export = modules_to_export
    self._global_step = global_step
    self._export_interval = export_interval
    self._max_to_keep = max_to_keep
    self._export_name = export_name
    self._options = options
    # The step of the latest export at or below the current step, read from
    # the directory at the first call (once a Controller has restored the
    # step); None if there is none.
    self._last_step = None
    self._last_step_read = False
    self._check_and_recover()

  def __call__(self, output: Any = None) -> Optional[str]:
    """Exports the modules if `export_interval` steps have passed.

    Args:
      output: The train (or eval) output orbit passes to actions; unused.

    Returns:
      The path of the new export, or None if none was due.
    """
    del output  # Exports depend on the step only.
    step = int(self._global_step.numpy())
    if not self._last_step_read:
      earlier = [s for s, _ in self._own_exports() if s <= step]
      self._last_step = earlier[-1] if earlier else None
      self._last_step_read = True
    interval = self._export_interval
    if (interval is not None and self._last_step is not None and
        step // interval <= self._last_step // interval):
      return None
    return self.export()

  def export(self) -> str:
    """Exports the modules at the current step, whatever the interval.

    Then deletes this action's exports of higher steps and those beyond
    `max_to_keep`.

    Returns:
      The path of the new export.

    Raises:
      ValueError: If the directory now holds checkpoints named `export_name`,
        or a module gets no serving signature; nothing is lost then.
    """
    step = int(self._global_step.numpy())
    self._check_and_recover()
    export_dir = paths.export_path(self._directory, self._export_name, step)
    commit.check_replaceable(export_dir, step)
    with commit.staged_export(
        export_dir, commit.export_info(step, self._modules_to_export)) as tmp:
      savedmodel.write_modules(self._modules_to_export, tmp, self._options)
    self._last_step = step
    self._last_step_read = True
    self._collect_garbage(step)
    return export_dir

  @property
  def directory(self) -> str:
    return self._directory

  @property
  def export_name(self) -> str:
    return self._export_name

  @property
  def exports(self) -> List[str]:
    """This action's published exports in its directory, by step."""
    return [path for _, path in self._own_exports()]

  def _own_exports(self) -> List[Tuple[int, str]]:
    """(step, path) of the exports of this name that ckpt_export wrote."""
    return [(step, path) for step, path in readers.export_candidates(
        self._directory, self._export_name) if commit.has_commit_marker(path)]

  def _check_and_recover(self) -> None:
    """Checks the name is free, then removes dead writers' leftovers.

    Raises:
      ValueError: If the directory holds checkpoints named `export_name`.
    """
    names = readers.list_directory(self._directory)
    clashing = sorted(name for name in names if name.endswith('.index') and
                      paths.parse_checkpoint_step(name[:-len('.index')],
                                                  self._export_name)
                      is not None)
    if clashing:
      raise ValueError(
          f'{self._directory!r} holds checkpoints named {self._export_name!r} '
          f'({clashing[0]}, ...): their manager would delete this action\'s '
          'exports. Choose another export_name or directory.')
    housekeeping.collect(self._directory, self._export_name,
                         lambda names, steps: steps)

  def _collect_garbage(self, step: int) -> None:
    """Deletes exports above `step` and all but the newest `max_to_keep`.

    Through `housekeeping.collect`, which never raises; an export a reader
    leases stays until released (see `leases.py`).
    """
    def keep(names: Set[str], steps: List[int]) -> List[int]:
      del names  # Only this action's exports matter.
      kept = sorted(s for s in steps if s <= step)
      if len(kept) < len(steps):
        logging.warning('Removing exports above step %d in %s: training went '
                        'back to step %d.', step, self._directory, step)
      return kept[-self._max_to_keep:] if self._max_to_keep else kept
    housekeeping.collect(self._directory, self._export_name, keep)


def flatten_scalars(output: Mapping[str, Any]) -> Dict[str, float]:
  """Returns the real scalars of a (nested) eval output, as 'a/b' names.

  The rule of `best.as_metrics` (nested dicts named as orbit names their
  summaries, a Keras metric object an error), except that values that are not
  real scalars (e.g. arrays of predictions) are left out.
  """
  return best_lib.as_metrics(output, 'the eval output', drop_non_scalars=True)


def _model_dir_of(manager_or_model_dir: Any) -> str:
  if isinstance(manager_or_model_dir, (str, os.PathLike)):
    return os.fspath(manager_or_model_dir)
  if isinstance(getattr(manager_or_model_dir, 'directory', None), str):
    return manager_or_model_dir.directory
  raise ValueError('manager_or_model_dir must be a checkpoint manager or a '
                   f'directory, got {manager_or_model_dir!r}.')


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
    self._model_dir = _model_dir_of(manager_or_model_dir)
    if not (callable(global_step) or tf.is_tensor(global_step) or
            isinstance(global_step, tf.Variable)):
      raise ValueError('global_step must be a variable or a function returning '
                       f'the step, got {global_step!r}.')
    paths.validate_component('checkpoint_name', checkpoint_name)
    best.check_checkpoint_name(checkpoint_name, 'offered')
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
