"""Writer tokens: which process made a name, and whether it still needs it.

Every temporary name ckpt_export writes (a work directory, a lease, the
temporary file of an atomic write) carries a token naming the operation that
made it: `<ms>-<pid>-<host>-<random>`. Housekeeping in any process removes
what a writer left only once `token_alive` says that writer is gone, so the
entries of a live writer are never touched.

Work directories are named `.<target>.<kind>-<token>` beside their target:
`tmp` while an export (or file) is written, `old` for a replaced export
renamed aside, `del` for one renamed away to be deleted. No reader takes such
a name for an export (it does not end in `_saved_modules`), and no export's
name is a prefix of it, which TF's prefix-matching `ram://` file system needs.
"""

import contextlib
import os
import re
import secrets
import socket
import threading
import time
from typing import Iterator, NamedTuple, Optional

from ckpt_export import paths

# A work directory of another host (whose pid cannot be checked), or of a pid
# on this host that may have been reused, counts as abandoned after this long.
STALE_SECONDS = 6 * 3600.0

# The kinds of work directory (see the module docstring).
TMP, OLD, DEL = 'tmp', 'old', 'del'

# This host, as tokens spell it.
HOST = re.sub(r'[^A-Za-z0-9._]', '_', socket.gethostname()) or 'host'
# A token names the operation that made a name: `<ms>-<pid>-<host>-<random>`.
TOKEN_PATTERN = (r'(?P<ms>[0-9]+)-(?P<pid>[0-9]+)-(?P<host>[A-Za-z0-9._]+)'
                 r'-[0-9a-f]{8}')
_TOKEN_RE = re.compile(TOKEN_PATTERN + r'\Z')
_WORK_RE = re.compile(r'\.(?P<target>.+)\.(?P<kind>tmp|old|del)-(?P<token>' +
                      TOKEN_PATTERN + r')\Z', re.DOTALL)

# Tokens of the operations in flight in this process.
_lock = threading.Lock()
_live_tokens = set()


class WorkName(NamedTuple):
  """A parsed work directory name `.<target>.<kind>-<token>`."""
  target: str
  kind: str
  token: str


def new_token() -> str:
  """A fresh token of this process (not registered as in flight)."""
  return (f'{int(time.time() * 1000)}-{os.getpid()}-{HOST}-'
          f'{secrets.token_hex(4)}')


def work_dir(target: str, kind: str, token: str) -> str:
  """The path of the work directory (or file) of `kind` for `target`."""
  target = target.rstrip('/')
  return os.path.join(os.path.dirname(target),
                      f'.{paths.basename(target)}.{kind}-{token}')


def parse_work_name(name: str) -> Optional[WorkName]:
  """Parses a work directory's base name; None if it is not one."""
  match = _WORK_RE.match(name)
  return None if match is None else WorkName(*match.group('target', 'kind',
                                                          'token'))


def _pid_running(pid: int) -> bool:
  """Whether `pid` runs on this host; a zombie (killed, not reaped) does not."""
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # It runs, as another user.
    pass
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      state = f.read().rpartition(b')')[2].split()[:1]
  except OSError:  # No /proc here, or it just exited.
    return True
  return state != [b'Z']


def token_alive(token: str,
                stale_seconds: Optional[float] = STALE_SECONDS) -> bool:
  """Whether the process that made `token` may still be using what it names.

  A token of this process is alive while its operation is in flight (see
  `begin_operation`); one of another pid on this host while that pid runs; one
  of another host always, as its pid cannot be checked. Any token older than
  `stale_seconds` (unless None) counts as gone, as does one that is malformed.

  Args:
    token: A token made by `begin_operation`.
    stale_seconds: The age after which a token counts as gone, or None.
  """
  match = _TOKEN_RE.match(token)
  if match is None:
    return False
  with _lock:
    if token in _live_tokens:
      return True
  if (stale_seconds is not None and
      time.time() - int(match.group('ms')) / 1000 > stale_seconds):
    return False
  if match.group('host') != HOST:
    return True
  pid = int(match.group('pid'))
  if pid == os.getpid():  # Not live in this process: a former process's.
    return False
  return _pid_running(pid)


def work_owner_alive(name: str) -> bool:
  """Whether the writer that named a work directory may still be using it."""
  work = parse_work_name(name)
  return work is not None and token_alive(work.token)


def begin_operation() -> str:
  """Registers an operation in flight in this process; returns its token."""
  token = new_token()
  with _lock:
    _live_tokens.add(token)
  return token


def end_operation(token: str) -> None:
  """Ends the operation that `begin_operation` returned `token` for."""
  with _lock:
    _live_tokens.discard(token)


@contextlib.contextmanager
def operation() -> Iterator[str]:
  """Registers an operation in flight in this process; yields its token."""
  token = begin_operation()
  try:
    yield token
  finally:
    end_operation(token)
