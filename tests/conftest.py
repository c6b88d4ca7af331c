"""Fixtures: small real modules, and model directories on each file system.

What tests share besides fixtures is in `helpers.py`.
"""

import os
import uuid

# Read once, when TensorFlow registers its gs:// file system (at import): a
# test reads what a writer in another process changes, so TF's client must
# not answer from its stat cache (up to 5 s stale by default).
os.environ.setdefault('GCS_STAT_CACHE_MAX_AGE', '0')

# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest
import tensorflow as tf

import gcs_emulator
import helpers
# pylint: enable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def reference():
  """The reference implementation's module (skips without Model Garden)."""
  return pytest.importorskip(helpers.MODEL_GARDEN_REFERENCE)


@pytest.fixture
def scale() -> helpers.Scale:
  return helpers.Scale()


@pytest.fixture(params=['local', 'ram'])
def model_dir(request, tmp_path) -> str:
  """A fresh model directory on local disk, then on TF's ram:// file system."""
  if request.param == 'local':
    yield str(tmp_path / 'model')
    return
  path = f'ram://ckpt_export_test/{uuid.uuid4().hex}/model'
  yield path
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)


@pytest.fixture
def local_dir(tmp_path) -> str:
  return str(tmp_path / 'model')


@pytest.fixture(scope='module')
def emulator(tmp_path_factory) -> gcs_emulator.GcsEmulator:
  """A running GCS emulator, with this process's env pointed at it.

  Skips the test, saying why, if the emulator cannot run here.
  """
  try:
    emulator = gcs_emulator.GcsEmulator(tmp_path_factory.mktemp('gcs'))
  except gcs_emulator.Unavailable as e:
    pytest.skip(f'No GCS emulator here: {e}')
  # For child processes (this one has it from the top of this file).
  env = dict(emulator.env(), GCS_STAT_CACHE_MAX_AGE='0')
  saved = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  yield emulator
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  emulator.stop()
