"""kill -9 at random instants of save() never exposes a partial export.

Each round starts `crash_child.py` on one model directory, lets it restore and
save for a random delay, and SIGKILLs it. After every kill, each export a
reader accepts must load and serve the values of its own step, and every
checkpoint the next run may restore must have its export. A last run then
restores, finishes, and must leave exactly the exports its checkpoints call
for and no work directories. All of it runs with synchronous saves, then with
asynchronous ones (`CheckpointOptions(enable_async=True)`). Other tests kill
the child at each step of a linked export, on local disk and on gs:// (the
GCS emulator, fixture `emulator`), where exports are published with a commit
marker and their variables are copied server-side.

Children import TensorFlow (~5 s) before touching the model directory and wait
for a go line after READY, so the next children are started ahead and import
while the parent checks; they are stopped (SIGSTOP) while a child runs, so that
it has the CPU to itself. The kill delay counts from the go line.
"""

import collections
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from typing import IO, Iterable, List, NoReturn, Optional, Set, Tuple

import numpy as np
import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
import crash_child
from helpers import child_env

SEED = int(os.environ.get('CRASH_KILL_SEED', '20251121'))
ROUNDS = 20
MAX_DELAY_SECONDS = 1.5
PREFETCH = 3  # Children importing TensorFlow ahead of their round.
SAVE_EVERY = 2
MAX_TO_KEEP = 3
ENDLESS_STEPS = 10**9  # Killed rounds never finish.
FINAL_SAVES = 2  # Saves of the last run, which runs to completion.

WORK_DIR_MARKS = ('.tmp-', '.old-', '.del-')
GCS_TIMEOUT_SECONDS = 240  # For a run of the job on gs://.


def _child_command(model_dir: str, total_steps: int,
                   enable_async: bool) -> List[str]:
  return [sys.executable, crash_child.__file__, '--model_dir', model_dir,
          '--total_steps', str(total_steps), '--save_every', str(SAVE_EVERY),
          '--max_to_keep', str(MAX_TO_KEEP)] + (
              ['--enable_async'] if enable_async else [])


class _Child:
  """A `crash_child.py` process started ahead, waiting for its go line."""

  def __init__(self, model_dir: str, stderr: IO[str], enable_async: bool):
    self.stderr_path = stderr.name
    self.proc = subprocess.Popen(
        _child_command(model_dir, ENDLESS_STEPS, enable_async) +
        ['--wait_for_go'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        text=True, env=child_env())

  def _fail(self, what: str) -> NoReturn:
    with open(self.stderr_path) as f:
      pytest.fail(f'Child {self.proc.pid} {what}; stderr:\n{f.read()[-4000:]}')

  def run_then_kill(self, delay: float, spares: Iterable['_Child']
                   ) -> List[str]:
    """Waits for READY, sends go, SIGKILLs after `delay` s; returns its lines.

    Args:
      delay: Seconds from the go line to the kill.
      spares: Children started ahead, stopped meanwhile.

    Returns:
      The lines the child printed after READY.
    """
    if self.proc.stdout.readline() != 'READY\n':
      self._fail('did not print READY')
    for spare in spares:
      spare.proc.send_signal(signal.SIGSTOP)
    self.proc.stdin.write('go\n')
    self.proc.stdin.flush()
    time.sleep(delay)
    if self.proc.poll() is not None:
      self._fail(f'exited with {self.proc.returncode} before the kill')
    self.proc.send_signal(signal.SIGKILL)
    # Reap it: a zombie's pid still looks alive to ckpt_export's recovery.
    self.proc.wait()
    for spare in spares:
      spare.proc.send_signal(signal.SIGCONT)
    return self.proc.stdout.read().splitlines()

  def close(self) -> None:
    """Kills the child if it still runs, reaps it and closes its pipes."""
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    self.proc.stdout.close()
    self.proc.stdin.close()


# The deletion request, and the temporary file it is written to first.
_DELETE_REQUEST_RE = re.compile(
    '(' + re.escape(leases.DELETE_REQUEST) + '|' +
    re.escape('.' + leases.DELETE_REQUEST + '.tmp-') + r'.+)\Z', re.DOTALL)


def _listdir(directory: str) -> List[str]:
  """The entries of a local or gs:// directory, sorted; [] if there is none."""
  if not tf.io.gfile.isdir(directory):
    return []
  return sorted(n.rstrip('/') for n in tf.io.gfile.listdir(directory))


def _files(root: str) -> Set[str]:
  """The paths of the files under `root`, relative to it.

  A tensor bundle's data shards count as one file, `<prefix>.data-*`: a full
  export has one, a linked one two.
  """
  return {re.sub(r'\.data-[0-9]{5}-of-[0-9]{5}\Z', '.data-*',
                 os.path.join(d, f)[len(root.rstrip('/')) + 1:])
          for d, _, files in tf.io.gfile.walk(root) for f in files}


def _check_export(path: str, layouts: Set[frozenset]) -> int:
  """Asserts that an export is complete and serves its step; returns the step.

  Args:
    path: The export directory.
    layouts: The file lists of the exports checked so far; gets this one's.
      All exports of the model must have the same files.

  Returns:
    The step of the export.
  """
  step = ckpt_export.parse_export_step(path)
  assert step is not None, path
  # A kill between garbage collection's deletion request and the deletion
  # leaves the request in a whole export, or, killed while writing it, the
  # request's temporary file; the next collection deletes the export. On
  # gs://, a kill between the commit marker's write and the incomplete
  # marker's removal leaves that marker in a whole export (the next run
  # deletes it), as does one between the marker's write and the commit
  # marker's removal when the export is deleted.
  layout = frozenset(
      f for f in _files(path) if not _DELETE_REQUEST_RE.match(f) and not (
          path.startswith('gs://') and f == commit.INCOMPLETE_MARKER))
  assert not layouts or layout in layouts, (
      f'{path} has other files than earlier exports: '
      f'{sorted(layout ^ next(iter(layouts)))}')
  layouts.add(layout)
  assert crash_child.served_step(path) == step, path
  return step


def _state_steps(model_dir: str) -> List[int]:
  """The steps of the checkpoints listed in the `checkpoint` state file."""
  state = tf.train.get_checkpoint_state(model_dir)
  if state is None:
    return []
  return [paths.parse_checkpoint_step(p)
          for p in state.all_model_checkpoint_paths]


def _index_steps(names: List[str]) -> Set[int]:
  """The steps of the checkpoints whose `.index` file is in `names`."""
  return {paths.parse_checkpoint_step(n[:-len('.index')])
          for n in names if n.endswith('.index')}


def _check_after_kill(model_dir: str, layouts: Set[frozenset]
                     ) -> Tuple[List[str], List[int], int]:
  """Checks what a reader and the next run see after a kill.

  Args:
    model_dir: The model directory of the killed child.
    layouts: As for `_check_export`.

  Returns:
    The entries of `model_dir`, the steps of the published exports, and the
    step of the checkpoint the next run restores (0 for none).
  """
  names = _listdir(model_dir)
  # Everything a reader takes for an export, whatever its checkpoint name: on
  # local disk, each directory with an export's name; on gs://, each one with
  # a commit marker (see `test_kill_at_each_step_on_gcs` for the others).
  exports = sorted(
      (ckpt_export.parse_export_step(n), os.path.join(model_dir, n))
      for n in names if ckpt_export.parse_export_step(n) is not None and
      tf.io.gfile.isdir(os.path.join(model_dir, n)) and (
          not model_dir.startswith('gs://') or tf.io.gfile.exists(
              os.path.join(model_dir, n, paths.COMMIT_MARKER))))
  assert ckpt_export.list_savedmodels(model_dir) == [p for _, p in exports]
  export_steps = [_check_export(p, layouts) for _, p in exports]
  # Every checkpoint the next run may restore has its export.
  index_steps = _index_steps(names)
  restorable = [s for s in _state_steps(model_dir) if s in index_steps]
  assert set(restorable) <= set(export_steps), (restorable, names)
  latest = tf.train.latest_checkpoint(model_dir)
  latest_step = 0 if latest is None else paths.parse_checkpoint_step(latest)
  assert latest is None or latest_step in restorable, (latest, names)
  return names, export_steps, latest_step


def _traces(names: List[str], new_names: Set[str], export_steps: List[int],
            latest_step: int) -> List[str]:
  """Where a kill interrupted save(), as far as the directory tells.

  Args:
    names: The entries of the model directory.
    new_names: The entries that appeared since the previous kill.
    export_steps: The steps of the published exports.
    latest_step: The step of the latest checkpoint.

  Returns:
    The kinds of work directories left ('tmp', 'old', 'del'), 'ckpt_temp' for
    a checkpoint being written (TensorFlow's `ckpt-N_temp`), 'export_ahead'
    for an export newer than the latest checkpoint, 'export_orphan' for an
    older one whose checkpoint is deleted.
  """
  traces = sorted({mark.strip('.-') for n in new_names
                   for mark in WORK_DIR_MARKS if mark in n})
  if any(n.endswith('_temp') for n in new_names):
    traces.append('ckpt_temp')
  if export_steps and export_steps[-1] > latest_step:
    traces.append('export_ahead')
  index_steps = _index_steps(names)
  if any(s < latest_step and s not in index_steps for s in export_steps):
    traces.append('export_orphan')
  return traces


@pytest.mark.slow
@pytest.mark.parametrize('enable_async', [False, True], ids=['sync', 'async'])
def test_kill_during_save_leaves_no_partial_export(
    tmp_path: pathlib.Path, enable_async: bool) -> None:
  """SIGKILLs ROUNDS runs at random delays, then runs one to completion."""
  rng = random.Random(SEED)
  delays = [rng.uniform(0, MAX_DELAY_SECONDS) for _ in range(ROUNDS)]
  print(f'\nseed={SEED} delays={[round(d, 3) for d in delays]}')
  model_dir = str(tmp_path / 'model_dir')
  layouts = set()
  logs = [open(tmp_path / f'child-{i}.stderr', 'w') for i in range(ROUNDS)]
  children = collections.deque()
  started = 0
  restored_at = 0  # Where the next run must restore from.
  names = []
  exports_checked = 0
  kills = collections.Counter()  # Traces of the interrupted saves.
  try:
    for i, delay in enumerate(delays):
      while started < min(ROUNDS, i + 1 + PREFETCH):
        children.append(_Child(model_dir, logs[started], enable_async))
        started += 1
      child = children.popleft()
      lines = child.run_then_kill(delay, children)
      child.close()
      restored = [int(l.split()[1]) for l in lines if l.startswith('RESTORED')]
      assert restored in ([], [restored_at]), (lines, restored_at)
      saves = sum(l.startswith('SAVED') for l in lines)
      previous_names = names
      names, exports, restored_at = _check_after_kill(model_dir, layouts)
      traces = _traces(names, set(names) - set(previous_names), exports,
                       restored_at)
      exports_checked += len(exports)
      kills.update(traces or ['none' if restored else 'before_restore'])
      print(f'round {i:2d}: delay {delay:.3f}s restored {restored} saves '
            f'{saves} exports {exports} latest ckpt {restored_at} traces '
            f'{traces}')
  finally:
    for child in children:
      child.close()
    for log in logs:
      log.close()
  print(f'kills by trace: {dict(kills)}; exports checked: {exports_checked}')
  # Kills landed inside save(): at least one while an export was written.
  assert kills['tmp'] >= 1, kills
  assert restored_at > 0

  total_steps = restored_at + FINAL_SAVES * SAVE_EVERY
  final = subprocess.run(_child_command(model_dir, total_steps, enable_async),
                         capture_output=True, text=True, env=child_env(),
                         timeout=120, check=False)
  assert final.returncode == 0, final.stderr[-4000:]
  lines = final.stdout.splitlines()
  assert lines[1] == f'RESTORED {restored_at}', lines
  assert lines[-1] == f'DONE {total_steps}', lines

  names = sorted(os.listdir(model_dir))
  print(f'final directory: {names}')
  exports = ckpt_export.list_savedmodels(model_dir)
  export_steps = {_check_export(p, layouts) for p in exports}
  expected = {total_steps - k * SAVE_EVERY for k in range(MAX_TO_KEEP)}
  assert export_steps == _index_steps(names) == set(
      _state_steps(model_dir)) == expected, names
  for step in expected:
    reader = tf.train.load_checkpoint(os.path.join(model_dir, f'ckpt-{step}'))
    np.testing.assert_array_equal(
        reader.get_tensor('model/w/.ATTRIBUTES/VARIABLE_VALUE'),
        np.full([crash_child.WIDTH], step, np.float32))
  # Neither ckpt_export's work directories nor TF's checkpoint ones remain.
  assert not [n for n in names if any(m in n for m in WORK_DIR_MARKS) or
              n.endswith('_temp')], names


@pytest.mark.slow
@pytest.mark.parametrize('kill_at, enable_async', [
    pytest.param(point, enable_async,
                 id=f'{point}-{"async" if enable_async else "sync"}')
    for point in sorted(crash_child.KILL_POINTS)
    for enable_async in (False, True)
    if enable_async or point not in crash_child.ASYNC_ONLY_POINTS])
def test_kill_at_each_step_of_a_linked_export(
    tmp_path: pathlib.Path, kill_at: str, enable_async: bool) -> None:
  """A kill at each step of an export or an old export's deletion.

  Readers and the next run are fine. The child is killed the second time it
  reaches a step of a linked export or of a deletion, so that linked exports
  of earlier steps exist beside the interrupted one; at a step of the first
  export of a run, in a run restarted after a first one (which left exports).
  """
  model_dir = str(tmp_path / 'model_dir')
  if kill_at in crash_child.FIRST_EXPORT_POINTS:
    first = subprocess.run(
        _child_command(model_dir, 2 * SAVE_EVERY, enable_async),
        capture_output=True, text=True, env=child_env(), timeout=120,
        check=False)
    assert first.returncode == 0, first.stderr[-4000:]
  killed = subprocess.run(
      _child_command(model_dir, ENDLESS_STEPS, enable_async) +
      ['--kill_at', kill_at], capture_output=True, text=True,
      env=child_env(), timeout=120, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  layouts = set()
  names, exports, restored_at = _check_after_kill(model_dir, layouts)
  print(f'{kill_at}: {names} exports {exports} latest ckpt {restored_at}')
  assert exports and restored_at > 0, names

  _finish_and_check(model_dir, restored_at, enable_async, layouts)


def _finish_and_check(model_dir: str, restored_at: int, enable_async: bool,
                      layouts: Set[frozenset],
                      timeout: float = 120) -> None:
  """Runs the job to completion after a kill; checks what it leaves.

  Exactly the exports and checkpoints of the last `MAX_TO_KEEP` saves, each
  export listed and serving its step, and no work directory, TF temporary
  directory or incomplete marker.

  Args:
    model_dir: The model directory.
    restored_at: The step of the checkpoint the run restores.
    enable_async: Whether it saves asynchronously.
    layouts: As for `_check_export`.
    timeout: Seconds the run may take.
  """
  total_steps = restored_at + FINAL_SAVES * SAVE_EVERY
  final = subprocess.run(_child_command(model_dir, total_steps, enable_async),
                         capture_output=True, text=True, env=child_env(),
                         timeout=timeout, check=False)
  assert final.returncode == 0, final.stderr[-4000:]
  assert final.stdout.splitlines()[-1] == f'DONE {total_steps}'
  names = _listdir(model_dir)
  exports = ckpt_export.list_savedmodels(model_dir)
  export_steps = {_check_export(p, layouts) for p in exports}
  expected = {total_steps - k * SAVE_EVERY for k in range(MAX_TO_KEEP)}
  assert export_steps == _index_steps(names) == set(
      _state_steps(model_dir)) == expected, names
  # Nothing else has an export's name (such as a half-deleted export).
  assert [n for n in names if ckpt_export.parse_export_step(n) is not None
         ] == sorted(os.path.basename(p) for p in exports), names
  assert not [n for n in names if any(m in n for m in WORK_DIR_MARKS) or
              n.endswith('_temp')], names
  assert not [f for f in _files(model_dir)
              if os.path.basename(f) == commit.INCOMPLETE_MARKER], names


def _incomplete_writer(export_dir: str) -> Optional[str]:
  """What an export's incomplete marker holds (its writer), or None."""
  try:
    with tf.io.gfile.GFile(
        os.path.join(export_dir, commit.INCOMPLETE_MARKER)) as f:
      return f.read()
  except tf.errors.NotFoundError:
    return None


def _gcs_traces(model_dir: str, names: List[str], export_steps: List[int],
                latest_step: int) -> Set[str]:
  """What a kill left on gs://, beside what readers list (see `_traces`).

  Args:
    model_dir: The model directory.
    names: Its entries.
    export_steps: The steps of the published exports.
    latest_step: The step of the latest checkpoint.

  Returns:
    'work_dir' for an export's work directory; 'half_published' and
    'half_deleted' for an unlisted export whose incomplete marker names a
    writer of a publish or a deletion; 'only_marker' if such an export holds
    nothing else; 'listed_marked' for a listed export with an incomplete
    marker; 'export_ahead' for an export newer than the latest checkpoint;
    'checkpoint_ahead' for checkpoint data newer than it, without export.
  """
  traces = set()
  if any('.tmp-' in n for n in names):
    traces.add('work_dir')
  listed = ckpt_export.list_savedmodels(model_dir)
  for name in names:
    path = os.path.join(model_dir, name)
    if ckpt_export.parse_export_step(name) is None:
      continue
    writer = _incomplete_writer(path)
    if path in listed:
      if writer is not None:
        traces.add('listed_marked')
      continue
    # Never listed, and always marked (a kill leaves no unmarked directory).
    assert writer is not None, (path, _files(path))
    traces.add('half_deleted' if '.del-' in writer else 'half_published')
    if _files(path) == {commit.INCOMPLETE_MARKER}:
      traces.add('only_marker')
  if export_steps and export_steps[-1] > latest_step:
    traces.add('export_ahead')
  if any(s > latest_step and s not in export_steps
         for s in _index_steps(names)):
    traces.add('checkpoint_ahead')
  return traces


# Where each kill on gs:// lands (`crash_child.GCS_KILL_POINTS`), and whether
# with async checkpoints too: those of the export run in TF's checkpoint
# thread then; garbage collection takes the same path in both modes.
GCS_KILLS = {
    'data_written': ({'checkpoint_ahead'}, False),
    'server_side_copy': ({'checkpoint_ahead', 'work_dir'}, True),
    'publish_started': ({'checkpoint_ahead', 'half_published', 'only_marker',
                         'work_dir'}, False),
    'files_moved': ({'checkpoint_ahead', 'half_published'}, True),
    'committed': ({'listed_marked', 'export_ahead'}, False),
    'published': ({'export_ahead'}, True),
    'gc_unpublished': ({'half_deleted'}, False),
    'gc_files_removed': ({'half_deleted', 'only_marker'}, False),
}


@pytest.mark.slow
@pytest.mark.parametrize('kill_at, enable_async', [
    pytest.param(point, enable_async,
                 id=f'{point}-{"async" if enable_async else "sync"}')
    for point, (_, both) in sorted(GCS_KILLS.items())
    for enable_async in ((False, True) if both else (False,))])
def test_kill_at_each_step_on_gcs(emulator, kill_at: str,
                                  enable_async: bool) -> None:
  """A kill at each step of a fast export and of its deletion, on gs://.

  There exports are published with a commit marker, object by object, and
  deleted in reverse (`commit.CommitMarkerPublisher`); their variables are a
  server-side copy. The child is killed the second time it reaches the step.
  """
  assert set(GCS_KILLS) == set(crash_child.GCS_KILL_POINTS)
  model_dir = f'gs://{emulator.bucket}/{uuid.uuid4().hex}/model'
  killed = subprocess.run(
      _child_command(model_dir, ENDLESS_STEPS, enable_async) +
      ['--kill_at', kill_at], capture_output=True, text=True,
      env=child_env(), timeout=GCS_TIMEOUT_SECONDS, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  layouts = set()
  names, exports, restored_at = _check_after_kill(model_dir, layouts)
  traces = _gcs_traces(model_dir, names, exports, restored_at)
  print(f'{kill_at}: {names} exports {exports} latest ckpt {restored_at} '
        f'traces {sorted(traces)}')
  assert exports and restored_at > 0, names
  # With async checkpoints the training thread may be a save further.
  expected = GCS_KILLS[kill_at][0]
  assert expected <= traces if enable_async else expected == traces, names
  _finish_and_check(model_dir, restored_at, enable_async, layouts,
                    timeout=GCS_TIMEOUT_SECONDS)
