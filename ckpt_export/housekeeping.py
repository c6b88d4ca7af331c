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

Deleting an export unpublishes it at once; removing its files, which costs
the most (freeing the last link of its checkpoint's data), is left to a
`commit.Removal`: the manager passes a `BackgroundRemover`, which does it off
the training thread.

Housekeeping never fails a save: each failure (an entry of another user, a
directory where a file should be, a read-only directory) is logged once per
path with what to do about it, and tried again at the next call. It never
deletes, writes or renames through a symbolic link: links are foreign, never
taken for an export, a work directory or a leftover. Directories that are not
exports (no SavedModel in them) are never touched.
"""

import atexit
import collections
import os
import threading
import time
from typing import Callable, Container, List, Optional, Set
import weakref

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
            leftover: Optional[LeftoverFn] = None,
            removal: commit.Removal = commit.remove_now) -> Set[str]:
  """Recovers leftovers, sweeps leases and deletes the exports not kept.

  Never raises for what it finds in `directory`: failures are logged, once
  per path, and retried at the next call.

  Args:
    directory: The model directory (or `BestExport`'s directory).
    checkpoint_name: The name of the exports (`<name>-<step>_saved_modules`).
    keep: Returns the steps whose exports stay.
    leftover: Tells the caller's own crash leftovers among the entries.
    removal: Removes the files of the exports deleted, once unpublished (see
      `commit.delete_export_if_same`); by default at once.

  Returns:
    The entries of `directory` afterwards (for readers: the files of deleted
    exports may still be being removed).
  """
  directory = os.fspath(directory)
  try:
    names = set(readers.list_directory(directory))
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'list', e)
    return set()
  names = _recover(directory, checkpoint_name, names, leftover)
  if leases.STATE_DIR in names:
    names = _sweep_leases(directory, names, removal)
  return _delete_exports_not_kept(directory, checkpoint_name, names, keep,
                                  removal)


def _recover(directory: str, checkpoint_name: str, names: Set[str],
             leftover: Optional[LeftoverFn]) -> Set[str]:
  """Step 1: removes the work of dead writers and crash leftovers.

  Returns:
    The entries of `directory` afterwards.
  """
  try:
    names = commit.recover(directory, checkpoint_name, names)
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'recover the leftovers in', e)
  try:
    names -= _remove_leftovers(directory, names, leftover)
    names -= _reference_leftovers(directory, checkpoint_name, names)
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(directory, 'remove the crash leftovers in', e)
  return names


def _sweep_leases(directory: str, names: Set[str],
                  removal: commit.Removal) -> Set[str]:
  """Step 2: drops expired leases and carries out the deletions deferred.

  Returns:
    The entries of `directory` afterwards.
  """
  try:
    names.difference_update(
        paths.basename(p) for p in leases.sweep(directory, removal))
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(os.path.join(directory, leases.STATE_DIR),
                        'sweep the leases in', e)
  return names


def _delete_exports_not_kept(directory: str, checkpoint_name: str,
                             names: Set[str], keep: KeepFn,
                             removal: commit.Removal) -> Set[str]:
  """Step 3: deletes the exports `keep` does not keep, unless leased.

  Returns:
    The entries of `directory` afterwards.
  """
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
      if leases.delete_export_unless_leased(path, removal):
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


# How long interpreter exit waits for pending removals, in seconds.
EXIT_SECONDS = 30.0
# The removers whose removals interpreter exit waits for.
_removers = weakref.WeakSet()


class BackgroundRemover:
  """Removes the files of unpublished exports off the caller's thread.

  A `commit.Removal`: a call queues the tree and returns at once; a daemon
  thread removes the queued trees in order, and ends when none is left. The
  trees were renamed away from their exports, so no reader or writer of an
  export sees them, and their tokens stay live until removed, so recovery
  leaves them alone meanwhile. A failure is logged, never raised, and the
  token ended: the next recovery removes the tree (as after a crash).
  Interpreter exit waits up to `EXIT_SECONDS` for the removals queued.
  """

  def __init__(self):
    self._condition = threading.Condition()
    self._queue = collections.deque()
    self._thread = None
    _removers.add(self)

  def __call__(self, doomed: str, token: str) -> None:
    """Queues the removal of `doomed` (see `commit.Removal`)."""
    with self._condition:
      self._queue.append((doomed, token))
      if self._thread is None:
        self._thread = threading.Thread(
            target=self._run, name='ckpt_export-removal', daemon=True)
        self._thread.start()

  def wait(self, timeout: Optional[float] = None) -> bool:
    """Waits for the removals queued; False if `timeout` passed first."""
    with self._condition:
      return self._condition.wait_for(lambda: self._thread is None, timeout)

  def _run(self) -> None:
    while True:
      with self._condition:
        if not self._queue:
          self._thread = None
          self._condition.notify_all()
          return
        doomed, token = self._queue.popleft()
      try:
        commit.attempt(doomed, 'remove the deleted export', commit.remove_now,
                       doomed, token)
      except Exception:  # pylint: disable=broad-except
        logging.exception('Removing %s failed; the next housekeeping removes '
                          'it.', doomed)


@atexit.register
def _wait_at_exit() -> None:
  """Gives pending removals `EXIT_SECONDS` at interpreter exit."""
  deadline = time.monotonic() + EXIT_SECONDS
  for remover in list(_removers):
    if not remover.wait(max(0.0, deadline - time.monotonic())):
      logging.warning('Removing deleted exports still runs at exit after %s '
                      's: the next run removes what is left.', EXIT_SECONDS)
