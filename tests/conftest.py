"""Shared fixtures: small real modules, and model directories on each file system."""

import os
import subprocess
import sys
from typing import Sequence
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The installed console script, run on this checkout's code (see cli_env).
CKPT_EXPORT = os.path.join(os.path.dirname(sys.executable), 'ckpt-export')


def cli_env(**extra: str) -> dict:
  """The environment to run CKPT_EXPORT in: this checkout first on the path.

  TF_CPP_MIN_LOG_LEVEL and CUDA_VISIBLE_DEVICES are removed, so that the
  command's own defaults for them are what the tests see.
  """
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'CUDA_VISIBLE_DEVICES')}
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO, os.path.join(REPO, 'tests')] +
      [p for p in [os.environ.get('PYTHONPATH')] if p])
  env.update(extra)
  return env


def run_cli(*args: str, prefix: Sequence[str] = (),
            **kwargs) -> subprocess.CompletedProcess:
  """Runs `ckpt-export ARGS` (after `prefix`), capturing its output as text."""
  return subprocess.run([*prefix, CKPT_EXPORT, *args], capture_output=True,
                        text=True, env=cli_env(), check=False, **kwargs)


class FakeClock:
  """Stands in for a module's `time`: sleeping advances it and runs events.

  Args:
    events: (time, function) pairs; `sleep` calls each function once, as soon
      as the clock reaches its time.
  """

  def __init__(self, events: Sequence[tuple] = ()):
    self.now = 0.0
    self._events = sorted(events, key=lambda event: event[0])

  def monotonic(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.now += seconds
    while self._events and self._events[0][0] <= self.now:
      self._events.pop(0)[1]()
