"""orbit Actions that export SavedModels through ckpt_export's commit protocol.

An orbit Action is any callable taking the output of a train or eval loop, so
nothing here imports orbit. `ExportSavedModel` replaces
`orbit.actions.ExportSavedModel`, which writes straight into the final
directory: its exports are staged and published like the manager's
(`commit.py`), named `<directory>/<export_name>-<step>_saved_modules/<module>/`,
and read with the readers given `checkpoint_name=export_name`:

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
"""

from typing import Any, List, Mapping, Optional, Set, Tuple

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import export
from ckpt_export import housekeeping
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import validate


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
        `<export dir>/<name>/` with its signatures (see `export.py`).
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
    export.validate_modules(modules_to_export)
    self._directory = paths.validate_location(directory, 'export_name',
                                              export_name)
    if (not isinstance(global_step, tf.Variable) or
        not global_step.dtype.is_integer or global_step.shape.rank != 0):
      raise ValueError('global_step must be a scalar integer tf.Variable, got '
                       f'{global_step!r}.')
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
    if not commit.is_replaceable(export_dir):
      raise ValueError(
          f'Cannot export step {step}: {export_dir!r} exists and is not an '
          'export (no SavedModels in it); move it away, it is left as is.')
    with commit.staged_export(export_dir, {
        'step': step, 'modules': list(self._modules_to_export)}) as tmp:
      export.write_modules(self._modules_to_export, tmp, self._options)
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
