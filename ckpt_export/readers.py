"""Listing, waiting for and iterating over the exports of a model directory.

Readers need no trainer and no `tf.train.Checkpoint`: these functions take a
directory and a checkpoint name, see only published exports (see `commit.py`),
and order them by step number. `SavedModelCheckpointManager` composes them.
"""

import os
import time
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import validate

# Why `savedmodels_iterator` skipped an export (see its `on_skip`).
SKIPPED_DELETED = 'deleted'
SKIPPED_LATEST_ONLY = 'latest_only'


def list_directory(directory: paths.PathLike) -> List[str]:
  """Returns the entry names of `directory`, or [] if it does not exist yet."""
  try:
    names = tf.io.gfile.listdir(os.fspath(directory))
  except tf.errors.NotFoundError:
    return []
  return [name.rstrip('/') for name in names]


def export_candidates(directory: paths.PathLike, checkpoint_name: str = 'ckpt',
                      names: Optional[Iterable[str]] = None
                     ) -> List[Tuple[int, str]]:
  """Returns (step, path) of every entry named like an export, by step.

  Whether each is published is not checked; see `commit.is_published`.

  Args:
    directory: The model directory.
    checkpoint_name: The checkpoint name of the exports.
    names: The entries of `directory`, if the caller has listed it already.
  """
  directory = os.fspath(directory)
  if names is None:
    names = list_directory(directory)
  prefix = os.path.join(directory, '')  # Joined once: names are relative.
  found = []
  for name in names:
    step = paths.parse_export_step(name, checkpoint_name)
    if step is not None:
      found.append((step, prefix + name))
  return sorted(found)


def _published_exports(directory: str, checkpoint_name: str,
                       after_step: int = -1, newest_first: bool = False
                       ) -> Iterator[Tuple[int, str]]:
  """Yields (step, path) of the published exports after `after_step`.

  On a local path one `os.scandir` lists the entries and tells directories
  (published exports there) from the rest; elsewhere each candidate after
  `after_step` is checked with `commit.is_published` as it is reached, so a
  caller that stops at the first one found checks no more.

  Args:
    directory: The model directory.
    checkpoint_name: The checkpoint name of the exports.
    after_step: Only exports of higher steps are yielded.
    newest_first: Whether to yield by decreasing step, not increasing.
  """
  local = paths.local_path(directory)
  if local is None:
    candidates = export_candidates(directory, checkpoint_name)
    is_published = commit.is_published
  else:
    try:
      with os.scandir(local) as scan:  # Links are never exports.
        names = [entry.name for entry in scan
                 if entry.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
      return
    candidates = export_candidates(directory, checkpoint_name, names)
    is_published = None
  for step, path in reversed(candidates) if newest_first else candidates:
    if step > after_step and (is_published is None or is_published(path)):
      yield step, path


def list_savedmodels(directory: paths.PathLike, checkpoint_name: str = 'ckpt'
                    ) -> List[str]:
  """Returns the paths of all published exports in `directory`, by step."""
  return [path for _, path in _published_exports(os.fspath(directory),
                                                 checkpoint_name)]


def latest_savedmodel(directory: paths.PathLike,
                      checkpoint_name: str = 'ckpt') -> Optional[str]:
  """Returns the published export with the highest step, or None."""
  found = published_export_after(directory, -1, checkpoint_name, newest=True)
  return found[1] if found else None


def published_export_after(directory: paths.PathLike, after_step: int,
                           checkpoint_name: str = 'ckpt',
                           newest: bool = False) -> Optional[Tuple[int, str]]:
  """Returns (step, path) of the lowest published export after `after_step`.

  Args:
    directory: The model directory.
    after_step: Only exports of higher steps are considered.
    checkpoint_name: The checkpoint name of the exports.
    newest: Return the highest such step instead: the newest export.

  Returns:
    None if there is none.
  """
  return next(_published_exports(os.fspath(directory), checkpoint_name,
                                 after_step, newest_first=newest), None)


# The shortest sleep between two looks at a directory: below it a poll is a
# busy loop that takes a core from the trainer.
MIN_SECONDS_TO_SLEEP = 0.001


def check_seconds_to_sleep(value: float) -> None:
  """Raises a ValueError unless `value` is a usable time between polls."""
  validate.seconds('seconds_to_sleep', value, MIN_SECONDS_TO_SLEEP)


def _step_of(savedmodel: Optional[paths.PathLike], checkpoint_name: str) -> int:
  if savedmodel is None:
    return -1
  savedmodel = os.fspath(savedmodel)
  step = paths.parse_export_step(savedmodel, checkpoint_name)
  if step is None:
    raise ValueError(f'{savedmodel!r} is not the path of an export named '
                     f'{checkpoint_name!r}-<step>_saved_modules.')
  return step


def wait_for_new_savedmodel(directory: paths.PathLike,
                            last_savedmodel: Optional[paths.PathLike] = None,
                            seconds_to_sleep: float = 1.0,
                            timeout: Optional[float] = None,
                            checkpoint_name: str = 'ckpt') -> Optional[str]:
  """Waits for a published export with a step above `last_savedmodel`'s.

  Looks before it sleeps, then every `seconds_to_sleep`, and once more at the
  deadline: it never sleeps past `timeout`, and never returns None while an
  export it should return exists at the deadline.

  Args:
    directory: The model directory.
    last_savedmodel: The last export path seen, or None to take the first.
    seconds_to_sleep: Seconds between looks.
    timeout: The maximum number of seconds to wait; None waits forever.
    checkpoint_name: The checkpoint name of the exports.

  Returns:
    The path of the export with the lowest step above the last one, or None
    if the timeout was reached.

  Raises:
    ValueError: If `last_savedmodel` is not an export path of this checkpoint
      name, or a time is negative.
  """
  check_seconds_to_sleep(seconds_to_sleep)
  validate.seconds('timeout', timeout, allow_none=True)
  found = _wait_for_export_after(
      os.fspath(directory), _step_of(last_savedmodel, checkpoint_name),
      seconds_to_sleep, timeout, checkpoint_name)
  return found[1] if found else None


def _wait_for_export_after(directory: str, after_step: int,
                           seconds_to_sleep: float, timeout: Optional[float],
                           checkpoint_name: str, newest: bool = False
                           ) -> Optional[Tuple[int, str]]:
  """`published_export_after`, once there is one; None after `timeout`."""
  logging.info('Waiting for an export after step %d in %s', after_step,
               directory)
  stop_time = None if timeout is None else time.monotonic() + timeout
  while True:
    found = published_export_after(directory, after_step, checkpoint_name,
                                   newest)
    if found is not None:
      logging.info('Found export %s', found[1])
      return found
    if stop_time is None:
      time.sleep(seconds_to_sleep)
      continue
    remaining = stop_time - time.monotonic()
    if remaining <= 0:
      return None
    time.sleep(min(seconds_to_sleep, remaining))


def savedmodels_iterator(
    directory: paths.PathLike,
    min_interval_secs: float = 0,
    timeout: Optional[float] = None,
    timeout_fn: Optional[Callable[[], bool]] = None,
    seconds_to_sleep: float = 1.0,
    checkpoint_name: str = 'ckpt',
    latest_only: bool = False,
    lease_seconds: Optional[float] = leases.DEFAULT_LEASE_SECONDS,
    after_step: int = -1,
    on_skip: Optional[Callable[[int, str], None]] = None
) -> Iterator[str]:
  """Yields published exports in step order, waiting for new ones.

  Each export yielded is leased (see `leases.py`): no garbage collection
  deletes it until the caller asks for the next one or closes the iterator.
  An export deleted before it could be leased is skipped, and logged.

  Args:
    directory: The model directory.
    min_interval_secs: The minimum number of seconds between yields.
    timeout: The maximum number of seconds to wait for the next export; None
      waits forever.
    timeout_fn: Called after a timeout; the iterator ends if it returns True
      (or if there is none), and goes on waiting otherwise.
    seconds_to_sleep: Seconds between looks for a new export.
    checkpoint_name: The checkpoint name of the exports.
    latest_only: If False, yield every export, in step order (the reference's
      behaviour). If True, yield only the newest export each time, skipping
      (and logging) older unseen ones, as `tf.train.checkpoints_iterator`
      does: for a reader slower than the trainer.
    lease_seconds: The lease duration (renewed while held, see
      `leases.acquire`), or None to take no lease. With the default, a
      reader that may not write the lease directory reads without leases
      (logged once); with a value given, that is an error.
    after_step: Only exports of higher steps are yielded: a restarted reader
      passes the last step it handled, and waits for no export before it.
    on_skip: Called as `on_skip(step, reason)` for each export it skips,
      `reason` being SKIPPED_LATEST_ONLY or SKIPPED_DELETED.

  Returns:
    An iterator of export paths, each step at most once, in increasing step
    order.

  Raises:
    ValueError: For a negative or infinite time, a `seconds_to_sleep` below
      `MIN_SECONDS_TO_SLEEP`, a bad `lease_seconds`, a non-bool `latest_only`
      or an `after_step` that is not an integer >= -1; at the call.
    tf.errors.PermissionDeniedError: If `lease_seconds` was given and the
      lease directory may not be written; when the next export is asked for.
    leases.LeaseLapsedError: When the next export is asked for, if the lease
      on the last one lapsed while it was read (this process was stopped
      longer than `lease_seconds`): it may have been deleted meanwhile.
  """
  validate.seconds('min_interval_secs', min_interval_secs)
  check_seconds_to_sleep(seconds_to_sleep)
  validate.seconds('timeout', timeout, allow_none=True)
  if lease_seconds is not None:
    leases.check_lease_seconds(lease_seconds)
  if not isinstance(latest_only, bool):
    raise ValueError(f'latest_only must be a bool, got {latest_only!r}.')
  after_step = validate.integer('after_step', after_step, -1)
  return _iterate(os.fspath(directory), min_interval_secs, timeout, timeout_fn,
                  seconds_to_sleep, checkpoint_name, latest_only, lease_seconds,
                  after_step, on_skip or (lambda step, reason: None))


def _iterate(directory: str, min_interval_secs: float,
             timeout: Optional[float],
             timeout_fn: Optional[Callable[[], bool]],
             seconds_to_sleep: float, checkpoint_name: str, latest_only: bool,
             lease_seconds: Optional[float], last_step: int,
             on_skip: Callable[[int, str], None]) -> Iterator[str]:
  """The generator behind `savedmodels_iterator`."""
  leaser = _Leaser(directory, lease_seconds)
  while True:
    found = _wait_for_export_after(directory, last_step, seconds_to_sleep,
                                   timeout, checkpoint_name, latest_only)
    if found is None:
      if timeout_fn is None:
        logging.info('Timed out waiting for an export in %s', directory)
        return
      if timeout_fn():
        return
      continue
    start = time.monotonic()
    step, path = found
    _skip_passed_over(directory, checkpoint_name, last_step, step,
                      latest_only, on_skip)
    last_step = step
    try:
      lease = leaser.acquire(path)
    except _Gone:
      logging.warning('Skipping the export of step %d: deleted before it '
                      'could be read (%s).', step, path)
      on_skip(step, SKIPPED_DELETED)
      continue
    try:
      yield path
      if lease is not None:
        lease.check()
    finally:
      if lease is not None:
        lease.release()
    time_to_next = start + min_interval_secs - time.monotonic()
    if time_to_next > 0:
      time.sleep(time_to_next)


def _skip_passed_over(directory: str, checkpoint_name: str, last_step: int,
                      step: int, latest_only: bool,
                      on_skip: Callable[[int, str], None]) -> None:
  """Reports the exports between the last step yielded and `step`."""
  skipped = [s for s, _ in export_candidates(directory, checkpoint_name)
             if last_step < s < step]
  if skipped:
    logging.warning('Skipping the exports of steps %s in %s: %s.', skipped,
                    directory, 'only the latest is read' if latest_only else
                    'no longer published (being deleted)')
    for s in skipped:
      on_skip(s, SKIPPED_LATEST_ONLY if latest_only else SKIPPED_DELETED)


class _Gone(Exception):
  """The export was deleted before it could be leased."""


class _Leaser:
  """Leases the exports an iterator yields, or none once that is refused."""

  def __init__(self, directory: str, lease_seconds: Optional[float]) -> None:
    self._directory = directory
    self._lease_seconds = lease_seconds

  def acquire(self, path: str) -> Optional[leases.Lease]:
    """Returns a lease on the export `path`; None if reading without leases.

    With the default `lease_seconds`, a lease directory this process may not
    write turns leases off (logged once); with a value given, it is an error.

    Raises:
      _Gone: If the export was deleted before it could be leased.
      tf.errors.PermissionDeniedError: If the lease directory may not be
        written and `lease_seconds` was given.
    """
    if self._lease_seconds is None:
      return None
    try:
      lease = leases.acquire(path, self._lease_seconds)
    except tf.errors.PermissionDeniedError as e:
      if not leases.is_default(self._lease_seconds):
        raise
      logging.warning('Reading %s without leases: %s Garbage collection may '
                      'delete an export while it is read (as with the '
                      'reference implementation); pass lease_seconds to '
                      'make this an error.', self._directory, e.message)
      self._lease_seconds = None
      return None
    if lease is None:
      raise _Gone()
    return lease
