"""Housekeeping of a model directory: the one routine every writer runs.

The manager (after each save, in `sync()` and `restore_or_initialize()`), the
decoupled exporter, the orbit `ExportSavedModel` action and `BestExport` all
clean up with `collect`, differing only in which of their exports they keep:

1. recovery: the work directories of writers that are gone are removed (a
   replaced export whose replacement never got published is restored), and the
   caller's own crash leftovers (`leftover`), such as TF's `<name>-N_temp`;
2. the lease sweep: expired leases are dropped, and the deletions they
   deferred carried out;
3. garbage collection: each export of `checkpoint_name` that ckpt_export or
   the reference implementation wrote and that `keep` does not keep is
   deleted, unless a reader leases it.

Housekeeping never fails a save: each failure (an entry of another user, a
directory where a file should be, a read-only directory) is logged once per
path with what to do about it, and tried again at the next call. It never
deletes, writes or renames through a symbolic link: links are foreign, never
taken for an export, a work directory or a leftover. Directories that are not
exports (no SavedModel in them) are never touched.
"""

import os
from typing import Callable, Container, List, Optional, Set

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import distribution
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers

# keep(names, steps): the steps (of `steps`, those of the exports found) to
# keep, given the directory's entries after recovery.
KeepFn = Callable[[Set[str], List[int]], Container[int]]
# leftover(name, names): whether entry `name` is a crash leftover to remove.
LeftoverFn = Callable[[str, Set[str]], bool]


def collect(directory: str, checkpoint_name: str, keep: KeepFn,
            leftover: Optional[LeftoverFn] = None) -> Set[str]:
  """Recovers leftovers, sweeps leases and deletes the exports not kept.

  Never raises for what it finds in `directory`: failures are logged, once
  per path, and retried at the next call.

  Args:
    directory: The model directory (or `BestExport`'s directory).
    checkpoint_name: The name of the exports (`<name>-<step>_saved_modules`).
    keep: Returns the steps whose exports stay.
    leftover: Tells the caller's own crash leftovers among the entries.

  Returns:
    The entries of `directory` afterwards.
  """
  directory = os.fspath(directory)
  try:
    names = set(readers.list_directory(directory))
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'list', e)
    return set()
  try:
    names = commit.recover(directory, checkpoint_name, names)
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'recover the leftovers in', e)
  try:
    names -= _remove_leftovers(directory, names, leftover)
    names -= _reference_leftovers(directory, checkpoint_name, names)
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'remove the crash leftovers in', e)
  if leases.STATE_DIR in names:
    try:
      names.difference_update(
          paths.basename(p) for p in leases.sweep(directory))
    except commit.HOUSEKEEPING_ERRORS as e:
      commit.warn_failure(os.path.join(directory, leases.STATE_DIR),
                          'sweep the leases in', e)
  try:
    exports = [(step, path) for step, path in readers.export_candidates(
        directory, checkpoint_name, names)
               if commit.has_commit_marker(path) or
               commit.is_reference_export(path)]
    kept = keep(names, [step for step, _ in exports])
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'decide which exports to keep in', e)
    return names
  for step, path in exports:
    if step in kept:
      continue
    logging.info('Removing export %s: it is not kept.', path)
    try:
      if leases.delete_export_unless_leased(path):
        names.discard(paths.basename(path))
    except commit.HOUSEKEEPING_ERRORS as e:
      commit.warn_failure(path, 'delete the export', e)
  return names


def _remove_leftovers(directory: str, names: Set[str],
                      leftover: Optional[LeftoverFn]) -> Set[str]:
  """Removes the entries `leftover` tells; returns those removed."""
  removed = set()
  for name in sorted(names) if leftover is not None else ():
    path = os.path.join(directory, name)
    if leftover(name, names) and not commit.skip_link(path):
      logging.info('Removing %s, left by a crashed write or deletion.', path)
      if commit.attempt(path, 'remove the crash leftover', commit.remove_tree,
                        path):
        removed.add(name)
  return removed


def _reference_leftovers(directory: str, checkpoint_name: str,
                         names: Set[str]) -> Set[str]:
  """Removes the reference's `<name>-N_saved_modules_temp` crash leftovers.

  Only directories holding a SavedModel: anything else is not the reference's.
  """
  removed = set()
  for name in sorted(names):
    if (not name.endswith('_temp') or
        paths.parse_export_step(name[:-len('_temp')], checkpoint_name) is None):
      continue
    path = os.path.join(directory, name)
    if commit.skip_link(path) or not _holds_savedmodel(path):
      continue
    logging.info('Removing %s, left by a crashed export of the reference '
                 'implementation.', path)
    if commit.attempt(path, 'remove the reference\'s leftover',
                      commit.remove_tree, path):
      removed.add(name)
  return removed


def _holds_savedmodel(path: str) -> bool:
  try:
    return any(tf.io.gfile.exists(os.path.join(path, child.rstrip('/'),
                                               'saved_model.pb'))
               for child in tf.io.gfile.listdir(path))
  except tf.errors.OpError:
    return False


def clean_scratch() -> None:
  """Removes the scratch directories of dead workers; never raises."""
  try:
    distribution.remove_stale_scratch_directories()
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure('scratch directories', 'remove', e)
