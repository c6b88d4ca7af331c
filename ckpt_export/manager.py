"""A `tf.train.CheckpointManager` that also exports SavedModels at each save.

A drop-in replacement for Model Garden's
`official.core.savedmodel_checkpoint_manager.SavedModelCheckpointManager`:
same constructor, methods, properties and on-disk layout, without its defects.

At each `save()` that writes a checkpoint, the modules are exported and the
export is published (`commit.py`) before the checkpoint is recorded, so a
recorded checkpoint never lacks its export. Exports after the first are fast
(`fast_export.py`) while the modules' structure is unchanged: made once the
checkpoint's data is written (in TF's checkpoint thread with async
checkpointing), sharing that data on local disk. An export then lives exactly as
long as its checkpoint's files: garbage collection removes the exports (made
by ckpt_export) whose checkpoint is gone, which also keeps the exports of
checkpoints preserved by `keep_checkpoint_every_n_hours`. It runs before each
`save()` returns, as the reference's does, but only unpublishes: the files of
deleted exports are removed by a background thread
(`housekeeping.BackgroundRemover`), which `sync()` waits for.

In a multi-worker job only the chief writes the directory; the other workers
save into scratch directories they delete (`distribution.py`).
"""

import copy
import os
from typing import Any, Callable, Iterator, List, Mapping, Optional, Set

from absl import logging
import tensorflow as tf

from ckpt_export import _tf_internals
from ckpt_export import commit
from ckpt_export import distribution
from ckpt_export import fast_export
from ckpt_export import housekeeping
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import savedmodel
from ckpt_export import validate


# How long `sync()` waits for the background removal of deleted exports, in
# seconds.
_REMOVAL_SECONDS = 300.0


def _validate_settings(max_to_keep: Any, directory: str, checkpoint_name: str,
                       modules_to_export: Any) -> None:
  """Raises ValueError for a bad constructor argument, naming it."""
  validate.integer('max_to_keep', max_to_keep, 1, allow_none=True)
  paths.validate_location(directory, 'checkpoint_name', checkpoint_name)
  savedmodel.validate_modules(modules_to_export)


def _as_step(value: Any) -> int:
  """Converts a checkpoint number (int, integer tensor or variable) to int."""
  if tf.is_tensor(value) and value.dtype.is_integer and value.shape.rank == 0:
    value = int(value.numpy())
  if not validate.is_step(value):
    raise ValueError('checkpoint_number must be a non-negative integer (or a '
                     f'scalar integer tensor), got {value!r}.')
  return int(value)


class SavedModelCheckpointManager(tf.train.CheckpointManager):
  """A CheckpointManager that also exports `SavedModel`s."""

  def __init__(self,
               checkpoint: tf.train.Checkpoint,
               directory: str,
               max_to_keep: Optional[int],
               modules_to_export: Optional[Mapping[str, tf.Module]] = None,
               keep_checkpoint_every_n_hours: Optional[float] = None,
               checkpoint_name: str = 'ckpt',
               step_counter: Optional[tf.Variable] = None,
               checkpoint_interval: Optional[int] = None,
               init_fn: Optional[Callable[[], None]] = None):
    """Configures the manager; arguments as `tf.train.CheckpointManager`'s.

    Args:
      checkpoint: The `tf.train.Checkpoint` to save and restore.
      directory: The model directory (local path or URL such as `gs://...`).
      max_to_keep: How many checkpoints (and their exports) to keep; None
        keeps all.
      modules_to_export: Modules to export at each save, by name. Each is
        saved as `<directory>/<checkpoint_name>-<step>_saved_modules/<name>/`.
      keep_checkpoint_every_n_hours: Also keep one checkpoint (with its export)
        every this many hours.
      checkpoint_name: The prefix of checkpoint and export names.
      step_counter: The step variable, required with `checkpoint_interval`.
      checkpoint_interval: Minimum number of steps between saves.
      init_fn: Called by `restore_or_initialize` when there is no checkpoint.

    Raises:
      ValueError: For a bad `max_to_keep`, directory, checkpoint name or
        module; nothing is written then.
    """
    _validate_settings(max_to_keep, directory, checkpoint_name,
                       modules_to_export)
    super().__init__(
        checkpoint=checkpoint,
        directory=directory,
        max_to_keep=max_to_keep,
        keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
        checkpoint_name=checkpoint_name,
        step_counter=step_counter,
        checkpoint_interval=checkpoint_interval,
        init_fn=init_fn)
    _tf_internals.adopt_manager_settings(
        self, _directory=directory, _checkpoint=checkpoint,
        _max_to_keep=max_to_keep, _step_counter=step_counter,
        _checkpoint_interval=checkpoint_interval)
    self._checkpoint_name = checkpoint_name
    self._modules_to_export = modules_to_export
    self._exporter = fast_export.Exporter(modules_to_export or {},
                                          checkpoint)
    self._init_bookkeeping()

  def _init_bookkeeping(self) -> None:
    """Sets up what the manager tracks between saves."""
    # The step of this manager's latest save: its checkpoint may still be
    # in flight (async), so its export is kept regardless.
    self._last_saved_step = None
    # The tf.distribute strategy (see `_is_chief`), and whether it is final.
    self._strategy = None
    self._strategy_resolved = False
    # Whether a non-chief removed dead workers' scratch directories yet.
    self._scratch_swept = False
    # Removes the files of the exports housekeeping deletes.
    self._remover = housekeeping.BackgroundRemover()
    self._savedmodels = None  # Listed when next asked for.

  def save(self,
           checkpoint_number: Optional[Any] = None,
           check_interval: bool = True,
           options: Optional[tf.train.CheckpointOptions] = None
          ) -> Optional[str]:
    """Exports the modules, then saves a checkpoint; see the base class.

    The export of step N is published before checkpoint N is recorded, and
    replaces an earlier export of step N if there is one: a full export
    before the checkpoint is written, a fast one (the modules' structure
    unchanged) right after its data is, sharing it where possible. With
    `options=tf.train.CheckpointOptions(enable_async=True)` the checkpoint is
    written in the background, and so is a fast export (from values taken
    now where it cannot share the data), and a full one where the
    checkpoint holds all its values (traced in the background, filled from
    the checkpoint; see `fast_export.py`). `sync()` waits for both.
    In a multi-worker job every worker calls it, and only the chief writes
    the directory; under a multi-worker strategy every export is a full one.

    Args:
      checkpoint_number: The step to save as (an integer, or a scalar integer
        tensor or variable); by default `checkpoint.save_counter + 1`.
      check_interval: Whether to honour `checkpoint_interval`.
      options: `tf.train.CheckpointOptions` for the checkpoint.

    Returns:
      The checkpoint path, or None if no checkpoint was due.

    Raises:
      ValueError: For a bad `checkpoint_number`, a module that gets no serving
        signature, or a user's file, directory or symbolic link in the way of
        the export or checkpoint; nothing is written then.
      Exception: The error of an earlier background export.
    """
    self._wait_for_exports()
    step = self._step_to_save(checkpoint_number, check_interval)
    if step is None:
      return None
    chief = self._is_chief()
    self._strategy_resolved = True
    if not chief:
      return self._save_as_worker(step, options)
    options = self._export_before_checkpoint(step, options)
    checkpoint_path = self._save_checkpoint(step, check_interval, options)
    self._last_saved_step = step
    self._savedmodels = None
    # As with the reference, once save() returns only the kept exports remain
    # (readers and code that look right after a save rely on it).
    self._collect_garbage()
    return checkpoint_path

  def _export_before_checkpoint(
      self, step: int, options: Optional[tf.train.CheckpointOptions]
  ) -> Optional[tf.train.CheckpointOptions]:
    """Exports step `step`, or prepares its export after the checkpoint.

    Args:
      step: The step being saved.
      options: The caller's checkpoint options.

    Returns:
      The options to write the checkpoint with (with the callback that
      publishes a fast export once the checkpoint's data is written).

    Raises:
      ValueError: If something that is not an export is in the way.
    """
    export_dir = paths.export_path(self._directory, self._checkpoint_name, step)
    # TF writes checkpoint N into this directory first: never through a link.
    commit.refuse_link(os.path.join(self._directory,
                                    f'{self._checkpoint_name}-{step}_temp'))
    if not self._modules_to_export:
      logging.info('No modules_to_export: saving a checkpoint only.')
      return options
    commit.check_replaceable(export_dir, step)
    commit_info = commit.export_info(step, self._modules_to_export)
    if not distribution.fast_exports_allowed(self._strategy):
      # The operations every worker runs (see `_save_as_worker`) must match.
      with commit.staged_export(export_dir, commit_info) as tmp:
        savedmodel.write_modules(self._modules_to_export, tmp)
      return options
    self._exporter.export(
        export_dir, commit_info, after_checkpoint=True,
        keep_values=bool(options and
                         options.experimental_enable_async_checkpoint))
    return self._exporter.checkpoint_options(options, self._directory)

  def _save_checkpoint(self, step: int, check_interval: bool,
                       options: Optional[tf.train.CheckpointOptions]) -> str:
    """Writes checkpoint `step` with the base class; undoes its export if not.

    Returns:
      The checkpoint path.
    """
    try:
      checkpoint_path = super().save(
          checkpoint_number=step, check_interval=check_interval,
          options=options)
      if checkpoint_path is None:
        raise RuntimeError(f'tf.train.CheckpointManager skipped step {step} '
                           'that was due: was the step counter changed '
                           'concurrently?')
      _tf_internals.note_checkpoint(self, None, self._interval_step(),
                                    by_base=True)
    except BaseException:
      self._exporter.wait(raise_errors=False)
      export_dir = paths.export_path(self._directory, self._checkpoint_name,
                                     step)
      if self._modules_to_export and commit.has_commit_marker(export_dir):
        commit.attempt(export_dir, 'delete the export of the failed save',
                       leases.delete_export_unless_leased, export_dir)
      raise
    return checkpoint_path

  def _step_to_save(self, checkpoint_number: Any,
                    check_interval: bool) -> Optional[int]:
    """The step `save()` will write, or None where the base class would skip.

    Known before TF writes anything: a full export precedes its checkpoint
    and is named by its step. TF's own interval decision reads a private
    record of the last checkpoint's step, read here through `_tf_internals`
    (TF has no public accessor; the step of the path TF's save returns, or
    that a write callback gets, comes after the full export).
    """
    if checkpoint_number is not None:
      checkpoint_number = _as_step(checkpoint_number)
    if self.checkpoint_interval is not None:
      current = _as_step(self._step_counter)
      last = _tf_internals.last_checkpoint_step(self)
      if last is not None and (current == last or (
          check_interval and current < last + self.checkpoint_interval)):
        return None
    if checkpoint_number is None:
      return int(self.checkpoint.save_counter.numpy()) + 1
    return checkpoint_number

  def _interval_step(self) -> Optional[int]:
    """The step counter's value if saves have an interval, else None."""
    if self.checkpoint_interval is None:
      return None
    return _as_step(self._step_counter)

  def _is_chief(self) -> bool:
    """Whether this process writes the directory (see `distribution.py`).

    The strategy is looked for (a walk of the checkpoint's objects) until the
    first save, when the variables exist: none found then means none.
    """
    if not self._strategy_resolved:
      self._strategy = distribution.find_strategy(self._checkpoint)
    return distribution.is_chief(self._strategy)

  def _save_as_worker(self, step: int,
                      options: Optional[tf.train.CheckpointOptions]) -> str:
    """Saves as a non-chief worker: the chief's work, into scratch space.

    Runs the same TensorFlow operations as the chief's save, so that the
    collectives they need match, but writes a scratch directory that is
    removed as soon as the checkpoint is written (in the background with
    async checkpointing). The model directory is never touched; this
    manager's bookkeeping follows the chief's.

    Args:
      step: The step being saved.
      options: The `tf.train.CheckpointOptions` of the save.

    Returns:
      The path of the chief's checkpoint of this step.
    """
    if not self._scratch_swept:
      housekeeping.clean_scratch()
      self._scratch_swept = True
    scratch = distribution.make_scratch_directory(self._strategy)
    options = copy.copy(options) or tf.train.CheckpointOptions()
    options.experimental_write_callbacks = [
        *(options.experimental_write_callbacks or []),
        lambda: distribution.remove_scratch_directory(scratch)]
    try:
      if self._modules_to_export:
        savedmodel.write_modules(self._modules_to_export, paths.export_path(
            scratch, self._checkpoint_name, step))
      # What tf.train.CheckpointManager.save does, with another prefix.
      self._checkpoint.save_counter.assign_add(1)
      self._checkpoint.write(os.path.join(scratch, f'{self._checkpoint_name}-'
                                          f'{step}'), options=options)
    except BaseException:
      distribution.remove_scratch_directory(scratch)
      raise
    checkpoint_path = os.path.join(self._directory,
                                   f'{self._checkpoint_name}-{step}')
    _tf_internals.note_checkpoint(self, checkpoint_path, self._interval_step(),
                                  by_base=False)
    self._last_saved_step = step
    self._savedmodels = None
    return checkpoint_path

  def _collect_garbage(self) -> None:
    """Housekeeping (`housekeeping.collect`); never raises.

    Keeps the exports of the checkpoints whose `.index` is there, and the
    latest save's (its checkpoint may be in flight); an export a reader
    leases stays until released (see `leases.py`). The exports it deletes
    are unpublished when it returns; their files are removed in the
    background (`_remover`). Even a bug of its own is logged, not raised:
    housekeeping is never the reason a save fails.
    """
    try:
      housekeeping.collect(self._directory, self._checkpoint_name,
                           self._kept_steps, self._crash_leftover,
                           self._remover)
    except Exception:  # pylint: disable=broad-except
      logging.exception('Housekeeping of %s failed; it runs again at the next '
                        'save.', self._directory)

  def _wait_for_removals(self) -> None:
    """Waits (up to `_REMOVAL_SECONDS`) for the removal of deleted exports."""
    if not self._remover.wait(_REMOVAL_SECONDS):
      logging.warning('Removing the deleted exports of %s still runs after %s '
                      's; it goes on in the background.', self._directory,
                      _REMOVAL_SECONDS)

  def _kept_steps(self, names: Set[str], steps: List[int]) -> Set[int]:
    """The steps whose checkpoint's `.index` is in `names`, and the latest."""
    del steps  # Kept by their checkpoints, whatever exports there are.
    kept = {paths.parse_checkpoint_step(name[:-len('.index')],
                                        self._checkpoint_name)
            for name in names if name.endswith('.index')}
    kept.add(self._last_saved_step)
    return kept

  def _crash_leftover(self, name: str, names: Set[str]) -> bool:
    """Whether a crash in TF left entry `name` there.

    Leftovers are TF's work directories `<name>-N_temp` of a write, the data
    files `<name>-N.data-*` of a checkpoint without its `.index` (a write or
    a deletion of old checkpoints, which removes the index first, cut short),
    except those of a checkpoint write still in flight; and, before this
    manager's first save (none of its writes in flight then), the temporary
    files of TF's checkpoint state file.
    """
    prefix, data, _ = name.partition('.data-')
    if data:
      step = paths.parse_checkpoint_step(prefix, self._checkpoint_name)
      return (step is not None and f'{prefix}.index' not in names and
              step != self._last_saved_step)
    step = paths.parse_checkpoint_temp_step(name, self._checkpoint_name)
    if step is not None:
      return (step != self._last_saved_step and
              _tf_internals.is_checkpoint_temp_name_known())
    return (self._last_saved_step is None and
            _tf_internals.is_state_temp_file(name))

  def _managed_savedmodels(self) -> List[str]:
    """Published exports of the managed checkpoints and the latest save."""
    steps = {paths.parse_checkpoint_step(path, self._checkpoint_name)
             for path in self.checkpoints}
    steps.add(self._last_saved_step)
    try:
      return [path for step, path in readers.export_candidates(
          self._directory, self._checkpoint_name)
              if step in steps and commit.is_published(path)]
    except commit.HOUSEKEEPING_ERRORS as e:
      commit.warn_failure(self._directory, 'list the exports in', e)
      return []

  def restore_or_initialize(self) -> Optional[str]:
    """Cleans up after crashed saves, then restores; see the base class.

    Cleaning up is what each save's garbage collection does: a run killed
    while deleting old checkpoints may have left their exports.

    If the restored checkpoint has no published export (a checkpoint written
    by another tool, or one whose export was lost), the restored modules are
    exported for its step (without a tf.distribute strategy: with one, every
    worker would have to take part). Every worker of a multi-worker job
    restores the chief's latest checkpoint; only the chief cleans up.
    """
    if self._is_chief():
      self._collect_garbage()
      self._wait_for_removals()
    checkpoint_path = super().restore_or_initialize()
    if checkpoint_path is not None:
      _tf_internals.note_checkpoint(self, None, self._interval_step(),
                                    by_base=True)
    step = paths.parse_checkpoint_step(checkpoint_path or '',
                                       self._checkpoint_name)
    if (self._modules_to_export and step is not None and
        self._strategy is None):
      export_dir = paths.export_path(self._directory, self._checkpoint_name,
                                     step)
      if not commit.is_published(export_dir) and commit.is_replaceable(
          export_dir):
        logging.warning('Checkpoint %s has no export: exporting it now.',
                        checkpoint_path)
        self._exporter.export(
            export_dir, commit.export_info(step, self._modules_to_export))
        self._savedmodels = None
    return checkpoint_path

  def sync(self) -> None:
    """Waits for pending checkpoint writes and exports, and housekeeping.

    Housekeeping runs once more after the writes (with async checkpointing,
    an old checkpoint's export can go only once its successor is written);
    `sync()` then waits up to `_REMOVAL_SECONDS` for the files of deleted
    exports to be removed, then leaves that to the background with a
    warning.

    Raises:
      Exception: The error of a background export.
    """
    self._wait_for_exports()
    super().sync()
    if self._last_saved_step is not None and self._is_chief():
      self._collect_garbage()
    self._wait_for_removals()

  def _wait_for_exports(self) -> None:
    """Waits for background exports and their checkpoints; raises an error."""
    if not self._exporter.pending:
      return
    super().sync()
    try:
      self._exporter.wait()
    except BaseException as e:
      _tf_internals.forget_async_error(self._checkpoint, e)
      raise

  def get_existing_savedmodels(self) -> List[str]:
    """Returns all published exports in the directory, by step.

    Includes exports of checkpoints kept by `keep_checkpoint_every_n_hours`
    and exports written by the reference implementation.
    """
    return readers.list_savedmodels(self._directory, self._checkpoint_name)

  @property
  def latest_savedmodel(self) -> Optional[str]:
    """The export of the newest managed checkpoint, or None."""
    savedmodels = self.savedmodels
    return savedmodels[-1] if savedmodels else None

  @property
  def savedmodels(self) -> List[str]:
    """Exports of the managed checkpoints, oldest (lowest step) first.

    Listed at the first look after a save (not by the save itself).
    """
    if self._savedmodels is None:
      self._savedmodels = self._managed_savedmodels()
    return list(self._savedmodels)

  @property
  def modules_to_export(self) -> Optional[Mapping[str, tf.Module]]:
    return self._modules_to_export

  def get_savedmodel_number_from_path(self,
                                      savedmodel_path: str) -> Optional[int]:
    """Returns the step of one of this manager's export paths, or None."""
    return paths.parse_export_step(savedmodel_path, self._checkpoint_name)

  def wait_for_new_savedmodel(self,
                              last_savedmodel: Optional[str] = None,
                              seconds_to_sleep: float = 1.0,
                              timeout: Optional[float] = None
                             ) -> Optional[str]:
    """Waits for a new export; see `readers.wait_for_new_savedmodel`."""
    return readers.wait_for_new_savedmodel(
        self._directory, last_savedmodel, seconds_to_sleep, timeout,
        self._checkpoint_name)

  def savedmodels_iterator(
      self,
      min_interval_secs: float = 0,
      timeout: Optional[float] = None,
      timeout_fn: Optional[Callable[[], bool]] = None,
      seconds_to_sleep: float = 1.0,
      latest_only: bool = False,
      lease_seconds: Optional[float] = leases.DEFAULT_LEASE_SECONDS,
      after_step: int = -1
  ) -> Iterator[str]:
    """Yields leased exports by step; see `readers.savedmodels_iterator`."""
    return readers.savedmodels_iterator(
        self._directory, min_interval_secs, timeout, timeout_fn,
        seconds_to_sleep, self._checkpoint_name, latest_only, lease_seconds,
        after_step)
