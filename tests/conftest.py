"""Shared fixtures: small real modules, and model directories on each file system."""

import os
import uuid

import pytest
import tensorflow as tf

from ckpt_export import paths

N_FEATURES = 4


class Scale(tf.Module):
  """A module whose serving signature returns its weights times the input."""

  def __init__(self) -> None:
    super().__init__()
    self.w = tf.Variable(tf.zeros([N_FEATURES]))

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def __call__(self, x: tf.Tensor) -> tf.Tensor:
    return x * self.w

  @property
  def saved_model_signatures(self):
    return {'serving_default': self.__call__}


def served_value(export_dir: str, module_name: str = 'scale') -> float:
  """Loads `<export_dir>/<module_name>` and returns the value it serves."""
  loaded = tf.saved_model.load(os.path.join(export_dir, module_name))
  out = loaded.signatures['serving_default'](tf.ones([1, N_FEATURES]))
  values = list(out.values())[0].numpy()
  assert (values == values.flat[0]).all(), values
  return float(values.flat[0])


@pytest.fixture
def scale() -> Scale:
  return Scale()


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


def entries(directory: str) -> list:
  """The sorted entry names of a directory (without trailing '/')."""
  return sorted(n.rstrip('/') for n in tf.io.gfile.listdir(directory))


def save_step(manager, module: Scale, step: int, **kwargs):
  """Sets `module`'s weights to `step`, then saves checkpoint `step`."""
  module.w.assign(tf.fill([N_FEATURES], float(step)))
  return manager.save(checkpoint_number=step, **kwargs)


def steps_of(export_paths) -> list:
  """The steps of a list of export paths."""
  return [paths.parse_export_step(p) for p in export_paths]
