"""File system faults during save(): a full disk, a directory turned read-only.

A full disk is a real one: a 24 MB tmpfs the test mounts (root, or
CAP_SYS_ADMIN, is needed; without it these tests skip). Permissions are real
too: root bypasses them through its capabilities, so under root the saving
process runs without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER
(util-linux's `setpriv` drops them), and file modes apply to it.
Either way save() must raise TensorFlow's own error naming the path, leave
every earlier checkpoint and export intact and loadable, leave nothing a
reader takes for an export, and the next save once the fault is gone must
work and leave no leftovers.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import paths
from helpers import child_env
from helpers import entries
from helpers import make_manager
from helpers import N_FEATURES
from helpers import REPO
from helpers import Scale
from helpers import served_value
from helpers import unprivileged_prefix
import permission_child

FS_BYTES = 24 << 20
PAD_FLOATS = 512 * 1024  # 2 MB in each checkpoint and in each export.
# The capabilities that let root ignore file modes.
class Padded(Scale):
  """Serves `x * w` like helpers.Scale, carrying 2 MB of other weights."""

  def __init__(self) -> None:
    super().__init__()
    self.pad = tf.Variable(tf.zeros([PAD_FLOATS]))


@pytest.fixture
def small_fs(tmp_path) -> pathlib.Path:
  """A freshly mounted 24 MB tmpfs."""
  mount_point = tmp_path / 'fs'
  mount_point.mkdir()
  mounted = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={FS_BYTES}', 'tmpfs',
       str(mount_point)], capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip('Cannot mount a small tmpfs to fill up (needs root or '
                f'CAP_SYS_ADMIN): {mounted.stderr.strip()}')
  yield mount_point
  subprocess.run(['umount', '-l', str(mount_point)], check=True)


def _fill(fs: pathlib.Path, leave_bytes: int) -> pathlib.Path:
  """Fills `fs` up to `leave_bytes` free bytes; returns the filler file."""
  st = os.statvfs(fs)
  filler = fs / 'filler'
  with open(filler, 'wb') as f:
    f.write(b'\0' * (st.f_bavail * st.f_frsize - leave_bytes))
  return filler


def _expected_entries(steps) -> list:
  names = ['checkpoint']
  for step in steps:
    names += [f'ckpt-{step}.data-*', f'ckpt-{step}.index',
              paths.export_basename('ckpt', step)]
  return sorted(names)


def _check_intact(model_dir: str, steps) -> None:
  """Exactly `steps` are published, serve their values and restore."""
  assert [paths.parse_export_step(p) for p in
          ckpt_export.list_savedmodels(model_dir)] == list(steps)
  for step in steps:
    assert served_value(paths.export_path(model_dir, 'ckpt', step)) == step
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest == os.path.join(model_dir, f'ckpt-{steps[-1]}')
  module = Padded()
  status = tf.train.Checkpoint(module=module).read(latest)
  status.assert_existing_objects_matched()
  assert module.w.numpy().tolist() == [float(steps[-1])] * N_FEATURES


def _save(manager, module: Padded, step: int) -> str:
  module.w.assign(tf.fill([N_FEATURES], float(step)))
  return manager.save(checkpoint_number=step)


# Free space left before a restarted job's step 3 save: less than its (full)
# export needs (it fails writing the export), or enough for the export but not
# for the checkpoint.
@pytest.mark.parametrize('free_bytes,failing_write', [
    (1 << 20, '.ckpt-3_saved_modules.tmp-'),
    (3 << 20, 'ckpt-3_temp'),
], ids=['export', 'checkpoint'])
def test_disk_full(small_fs, free_bytes, failing_write):
  model_dir = str(small_fs / 'model')
  module = Padded()
  manager = make_manager(model_dir, module, 5)
  _save(manager, module, 1)
  _save(manager, module, 2)
  filler = _fill(small_fs, free_bytes)
  # A restarted job: its first export is a full one, written before the
  # checkpoint (later exports share the checkpoint's variables and need only
  # their metadata's space).
  manager = make_manager(model_dir, module, 5)

  with pytest.raises(tf.errors.ResourceExhaustedError) as error:
    _save(manager, module, 3)
  assert 'No space left on device' in str(error.value)
  assert os.path.join(model_dir, failing_write) in str(error.value)
  _check_intact(model_dir, [1, 2])
  assert manager.savedmodels == [paths.export_path(model_dir, 'ckpt', s)
                                 for s in (1, 2)]

  filler.unlink()
  _save(manager, module, 3)
  assert entries(model_dir) == _expected_entries([1, 2, 3])
  _check_intact(model_dir, [1, 2, 3])


@pytest.mark.slow
@pytest.mark.parametrize('when', ['before', 'mid_publish'])
def test_permission_denied_on_the_model_directory(when, tmp_path):
  model_dir = str(tmp_path / 'model')
  os.mkdir(model_dir)
  try:
    child = subprocess.run(
        [*unprivileged_prefix(), sys.executable, permission_child.__file__,
         '--model_dir', model_dir, '--when', when],
        capture_output=True, text=True, check=False, env=child_env())
    assert child.returncode == 0, child.stderr[-4000:]
    error = json.loads(child.stdout.strip().split('\n')[-1])
    assert error['type'] == 'PermissionDeniedError'
    assert model_dir in error['message']
    assert 'Permission denied' in error['message']

    # Nothing a reader takes for an export, and step 1 intact.
    assert [paths.parse_export_step(p) for p in
            ckpt_export.list_savedmodels(model_dir)] == [1]
    assert served_value(paths.export_path(model_dir, 'ckpt', 1),
                        'first') == 1.0
    assert tf.train.latest_checkpoint(model_dir) == os.path.join(
        model_dir, 'ckpt-1')

    # Writable again: the next save works and leaves no leftovers.
    os.chmod(model_dir, 0o755)
    first, second = permission_child.Scale(), permission_child.Scale()
    manager = ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(first=first, second=second), model_dir,
        max_to_keep=5, modules_to_export={'first': first, 'second': second})
    manager.restore_or_initialize()
    assert first.w.numpy().tolist() == [1.0] * N_FEATURES
    for module in (first, second):
      module.w.assign(tf.fill([N_FEATURES], 2.0))
    manager.save(checkpoint_number=2)
    assert entries(model_dir) == _expected_entries([1, 2])
    assert served_value(paths.export_path(model_dir, 'ckpt', 2),
                        'second') == 2.0
  finally:
    os.chmod(model_dir, 0o755)  # For pytest's clean-up, if not done yet.


_READ_ONCE = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import ckpt_export
try:
  found = list(ckpt_export.savedmodels_iterator(
      sys.argv[2], timeout=0, lease_seconds=None if sys.argv[3] == 'none'
      else 60))
  print(json.dumps({'found': found}))
except Exception as e:  # pylint: disable=broad-except
  print(json.dumps({'type': type(e).__name__, 'message': str(e)}))
'''


@pytest.mark.slow
def test_a_reader_that_may_not_write_is_told_how_to_read(tmp_path):
  module = Scale()
  module.w.assign(tf.fill([N_FEATURES], 1.0))
  model_dir = str(tmp_path / 'model')
  make_manager(model_dir, module, 2).save(checkpoint_number=1)
  before = entries(model_dir)
  os.chmod(model_dir, 0o555)
  try:
    results = {}
    for lease in ('60', 'none'):
      child = subprocess.run(
          [*unprivileged_prefix(), sys.executable, '-c', _READ_ONCE, REPO,
           model_dir, lease],
          capture_output=True, text=True, check=False,
          env=child_env(tf_log_level='3'))
      assert child.returncode == 0, child.stderr[-4000:]
      results[lease] = json.loads(child.stdout.strip().split('\n')[-1])
  finally:
    os.chmod(model_dir, 0o755)
  assert results['60']['type'] == 'PermissionDeniedError'
  assert os.path.join(model_dir, '.ckpt_export', 'leases') in (
      results['60']['message'])
  assert 'lease_seconds=None' in results['60']['message']
  assert results['none'] == {
      'found': [paths.export_path(model_dir, 'ckpt', 1)]}
  assert entries(model_dir) == before
