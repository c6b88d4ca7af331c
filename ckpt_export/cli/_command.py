"""Runs the COMMAND of `ckpt-export watch`: a process group that dies with it.

Imports no TensorFlow.
"""

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Callable, Dict, List

from ckpt_export.cli import _common

_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def _die_with(parent: int) -> Callable[[], None]:
  """A preexec_fn: the COMMAND gets SIGKILL when the watch dies (Linux)."""
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # Looked up before fork.
  except (OSError, AttributeError):
    prctl = None

  def preexec() -> None:
    if prctl is not None:
      prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # The watch died before prctl.
      os.kill(os.getpid(), signal.SIGKILL)
  return preexec


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def kill_orphans(running: Dict[str, Any]) -> None:
  """Kills what is left of a dead watch's COMMAND (its process group).

  A parent-death signal kills the COMMAND itself when its watch is killed;
  its own children may live on. They are killed if they are still in the
  recorded process group, on this host, with this watch's MODEL_DIR in
  their environment (so a reused group id is never killed).

  Args:
    running: What the dead watch recorded (`WatchState.running`).
  """
  pgid = running.get('pgid')
  if (running.get('host') != socket.gethostname() or
      not isinstance(pgid, int) or pgid <= 1 or not os.path.isdir('/proc')):
    return
  marker = f'CKPT_EXPORT_MODEL_DIR={running.get("model_dir")}'.encode()
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat', 'rb') as f:
        group = int(f.read().rsplit(b')', 1)[1].split()[2])
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except (OSError, ValueError, IndexError):
      continue
    if group == pgid and marker in environ:
      print(f'{_common.PROG}: killing process {pid}, left running on step '
            f'{running.get("step")} by a watch that died', file=sys.stderr)
      try:
        os.kill(int(pid), signal.SIGKILL)
      except ProcessLookupError:
        pass


def _cannot_run(command: str, error: OSError) -> _common.UsageError:
  """The error for a COMMAND that cannot be started (not its failure)."""
  hint = ' (a script needs a #! line)' if error.errno == errno.ENOEXEC else ''
  return _common.UsageError(f'cannot run COMMAND {command}: '
                            f'{error.strerror or error}{hint}')


def run(command: List[str], env: Dict[str, str],
        started: Callable[[int], None]) -> int:
  """Runs `command` in its own process group, killed with the watch.

  Args:
    command: The command line.
    env: Its environment.
    started: Called with the process (and group) id once it started.

  Returns:
    Its exit code (-N if signal N killed it).
  """
  try:
    child = subprocess.Popen(command, env=env, start_new_session=True,
                             preexec_fn=_die_with(os.getpid()))
  except OSError as e:
    raise _cannot_run(command[0], e) from None
  try:
    started(child.pid)
    return child.wait()
  finally:
    _kill_group(child.pid)  # Its leftovers, or all of it if we are ending.
    child.wait()


def describe_exit(code: int) -> str:
  if code < 0:
    return f'was killed by signal {-code}'
  return f'exited with code {code}'
