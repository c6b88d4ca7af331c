"""gs:// through TensorFlow's own GCS client, against a local GCS emulator.

There a directory "rename" copies and deletes object by object, so exports are
published by a commit marker (see `commit.py`). These tests run the manager
there, read exports while a writer in another process publishes and deletes
them, SIGKILL that writer mid-publish, and recover. See `gcs_emulator.py` for
how TensorFlow's client reaches the emulator; without the emulator's binary
or openssl the tests skip, saying why.
"""

import signal
import subprocess
import sys
import time
import urllib.parse
import uuid

import pytest
import requests
import tensorflow as tf
from typing import Dict, List

import ckpt_export
from ckpt_export import commit
from ckpt_export import fast_export
from ckpt_export import paths
from ckpt_export import readers
from helpers import child_env
from helpers import entries
from helpers import make_manager
from helpers import N_FEATURES
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import steps_of
import crash_child

pytestmark = pytest.mark.slow

WRITER_TIMEOUT_SECONDS = 240
MIN_EXPORTS_READ = 3  # Exports the reader checks before the kill.


@pytest.fixture(scope='module')
def bucket(emulator) -> str:
  return f'gs://{emulator.bucket}'


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


WIDE = 1 << 18  # Elements of `Wide`'s variable: 1 MiB of float32.


class Wide(tf.Module):
  """A module whose variable's bytes stand out from any metadata's."""

  def __init__(self):
    super().__init__()
    self.w = tf.Variable(tf.zeros([WIDE]))

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def __call__(self, x):
    return x * self.w[0]

  @property
  def saved_model_signatures(self):
    return {'serving_default': self.__call__}


def _uploads(requests: List[Dict], bucket: str) -> Dict[str, int]:
  """Bytes the client uploaded into each object (by name in the bucket)."""
  names, uploaded = {}, {}
  for request in requests:
    url = urllib.parse.urlsplit(request['path'])
    query = urllib.parse.parse_qs(url.query)
    name = query.get('name', [None])[0]
    if name is None and url.path.startswith(f'/upload/storage/v1/b/{bucket}/'):
      name = names.get(query.get('upload_id', [None])[0])
    if name is None:
      continue
    if request['location']:  # A resumable upload's start: data comes next.
      location = urllib.parse.urlsplit(request['location'])
      names[urllib.parse.parse_qs(location.query)['upload_id'][0]] = name
    uploaded[name] = uploaded.get(name, 0) + request['sent']
  return uploaded


@pytest.mark.parametrize('use_async', [False, True], ids=['sync', 'async'])
def test_a_fast_export_on_gcs_uploads_no_variable_byte(emulator, gcs_dir,
                                                       use_async):
  """The export's variables are a server-side copy of the checkpoint's shard.

  Measured and printed (`pytest -s`): requests and bytes of one fast save
  (and its `sync()`); with async checkpointing the copy is made in TF's
  checkpoint thread.
  """
  module = Wide()
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=module), gcs_dir, max_to_keep=2,
      modules_to_export={'m': module})
  module.w.assign(tf.fill([WIDE], 1.0))
  manager.save(checkpoint_number=1)  # Full; learns the checkpoint's keys.
  before = len(emulator.requests())
  module.w.assign(tf.fill([WIDE], 2.0))
  manager.save(checkpoint_number=2, options=tf.train.CheckpointOptions(
      enable_async=use_async))
  module.w.assign(tf.fill([WIDE], -1.0))
  manager.sync()
  requests = emulator.requests()[before:]
  exporter, = manager._exporter.modules  # pylint: disable=protected-access
  assert (exporter.full_exports, exporter.fast_exports,
          exporter.linked_exports) == (1, 1, 1)
  prefix = gcs_dir[len(f'gs://{emulator.bucket}/'):]
  uploads = _uploads(requests, emulator.bucket)
  # The export is staged in `.<export>.tmp-<token>/`, then renamed (on
  # gs://, TF renames objects with a server-side rewrite too).
  export_name = paths.export_basename('ckpt', 2)
  exported = sum(n for name, n in uploads.items()
                 if name.startswith((f'{prefix}/{export_name}/',
                                     f'{prefix}/.{export_name}.tmp-')))
  checkpointed = sum(n for name, n in uploads.items()
                     if name.startswith(f'{prefix}/ckpt-2.') or
                     name.startswith(f'{prefix}/ckpt-2_temp/'))
  variable_bytes = WIDE * 4
  rewrites = [r for r in requests if '/rewriteTo/' in r['path']]
  print(f'gs:// fast save (async: {use_async}) of {variable_bytes} variable '
        'bytes: '
        f'{len(requests)} requests ({len(rewrites)} rewrites), '
        f'{sum(r["sent"] for r in requests)} bytes up, '
        f'{sum(r["received"] for r in requests)} down; uploaded into the '
        f'checkpoint {checkpointed}, into the export {exported}; by method '
        + str({m: sum(r['method'] == m for r in requests)
               for m in sorted({r['method'] for r in requests})}))
  # The checkpoint uploads the variables once; the export only its graph
  # files (`saved_model.pb`: about 11 KB here), index and object graph.
  assert variable_bytes <= checkpointed < variable_bytes + 4096
  assert exported < 64 * 1024
  assert sum(r['sent'] for r in requests) < variable_bytes + 64 * 1024
  # A standard SavedModel of step 2, also once its checkpoint is gone.
  export_dir = manager.latest_savedmodel
  with tf.io.gfile.GFile(f'{export_dir}/m/variables/variables.index',
                         'rb') as f:
    assert f.read()  # Written by ckpt_export, read by TF below.
  for name in tf.io.gfile.glob(f'{gcs_dir}/ckpt-2.*'):
    tf.io.gfile.remove(name)
  assert served_value(export_dir, 'm') == 2.0
  reader = tf.compat.v1.train.NewCheckpointReader(
      f'{export_dir}/m/variables/variables')
  assert reader.get_tensor('w/.ATTRIBUTES/VARIABLE_VALUE').tolist() == [
      2.0] * WIDE


def _assert_second_export_uploads(emulator, gcs_dir: str,
                                  before_second_save=lambda: None) -> None:
  """Saves steps 1 and 2; asserts that export 2 is fast but uploaded its
  variables (not linked, not copied server-side) and serves step 2."""
  module = Wide()
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=module), gcs_dir, max_to_keep=2,
      modules_to_export={'m': module})
  module.w.assign(tf.fill([WIDE], 1.0))
  manager.save(checkpoint_number=1)
  before_second_save()
  before = len(emulator.requests())
  module.w.assign(tf.fill([WIDE], 2.0))
  manager.save(checkpoint_number=2)
  uploads = _uploads(emulator.requests()[before:], emulator.bucket)
  exporter, = manager._exporter.modules  # pylint: disable=protected-access
  assert (exporter.full_exports, exporter.fast_exports,
          exporter.linked_exports) == (1, 1, 0)
  export_name = paths.export_basename('ckpt', 2)
  assert sum(n for name, n in uploads.items()
             if f'/.{export_name}.tmp-' in name) >= WIDE * 4
  module.w.assign(tf.fill([WIDE], -1.0))
  assert served_value(manager.latest_savedmodel, 'm') == 2.0


def test_a_failed_server_side_copy_falls_back_to_uploading(
    emulator, gcs_dir, monkeypatch, caplog):
  """A rewrite that fails (here: TLS, with a CA bundle that lacks the
  emulator's) leaves the export to upload its variables, with a warning."""
  _assert_second_export_uploads(
      emulator, gcs_dir, lambda: monkeypatch.setenv(
          'REQUESTS_CA_BUNDLE', requests.certs.where()))
  assert any('CERTIFICATE_VERIFY_FAILED' in r.getMessage()
             for r in caplog.records), 'no warning names the failure'


def test_without_google_auth_exports_upload_their_variables(
    emulator, gcs_dir, monkeypatch, caplog):
  """Without the optional `google-auth`, gs:// exports upload their variables
  (the public path), with one warning saying what to install."""
  monkeypatch.setitem(sys.modules, 'google.auth', None)  # Not importable.
  monkeypatch.setattr(fast_export, '_sharers', {})  # Chosen afresh.
  _assert_second_export_uploads(emulator, gcs_dir)
  assert [r.getMessage() for r in caplog.records
          if 'install google-auth' in r.getMessage()] == [
              'Exports on gs:// upload their variables again: install '
              'google-auth for server-side copies.']


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
