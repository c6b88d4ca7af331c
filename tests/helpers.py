"""What the tests share: small real modules, checks, and child processes.

A plain module (`import helpers`), not `conftest`: conftest.py holds only the
pytest fixtures. Child scripts (in `children/`) import it too.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import paths

N_FEATURES = 4

# Tests that need Model Garden (tf-models-official, which ships orbit too) skip
# where it is not installed: CI's core legs run without it.
MODEL_GARDEN_REFERENCE = 'official.core.savedmodel_checkpoint_manager'

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
# The scripts tests run as child processes (and the modules they load).
CHILDREN = os.path.join(TESTS, 'children')
# The installed console script, run on this checkout's code (see child_env).
CKPT_EXPORT = os.path.join(os.path.dirname(sys.executable), 'ckpt-export')


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


def make_manager(model_dir: str, module: tf.Module,
                 max_to_keep: Optional[int] = 2, *, module_name: str = 'scale',
                 checkpoint: Optional[tf.train.Checkpoint] = None,
                 manager_class=ckpt_export.SavedModelCheckpointManager,
                 **kwargs) -> ckpt_export.SavedModelCheckpointManager:
  """A manager saving `Checkpoint(module=module)`, exporting `module`.

  Args:
    model_dir: The model directory.
    module: The module to export.
    max_to_keep: As the manager's.
    module_name: The name of the module's export (its directory in each
      export).
    checkpoint: What to save instead of `Checkpoint(module=module)`.
    manager_class: The manager (the reference's, to compare).
    **kwargs: More arguments of the manager (`modules_to_export` replaces
      `{module_name: module}`).
  """
  kwargs.setdefault('modules_to_export', {module_name: module})
  return manager_class(checkpoint or tf.train.Checkpoint(module=module),
                       model_dir, max_to_keep, **kwargs)


def save_step(manager, module: Scale, step: int, **kwargs):
  """Sets `module`'s weights to `step`, then saves checkpoint `step`."""
  module.w.assign(tf.fill([N_FEATURES], float(step)))
  return manager.save(checkpoint_number=step, **kwargs)


def served_value(export_dir: str, module_name: str = 'scale') -> float:
  """Loads `<export_dir>/<module_name>` and returns the value it serves.

  The module must serve one value in every output position (as `Scale` after
  `save_step`); it is checked.
  """
  loaded = tf.saved_model.load(os.path.join(export_dir, module_name))
  out = loaded.signatures['serving_default'](tf.ones([1, N_FEATURES]))
  values = list(out.values())[0].numpy()
  assert (values == values.flat[0]).all(), values
  return float(values.flat[0])


def assert_serves_its_step(export_dir: str, module_name: str = 'scale'
                           ) -> None:
  """A `save_step` export serves the step its path names."""
  step = paths.parse_export_step(export_dir)
  assert served_value(export_dir, module_name) == step, export_dir


def snapshot(root: str) -> dict:
  """Each path under `root` (links not followed): file bytes; None for dirs."""
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


def steps_of(export_paths) -> list:
  """The steps of a list of export paths."""
  return [paths.parse_export_step(p) for p in export_paths]


# Model Garden's mock experiment (official.utils.testing.mock_task); only
# Model Garden's tests, which skip without it, call these (hence the imports
# inside).

MOCK_INPUT = np.array([[0.5, -2.0], [3.0, 1.0]], np.float32)


def mock_params(**trainer):
  """The mock experiment's config, small: 6 steps, saving every 2.

  Args:
    **trainer: Overrides of its `trainer` section.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  from official.core import exp_factory
  from official.utils.testing import mock_task  # Registers 'mock'.
  # pylint: enable=g-import-not-at-top,unused-import
  params = exp_factory.get_exp_config('mock')
  params.override({'trainer': {
      'train_steps': 6, 'steps_per_loop': 2, 'checkpoint_interval': 2,
      'validation_steps': 1, 'validation_interval': 2, 'max_to_keep': 2,
      'summary_interval': 2, **trainer,
      'optimizer_config': {
          'optimizer': {'type': 'sgd'},
          'learning_rate': {'type': 'constant',
                            'constant': {'learning_rate': 0.1}}}}})
  return params


def checkpoint_outputs(model_dir: str, step: int) -> np.ndarray:
  """What the mock model restored from checkpoint `step` computes on input."""
  from official.utils.testing import (  # pylint: disable=g-import-not-at-top
      mock_task)
  model = mock_task.MockTask().build_model()
  tf.train.Checkpoint(model=model).read(
      os.path.join(model_dir, f'ckpt-{step}')).expect_partial()
  return model(MOCK_INPUT).numpy()


def served_outputs(export_dir: str, name: str = 'model') -> np.ndarray:
  """What `<export_dir>/<name>` serves for MOCK_INPUT."""
  loaded = tf.saved_model.load(os.path.join(export_dir, name))
  out = loaded.signatures['serving_default'](tf.constant(MOCK_INPUT))
  (values,) = out.values()
  return values.numpy()


def assert_exports_match_checkpoints(model_dir: str, steps) -> None:
  """The model dir's exports are those of `steps`, each serving its step."""
  exports = ckpt_export.list_savedmodels(model_dir)
  assert steps_of(exports) == list(steps)
  for step, export_dir in zip(steps, exports):
    np.testing.assert_allclose(served_outputs(export_dir),
                               checkpoint_outputs(model_dir, step), rtol=1e-6)


# Child processes.


def child_env(*, tf_log_level: Optional[str] = '2', **extra: str
              ) -> Dict[str, str]:
  """The environment of a child process running this checkout's code.

  PYTHONPATH starts with the checkout, tests/ and tests/children.

  Args:
    tf_log_level: TF_CPP_MIN_LOG_LEVEL; None removes it and
      CUDA_VISIBLE_DEVICES, so that `ckpt-export`'s own defaults for them are
      what a test sees.
    **extra: More variables.
  """
  env = dict(os.environ)
  if tf_log_level is None:
    env.pop('TF_CPP_MIN_LOG_LEVEL', None)
    env.pop('CUDA_VISIBLE_DEVICES', None)
  else:
    env['TF_CPP_MIN_LOG_LEVEL'] = tf_log_level
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO, TESTS, CHILDREN] +
      [p for p in [os.environ.get('PYTHONPATH')] if p])
  env.update(extra)
  return env


def free_ports(count: int) -> List[int]:
  """`count` TCP ports on 127.0.0.1 that were free just now."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def worker_envs(scratch_root: Union[str, os.PathLike], count: int = 2,
                **extra: str) -> List[Dict[str, str]]:
  """The environments of `count` MultiWorkerMirrored workers on 127.0.0.1.

  Args:
    scratch_root: Each worker's TMPDIR is its own `tmp<index>` here
      (created if need be), so that a test sees what a worker leaves behind.
    count: How many workers.
    **extra: More variables.

  Returns:
    One environment per worker (`child_env`), with TF_CONFIG naming them all.
  """
  cluster = {'worker': [f'127.0.0.1:{p}' for p in free_ports(count)]}
  envs = []
  for index in range(count):
    scratch = os.path.join(scratch_root, f'tmp{index}')
    os.makedirs(scratch, exist_ok=True)
    envs.append(child_env(
        TMPDIR=scratch, TF_CONFIG=json.dumps(
            {'cluster': cluster, 'task': {'type': 'worker', 'index': index}}),
        **extra))
  return envs


def unprivileged_prefix() -> List[str]:
  """A command prefix running a child to which file modes apply.

  As root, `setpriv` (util-linux) drops the capabilities that bypass file
  modes and ownership; the test skips where it is missing. Otherwise, none.
  """
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which('setpriv')
  if setpriv is None:
    pytest.skip('Running as root, which bypasses file modes, and there is no '
                'setpriv (util-linux) to drop the capabilities that do so.')
  caps = '-dac_override,-dac_read_search,-fowner'
  return [setpriv, f'--bounding-set={caps}', f'--inh-caps={caps}', '--']


def child_command(script: str, *args: str) -> List[str]:
  """The command running `tests/children/<script>` with this Python."""
  return [sys.executable, os.path.join(CHILDREN, script), *args]


def finish(procs: Sequence[subprocess.Popen], timeout: float,
           stderr_paths: Sequence[Union[str, os.PathLike]] = ()
           ) -> List[Tuple[Optional[str], Optional[str]]]:
  """Waits for processes to exit, each with status 0, all within `timeout` s.

  Fails the test, naming the process, its status, and the end of its output,
  if one does not; kills whatever is still running then.

  Args:
    procs: The processes.
    timeout: Seconds for all of them together.
    stderr_paths: The files the first processes write their stderr to (when
      it is not a pipe).

  Returns:
    Each process's (stdout, stderr), None for what did not go to a pipe.
  """
  deadline = time.monotonic() + timeout
  outputs, failure = [], None
  try:
    for proc in procs:
      try:
        outputs.append(proc.communicate(
            timeout=max(deadline - time.monotonic(), 0)))
      except subprocess.TimeoutExpired:
        failure = proc, f'was still running after {timeout} s', (None, None)
        break
      if proc.returncode:
        failure = proc, f'exited with {proc.returncode}', outputs[-1]
        break
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if failure:
    proc, what, (stdout, stderr) = failure
    index = list(procs).index(proc)
    if index < len(stderr_paths):
      with open(stderr_paths[index]) as f:
        stderr = f.read()
    raise AssertionError(f'{proc.args} {what}; stdout:\n'
                         f'{(stdout or "")[-2000:]}\nstderr:\n'
                         f'{(stderr or "")[-4000:]}')
  return outputs


def wait_for(condition: Callable[[], object], what: str,
             seconds: float = 60, interval: float = 0.1) -> None:
  """Polls `condition` every `interval` s until true; fails after `seconds`."""
  deadline = time.monotonic() + seconds
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f'Timed out after {seconds} s waiting for {what}')
    time.sleep(interval)


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
                          text=True, env=child_env(tf_log_level=None),
                          check=False, **kwargs)
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
