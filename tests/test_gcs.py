"""gs:// through TensorFlow's own GCS client, against a local GCS emulator.

There a directory "rename" copies and deletes object by object, so exports are
published by a commit marker (see `commit.py`). These tests run the manager
there, read exports while a writer in another process publishes and deletes
them, SIGKILL that writer mid-publish, and recover. See `gcs_emulator.py` for
how TensorFlow's client reaches the emulator; without the emulator's binary
or openssl the tests skip, saying why.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import readers
from helpers import child_env
from helpers import entries
from helpers import make_manager
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import steps_of
import crash_child
import gcs_emulator

pytestmark = pytest.mark.slow

WRITER_TIMEOUT_SECONDS = 240
MIN_EXPORTS_READ = 3  # Exports the reader checks before the kill.


@pytest.fixture(scope='module')
def bucket(tmp_path_factory) -> str:
  """A bucket on a running emulator, with this process's env pointed at it."""
  try:
    emulator = gcs_emulator.GcsEmulator(tmp_path_factory.mktemp('gcs'))
  except gcs_emulator.Unavailable as e:
    pytest.skip(f'No GCS emulator here: {e}')
  # This process reads what a writer in another process changes: without
  # this, TF's client answers from its stat cache, up to 5 s stale.
  env = dict(emulator.env(), GCS_STAT_CACHE_MAX_AGE='0')
  saved = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  yield f'gs://{emulator.bucket}'
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  emulator.stop()


@pytest.fixture
def gcs_dir(bucket) -> str:
  return f'{bucket}/{uuid.uuid4().hex}/model'


def test_manager_save_gc_restore(gcs_dir, scale):
  manager = make_manager(gcs_dir, scale, 2)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  assert steps_of(manager.savedmodels) == [2, 3]
  assert steps_of(ckpt_export.list_savedmodels(gcs_dir)) == [2, 3]
  assert entries(gcs_dir) == sorted(
      ['checkpoint'] + [f'ckpt-{s}{suffix}' for s in (2, 3) for suffix in (
          '.data-*', '.index', '_saved_modules')])
  for step in (2, 3):
    export_dir = paths.export_path(gcs_dir, 'ckpt', step)
    assert commit.read_commit_info(export_dir)['step'] == step
    assert served_value(export_dir) == step

  restored = Scale()
  again = make_manager(gcs_dir, restored, 2)
  assert again.restore_or_initialize() == f'{gcs_dir}/ckpt-3'
  assert restored.w.numpy().tolist() == [3.0] * 4
  assert steps_of(again.savedmodels) == [2, 3]


def _serves_its_step(export_dir: str) -> bool:
  """Loads a crash_child export; False if it was deleted meanwhile."""
  try:
    served = crash_child.served_step(export_dir)
  except (tf.errors.OpError, OSError, ValueError):
    # Only an export that is no longer published may fail to load.
    assert not commit.is_published(export_dir), export_dir
    return False
  assert served == paths.parse_export_step(export_dir), export_dir
  return True


def _half_published(gcs_dir: str) -> str:
  """An export being published right now (incomplete marker of a tmp-)."""
  for _, path in readers.export_candidates(gcs_dir):
    try:
      with tf.io.gfile.GFile(f'{path}/{commit.INCOMPLETE_MARKER}') as f:
        if '.tmp-' in f.read():
          return path
    except tf.errors.NotFoundError:
      pass
  return ''


def test_readers_and_a_writer_killed_mid_publish(gcs_dir, tmp_path):
  with open(tmp_path / 'stderr', 'w') as stderr:
    writer = subprocess.Popen(
        [sys.executable, crash_child.__file__, '--model_dir', gcs_dir,
         '--total_steps', '1000000', '--save_every', '1', '--max_to_keep',
         '2'], stdout=subprocess.DEVNULL, stderr=stderr,
        env=child_env())
  try:
    # A reader polls while the writer publishes and deletes exports: every
    # export it is shown loads and serves its own step.
    read, victim = set(), ''
    deadline = time.monotonic() + WRITER_TIMEOUT_SECONDS
    while not victim:
      assert writer.poll() is None, (tmp_path / 'stderr').read_text()[-4000:]
      assert time.monotonic() < deadline, (
          f'Read {sorted(read)} and never caught an export mid-publish.')
      for path in ckpt_export.list_savedmodels(gcs_dir):
        if path not in read and _serves_its_step(path):
          read.add(path)
      if len(read) >= MIN_EXPORTS_READ:
        victim = _half_published(gcs_dir)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
  finally:
    if writer.poll() is None:
      writer.kill()
      writer.wait()

  # Killed mid-publish: the half-copied export is there, and no reader
  # takes it for an export.
  assert tf.io.gfile.exists(f'{victim}/{commit.INCOMPLETE_MARKER}')
  assert not commit.is_published(victim)
  published = ckpt_export.list_savedmodels(gcs_dir)
  assert victim not in published
  assert ckpt_export.latest_savedmodel(gcs_dir) != victim
  for path in published:
    assert _serves_its_step(path)

  # The next run recovers: the half-published export goes, every checkpoint
  # it may restore has its export, and it saves again.
  model = crash_child.StepModel()
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model), gcs_dir, max_to_keep=2,
      modules_to_export={crash_child.MODULE_NAME: model})
  manager.restore_or_initialize()
  assert not tf.io.gfile.exists(victim)
  assert not [name for name in entries(gcs_dir) if name.startswith('.')]
  step = int(model.step.numpy())
  assert paths.export_path(gcs_dir, 'ckpt', step) in manager.savedmodels
  manager.save(checkpoint_number=model.train_step())
  assert steps_of(ckpt_export.list_savedmodels(gcs_dir)) == [step, step + 1]
  for path in ckpt_export.list_savedmodels(gcs_dir):
    assert _serves_its_step(path)
