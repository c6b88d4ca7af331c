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

The manager runs it in a background thread (`BackgroundCollector`), off the
training thread.

Housekeeping never fails a save: each failure (an entry of another user, a
directory where a file should be, a read-only directory) is logged once per
path with what to do about it, and tried again at the next call. It never
deletes, writes or renames through a symbolic link: links are foreign, never
taken for an export, a work directory or a leftover. Directories that are not
exports (no SavedModel in them) are never touched.
"""

import atexit
import os
import threading
import time
from typing import Any, Callable, Container, List, Optional, Set
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
  names = _recover(directory, checkpoint_name, names, leftover)
  if leases.STATE_DIR in names:
    names = _sweep_leases(directory, names)
  return _delete_exports_not_kept(directory, checkpoint_name, names, keep)


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


def _sweep_leases(directory: str, names: Set[str]) -> Set[str]:
  """Step 2: drops expired leases and carries out the deletions deferred.

  Returns:
    The entries of `directory` afterwards.
  """
  try:
    names.difference_update(
        paths.basename(p) for p in leases.sweep(directory))
  except commit.HOUSEKEEPING_ERRORS as e:
    commit.warn_failure(os.path.join(directory, leases.STATE_DIR),
                        'sweep the leases in', e)
  return names


def _delete_exports_not_kept(directory: str, checkpoint_name: str,
                             names: Set[str], keep: KeepFn) -> Set[str]:
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


# How long interpreter exit waits for pending background passes, in seconds.
EXIT_SECONDS = 30.0
# The collectors whose passes interpreter exit waits for.
_collectors = weakref.WeakSet()


class BackgroundCollector:
  """Runs a caller's housekeeping off its thread, one pass at a time.

  `request()` returns at once; a daemon thread then runs `collect_fn` holding
  `lock`, which the caller holds while it writes the directory, so that a pass
  never sees one of the caller's writes half done (and a write waits for a
  pass under way). Requests made while a pass waits to start are merged into
  it. The thread ends when no pass is pending. An error of a pass is logged,
  never raised: housekeeping never fails the caller. Interpreter exit waits
  up to `EXIT_SECONDS` for the passes requested.

  Args:
    collect_fn: One housekeeping pass (such as a call of `collect`).
    lock: The caller's lock of the directory.
  """

  def __init__(self, collect_fn: Callable[[], Any], lock: threading.Lock):
    self._collect_fn = collect_fn
    self._lock = lock
    self._condition = threading.Condition()
    self._requested = 0  # Passes requested so far.
    self._finished = 0  # Of those, the passes known to be finished.
    self._thread = None
    _collectors.add(self)

  def request(self) -> None:
    """Asks for a pass after this call; returns at once."""
    with self._condition:
      self._requested += 1
      if self._thread is None:
        self._thread = threading.Thread(
            target=self._run, name='ckpt_export-housekeeping', daemon=True)
        self._thread.start()

  def wait(self, timeout: Optional[float] = None) -> bool:
    """Waits for the passes requested so far; False if `timeout` passed."""
    with self._condition:
      target = self._requested
      return self._condition.wait_for(lambda: self._finished >= target,
                                      timeout)

  @property
  def pending(self) -> bool:
    """Whether a pass is requested and not finished."""
    with self._condition:
      return self._finished < self._requested

  def _run(self) -> None:
    while True:
      with self._condition:
        if self._finished >= self._requested:
          self._thread = None
          return
        target = self._requested
      try:
        with self._lock:
          self._collect_fn()
      except Exception:  # pylint: disable=broad-except
        logging.exception('Housekeeping failed; it runs again after the next '
                          'save.')
      with self._condition:
        self._finished = target
        self._condition.notify_all()


@atexit.register
def _wait_at_exit() -> None:
  """Gives pending background passes `EXIT_SECONDS` at interpreter exit."""
  deadline = time.monotonic() + EXIT_SECONDS
  for collector in list(_collectors):
    if not collector.wait(max(0.0, deadline - time.monotonic())):
      logging.warning('Housekeeping still running at exit after %s s: left '
                      'for the next run.', EXIT_SECONDS)
