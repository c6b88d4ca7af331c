"""The state file of `ckpt-export watch`: where a restarted watch resumes."""

import os
import socket
from typing import Any, Dict, Optional, Tuple

import tensorflow as tf

from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import readers
from ckpt_export import strict_json
from ckpt_export import validate
from ckpt_export.cli import _common
from ckpt_export.cli import _model_dir

_VERSION = 1


def _check_steps(last_step: Any, failed: Any) -> None:
  """Raises ValueError if the recorded steps have the wrong shape."""
  if not validate.is_integer(last_step) or last_step < -1:
    raise ValueError(f'last_step {last_step!r} is not a step')
  if not (isinstance(failed, dict) and
          all(validate.is_integer(v) for v in failed.values())):
    raise ValueError(f'failed {failed!r} is not a map of exit codes')


class WatchState:
  """The last step a watch finished, persisted so a restart resumes after it.

  Written whole after each step with `commit.write_json`, so a
  reader (or a restart) sees the old state or the new one, never a mix.
  """

  def __init__(self, path: Optional[str], model_dir: str,
               checkpoint_name: str) -> None:
    self._path = path
    if _common.is_local(model_dir):
      model_dir = os.path.abspath(model_dir)
    self._owner = {'model_dir': model_dir, 'checkpoint_name': checkpoint_name}
    self.last_step = -1
    self.failed: Dict[str, int] = {}
    self.running: Optional[Dict[str, Any]] = None
    self._lease = None
    if path is not None:
      self._load()  # Checks the file (and its directory) first.
      self._lock()
      self._load()  # What the last watch wrote before it ended.

  def _lock(self) -> None:
    """Takes the state file's writer lease: one watch per state file."""
    parent = os.path.dirname(self._path) or '.'
    try:
      self._lease = leases.acquire_writer(
          parent, f'{_common.PROG} watch --state-file {self._path}',
          name=os.path.basename(self._path) + '.watch')
    except leases.WriterBusyError as e:
      raise _common.UsageError(str(e)) from None

  def close(self) -> None:
    """Releases the state file's writer lease."""
    if self._lease is not None:
      self._lease.release()

  def _read(self) -> Any:
    """The state file's content, or None if there is none yet."""
    parent = os.path.dirname(self._path) or '.'
    # Removes the unfinished write of a watch killed while recording a step.
    commit.remove_stale_files(parent, os.path.basename(self._path),
                              readers.list_directory(parent))
    try:
      return strict_json.load_file(self._path)
    except tf.errors.NotFoundError:
      if not tf.io.gfile.isdir(parent):
        raise _common.UsageError(f'--state-file {self._path}: directory '
                                 f'{parent} does not exist') from None
      return None
    except tf.errors.OpError as e:
      raise _common.UsageError(
          f'cannot read --state-file {self._path}: '
          f'{_model_dir.reason(e, self._path)}') from None
    except ValueError as e:
      raise self._not_a_state_file(e) from None

  def _not_a_state_file(self, e: Exception) -> _common.UsageError:
    return _common.UsageError(
        f'--state-file {self._path} is not a ckpt-export watch state file '
        f'({_common.one_line(e)}); fix or remove it')

  def _parse(self, state: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Returns the state read and its owner; checks their shape."""
    try:
      last_step, failed = state['last_step'], state['failed']
      owner = {key: state[key] for key in self._owner}
      if state['version'] != _VERSION:
        raise ValueError(f'version {state["version"]!r}')
      _check_steps(last_step, failed)
    except (ValueError, KeyError, TypeError) as e:
      raise self._not_a_state_file(e) from None
    return state, owner

  def _load(self) -> None:
    content = self._read()
    if content is None:
      return
    state, owner = self._parse(content)
    if owner != self._owner:
      raise _common.UsageError(
          f'--state-file {self._path} records the watch of MODEL_DIR '
          f'{owner["model_dir"]} with --checkpoint-name '
          f'{owner["checkpoint_name"]}; use another state file')
    self.last_step, self.failed = state['last_step'], state['failed']
    running = state.get('running')
    self.running = running if isinstance(running, dict) else None

  def start(self, step: int, pgid: int, model_dir: str) -> None:
    """Records the process group of the COMMAND running on `step`."""
    self.running = {'step': step, 'pgid': pgid, 'host': socket.gethostname(),
                    'model_dir': model_dir}
    self._write()

  def finish(self, step: int, exit_code: int, advance: bool = True) -> None:
    """Records `step` as handled, with its COMMAND's exit code if not 0.

    Args:
      step: The step.
      exit_code: Its COMMAND's exit code.
      advance: Whether `step` is the new last step (not for a retry).
    """
    if advance:
      self.last_step = step
    if exit_code:
      self.failed[str(step)] = exit_code
    else:
      self.failed.pop(str(step), None)
    self.running = None
    self._write()

  def _write(self) -> None:
    if self._path is None:
      return
    commit.write_json(self._path, dict(
        self._owner, version=_VERSION, last_step=self.last_step,
        failed=self.failed, running=self.running), indent=1, sort_keys=True)
