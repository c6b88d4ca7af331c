"""The `ckpt-export` command: list, verify, watch and make a model's exports.

    ckpt-export ls MODEL_DIR
    ckpt-export verify MODEL_DIR
    ckpt-export watch MODEL_DIR [options] -- COMMAND [ARGS...]
    ckpt-export export MODEL_DIR --build-fn package.module:function
    ckpt-export serve MODEL_DIR --latest-dir DIR [--best-dir DIR]

Exit codes: 0 success; 1 a broken export, a failed COMMAND or an unexpected
error; 2 bad arguments, or a MODEL_DIR that cannot be accessed (missing,
unreadable, or a lease directory this process may not write: see
`--no-lease`). Every error is one line on stderr, never a traceback. `watch
--stop-on-failure` exits with the failed COMMAND's own code.

TensorFlow is imported only once a subcommand runs, after its C++ logging is
turned down to errors (`TF_CPP_MIN_LOG_LEVEL=2`) and GPUs are hidden
(`CUDA_VISIBLE_DEVICES=`), unless the user set these: `--help` is fast, output
is not buried in TensorFlow's start-up lines, and a command never takes GPU
memory from a trainer on the same machine. COMMANDs run by `watch` get the
environment as it was, without these two.

Adding a subcommand: write `_add_<name>(subparsers)`, which adds its parser
(with `add_model_dir_arguments` for MODEL_DIR and --checkpoint-name) and sets
`run=<function of the parsed arguments returning the exit code>` as a default,
then list it in `_SUBCOMMANDS`. A subcommand that takes `-- COMMAND [ARGS...]`
also sets `takes_command=True` and finds the words in `args.command`.
"""

import argparse
import contextlib
import ctypes
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from absl import logging

from ckpt_export import paths

PROG = 'ckpt-export'
# Set for this process unless the user set them; see the module docstring.
_ENV_DEFAULTS = {'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': ''}
_STATE_VERSION = 1


class UsageError(Exception):
  """Bad arguments or an unusable MODEL_DIR: a one-line error, exit code 2."""


class _Terminated(Exception):
  """Raised by the SIGTERM handler so that cleanup (leases, child) runs."""


# Argument types: each raises argparse.ArgumentTypeError naming the bad value.


def _seconds(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 <= value < float('inf'):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a non-negative number of seconds')
  return value


def _positive_seconds(text: str) -> float:
  value = _seconds(text)
  if value == 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be more than 0 seconds')
  return value


def _step(text: str) -> int:
  if not re.fullmatch(r'[0-9]+', text):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not a step (a non-negative integer)')
  return int(text)


def _checkpoint_name(text: str) -> str:
  try:
    return paths.validate_component('checkpoint name', text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def add_model_dir_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds MODEL_DIR, --checkpoint-name and -v, which every subcommand takes."""
  parser.add_argument('model_dir', metavar='MODEL_DIR',
                      help='the model directory (local path or URL)')
  parser.add_argument('--checkpoint-name', type=_checkpoint_name,
                      default='ckpt',
                      help='the checkpoint name of the exports (default: '
                      '%(default)s)')
  parser.add_argument('-v', '--verbose', action='store_true',
                      default=argparse.SUPPRESS,
                      help='log what is done (absl INFO logging)')


def _add_no_lease_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      '--no-lease', action='store_true',
      help='read without leases, for a MODEL_DIR this process may not write '
      '(a read-only bucket). Risk: the trainer\'s garbage collection may '
      'delete an export while it is read, which then fails to load')


def _lease(export_dir: str, args: argparse.Namespace) -> Any:
  """A lease on `export_dir` (None if gone), or a null context (--no-lease)."""
  from ckpt_export import leases  # pylint: disable=g-import-not-at-top
  if args.no_lease:
    return contextlib.nullcontext()
  return leases.acquire(export_dir, holder=f'{PROG} {args.subcommand}')


# Shared by the subcommands.


def _one_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines()]
  return next((line for line in lines if line), '')


def _reason(error: Any, path: str) -> str:
  """The first line of a TensorFlow error about `path`, without the path."""
  reason = _one_line(error.message)
  return reason[len(path) + 2:] if reason.startswith(f'{path}; ') else reason


def _list_model_dir(model_dir: str) -> List[str]:
  """Returns the entries of MODEL_DIR, or raises UsageError saying why not.

  Local paths are checked without TensorFlow, so that these errors are quick.
  """
  if '://' not in model_dir:
    if not os.path.isdir(model_dir):
      if os.path.exists(model_dir):
        raise UsageError(f'MODEL_DIR {model_dir} is not a directory')
      raise UsageError(f'MODEL_DIR {model_dir} does not exist')
    try:
      return os.listdir(model_dir)
    except OSError as e:
      raise UsageError(
          f'cannot read MODEL_DIR {model_dir}: {e.strerror}') from None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    if not tf.io.gfile.isdir(model_dir):
      raise UsageError(f'MODEL_DIR {model_dir} does not exist or is not a '
                       'directory')
    return [name.rstrip('/') for name in tf.io.gfile.listdir(model_dir)]
  except tf.errors.OpError as e:
    raise UsageError(
        f'cannot read MODEL_DIR {model_dir}: {_reason(e, model_dir)}') from None


def _printable(text: str) -> str:
  """`text` with control characters escaped, so a table stays one line a row."""
  return re.sub('[\x00-\x1f\x7f]', lambda m: repr(m.group())[1:-1], text)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  """Prints left-aligned columns separated by two spaces."""
  rows = [[_printable(cell) for cell in row] for row in rows]
  widths = [max(len(row[i]) for row in [header, *rows])
            for i in range(len(header))]
  for row in [header, *rows]:
    print('  '.join(cell.ljust(width)
                    for cell, width in zip(row, widths)).rstrip())


# ls


def _human_size(size: int) -> str:
  if size < 1024:
    return f'{size} B'
  value = size / 1024
  for unit in ('KiB', 'MiB', 'GiB'):
    if value < 1024:
      break
    value /= 1024
  else:
    unit = 'TiB'
  return f'{value:.1f} {unit}'


def _human_age(seconds: float) -> str:
  seconds = max(0, int(seconds))
  for unit, length in (('d', 86400), ('h', 3600), ('m', 60)):
    if seconds >= length:
      return f'{seconds // length}{unit}'
  return f'{seconds}s'


def _tree_size(path: str) -> int:
  """Bytes of the files under `path` (or of the file), 0 if it is gone.

  On local disk links are not followed (a link to a parent would never end).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if '://' not in path:
    try:
      st = os.lstat(path)
    except OSError:
      return 0
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    for root, _, files in os.walk(path):
      for name in files:
        with contextlib.suppress(OSError):
          size += os.lstat(os.path.join(root, name)).st_size
    return size
  try:
    if not tf.io.gfile.isdir(path):
      return tf.io.gfile.stat(path).length
    return sum(tf.io.gfile.stat(os.path.join(d, f)).length
               for d, _, files in tf.io.gfile.walk(path) for f in files)
  except tf.errors.NotFoundError:  # Deleted meanwhile by the trainer.
    return 0


def _mtime(path: str) -> Optional[float]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return tf.io.gfile.stat(path).mtime_nsec / 1e9
  except tf.errors.OpError:
    return None


_CHECKPOINT_FILE_RE = re.compile(
    r'(?P<prefix>.+)\.(index|data-[0-9]+-of-[0-9]+)\Z', re.DOTALL)


class _Step:
  """What a model directory holds for one step."""

  def __init__(self) -> None:
    self.checkpoint = False  # Its `.index` file is there.
    self.export: Optional[str] = None  # The export-named directory.
    self.work = False  # A work directory of its export is there.
    self.entries: List[str] = []  # Every path that belongs to the step.


def _steps(model_dir: str, checkpoint_name: str,
           names: Sequence[str]) -> Dict[int, _Step]:
  """Groups the entries of MODEL_DIR by the step they belong to."""
  from ckpt_export import commit  # pylint: disable=g-import-not-at-top
  steps: Dict[int, _Step] = {}
  for name in names:
    work_of = commit.work_dir_export(name)
    checkpoint_file = _CHECKPOINT_FILE_RE.match(name)
    if work_of is not None:
      step = paths.parse_export_step(work_of, checkpoint_name)
    elif checkpoint_file is not None:
      step = paths.parse_checkpoint_step(checkpoint_file.group('prefix'),
                                         checkpoint_name)
    else:
      step = paths.parse_export_step(name, checkpoint_name)
    if step is None:
      continue
    entry = steps.setdefault(step, _Step())
    path = os.path.join(model_dir, name)
    entry.entries.append(path)
    if work_of is not None:
      entry.work = True
    elif checkpoint_file is not None:
      entry.checkpoint = entry.checkpoint or name.endswith('.index')
    else:
      entry.export = path
  return steps


def _export_columns(entry: _Step) -> List[str]:
  """The export (published, partial or none), modules and leases columns."""
  from ckpt_export import commit  # pylint: disable=g-import-not-at-top
  from ckpt_export import leases  # pylint: disable=g-import-not-at-top
  if entry.export is not None and commit.is_published(entry.export):
    info = commit.read_commit_info(entry.export) or {}
    modules = info.get('modules') or _module_names(entry.export)
    holders = leases.holders(entry.export)
    return ['published', ','.join(modules) or '-',
            f'{len(holders)}: ' + ','.join(
                f'{h.get("holder")}@{h.get("host")}:{h.get("pid")}'
                for h in holders)
            if holders else '-']
  return ['partial' if entry.export or entry.work else 'none', '-', '-']


def _module_names(export_dir: str) -> List[str]:
  """The module directories of an export (for exports without metadata)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    names = tf.io.gfile.listdir(export_dir)
  except tf.errors.NotFoundError:
    return []
  return sorted(n.rstrip('/') for n in names
                if not n.startswith('.') and
                tf.io.gfile.isdir(os.path.join(export_dir, n)))


def _ls(args: argparse.Namespace) -> int:
  """Prints a table of the steps in MODEL_DIR."""
  names = _list_model_dir(args.model_dir)
  steps = _steps(args.model_dir, args.checkpoint_name, names)
  if not steps:
    print(f'No checkpoints or exports named {args.checkpoint_name!r} in '
          f'{args.model_dir}.')
    return 0
  now = time.time()
  rows = []
  for step, entry in sorted(steps.items()):
    export, modules, holders = _export_columns(entry)
    times = [t for t in map(_mtime, entry.entries) if t is not None]
    rows.append([
        str(step), 'yes' if entry.checkpoint else 'no', export, modules,
        _human_size(sum(map(_tree_size, entry.entries))),
        _human_age(now - max(times)) if times else '-', holders])
  _print_table(['STEP', 'CHECKPOINT', 'EXPORT', 'MODULES', 'SIZE', 'AGE',
                'LEASES'], rows)
  return 0


def _add_ls(subparsers: Any) -> None:
  parser = subparsers.add_parser(
      'ls', help='list the steps of a model directory',
      description='Prints a table of the steps in MODEL_DIR: whether each has '
      'its checkpoint and a published export (or only part of one, left by a '
      'write in progress or a crash), its modules, its size on disk (checkpoint'
      ' and export), the age of its newest entry, and the readers holding a '
      'lease on its export (count: holder@host:pid).')
  add_model_dir_arguments(parser)
  parser.set_defaults(run=_ls)


# verify


def _verify_module(module_dir: str) -> List[str]:
  """Loads one SavedModel; returns its status (ok or BROKEN) and a detail."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    loaded = tf.saved_model.load(module_dir)
  except Exception as e:  # pylint: disable=broad-except
    return ['BROKEN', f'does not load: {_one_line(e)}']
  signatures = sorted(loaded.signatures.keys())
  if not signatures:
    return ['BROKEN', 'no serving signature']
  return ['ok', 'signatures: ' + ','.join(signatures)]


def _verify_export(export_dir: str) -> List[List[str]]:
  """Returns the table rows (module, status, detail) of one export."""
  from ckpt_export import commit  # pylint: disable=g-import-not-at-top
  info = commit.read_commit_info(export_dir) or {}
  modules = info.get('modules') or _module_names(export_dir)
  if not modules:
    return [['-', 'BROKEN', 'no modules']]
  return [[module, *_verify_module(os.path.join(export_dir, module))]
          for module in modules]


def _verify(args: argparse.Namespace) -> int:
  """Loads every published export; exits 1 if any is broken."""
  from ckpt_export import commit  # pylint: disable=g-import-not-at-top
  from ckpt_export import leases  # pylint: disable=g-import-not-at-top
  from ckpt_export import readers  # pylint: disable=g-import-not-at-top
  names = _list_model_dir(args.model_dir)
  exports = [(step, path) for step, path in readers.export_candidates(
      args.model_dir, args.checkpoint_name, names)
             if commit.is_published(path)]
  if not exports:
    print(f'No published exports named {args.checkpoint_name!r} in '
          f'{args.model_dir}.')
    return 0
  rows = []
  for step, path in exports:
    lease = _lease(path, args)
    if lease is None:
      rows.append([str(step), '-', 'gone', 'deleted before it could be read'])
      continue
    with lease:
      rows.extend([str(step), *row] for row in _verify_export(path))
      if isinstance(lease, leases.Lease):
        try:
          lease.check()
        except leases.LeaseLapsedError as e:
          rows.append([str(step), '-', 'BROKEN', _one_line(e)])
  _print_table(['STEP', 'MODULE', 'STATUS', 'DETAIL'], rows)
  broken = sorted({int(row[0]) for row in rows if row[2] == 'BROKEN'})
  if broken:
    print(f'{PROG}: broken exports at steps {", ".join(map(str, broken))}',
          file=sys.stderr)
    return 1
  return 0


def _add_verify(subparsers: Any) -> None:
  parser = subparsers.add_parser(
      'verify', help='load every published export and check its signatures',
      description='Loads each module of every published export in MODEL_DIR '
      'with tf.saved_model.load and checks that it has a serving signature, '
      'holding a lease on the export meanwhile (unless --no-lease). Prints a '
      'table; exits 1 if any export is broken, 2 if MODEL_DIR cannot be '
      'accessed.')
  add_model_dir_arguments(parser)
  _add_no_lease_argument(parser)
  parser.set_defaults(run=_verify, subcommand='verify')


# watch


class _WatchState:
  """The last step a watch finished, persisted so a restart resumes after it.

  Written whole after each step with `commit.write_file_atomically`, so a
  reader (or a restart) sees the old state or the new one, never a mix.
  """

  def __init__(self, path: Optional[str], model_dir: str,
               checkpoint_name: str) -> None:
    self._path = path
    if '://' not in model_dir:
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
    from ckpt_export import leases  # pylint: disable=g-import-not-at-top
    parent = os.path.dirname(self._path) or '.'
    try:
      self._lease = leases.acquire_writer(
          parent, f'{PROG} watch --state-file {self._path}',
          name=os.path.basename(self._path) + '.watch')
    except leases.WriterBusyError as e:
      raise UsageError(str(e)) from None

  def close(self) -> None:
    """Releases the state file's writer lease."""
    if self._lease is not None:
      self._lease.release()

  def _load(self) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # pylint: disable=g-import-not-at-top
    from ckpt_export import commit
    from ckpt_export import readers
    # pylint: enable=g-import-not-at-top
    parent = os.path.dirname(self._path) or '.'
    # Removes the unfinished write of a watch killed while recording a step.
    commit.remove_stale_files(parent, os.path.basename(self._path),
                              readers.list_directory(parent))
    try:
      with tf.io.gfile.GFile(self._path) as f:
        text = f.read()
    except tf.errors.NotFoundError:
      if not tf.io.gfile.isdir(parent):
        raise UsageError(f'--state-file {self._path}: directory {parent} does '
                         'not exist') from None
      return
    except tf.errors.OpError as e:
      raise UsageError(f'cannot read --state-file {self._path}: '
                       f'{_reason(e, self._path)}') from None
    try:
      state = json.loads(text)
      last_step, failed = state['last_step'], state['failed']
      owner = {key: state[key] for key in self._owner}
      if state['version'] != _STATE_VERSION:
        raise ValueError(f'version {state["version"]!r}')
      if (isinstance(last_step, bool) or not isinstance(last_step, int) or
          last_step < -1):
        raise ValueError(f'last_step {last_step!r} is not a step')
      if not (isinstance(failed, dict) and all(
          isinstance(v, int) and not isinstance(v, bool)
          for v in failed.values())):
        raise ValueError(f'failed {failed!r} is not a map of exit codes')
    except (ValueError, KeyError, TypeError) as e:
      raise UsageError(f'--state-file {self._path} is not a ckpt-export watch '
                       f'state file ({_one_line(e)}); fix or remove it') from None
    if owner != self._owner:
      raise UsageError(
          f'--state-file {self._path} records the watch of MODEL_DIR '
          f'{owner["model_dir"]} with --checkpoint-name '
          f'{owner["checkpoint_name"]}; use another state file')
    self.last_step, self.failed = last_step, failed
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
    text = json.dumps(dict(self._owner, version=_STATE_VERSION,
                           last_step=self.last_step, failed=self.failed,
                           running=self.running),
                      indent=1, sort_keys=True) + '\n'
    from ckpt_export import commit  # pylint: disable=g-import-not-at-top
    commit.write_file_atomically(self._path, text)


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


def _kill_orphans(running: Dict[str, Any]) -> None:
  """Kills what is left of a dead watch's COMMAND (its process group).

  A parent-death signal kills the COMMAND itself when its watch is killed;
  its own children may live on. They are killed if they are still in the
  recorded process group, on this host, with this watch's MODEL_DIR in
  their environment (so a reused group id is never killed).
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
      print(f'{PROG}: killing process {pid}, left running on step '
            f'{running.get("step")} by a watch that died', file=sys.stderr)
      try:
        os.kill(int(pid), signal.SIGKILL)
      except ProcessLookupError:
        pass


def _run_command(command: List[str], env: Dict[str, str], step: int,
                 state: _WatchState) -> int:
  """Runs COMMAND in its own process group, killed with the watch."""
  try:
    child = subprocess.Popen(command, env=env, start_new_session=True,
                             preexec_fn=_die_with(os.getpid()))
  except OSError as e:
    raise _cannot_run(command[0], e) from None
  try:
    state.start(step, child.pid, env['CKPT_EXPORT_MODEL_DIR'])
    return child.wait()
  finally:
    _kill_group(child.pid)  # Its leftovers, or all of it if we are ending.
    child.wait()


def _substitute(word: str, export_dir: str, step: int) -> str:
  values = {'path': export_dir, 'step': str(step)}
  return re.sub(r'\{(path|step)\}', lambda m: values[m.group(1)], word)


def _describe_exit(code: int) -> str:
  if code < 0:
    return f'was killed by signal {-code}'
  return f'exited with code {code}'


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  """Turns SIGTERM into _Terminated, so the COMMAND is killed and leases go."""
  def handler(signum: int, frame: Any) -> None:
    del signum, frame
    raise _Terminated()
  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _run_step(args: argparse.Namespace, export_dir: str, step: int,
              state: _WatchState, advance: bool = True) -> int:
  """Runs COMMAND on one export and records the outcome; returns its code."""
  command = args.command[:1] + [
      _substitute(word, export_dir, step) for word in args.command[1:]]
  logging.info('Step %d: running %s', step, shlex.join(command))
  env = dict(args.environ, CKPT_EXPORT_PATH=export_dir,
             CKPT_EXPORT_STEP=str(step), CKPT_EXPORT_MODEL_DIR=args.model_dir)
  code = _run_command(command, env, step, state)
  if code:
    print(f'{PROG}: step {step}: {command[0]} {_describe_exit(code)}',
          file=sys.stderr)
  if not (code and args.stop_on_failure):
    state.finish(step, code, advance)
  return code


def _retry_failed(args: argparse.Namespace, state: _WatchState) -> None:
  """Runs COMMAND again on each recorded failed step whose export remains."""
  # pylint: disable=g-import-not-at-top
  from ckpt_export import leases
  # pylint: enable=g-import-not-at-top
  for step in sorted(map(int, state.failed)):
    export_dir = paths.export_path(args.model_dir, args.checkpoint_name, step)
    lease = leases.acquire(export_dir, holder=f'{PROG} watch')
    if lease is None:
      print(f'{PROG}: step {step}: cannot retry, its export is gone; '
            'dropping its failure', file=sys.stderr)
      state.finish(step, 0, advance=False)
      continue
    with lease:
      _run_step(args, export_dir, step, state, advance=False)


def _watch(args: argparse.Namespace) -> int:
  """Runs COMMAND for each new export, in step order, never twice."""
  # pylint: disable=g-import-not-at-top
  from ckpt_export import leases
  from ckpt_export import readers
  # pylint: enable=g-import-not-at-top
  if not args.command:
    raise UsageError("watch needs a COMMAND after '--'")
  if shutil.which(args.command[0]) is None:
    raise UsageError(f'COMMAND {args.command[0]} not found')
  _list_model_dir(args.model_dir)
  state = _WatchState(args.state_file, args.model_dir, args.checkpoint_name)
  with contextlib.closing(state), _sigterm_raises():
    if state.running is not None:
      _kill_orphans(state.running)
    if state.failed:
      print(f'{PROG}: failed in earlier runs: step(s) '
            f'{", ".join(sorted(state.failed, key=int))}'
            f'{"; retrying" if args.retry_failed else " (--retry-failed)"}',
            file=sys.stderr)
      if args.retry_failed:
        _retry_failed(args, state)
    if args.until_step is not None and state.last_step >= args.until_step:
      print(f'{PROG}: step {state.last_step} was already handled; nothing '
            'to do', file=sys.stderr)
      return 1 if state.failed else 0
    exports = readers.savedmodels_iterator(
        args.model_dir, timeout=args.timeout,
        seconds_to_sleep=args.seconds_to_sleep,
        checkpoint_name=args.checkpoint_name, latest_only=args.latest_only,
        after_step=state.last_step,
        lease_seconds=None if args.no_lease else float(
            leases.DEFAULT_LEASE_SECONDS))
    with contextlib.closing(exports):
      for export_dir in exports:
        step = paths.parse_export_step(export_dir, args.checkpoint_name)
        code = _run_step(args, export_dir, step, state)
        if code and args.stop_on_failure:
          return code if code > 0 else 128 - code
        if args.until_step is not None and step >= args.until_step:
          break
  return 1 if state.failed else 0


def _cannot_run(command: str, error: OSError) -> UsageError:
  """The error for a COMMAND that cannot be started (not its failure)."""
  hint = ' (a script needs a #! line)' if error.errno == errno.ENOEXEC else ''
  return UsageError(f'cannot run COMMAND {command}: '
                    f'{error.strerror or error}{hint}')


def _add_watch(subparsers: Any) -> None:
  parser = subparsers.add_parser(
      'watch', help='run a command for each new export',
      usage=f'{PROG} watch MODEL_DIR [options] -- COMMAND [ARGS...]',
      description='Runs COMMAND once for each new published export of '
      'MODEL_DIR, in step order, never through a shell. The export\'s path and '
      'step are in the environment variables CKPT_EXPORT_PATH and '
      'CKPT_EXPORT_STEP (and MODEL_DIR in CKPT_EXPORT_MODEL_DIR), and replace '
      'the words {path} and {step} in ARGS. The export is leased while COMMAND '
      'runs (unless --no-lease): the trainer does not delete it meanwhile. COMMAND runs in its '
      'own process group, killed when it ends and when the watch ends or is '
      'killed (even by SIGKILL, through a parent-death signal). A failing '
      'COMMAND is reported on stderr and the watch goes on, unless '
      '--stop-on-failure; the failures recorded in --state-file are '
      'reported at every start, and the exit code is 1 while one stands '
      '(until --retry-failed succeeds on it). One watch per state file at a '
      'time: a second one is refused, naming the first.')
  add_model_dir_arguments(parser)
  parser.add_argument('--timeout', type=_seconds, default=None,
                      help='end the watch (exit 0) after this many seconds '
                      'without a new export (default: wait forever)')
  parser.add_argument('--seconds-to-sleep', type=_positive_seconds,
                      default=1.0,
                      help='seconds between looks for a new export (default: '
                      '%(default)s)')
  parser.add_argument('--latest-only', action='store_true',
                      help='run COMMAND only on the newest export each time, '
                      'skipping older unseen ones (for a COMMAND slower than '
                      'the trainer)')
  parser.add_argument('--state-file',
                      help='file recording the last step handled, written '
                      'after each step; a restarted watch with the same file '
                      'resumes after that step')
  parser.add_argument('--stop-on-failure', action='store_true',
                      help='stop at the first failing COMMAND, with its exit '
                      'code; its step is not recorded as handled')
  parser.add_argument('--until-step', type=_step, default=None,
                      help='stop after handling a step at or above this one')
  parser.add_argument('--retry-failed', action='store_true',
                      help='first run COMMAND again on the steps recorded as '
                      'failed in --state-file (a step whose export is gone '
                      'is dropped, said so)')
  _add_no_lease_argument(parser)
  parser.set_defaults(run=_watch, takes_command=True)


# export


def _export(args: argparse.Namespace) -> int:
  """Exports each new checkpoint of MODEL_DIR (the decoupled mode)."""
  from ckpt_export import decoupled  # pylint: disable=g-import-not-at-top
  _list_model_dir(args.model_dir)
  sys.path.insert(0, os.getcwd())  # Finds the user's modules, as python does.
  try:
    build_fn = decoupled.load_build_fn(args.build_fn)
    steps = decoupled.run_exporter(
        args.model_dir, build_fn, checkpoint_name=args.checkpoint_name,
        timeout=args.timeout, seconds_to_sleep=args.seconds_to_sleep)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  print(f'{PROG}: exported steps {", ".join(map(str, steps)) or "none"}')
  return 0


def _add_export(subparsers: Any) -> None:
  parser = subparsers.add_parser(
      'export', help='export each new checkpoint (trainer writes checkpoints '
      'only)',
      description='The decoupled mode: the trainer writes checkpoints only '
      '(a plain tf.train.CheckpointManager), and this process exports each new '
      'checkpoint of MODEL_DIR as <name>-<step>_saved_modules/<module>/ '
      'through the same commit protocol, and deletes exports whose checkpoint '
      'is gone (unless a reader leases them). BUILD_FN is '
      '"package.module:function", returning (tf.train.Checkpoint, '
      "{module name: module}) shaped like the trainer's checkpoint.")
  add_model_dir_arguments(parser)
  parser.add_argument('--build-fn', required=True, metavar='BUILD_FN',
                      help='package.module:function building the checkpoint '
                      'and the modules to export')
  parser.add_argument('--timeout', type=_seconds, default=None,
                      help='stop after this many seconds without a new '
                      'checkpoint (default: wait forever)')
  parser.add_argument('--seconds-to-sleep', type=_positive_seconds,
                      default=1.0,
                      help='seconds between looks for a new checkpoint '
                      '(default: %(default)s)')
  parser.set_defaults(run=_export)


# serve


def _max_versions(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(
        f'--max-versions must be a positive integer, got {text!r}')
  return value


def _serve(args: argparse.Namespace) -> int:
  """Publishes MODEL_DIR's latest and/or best export into serving views."""
  if not (args.latest_dir or args.best_dir):
    raise UsageError('serve needs --latest-dir or --best-dir (or both)')
  from ckpt_export import serving  # pylint: disable=g-import-not-at-top
  _list_model_dir(args.model_dir)
  try:
    feeds = [(serving.ServingView(d, args.max_versions), publish)
             for d, publish in (
                 (args.latest_dir, lambda v: v.publish_latest(
                     args.model_dir, args.checkpoint_name)),
                 (args.best_dir, lambda v: v.publish_best(args.model_dir)))
             if d]
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  last_new = time.monotonic()
  with _sigterm_raises():
    while True:
      for view, publish in feeds:
        for module, version_dir in sorted(publish(view).items()):
          print(f'{PROG}: published {module} version {version_dir}',
                flush=True)
          last_new = time.monotonic()
      if not args.follow or (args.timeout is not None and
                             time.monotonic() - last_new > args.timeout):
        return 0
      time.sleep(args.seconds_to_sleep)


def _add_serve(subparsers: Any) -> None:
  parser = subparsers.add_parser(
      'serve', help='publish exports as versions TF Serving can watch',
      description='Publishes the latest export of MODEL_DIR into --latest-dir '
      'and/or the best one (kept by BestExport) into --best-dir, each module '
      'as <dir>/<module>/<step>/, the version layout TensorFlow Serving '
      'watches. A version appears complete or not at all (hard links on '
      'local disk), the newest --max-versions per module are kept (and '
      'versions a reader leases), and <dir>/models.config lists them for '
      "TF Serving's --model_config_file (required on object stores, where a "
      'version directory is visible while it is copied).')
  add_model_dir_arguments(parser)
  parser.add_argument('--latest-dir', help='the view fed with the latest '
                      'export')
  parser.add_argument('--best-dir', help='the view fed with the best export')
  parser.add_argument('--max-versions', type=_max_versions, default=2,
                      help='versions kept per module (default: %(default)s)')
  parser.add_argument('--follow', action='store_true',
                      help='keep publishing new exports as they appear')
  parser.add_argument('--timeout', type=_seconds, default=None,
                      help='with --follow, stop after this many seconds '
                      'without a new version (default: never)')
  parser.add_argument('--seconds-to-sleep', type=_positive_seconds,
                      default=1.0,
                      help='with --follow, seconds between looks (default: '
                      '%(default)s)')
  parser.set_defaults(run=_serve)


_SUBCOMMANDS: Sequence[Callable[[Any], None]] = (_add_ls, _add_verify,
                                                 _add_watch, _add_export,
                                                 _add_serve)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description='Inspect, verify and watch the checkpoints and SavedModel '
      'exports of a model directory written by ckpt_export (or by Model '
      "Garden's SavedModelCheckpointManager).")
  parser.add_argument('-v', '--verbose', action='store_true',
                      help='log what is done (absl INFO logging)')
  subparsers = parser.add_subparsers(metavar='COMMAND', required=True)
  for add in _SUBCOMMANDS:
    add(subparsers)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line `argv` (default: sys.argv[1:]); returns its code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  command = None
  if '--' in argv:
    command = argv[argv.index('--') + 1:]
    argv = argv[:argv.index('--')]
  parser = _parser()
  args = parser.parse_args(argv)
  if command is not None and not getattr(args, 'takes_command', False):
    parser.error(f"unrecognized arguments: -- {shlex.join(command)}")
  args.command = command
  args.environ = dict(os.environ)
  for key, value in _ENV_DEFAULTS.items():
    os.environ.setdefault(key, value)
  if args.verbose:
    logging.set_verbosity(logging.INFO)
  try:
    return args.run(args)
  except (UsageError, ValueError) as e:  # ValueError: a bad value, named.
    print(f'{PROG}: error: {_one_line(e)}', file=sys.stderr)
    return 2
  except _Terminated:
    return 128 + signal.SIGTERM
  except KeyboardInterrupt:
    return 128 + signal.SIGINT
  except Exception as e:  # pylint: disable=broad-except
    tf = sys.modules.get('tensorflow')
    if tf is not None and isinstance(e, tf.errors.PermissionDeniedError):
      # Cannot access MODEL_DIR (or write leases there): exit code 2.
      print(f'{PROG}: error: {_one_line(e.message)}', file=sys.stderr)
      return 2
    if tf is not None and isinstance(e, tf.errors.OpError):
      message = e.message
    else:
      message = f'{type(e).__name__}: {e}'
    print(f'{PROG}: error: {_one_line(message)}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
