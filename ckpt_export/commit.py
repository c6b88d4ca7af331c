"""The commit protocol: how an export becomes visible, and how it goes away.

An export is written into a work directory that no reader takes for an export
(`.<export>.tmp-<token>`, see `writers.py`: its name does not end in
`_saved_modules`, is not an integer, and no export's name is a prefix of it,
which TF's prefix-matching `ram://` file system needs), and published only
once complete. Two file system families, each with its `Publisher`, chosen
once per path by `publisher_for`:

* `AtomicRenamePublisher`: atomic directory rename (local disk, `file://`).
  The commit marker is written into the work directory, which is then renamed
  to the final name in one step: the export appears complete or not at all. A
  replaced export is first renamed aside (`.old-`), a deleted one renamed away
  (`.del-`) before its files go, so no reader ever sees a half-deleted export
  either. Any directory with the final name is complete, so exports written by
  the reference stay readable.
* `CommitMarkerPublisher`: everything else (`gs://`, `s3://`, `ram://`, ...),
  where a directory "rename" copies and deletes object by object. The final
  directory first gets an `INCOMPLETE_MARKER`, then the files, then the
  `COMMIT_MARKER` (a single object write, atomic on every store), then the
  incomplete marker goes. Readers accept only directories holding the commit
  marker. Deletion reverses this: incomplete marker in, commit marker out,
  files out, incomplete marker last.

Work directory tokens name their writer (time, pid, host; see `writers.py`):
leftovers of a writer that is dead (or older than `writers.STALE_SECONDS`) are
removed by `recover`; those of a live writer are never touched.

Nothing here deletes, writes or renames through a symbolic link: on local disk
(the only place links exist) a link is someone else's entry, never taken for an
export or a work directory, and trees are removed without following the links
in them (`remove_tree`). Metadata that is not of the expected shape is foreign
too (`read_commit_info`).

Verbs: files and trees are *removed*; an export is *deleted*, which unpublishes
it first (`delete_export`).
"""

import abc
import contextlib
import errno
import os
import shutil
import stat
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set

from absl import logging
import tensorflow as tf

from ckpt_export import paths
from ckpt_export import strict_json
from ckpt_export import validate
from ckpt_export import writers

INCOMPLETE_MARKER = paths.INCOMPLETE_MARKER

_lock = threading.Lock()
# What `warn_once` has warned about.
_warned = set()


def warn_once(key: str, message: str, *args: Any) -> None:
  """Logs a warning the first time `key` (a path, usually) comes up."""
  with _lock:
    if key in _warned:
      return
    _warned.add(key)
  logging.warning(message, *args)


def has_atomic_rename(path: str) -> bool:
  """Whether a directory rename under `path` is atomic (local file systems)."""
  return paths.local_path(path) is not None


def _lstat(path: str) -> Optional[os.stat_result]:
  """`os.lstat` of a local path; None if absent or not local."""
  local = paths.local_path(path)
  if local is None:
    return None
  try:
    return os.lstat(local)
  except (FileNotFoundError, NotADirectoryError):
    return None


def is_link(path: str) -> bool:
  """Whether `path` is a symbolic link (only local paths have them)."""
  st = _lstat(path)
  return st is not None and stat.S_ISLNK(st.st_mode)


def refuse_link(path: str) -> None:
  """Raises ValueError if `path` is a symbolic link, which is never ours."""
  if is_link(path):
    raise ValueError(
        f'{path} is a symbolic link: ckpt_export never deletes, writes or '
        'renames through one (it is not an export or a file of ours). Remove '
        'the link if it is in the way.')


def _os_error(e: OSError, path: str) -> tf.errors.OpError:
  """A TensorFlow error for an `OSError`, as `tf.io.gfile` would raise."""
  kind = {errno.ENOENT: tf.errors.NotFoundError,
          errno.EACCES: tf.errors.PermissionDeniedError,
          errno.EPERM: tf.errors.PermissionDeniedError,
          errno.EEXIST: tf.errors.AlreadyExistsError}.get(
              e.errno, tf.errors.FailedPreconditionError)
  return kind(None, None, f'{e.filename or path}; {e.strerror or e}')


def remove_tree(path: str) -> None:
  """Removes a directory tree (or a file) without following any link.

  `tf.io.gfile.rmtree` follows links to directories on local disk, emptying
  what they point to; here a link inside the tree is removed as a link, and a
  link at `path` itself is refused. Object stores have no links: there this is
  `tf.io.gfile.rmtree`.

  Raises:
    ValueError: If `path` is a symbolic link.
    tf.errors.OpError: As `tf.io.gfile.rmtree` (NotFoundError if absent).
  """
  local = paths.local_path(path)
  if local is None:
    tf.io.gfile.rmtree(path)
    return
  refuse_link(path)
  try:
    if os.path.isdir(local):
      shutil.rmtree(local)
    else:
      os.unlink(local)
  except OSError as e:
    raise _os_error(e, path) from e


# How the files of an export are removed once it is unpublished: called with
# the tree renamed away (`doomed`) and the token of the operation that named
# it, it removes the tree and then ends that operation
# (`writers.end_operation`), so that recovery leaves the tree alone until then.
# `remove_now` removes at once; `housekeeping.BackgroundRemover` on a thread.
Removal = Callable[[str, str], None]


def remove_now(doomed: str, token: str) -> None:
  """Removes an unpublished export's tree at once (a `Removal`)."""
  try:
    remove_tree(doomed)
  finally:
    writers.end_operation(token)


def remove_file(path: str) -> None:
  """Removes one file; a symbolic link is refused (ValueError)."""
  refuse_link(path)
  tf.io.gfile.remove(path)


def write_new_file(path: str, content: str) -> None:
  """Writes a file; on local disk only if nothing (not even a link) is there.

  Files are only ever written under fresh names, so an existing entry is
  someone else's, and writing would go through it if it is a link.

  Raises:
    tf.errors.AlreadyExistsError: If something is at a local `path`.
    tf.errors.OpError: For any other failure.
  """
  local = paths.local_path(path)
  if local is None:
    with tf.io.gfile.GFile(path, 'w') as f:
      f.write(content)
    return
  try:
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                 0o666)
    with os.fdopen(fd, 'w') as f:
      f.write(content)
  except OSError as e:
    raise _os_error(e, path) from e


def write_new_json(path: str, value: Any) -> None:
  """Writes `value` as standard JSON to a fresh file (see `write_new_file`)."""
  write_new_file(path, strict_json.dumps(value))


def write_json(path: str, value: Any, **dumps_options: Any) -> None:
  """Writes `value` as standard JSON, replacing `path` whole.

  Args:
    path: The file to (over)write, atomically (`write_file_atomically`).
    value: What to write (`strict_json.dumps`).
    **dumps_options: Passed to `json.dumps` (`indent`, `sort_keys`).
  """
  write_file_atomically(path, strict_json.dumps(value, **dumps_options))


def write_file_atomically(path: str, content: str) -> None:
  """Writes a small file that readers see whole, old or new, never partial.

  The content goes to `.<name>.tmp-<token>` beside `path` first, which is then
  renamed over it: an atomic rename on local disk, and on object stores a copy
  into one object, which replaces the old one whole (writing in place is not
  enough everywhere: TF's `ram://` keeps the old tail of a longer file).
  `remove_stale_files` deletes what a writer killed in between leaves.

  Args:
    path: The file to (over)write.
    content: Its new content.
  """
  with writers.operation() as token:
    tmp = writers.work_dir(path, writers.TMP, token)
    try:
      write_new_file(tmp, content)
      tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
      if tf.io.gfile.exists(tmp):
        remove_file(tmp)
      raise


def remove_stale_files(directory: str, file_name: str,
                       names: Iterable[str]) -> Set[str]:
  """Deletes the temporary files of dead `write_file_atomically` writers.

  Args:
    directory: The directory holding `file_name`.
    file_name: The base name of the file written atomically.
    names: The entries of `directory`, as listed by the caller.

  Returns:
    The entries of `directory` after the removal.
  """
  names = set(names)
  for name in sorted(names):
    work = writers.parse_work_name(name)
    path = os.path.join(directory, name)
    if (work is not None and work.target == file_name and
        not writers.work_owner_alive(name) and not skip_link(path)):
      logging.info('Removing %s, left by a writer that is gone.', name)
      attempt(path, 'remove', remove_file, path)
      names.discard(name)
  return names


def skip_link(path: str) -> bool:
  """Whether `path` is a link named like ours: left alone, and logged once."""
  if not is_link(path):
    return False
  warn_once(path, '%s is a symbolic link named like an entry of ckpt_export: '
            'left alone (ckpt_export never deletes through a link); remove it '
            'if it is not needed.', path)
  return True


# What a failed housekeeping step on a foreign or inaccessible entry raises.
HOUSEKEEPING_ERRORS = (tf.errors.OpError, OSError, ValueError)


def attempt(path: str, what: str, function: Callable[..., Any],
             *args: Any) -> bool:
  """Runs a housekeeping step on `path`; logs a failure once, never raises.

  Returns:
    Whether it succeeded.
  """
  try:
    function(*args)
  except HOUSEKEEPING_ERRORS as e:
    warn_failure(path, what, e)
    return False
  return True


def warn_failure(path: str, what: str, error: BaseException) -> None:
  """Logs (once per path) that housekeeping could not `what` `path`."""
  warn_once(path, 'Could not %s: %s (%s). It is left as is and tried again at '
            'the next save; fix its permissions or remove it by hand.', what,
            path, _first_line(error))


def _first_line(error: BaseException) -> str:
  text = getattr(error, 'message', None) or str(error)
  return (text.strip().splitlines() or [type(error).__name__])[0]


def export_info(step: int, modules: Iterable[str]) -> Dict[str, Any]:
  """The commit marker's content of the export of `step` with `modules`."""
  return {'step': step, 'modules': list(modules)}


def valid_commit_info(info: Any) -> bool:
  """Whether `info` has the shape of a commit marker's content.

  A JSON object with a finite `created` time, and when present a
  non-negative integer `step` and a list of module names.
  """
  if not isinstance(info, dict) or not validate.is_finite(info.get('created')):
    return False
  modules = info.get('modules', [])
  return (validate.is_step(info.get('step', 0)) and
          isinstance(modules, list) and
          all(isinstance(m, str) for m in modules))


def read_commit_info(export_dir: str) -> Optional[Dict[str, Any]]:
  """Returns the metadata in an export's commit marker.

  None if there is none, or it is not ours: a marker that is not a valid
  `valid_commit_info` (foreign content, never trusted), or an export or marker
  that is a symbolic link.
  """
  marker = os.path.join(export_dir, paths.COMMIT_MARKER)
  if is_link(export_dir) or is_link(marker):
    return None
  return strict_json.read_file(marker, valid_commit_info)


def has_commit_marker(export_dir: str) -> bool:
  """Whether ckpt_export wrote `export_dir` (a valid commit marker, no link)."""
  return read_commit_info(export_dir) is not None


def export_identity(export_dir: str) -> Optional[float]:
  """The identity of an export: the `created` time in its commit marker.

  None for an export without a marker (as the reference writes them). A newer
  export of the same step (a restarted job saving the step again) has another.
  """
  return (read_commit_info(export_dir) or {}).get('created')


def is_replaceable(export_dir: str) -> bool:
  """Whether a new export may replace what is at `export_dir`.

  True if nothing is there, or an export: ours (also one a writer that is
  gone left partly written or deleted, see `Publisher.abandoned`), or one the
  reference wrote (a directory of SavedModel directories). A user's file,
  directory or symbolic link that merely has an export's name is never
  replaced.
  """
  if is_link(export_dir):
    return False
  if not tf.io.gfile.exists(export_dir):
    return True
  return (has_commit_marker(export_dir) or is_reference_export(export_dir) or
          publisher_for(export_dir).abandoned(export_dir))


def check_replaceable(export_dir: str, step: int) -> None:
  """Raises ValueError unless a new export of `step` may replace `export_dir`.

  See `is_replaceable`; the error names the path and leaves it as it is.
  """
  if not is_replaceable(export_dir):
    raise ValueError(
        f'Cannot export step {step}: {export_dir!r} exists and is not an '
        'export (no SavedModels in it); move it away, it is left as is.')


def is_reference_export(export_dir: str) -> bool:
  """Whether `export_dir` is a directory of SavedModel directories only.

  That is what the reference implementation writes (no commit marker). Links
  are never one.
  """
  try:
    if is_link(export_dir) or not tf.io.gfile.isdir(export_dir):
      return False
    children = [c.rstrip('/') for c in tf.io.gfile.listdir(export_dir)]
  except tf.errors.NotFoundError:  # Deleted meanwhile (a reader's release).
    return False
  return bool(children) and all(
      not is_link(os.path.join(export_dir, c)) and
      tf.io.gfile.exists(os.path.join(export_dir, c, 'saved_model.pb'))
      for c in children)


class Publisher(abc.ABC):
  """How exports appear and go away on one kind of file system.

  One instance per kind, chosen by `publisher_for`; the module docstring
  describes both protocols. Methods taking a `token` run within the operation
  that token names, which also names the work directories they make.
  """

  @abc.abstractmethod
  def is_published(self, export_dir: str) -> bool:
    """Whether `export_dir` is a complete export a reader may load."""

  @abc.abstractmethod
  def publish(self, work_dir: str, export_dir: str, marker: str,
              token: str) -> None:
    """Publishes the complete `work_dir` as `export_dir`, replacing it.

    Args:
      work_dir: The work directory holding the export's modules.
      export_dir: The final export path.
      marker: The content of the commit marker (JSON).
      token: The token of the operation, naming its work directories.
    """

  @abc.abstractmethod
  def delete(self, export_dir: str, token: str) -> None:
    """Deletes an export so that no reader ever sees it partly deleted."""

  @abc.abstractmethod
  def delete_if_same(self, export_dir: str, identity: Optional[float],
                     token: str, removal: Removal) -> bool:
    """Deletes the export at `export_dir` if it is the one of `identity`.

    Once unpublished, its files are removed by `removal` where the export has
    moved away from its path; otherwise at once.

    Returns:
      Whether it was deleted; False if it is gone or is another export.
    """

  @abc.abstractmethod
  def restores(self, work: writers.WorkName) -> bool:
    """Whether recovery renames a dead writer's `work` back to its export."""

  @abc.abstractmethod
  def abandoned(self, export_dir: str) -> bool:
    """Whether a writer that is gone left `export_dir` partly written."""


class AtomicRenamePublisher(Publisher):
  """Local disk: an export appears, is replaced and goes in one rename each."""

  def is_published(self, export_dir: str) -> bool:
    st = _lstat(export_dir)
    return st is not None and stat.S_ISDIR(st.st_mode)

  def publish(self, work_dir: str, export_dir: str, marker: str,
              token: str) -> None:
    # The marker goes in before the rename: the export appears with it.
    write_new_file(os.path.join(work_dir, paths.COMMIT_MARKER), marker)
    if not tf.io.gfile.exists(export_dir):
      tf.io.gfile.rename(work_dir, export_dir)
      return
    refuse_link(export_dir)
    # The replaced export goes aside first (`recover` renames it back if this
    # writer dies before the next rename), then the new one takes its name.
    old = writers.work_dir(export_dir, writers.OLD, token)
    tf.io.gfile.rename(export_dir, old)
    tf.io.gfile.rename(work_dir, export_dir)
    remove_tree(old)

  def delete(self, export_dir: str, token: str) -> None:
    del token  # The renamed tree gets a token of its own.
    refuse_link(export_dir)
    self._remove_renamed(export_dir, export_dir, remove_now)

  def delete_if_same(self, export_dir: str, identity: Optional[float],
                     token: str, removal: Removal) -> bool:
    # Renamed aside as a replaced export is (recovery renames it back after a
    # crash), and checked there, so a concurrent replacement is never deleted.
    if is_link(export_dir):
      return False
    aside = writers.work_dir(export_dir, writers.OLD, token)
    try:
      tf.io.gfile.rename(export_dir, aside)
    except tf.errors.NotFoundError:
      return False
    if is_link(aside) or export_identity(aside) != identity:
      tf.io.gfile.rename(aside, export_dir)
      return False
    self._remove_renamed(aside, export_dir, removal)
    return True

  def restores(self, work: writers.WorkName) -> bool:
    return work.kind == writers.OLD  # A replaced export, renamed aside.

  def abandoned(self, export_dir: str) -> bool:
    del export_dir  # An export appears whole, or not at all.
    return False

  @staticmethod
  def _remove_renamed(path: str, export_dir: str, removal: Removal) -> None:
    """Renames `path` away from the readers of `export_dir`; `removal` goes on.

    Once renamed the export is gone for readers and writers of `export_dir`:
    what is left is to remove its files, which `removal` may do later. The
    renamed tree's token stays live until then, so recovery leaves it alone;
    after a crash, recovery removes it.
    """
    token = writers.begin_operation()
    doomed = writers.work_dir(export_dir, writers.DEL, token)
    try:
      tf.io.gfile.rename(path, doomed)
    except BaseException:
      writers.end_operation(token)
      raise
    removal(doomed, token)


class CommitMarkerPublisher(Publisher):
  """Object stores and `ram://`: the commit marker, written last, publishes."""

  def is_published(self, export_dir: str) -> bool:
    return tf.io.gfile.exists(os.path.join(export_dir, paths.COMMIT_MARKER))

  def publish(self, work_dir: str, export_dir: str, marker: str,
              token: str) -> None:
    if tf.io.gfile.exists(export_dir):
      self.delete(export_dir, token)
    # Incomplete marker first (even before the directory, which on gs:// is
    # an object of its own), commit marker last (one object write): readers
    # take the directory for an export only once every file is in, and what a
    # writer killed in between leaves names that writer for `recover`.
    incomplete = _mark_incomplete(export_dir, writers.TMP, token)
    tf.io.gfile.makedirs(export_dir)
    _move_files(work_dir, export_dir)
    write_new_file(os.path.join(export_dir, paths.COMMIT_MARKER), marker)
    tf.io.gfile.remove(incomplete)

  def delete(self, export_dir: str, token: str) -> None:
    # Unpublished first (incomplete marker in, commit marker out), so a reader
    # never loads what is left; the incomplete marker goes last, with the
    # directory (on gs://, its object lists before the marker's).
    incomplete = _mark_incomplete(export_dir, writers.DEL, token)
    commit = os.path.join(export_dir, paths.COMMIT_MARKER)
    if tf.io.gfile.exists(commit):
      tf.io.gfile.remove(commit)
    for f in _walk_files(export_dir):
      if f != incomplete:
        tf.io.gfile.remove(f)
    for child in tf.io.gfile.listdir(export_dir):
      if tf.io.gfile.isdir(os.path.join(export_dir, child.rstrip('/'))):
        tf.io.gfile.rmtree(os.path.join(export_dir, child.rstrip('/')))
    tf.io.gfile.rmtree(export_dir)

  def delete_if_same(self, export_dir: str, identity: Optional[float],
                     token: str, removal: Removal) -> bool:
    # Removed at once: the files stay at `export_dir`, where a later removal
    # could take those of a new export of the same step.
    del removal
    if (not tf.io.gfile.exists(export_dir) or
        export_identity(export_dir) != identity):
      return False
    self.delete(export_dir, token)
    return True

  def restores(self, work: writers.WorkName) -> bool:
    del work  # Nothing is renamed aside: a replaced export is deleted first.
    return False

  def abandoned(self, export_dir: str) -> bool:
    # Also a directory without any file (`makedirs` makes an object on
    # gs://): what a writer killed between `makedirs` and its incomplete
    # marker left before the marker came first. Never a live writer's: its
    # incomplete marker comes first and goes last.
    try:
      with tf.io.gfile.GFile(os.path.join(export_dir, INCOMPLETE_MARKER)) as f:
        writer = f.read()
    except tf.errors.NotFoundError:
      try:
        return (tf.io.gfile.isdir(export_dir) and
                not tf.io.gfile.exists(
                    os.path.join(export_dir, paths.COMMIT_MARKER)) and
                not _walk_files(export_dir))
      except tf.errors.OpError:
        return False
    except tf.errors.OpError:
      return False
    return not writers.work_owner_alive(writer)


_ATOMIC_RENAME = AtomicRenamePublisher()
_COMMIT_MARKER = CommitMarkerPublisher()


def publisher_for(path: str) -> Publisher:
  """The publisher of exports under `path` (see the module docstring)."""
  return _ATOMIC_RENAME if has_atomic_rename(path) else _COMMIT_MARKER


def work_dir_export(name: str) -> Optional[str]:
  """Returns the export name a work directory name belongs to, or None."""
  work = writers.parse_work_name(name)
  return None if work is None else work.target


def _walk_files(root: str) -> List[str]:
  return [os.path.join(d, f) for d, _, files in tf.io.gfile.walk(root)
          for f in files]


def _mark_incomplete(export_dir: str, kind: str, token: str) -> str:
  """Writes the incomplete marker, naming its writer; returns its path."""
  incomplete = os.path.join(export_dir, INCOMPLETE_MARKER)
  write_new_file(incomplete,
                 paths.basename(writers.work_dir(export_dir, kind, token)))
  return incomplete


def _move_files(src: str, dst: str) -> None:
  """Moves a tree file by file (what a directory rename is on object stores)."""
  for d, _, files in tf.io.gfile.walk(src):
    target = dst + d[len(src):]
    tf.io.gfile.makedirs(target)
    for f in files:
      tf.io.gfile.rename(os.path.join(d, f), os.path.join(target, f),
                         overwrite=True)
  tf.io.gfile.rmtree(src)


def is_published(export_dir: str) -> bool:
  """Whether `export_dir` is a complete, published export a reader may load."""
  return publisher_for(export_dir).is_published(export_dir)


@contextlib.contextmanager
def staged_export(export_dir: str, commit_info: Dict[str, Any]
                 ) -> Iterator[str]:
  """Yields a fresh work directory and publishes it as `export_dir`.

  The caller writes the export's modules into the yielded directory. When the
  block completes, the work directory is published as `export_dir`, replacing
  an export of the same step if there is one. When the block raises, the work
  directory is removed and nothing is published.

  Args:
    export_dir: The final export path `<directory>/<name>-<step>_saved_modules`.
    commit_info: JSON-serializable metadata stored in the commit marker.

  Yields:
    The work directory to write into.
  """
  with writers.operation() as token:
    tmp = writers.work_dir(export_dir, writers.TMP, token)
    tf.io.gfile.makedirs(tmp)
    try:
      yield tmp
      # Serialized before anything is replaced: metadata that is not JSON
      # fails this save and leaves the export it would replace intact.
      marker = strict_json.dumps(dict(commit_info, created=time.time()))
      publisher_for(export_dir).publish(tmp, export_dir, marker, token)
    except BaseException:
      _remove_after_failure(tmp)
      raise


def _remove_after_failure(work_dir: str) -> None:
  """Removes a failed operation's work directory, keeping the first error.

  What cannot be removed now (the directory turned read-only, say) is left for
  `recover`, which removes it once this operation is over.

  Args:
    work_dir: The work directory.
  """
  try:
    if tf.io.gfile.exists(work_dir):
      remove_tree(work_dir)
  except tf.errors.OpError as e:
    logging.warning('Could not remove %s after a failed save (%s); a later '
                    'save removes it.', work_dir, e)


def delete_export(export_dir: str) -> None:
  """Deletes an export so that no reader ever sees it partly deleted.

  Raises:
    ValueError: If `export_dir` is a symbolic link (not ours to delete).
  """
  with writers.operation() as token:
    publisher_for(export_dir).delete(export_dir, token)


def delete_export_if_same(export_dir: str, identity: Optional[float],
                          removal: Removal = remove_now) -> bool:
  """Deletes an export only if it is the one of `identity`.

  So deleting an old export of step N never deletes a newer export of step N
  (see `export_identity`), even one replacing it meanwhile.

  Args:
    export_dir: The export to delete.
    identity: Its `export_identity`.
    removal: Removes its files once it is unpublished, where it was renamed
      away (local disk); by default at once.

  Returns:
    Whether it was deleted; False if it is gone or is another export.
  """
  with writers.operation() as token:
    return publisher_for(export_dir).delete_if_same(export_dir, identity,
                                                    token, removal)


def recover(directory: str, checkpoint_name: str,
            names: Iterable[str]) -> Set[str]:
  """Removes what crashed writers left in `directory`; restores replaced ones.

  Only entries of `checkpoint_name` are considered, and only those whose writer
  is no longer alive: work directories of dead writers are deleted (a replaced
  export whose replacement never got published is renamed back), and on
  non-atomic stores, exports left half-published or half-deleted are deleted.
  Symbolic links are never touched. Never raises: what cannot be removed is
  logged (once per path) and tried again at the next call.

  Args:
    directory: The model directory.
    checkpoint_name: The manager's checkpoint name.
    names: The entries of `directory`, as listed by the caller.

  Returns:
    The entries of `directory` after recovery.
  """
  return recover_targets(
      directory, names,
      lambda name: paths.parse_export_step(name, checkpoint_name) is not None)


def recover_targets(directory: str, names: Iterable[str],
                    is_target: Callable[[str], bool]) -> Set[str]:
  """`recover` for the targets named as `is_target` says (see `recover`).

  Args:
    directory: The directory of the targets (exports, or serving versions).
    names: The entries of `directory`, as listed by the caller.
    is_target: Whether a name is one of a target published by
      `staged_export`.

  Returns:
    The entries of `directory` after recovery.
  """
  names = set(names)
  publisher = publisher_for(directory)
  for name in sorted(names):
    work = writers.parse_work_name(name)
    if work is not None:
      if is_target(work.target):
        _recover_work_dir(directory, name, work, names, publisher)
    elif is_target(name) and publisher.abandoned(
        os.path.join(directory, name)):
      _delete_abandoned(directory, name, names, publisher)
  return names


def _recover_work_dir(directory: str, name: str, work: writers.WorkName,
                      names: Set[str], publisher: Publisher) -> None:
  """Removes (or restores) a work directory if its writer is gone.

  Args:
    directory: The model directory.
    name: The work directory's name.
    work: `name` parsed.
    names: The entries of `directory`, updated.
    publisher: The publisher of `directory`.
  """
  path = os.path.join(directory, name)
  if writers.work_owner_alive(name) or skip_link(path):
    return
  names.discard(name)
  export = os.path.join(directory, work.target)
  restore = publisher.restores(work) and work.target not in names
  try:
    if restore:
      logging.warning('Restoring export %s that a crashed save was '
                      'replacing.', work.target)
      tf.io.gfile.rename(path, export)
    else:
      logging.info('Removing %s, left behind by a writer that is gone.', path)
      remove_tree(path)
  except (tf.errors.NotFoundError, tf.errors.AlreadyExistsError):
    _log_recovered_meanwhile(path)
  except HOUSEKEEPING_ERRORS as e:
    names.add(name)
    warn_failure(path, 'remove (or restore)', e)
  if restore and tf.io.gfile.exists(export):
    names.add(work.target)  # Restored, here or by another process.


def _delete_abandoned(directory: str, name: str, names: Set[str],
                      publisher: Publisher) -> None:
  """Deletes an export a writer that is gone left partly written."""
  path = os.path.join(directory, name)
  logging.info('Removing %s, left half-written by a writer that is gone.',
               path)
  names.discard(name)
  try:
    with writers.operation() as token:
      publisher.delete(path, token)
  except tf.errors.NotFoundError:
    _log_recovered_meanwhile(path)
  except tf.errors.OpError as e:
    names.add(name)
    warn_failure(path, 'remove', e)


def _log_recovered_meanwhile(path: str) -> None:
  logging.info('%s was recovered meanwhile by another process (one sharing '
               'the directory, such as a decoupled exporter).', path)
