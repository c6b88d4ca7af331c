"""Reader leases: an export a reader holds is not deleted under it.

A reader takes a lease on an export before loading it; garbage collection, in
any process, deletes a leased export only once the lease is gone. Each lease
is one small file

    <model_dir>/.ckpt_export/leases/<export>.lease-<token>.json

naming the export, its holder, pid, host and expiry time. The holding process
renews it every third of its duration, so a live reader keeps its export
however long it evaluates, while the lease of a crashed or frozen reader
expires (at once if its pid is gone from this host). A file is never rewritten
in place (not every store writes a file atomically): a renewal writes a new
file, then removes the old one, and a file not yet readable counts as absent.

Deletion and acquisition never miss each other (each writes, then looks at
what the other writes). The deleter first writes a deletion request into the
export itself, `<export>/.ckpt_export_delete`, then looks for live leases: if
there are none it deletes the export, else it leaves the request, which the
last holder's `release` (or a `sweep` after the leases expired) carries out. A
reader first writes its lease, then checks that the export is published and
has no deletion request: otherwise it withdraws. As the request lives in the
export, it never applies to a newer export of the same step (a restarted job
that saved the step again), and a model directory no reader leased from gets
no `.ckpt_export` directory.

A lease file is trusted only if it has the shape `acquire` writes and an
expiry time at most its `lease_seconds` (itself at most `MAX_LEASE_SECONDS`)
plus `CLOCK_SKEW_SECONDS` ahead: anything else under a lease's name (other
JSON, a directory, a symbolic link) is foreign, neither honoured nor deleted.
A `.ckpt_export` or `leases` directory that is a symbolic link is not used.
"""

import contextlib
import os
import re
import socket
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple
import weakref

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import strict_json
from ckpt_export import validate
from ckpt_export import writers

class _DefaultLeaseSeconds(float):
  """The type of the default `lease_seconds`, to tell it from an explicit one.

  A reader given the default reads without leases where it may not write them
  (as the reference does), logging what that risks; one given a value asked for
  leases and gets the error.
  """


DEFAULT_LEASE_SECONDS: float = _DefaultLeaseSeconds(300.0)
# The longest lease granted; longer ones are refused, and a lease file claiming
# more is not trusted (it would pin its export for that long).
MAX_LEASE_SECONDS = 24 * 3600.0
# How far another host's clock may run ahead of this one's.
CLOCK_SKEW_SECONDS = 300.0

STATE_DIR = paths.STATE_DIR
_LEASES = 'leases'
DELETE_REQUEST = paths.DELETE_REQUEST
_VERSION_RE = re.compile(r'[0-9]+')


class LeaseLapsedError(RuntimeError):
  """A held lease expired before it could be renewed (the reader was frozen).

  Its export may have been deleted meanwhile; read the next one.
  """


def is_default(lease_seconds: Any) -> bool:
  """Whether `lease_seconds` is the default, not a value a caller chose."""
  return isinstance(lease_seconds, _DefaultLeaseSeconds)
_LEASE_RE = re.compile(r'(?P<export>.+)\.lease-(?P<token>' +
                       writers.TOKEN_PATTERN + r')\.json\Z', re.DOTALL)


def _is_leasable(name: str) -> bool:
  """Whether `name` is an export's, or a TF Serving version's (`serving.py`).

  A version `<serving_dir>/<module>/<integer>` is leased, and deleted, as an
  export, with `<serving_dir>/<module>` in the role of the model directory.
  """
  return (paths.parse_export_step(name) is not None or
          _VERSION_RE.fullmatch(paths.basename(name.rstrip('/'))) is not None)


def _split(export_dir: Any) -> Tuple[str, str]:
  """Returns (model_dir, export name) of an export path, or raises."""
  if isinstance(export_dir, os.PathLike):
    export_dir = os.fspath(export_dir)
  if not isinstance(export_dir, str) or not _is_leasable(export_dir):
    raise ValueError(f'{export_dir!r} is not the path of an export '
                     '(<model_dir>/<name>-<step>_saved_modules) or of a '
                     'serving version (<serving_dir>/<module>/<version>).')
  export_dir = export_dir.rstrip('/')
  return os.path.dirname(export_dir), paths.basename(export_dir)


def check_lease_seconds(lease_seconds: Any) -> float:
  """Returns `lease_seconds` as a float, or raises ValueError naming it."""
  return validate.seconds('lease_seconds', lease_seconds,
                          maximum=MAX_LEASE_SECONDS, allow_minimum=False)


def _state_dir(model_dir: str, kind: str) -> str:
  return os.path.join(model_dir, STATE_DIR, kind)


def _linked_state_dir(model_dir: str) -> Optional[str]:
  """The lease directory (or its parent) if it is a symbolic link, or None."""
  for path in (os.path.join(model_dir, STATE_DIR),
               _state_dir(model_dir, _LEASES)):
    if commit.is_link(path):
      return path
  return None


def _request_path(model_dir: str, name: str) -> str:
  return os.path.join(model_dir, name, DELETE_REQUEST)


def _requested(model_dir: str, name: str) -> bool:
  """Whether the export holds a deletion request that ckpt_export wrote.

  Anything else under the request's name (other content, a link) is foreign:
  it neither defers leases nor gets the export deleted.
  """
  path = _request_path(model_dir, name)
  if commit.is_link(path):
    return False
  return strict_json.read_file(path, _valid_request) is not None


def _valid_request(record: Any) -> bool:
  """Whether a deletion request's content has the shape ckpt_export writes."""
  return (isinstance(record, dict) and
          validate.is_finite(record.get('requested')))


def _listdir(directory: str) -> List[str]:
  """The entries of a lease directory; none if it is missing or a file."""
  try:
    return [n.rstrip('/') for n in tf.io.gfile.listdir(directory)]
  except (tf.errors.NotFoundError, tf.errors.FailedPreconditionError):
    return []


def _valid_record(record: Any, name: str, token: str) -> bool:
  """Whether a lease file's content has the shape `acquire` writes.

  Its expiry must be at most its (bounded) `lease_seconds` plus the clock skew
  ahead of now: a far-future or infinite one would pin its export forever.
  """
  if not isinstance(record, dict):
    return False
  expires, seconds = record.get('expires'), record.get('lease_seconds')
  try:
    check_lease_seconds(seconds)
  except ValueError:
    return False
  return (record.get('export') == name and record.get('token') == token and
          validate.is_finite(expires) and
          expires <= time.time() + seconds + CLOCK_SKEW_SECONDS)


def _remove_if_present(path: str) -> None:
  try:
    tf.io.gfile.remove(path)
  except tf.errors.NotFoundError:
    pass


def _first_line(text: str) -> str:
  return (str(text).strip().splitlines() or [''])[0]


def _is_live(record: Dict[str, Any]) -> bool:
  """Whether a valid lease is unexpired and its holder may still be running."""
  return (record['expires'] > time.time() and
          writers.token_alive(record['token'], stale_seconds=None))


def _lease_records(model_dir: str, name: Optional[str] = None
                  ) -> Iterator[Tuple[str, Any, bool]]:
  """Yields the lease files of an export (or all).

  Yields:
    (path, content or None if not JSON, whether the content is a valid lease).
    Symbolic links, and a lease directory that is one, are skipped (logged).
  """
  linked = _linked_state_dir(model_dir)
  if linked is not None:
    commit.warn_once(linked, '%s is a symbolic link: ckpt_export neither reads '
                     'nor writes leases through it. Remove it so that readers '
                     'can hold exports.', linked)
    return
  directory = _state_dir(model_dir, _LEASES)
  for entry in sorted(_listdir(directory)):
    match = _LEASE_RE.match(entry)
    if match is not None and name in (None, match.group('export')):
      path = os.path.join(directory, entry)
      if commit.is_link(path):
        commit.warn_once(path, '%s is a symbolic link, not a lease: ignored '
                         'and left alone.', path)
        continue
      record = strict_json.read_file(path)
      yield path, record, _valid_record(record, match.group('export'),
                                         match.group('token'))


def _live_holders(model_dir: str, name: str) -> List[Dict[str, Any]]:
  return [record for _, record, valid in _lease_records(model_dir, name)
          if valid and _is_live(record)]


def holders(export_dir: str) -> List[Dict[str, Any]]:
  """Returns the live (unexpired) leases on an export, as their JSON content.

  Each has `export`, `export_dir`, `holder`, `pid`, `host`, `token`,
  `acquired`, `expires` (seconds since the epoch) and `lease_seconds`.
  """
  return _live_holders(*_split(export_dir))


def is_leased(export_dir: str) -> bool:
  """Whether a live lease holds the export."""
  return bool(holders(export_dir))


def _delete_if_same(model_dir: str, name: str, identity: Optional[float],
                    removal: commit.Removal) -> bool:
  """Deletes the export of `identity` (`commit.export_identity`), if there."""
  export_dir = os.path.join(model_dir, name)
  try:
    deleted = commit.delete_export_if_same(export_dir, identity, removal)
  except tf.errors.NotFoundError:  # Deleted concurrently by another process.
    return False
  if deleted:
    logging.info('Deleted export %s.', export_dir)
  return deleted


def delete_export_unless_leased(
    export_dir: str, removal: commit.Removal = commit.remove_now) -> bool:
  """Deletes an export (as `commit.delete_export` does) unless it is leased.

  If a live lease holds the export, its deletion is recorded as requested and
  carried out when the last lease on it is released (or by a `sweep` once the
  leases expired). New leases on it are refused meanwhile.

  Args:
    export_dir: The export to delete.
    removal: Removes its files once it is unpublished (see
      `commit.delete_export_if_same`).

  Returns:
    True if the export is gone (for readers), False if its deletion was
    deferred.

  Raises:
    ValueError: If `export_dir` is not an export path, or is a symbolic link.
  """
  model_dir, name = _split(export_dir)
  export_dir = os.path.join(model_dir, name)
  commit.refuse_link(export_dir)
  if not tf.io.gfile.exists(export_dir):
    return True
  identity = commit.export_identity(export_dir)
  request = _request_path(model_dir, name)
  if not _requested(model_dir, name):
    try:  # Replaces (never writes through) whatever foreign entry is there.
      commit.write_json(request, {'requested': time.time()})
    except tf.errors.NotFoundError:  # A reader's release deleted it meanwhile.
      return True
  live = _live_holders(model_dir, name)
  if live:
    logging.info('Deferring the deletion of %s: leased by %s.', export_dir,
                 ', '.join(str(r.get('holder')) for r in live))
    return False
  if (not _delete_if_same(model_dir, name, identity, removal) and
      identity is not None and commit.export_identity(export_dir) is None):
    # Deleted meanwhile; on object stores the request written above may have
    # outlived the deletion, as a stray object where the export was.
    _remove_if_present(request)
  return True


def _delete_if_requested(model_dir: str, name: str,
                         removal: commit.Removal = commit.remove_now) -> bool:
  """Deletes an export whose deletion was requested, if no lease holds it.

  Returns:
    Whether it deleted the export.
  """
  export_dir = os.path.join(model_dir, name)
  # The identity first: a newer export replacing this one after this line has
  # no request, and one replacing it later is not `identity` then.
  identity = commit.export_identity(export_dir)
  if not _requested(model_dir, name) or _live_holders(model_dir, name):
    return False
  return _delete_if_same(model_dir, name, identity, removal)


def sweep(model_dir: str,
          removal: commit.Removal = commit.remove_now) -> List[str]:
  """Removes expired leases and carries out the deletions they deferred.

  Garbage collection calls this; it does nothing where no reader took a lease.
  Never raises: what it cannot remove is logged (once per path) and left for
  the next sweep.

  Args:
    model_dir: The model directory.
    removal: Removes the files of the exports it deletes (see
      `commit.delete_export_if_same`).

  Returns:
    The paths of the exports it deleted.
  """
  expired_exports = set()
  for path, record, valid in _lease_records(model_dir):
    match = _LEASE_RE.match(paths.basename(path))
    if record is None:  # Being written, unless its writer is gone.
      expired = not writers.token_alive(match.group('token'))
    elif not valid:
      commit.warn_once(path, '%s is not a lease ckpt_export wrote (or claims '
                       'an expiry too far ahead): it is neither honoured nor '
                       'deleted; remove it.', path)
      continue
    else:
      expired = not _is_live(record)
    if expired:
      logging.info('Removing expired lease %s.', path)
      if commit.attempt(path, 'remove the expired lease', _remove_if_present,
                        path):
        expired_exports.add(match.group('export'))
  deleted = []
  for name in sorted(expired_exports):
    if not _is_leasable(name):
      continue
    path = os.path.join(model_dir, name)
    try:
      if _delete_if_requested(model_dir, name, removal):
        deleted.append(path)
    except commit.HOUSEKEEPING_ERRORS as e:
      commit.warn_failure(path, 'delete', e)
  return deleted


def _lease_path(model_dir: str, name: str, token: str) -> str:
  return os.path.join(_state_dir(model_dir, _LEASES),
                      f'{name}.lease-{token}.json')


class _Holding:
  """A lease's state, shared by the `Lease` and its renewal thread.

  Each renewal writes the lease under a new token (registered as an operation
  in flight, see `writers.begin_operation`), then removes the previous file.
  """

  def __init__(self, model_dir: str, name: str,
               record: Dict[str, Any]) -> None:
    self.model_dir = model_dir
    self.name = name
    self.record = record
    self.lock = threading.Lock()
    self.released = threading.Event()
    # When the lease file was last written (time.time()), and the error of a
    # lease that lapsed before its renewal (then never renewed).
    self.written = record['acquired']
    self.lapsed: Optional[LeaseLapsedError] = None

  @property
  def path(self) -> str:
    return _lease_path(self.model_dir, self.name, self.record['token'])

  def renew_until_released(self) -> None:
    while not self.released.wait(self.record['lease_seconds'] / 3):
      with self.lock:
        if self.released.is_set() or self.check_lapsed():
          return
        self._renew()

  def check_lapsed(self) -> Optional[LeaseLapsedError]:
    """The error of a held lease that expired before it was renewed, if so.

    A reader frozen past its lease (SIGSTOP, a long pause) may have lost its
    export to garbage collection; its lease is then never renewed, as the
    export may be deleted.
    """
    now = time.time()
    if (self.lapsed is None and not self.released.is_set() and
        now >= self.record['expires']):
      seconds = self.record['lease_seconds']
      step = paths.parse_export_step(self.name)
      self.lapsed = LeaseLapsedError(
          f'The lease on the export of step {step}'
          f' ({os.path.join(self.model_dir, self.name)}) lapsed: it was not '
          f'renewed for {now - self.written:.1f} s (this reader was stopped, '
          'or could not write its lease), longer than '
          f'lease_seconds={seconds:g}, so garbage collection may have deleted '
          'the export. Read the next export, or pass a longer lease_seconds.')
      logging.warning('%s', self.lapsed)
    return self.lapsed

  def _renew(self) -> None:
    now = time.time()
    old_path, old_token = self.path, self.record['token']
    token = writers.begin_operation()
    record = dict(self.record, token=token,
                  expires=time.time() + self.record['lease_seconds'])
    try:
      commit.write_new_json(_lease_path(self.model_dir, self.name, token),
                            record)
    except tf.errors.OpError as e:
      writers.end_operation(token)
      logging.warning('Could not renew the lease %s: %s', old_path, e)
      return
    self.record = record
    self.written = now
    try:
      _remove_if_present(old_path)
    except tf.errors.OpError as e:  # It expires; a sweep removes it.
      logging.warning('Could not remove the old lease %s: %s', old_path, e)
    writers.end_operation(old_token)

  def release(self) -> None:
    with self.lock:
      if self.released.is_set():
        return
      self.released.set()
      try:
        _remove_if_present(self.path)
      except tf.errors.OpError as e:
        logging.warning('Could not remove the lease %s; it expires at %s: %s',
                        self.path, time.ctime(self.record['expires']), e)
      writers.end_operation(self.record['token'])
    try:
      _delete_if_requested(self.model_dir, self.name)
    except tf.errors.OpError as e:
      logging.warning('Could not delete %s at the release of its lease, left '
                      'to the next garbage collection: %s',
                      os.path.join(self.model_dir, self.name), e)


class Lease:
  """A reader's hold on an export, made by `acquire`.

  Release it, or leave its `with` block. It is renewed in the background while
  held; garbage-collecting an unreleased Lease releases it.
  """

  def __init__(self, holding: _Holding) -> None:
    self._holding = holding
    self._finalizer = weakref.finalize(self, holding.release)
    threading.Thread(target=holding.renew_until_released, daemon=True,
                     name=f'lease-{holding.name}').start()

  @property
  def export_dir(self) -> str:
    """The leased export."""
    return os.path.join(self._holding.model_dir, self._holding.name)

  @property
  def expires(self) -> float:
    """When the lease expires unless renewed (seconds since the epoch)."""
    return self._holding.record['expires']

  @property
  def released(self) -> bool:
    return self._holding.released.is_set()

  def check(self) -> None:
    """Raises if the lease lapsed before it could be renewed.

    Raises:
      LeaseLapsedError: Naming the step, how long this reader was stopped and
        the lease length.
    """
    with self._holding.lock:
      lapsed = self._holding.check_lapsed()
    if lapsed is not None:
      raise lapsed

  def release(self) -> None:
    """Lets go of the export, deleting it if its deletion was deferred."""
    self._finalizer()

  def __enter__(self) -> 'Lease':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.release()

  def __repr__(self) -> str:
    state = 'released' if self.released else 'held'
    return f'<Lease {self.export_dir!r} {state}>'


def acquire(export_dir: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
            holder: Optional[str] = None) -> Optional[Lease]:
  """Takes a lease on a published export.

  Args:
    export_dir: The export, `<model_dir>/<name>-<step>_saved_modules`.
    lease_seconds: How long the lease outlives its last renewal. The holding
      process renews it every `lease_seconds / 3`; this bounds how long a
      frozen reader pins the export.
    holder: A description of the reader, shown by `holders`; by default the
      program's name.

  Returns:
    The lease, or None if the export is not (or no longer) published or its
    deletion has been requested.

  Raises:
    ValueError: For an `export_dir` that is not an export path, or a bad
      `lease_seconds` or `holder`.
    tf.errors.PermissionDeniedError: If this process may not write the lease,
      or the lease directory is a symbolic link or not a directory (the
      message says where, and how to read without a lease).
  """
  model_dir, name = _split(export_dir)
  lease_seconds = check_lease_seconds(lease_seconds)
  if holder is None:
    holder = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else (
        'python')
  if not isinstance(holder, str):
    raise ValueError(f'holder must be a string or None, got {holder!r}.')
  export_dir = os.path.join(model_dir, name)
  holding = _Holding(model_dir, name, _new_record(name, export_dir, holder,
                                                  lease_seconds))
  _write_holding(holding, export_dir)
  # Only now look: a deleter that did not see the lease has written its
  # request before looking for leases.
  if commit.is_published(export_dir) and not _requested(model_dir, name):
    return Lease(holding)
  holding.release()
  return None


def _write_holding(holding: _Holding, export_dir: str) -> None:
  """Writes a new lease's record; ends its operation if that fails.

  Raises:
    tf.errors.PermissionDeniedError: Saying where and what to do, if the
      lease directory may not be written, or is a link or not a directory.
  """
  model_dir, token = holding.model_dir, holding.record['token']
  try:
    linked = _linked_state_dir(model_dir)
    if linked is not None:
      raise tf.errors.PermissionDeniedError(
          None, None, f'{linked} is a symbolic link, which ckpt_export never '
          'writes through')
    tf.io.gfile.makedirs(_state_dir(model_dir, _LEASES))
    commit.write_new_json(holding.path, holding.record)
  except (tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError,
          tf.errors.AlreadyExistsError) as e:
    writers.end_operation(token)
    raise tf.errors.PermissionDeniedError(
        e.node_def, e.op,
        f'Cannot lease {export_dir}: a lease is a file written under '
        f'{_state_dir(model_dir, _LEASES)}, which this process may not write '
        f'({_first_line(e.message)}). Grant write access there, or read '
        'without a lease (lease_seconds=None; `--no-lease` on the command '
        'line), which lets garbage collection delete the export while it is '
        'read.') from e
  except BaseException:
    writers.end_operation(token)
    raise


def _new_record(name: str, path: str, holder: str,
                lease_seconds: float) -> Dict[str, Any]:
  """A new lease record, under a token of an operation begun now."""
  now = time.time()
  return {'export': name, 'export_dir': path, 'holder': holder,
          'pid': os.getpid(), 'host': socket.gethostname(),
          'token': writers.begin_operation(), 'acquired': now,
          'expires': now + lease_seconds, 'lease_seconds': lease_seconds}


@contextlib.contextmanager
def leased(export_dir: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
           holder: Optional[str] = None) -> Iterator[Lease]:
  """Holds a lease on an export for the duration of a `with` block.

  Raises:
    FileNotFoundError: If the export is not published (or being deleted).
    ValueError: For bad arguments, as `acquire`.
  """
  lease = acquire(export_dir, lease_seconds, holder)
  if lease is None:
    raise FileNotFoundError(f'No published export at {export_dir!r} to lease '
                            '(missing, incomplete or being deleted).')
  with lease:
    yield lease


_WRITER = 'writer'


class WriterBusyError(RuntimeError):
  """Another live writer holds the writer lease of a directory."""


def _describe(record: Dict[str, Any]) -> str:
  acquired = record.get('acquired')
  since = (time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(acquired))
           if isinstance(acquired, (int, float)) else 'an unknown time')
  return (f'{record.get("holder")} (pid {record.get("pid")} on '
          f'{record.get("host")}, since {since})')


def acquire_writer(directory: str, holder: str,
                   lease_seconds: float = DEFAULT_LEASE_SECONDS,
                   name: str = _WRITER) -> Lease:
  """Takes the single-writer lease of a directory of records.

  A lease file `<directory>/.ckpt_export/leases/<name>.lease-<token>.json`,
  renewed and expiring as a reader's lease (so a writer that died stops
  blocking once its pid is gone, or its lease expired on another host). The
  writer writes its lease, then looks for other live writers' leases, and
  withdraws if there is any: of two writers starting at once, at most one
  gets the lease (both may fail, each naming the other).

  Args:
    directory: The directory the writer alone updates.
    holder: What the writer is, for the error another writer gets.
    lease_seconds: How long the lease outlives its last renewal.
    name: What in `directory` the lease is for, if not all of it.

  Returns:
    The lease; release it when done writing.

  Raises:
    WriterBusyError: Naming the live writer that holds the directory.
  """
  lease_seconds = check_lease_seconds(lease_seconds)
  record = _new_record(name, directory, holder, lease_seconds)
  token = record['token']
  holding = _Holding(directory, name, record)
  try:
    tf.io.gfile.makedirs(_state_dir(directory, _LEASES))
    commit.write_new_json(holding.path, holding.record)
  except BaseException:
    writers.end_operation(token)
    raise
  others = [r for r in _live_holders(directory, name)
            if r.get('token') != token]
  if others:
    holding.release()
    raise WriterBusyError(
        f'{directory} is being written by {_describe(others[0])}; one writer '
        f'at a time. Stop it, or use another directory for {holder}.')
  return Lease(holding)
