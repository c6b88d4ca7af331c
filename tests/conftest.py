"""Fixtures: small real modules, and model directories on each file system.

What tests share besides fixtures is in `helpers.py`.
"""

import uuid

import pytest
import tensorflow as tf

import helpers


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
