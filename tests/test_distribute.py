"""Saving under tf.distribute strategies: real processes, real collectives.

`distribute_job.py` is the user's training script. Under MultiWorkerMirrored
every worker runs it on the same model directory, as on a real cluster; here
the two workers are processes on 127.0.0.1, each with its own TMPDIR, so that
anything a worker leaves behind is seen. Its SyncOnRead counter makes every
save need both workers: a worker that skipped a save would hang the other.
"""

import os
import subprocess
import sys
import time
from typing import List, Sequence

import pytest
import tensorflow as tf

from ckpt_export import distribution
from ckpt_export import paths
from ckpt_export import writers
from helpers import child_env
from helpers import entries
from helpers import finish
from helpers import make_manager
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import worker_envs
import distribute_job

WORKERS = 2
TIMEOUT_SECONDS = 300


def _job_args(strategy: str, model_dir: str, total_steps: int,
              use_async: bool = False) -> List[str]:
  return [sys.executable, distribute_job.__file__, '--strategy', strategy,
          '--model_dir', model_dir, '--total_steps', str(total_steps),
          '--save_every', '2', '--max_to_keep', '2'] + (
              ['--async'] if use_async else [])


def _run_all(commands: Sequence[List[str]], envs: Sequence[dict],
             tmp_path) -> List[List[str]]:
  """Runs processes together; returns each one's output lines."""
  procs, stderr_paths = [], []
  for i, (command, env) in enumerate(zip(commands, envs)):
    stderr_paths.append(tmp_path / f'stderr{i}')
    with open(stderr_paths[-1], 'w') as stderr:
      procs.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                    stderr=stderr, text=True, env=env))
  outputs = finish(procs, TIMEOUT_SECONDS, stderr_paths)
  return [out.split('\n') for out, _ in outputs]


def _run_workers(model_dir: str, total_steps: int, use_async: bool,
                 tmp_path) -> List[List[str]]:
  """Runs the job on two MultiWorkerMirrored workers; returns their lines."""
  commands = [_job_args('multi_worker', model_dir, total_steps, use_async)
              ] * WORKERS
  return _run_all(commands, worker_envs(tmp_path, WORKERS), tmp_path)


def _expected_entries(steps: Sequence[int]) -> List[str]:
  names = ['checkpoint']
  for step in steps:
    names += [f'ckpt-{step}.data-*', f'ckpt-{step}.index',
              paths.export_basename('ckpt', step)]
  return sorted(names)


def _check_exports(model_dir: str, steps: Sequence[int],
                   replicas: int) -> None:
  """Each export serves its step's weights plus the summed counter."""
  for step in steps:
    export_dir = paths.export_path(model_dir, 'ckpt', step)
    assert served_value(export_dir, distribute_job.MODULE_NAME) == (
        (1 + replicas) * step)


def test_strategy_found_in_scope_or_from_the_checkpoint_variables():
  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
  with strategy.scope():
    distributed = tf.train.Checkpoint(model=distribute_job.CountingModel())
    assert distribution.find_strategy(tf.train.Checkpoint()) is strategy
  assert distribution.find_strategy(distributed) is strategy
  assert distribution.is_chief(strategy)
  plain = tf.train.Checkpoint(model=distribute_job.CountingModel())
  assert distribution.find_strategy(plain) is None
  assert distribution.is_chief(None)


def test_the_strategy_is_looked_for_until_the_first_save_only(
    tmp_path, monkeypatch):
  """Walking the checkpoint's objects is not repeated on every save."""
  calls = []
  find_strategy = distribution.find_strategy

  def counting(checkpoint):
    calls.append(checkpoint)
    return find_strategy(checkpoint)

  monkeypatch.setattr(distribution, 'find_strategy', counting)
  module = Scale()
  manager = make_manager(str(tmp_path / 'model'), module, 2)
  manager.restore_or_initialize()
  for step in (1, 2, 3):
    save_step(manager, module, step)
  manager.sync()
  assert len(calls) == 2  # At restore_or_initialize, then the first save.
  assert served_value(manager.latest_savedmodel) == 3


def test_scratch_directories_are_fresh_and_outside_the_model_directory(
    tmp_path, monkeypatch):
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  monkeypatch.setattr('tempfile.tempdir', None)  # Re-read TMPDIR.
  first = distribution.make_scratch_directory(None)
  second = distribution.make_scratch_directory(None)
  assert first != second
  for scratch in (first, second):
    assert os.path.dirname(scratch) == str(tmp_path)
    assert os.path.basename(scratch).startswith(
        distribution.SCRATCH_PREFIX + 'local.')
    assert not os.listdir(scratch)
    distribution.remove_scratch_directory(scratch)
  assert not os.listdir(tmp_path)


def _plant_scratch(directory, pid: int) -> str:
  """A scratch directory with a file, as process `pid` on this host makes."""
  token = f'{int(time.time() * 1000)}-{pid}-{writers.HOST}-0123abcd'
  path = os.path.join(directory,
                      f'{distribution.SCRATCH_PREFIX}worker1.{token}')
  os.makedirs(os.path.join(path, 'ckpt-2_saved_modules'))
  with open(os.path.join(path, 'ckpt-2.index'), 'w') as f:
    f.write('partial')
  return path


def test_only_the_scratch_directories_of_dead_processes_are_removed(
    tmp_path, monkeypatch):
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  monkeypatch.setattr('tempfile.tempdir', None)  # Re-read TMPDIR.
  killed = _plant_scratch(tmp_path, pid=999999999)
  running = _plant_scratch(tmp_path, pid=os.getppid())
  # Of this process: one in use, and one left by a former process whose pid
  # this one reuses (its token is not in flight here).
  in_use = distribution.make_scratch_directory(None)
  former = _plant_scratch(tmp_path, pid=os.getpid())
  unrelated = tmp_path / 'ckpt_export-scratch'  # Not named like ours.
  unrelated.mkdir()
  assert distribution.remove_stale_scratch_directories() == sorted(
      [killed, former])
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(p) for p in (running, in_use, str(unrelated)))
  distribution.remove_scratch_directory(in_use)
  assert distribution.remove_stale_scratch_directories() == []
  assert not os.path.exists(in_use)


def _variables(saved_model_dir: str) -> dict:
  reader = tf.train.load_checkpoint(
      os.path.join(saved_model_dir, 'variables', 'variables'))
  return {key: reader.get_tensor(key)
          for key in reader.get_variable_to_shape_map()
          if key != '_CHECKPOINTABLE_OBJECT_GRAPH'}


@pytest.mark.slow
@pytest.mark.parametrize('use_async', [False, True], ids=['sync', 'async'])
def test_mirrored_strategy_over_two_logical_cpus_exports_fast(
    tmp_path, use_async):
  """One process holds every replica: fast exports, linked on local disk."""
  model_dir = str(tmp_path / 'model')
  full = str(tmp_path / 'full')
  [lines] = _run_all(
      [_job_args('mirrored', model_dir, 6, use_async) + [
          '--full_export_dir', full]],
      [child_env()], tmp_path)
  assert 'DONE 2' in lines
  # Steps 2, 4, 6: the first export full, then fast and linked.
  assert 'EXPORTS 1 2 2' in lines
  assert entries(model_dir) == _expected_entries([4, 6])
  _check_exports(model_dir, [4, 6], replicas=2)
  # The last export holds what a full export under the strategy holds.
  linked = paths.export_path(model_dir, 'ckpt', 6)
  module_dir = os.path.join(linked, distribute_job.MODULE_NAME)
  want, got = _variables(full), _variables(module_dir)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert (got[key] == value).all(), key
  # The model and the checkpoint's bookkeeping only: one shard, shared.
  assert os.path.samefile(
      os.path.join(module_dir, 'variables', 'variables.data-00000-of-00002'),
      os.path.join(model_dir, 'ckpt-6.data-00000-of-00001'))


@pytest.mark.slow
def test_multi_worker_chief_alone_writes_sync_then_async(tmp_path):
  model_dir = str(tmp_path / 'model')
  first = _run_workers(model_dir, 4, use_async=False, tmp_path=tmp_path)
  for lines in first:
    assert 'RESTORED 0' in lines and 'DONE 2' in lines
    # Every worker's manager names the chief's checkpoints.
    assert f'SAVED 4 {model_dir}/ckpt-4' in lines
  assert entries(model_dir) == _expected_entries([2, 4])
  _check_exports(model_dir, [2, 4], replicas=2)

  # Resumed, with async checkpointing: every worker restores the chief's
  # latest checkpoint, and the chief alone collects garbage.
  # The non-chief's TMPDIR holds what a killed predecessor of it left, and
  # the scratch directory of a running process sharing it.
  killed = _plant_scratch(tmp_path / 'tmp1', pid=999999999)
  running = _plant_scratch(tmp_path / 'tmp1', pid=os.getpid())
  second = _run_workers(model_dir, 8, use_async=True, tmp_path=tmp_path)
  for lines in second:
    assert 'RESTORED 4' in lines and 'DONE 2' in lines
  assert entries(model_dir) == _expected_entries([6, 8])
  _check_exports(model_dir, [6, 8], replicas=2)
  assert not os.path.exists(killed)
  assert os.listdir(tmp_path / 'tmp1') == [os.path.basename(running)]
  assert not os.listdir(tmp_path / 'tmp0'), 'the chief left files in TMPDIR'
