"""Shared fixtures: small real modules, and model directories on each file system."""

import os
import re
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


# Tests that need Model Garden (tf-models-official, which ships orbit too) skip
# where it is not installed: CI's core legs run without it.
MODEL_GARDEN_REFERENCE = 'official.core.savedmodel_checkpoint_manager'


@pytest.fixture(scope='session')
def reference():
  """The reference implementation's module (skips without Model Garden)."""
  return pytest.importorskip(MODEL_GARDEN_REFERENCE)


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


def snapshot(root: str) -> dict:
  """Every path under `root` (not following links): file bytes, None for dirs."""
  found = {}
  for directory, dirs, files in os.walk(root):
    for name in dirs:
      found[os.path.relpath(os.path.join(directory, name), root)] = None
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, root)] = f.read()
  return found


def entries(directory: str) -> list:
  """The sorted entry names of a directory (without trailing '/').

  The data shards of a tensor bundle count as one entry, `<prefix>.data-*`:
  a checkpoint has one or two (the exported variables in their own).
  """
  return sorted({re.sub(r'\.data-[0-9]{5}-of-[0-9]{5}\Z', '.data-*',
                        n.rstrip('/')) for n in tf.io.gfile.listdir(directory)})


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


# What TensorFlow writes to stderr while it loads its CUDA plugins and looks
# for a GPU, whatever TF_CPP_MIN_LOG_LEVEL=2 and CUDA_VISIBLE_DEVICES= (the
# command's defaults) say: errors about registering cuFFT/cuDNN/cuBLAS twice
# on 2.18, a missing CUDA driver on 2.21 (tensorflow/tensorflow#100442).
# Not ckpt-export's output: run_cli drops these lines.
TF_LOAD_NOISE = re.compile(
    r'^(WARNING: All log messages before absl::InitializeLog\(\) is called '
    r'are written to STDERR|(\d{4}-\d\d-\d\d [\d:.]+: [IWE] |'
    r'[IWE]\d{4} [\d:.]+ +\d+ )\S*?'
    r'(cudart_stub|cuda_platform|cuda_fft|cuda_dnn|cuda_blas)\.cc:\d+\] .*)\n',
    re.M)


def run_cli(*args: str, prefix: Sequence[str] = (),
            **kwargs) -> subprocess.CompletedProcess:
  """Runs `ckpt-export ARGS` (after `prefix`), capturing its output as text.

  TensorFlow's own start-up lines (`TF_LOAD_NOISE`) are dropped from stderr.
  """
  result = subprocess.run([*prefix, CKPT_EXPORT, *args], capture_output=True,
                          text=True, env=cli_env(), check=False, **kwargs)
  result.stderr = TF_LOAD_NOISE.sub('', result.stderr or '')
  return result


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
