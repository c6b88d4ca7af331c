"""The decoupled exporter: a trainer checkpoints, the exporter exports."""

import subprocess
import threading
import time

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import decoupled
from ckpt_export import paths
import exporter_build
from helpers import child_command
from helpers import child_env
from helpers import entries
from helpers import N_FEATURES
from helpers import run_cli
from helpers import Scale
from helpers import served_value
from helpers import steps_of

def _write_checkpoints(model_dir, steps, max_to_keep=3):
  scale = Scale()
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(module=scale),
                                       model_dir, max_to_keep)
  for step in steps:
    scale.w.assign(tf.fill([N_FEATURES], float(step)))
    manager.save(checkpoint_number=step)
  return manager


def test_exports_every_kept_checkpoint_with_its_values(local_dir):
  _write_checkpoints(local_dir, [1, 2, 3, 4])
  assert decoupled.run_exporter(local_dir, exporter_build.build,
                               timeout=0) == [2, 3, 4]
  exports = ckpt_export.list_savedmodels(local_dir)
  assert steps_of(exports) == [2, 3, 4]
  for export_dir in exports:
    assert served_value(export_dir) == paths.parse_export_step(export_dir)
  assert decoupled.run_exporter(local_dir, exporter_build.build,
                               timeout=0) == []


def test_exports_whose_checkpoint_is_gone_are_deleted(local_dir):
  manager = _write_checkpoints(local_dir, [1, 2], max_to_keep=2)
  assert decoupled.run_exporter(local_dir, exporter_build.build,
                               timeout=0) == [1, 2]
  manager.save(checkpoint_number=3)
  assert decoupled.run_exporter(local_dir, exporter_build.build,
                               timeout=0) == [3]
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [2, 3]
  assert not [n for n in entries(local_dir) if n.startswith('.')]


def test_stops_when_asked(local_dir):
  _write_checkpoints(local_dir, [1])
  stop, returned = threading.Event(), []
  # No timeout: only `stop` ends it, once it has exported step 1.
  thread = threading.Thread(target=lambda: returned.append(
      decoupled.run_exporter(local_dir, exporter_build.build,
                            seconds_to_sleep=0.05, stop=stop)), daemon=True)
  thread.start()
  deadline = time.monotonic() + 300
  while not ckpt_export.list_savedmodels(local_dir) and thread.is_alive():
    if time.monotonic() > deadline:
      stop.set()
      pytest.fail('No export of step 1 within 300 s')
    time.sleep(0.05)
  stop.set()
  thread.join(60)
  assert not thread.is_alive(), 'run_exporter did not return once stopped'
  assert returned == [[1]]
  assert served_value(paths.export_path(local_dir, 'ckpt', 1)) == 1


def test_load_build_fn_finds_the_function():
  assert decoupled.load_build_fn('exporter_build:build') is exporter_build.build


@pytest.mark.parametrize('spec, match', [
    ('exporter_build', 'expected .package.module:function'),
    (':build', 'expected'),
    ('exporter_build:', 'expected'),
    ('no_such_module_xyz:build', "Cannot import module 'no_such_module_xyz'"),
    ('exporter_build:missing', "no callable 'missing'"),
    ('exporter_build:NOT_CALLABLE', "no callable 'NOT_CALLABLE'"),
])
def test_load_build_fn_names_what_is_wrong(spec, match):
  with pytest.raises(ValueError, match=match):
    decoupled.load_build_fn(spec)


def test_a_checkpoint_without_the_modules_is_a_clear_error(local_dir):
  _write_checkpoints(local_dir, [1])
  with pytest.raises(ValueError, match='does not hold all variables'):
    decoupled.run_exporter(local_dir, exporter_build.build_other_names,
                          timeout=0)
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == []


@pytest.mark.parametrize('kwargs, match', [
    ({'timeout': -1}, 'timeout'),
    ({'seconds_to_sleep': None}, 'seconds_to_sleep'),
    ({'checkpoint_name': 'a/b'}, 'checkpoint_name'),
])
def test_bad_arguments(local_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    decoupled.run_exporter(local_dir, exporter_build.build, **kwargs)


def test_a_build_function_must_return_a_checkpoint_and_modules(local_dir):
  with pytest.raises(ValueError, match='must return'):
    decoupled.run_exporter(local_dir, lambda: {'scale': Scale()}, timeout=0)


@pytest.mark.slow
def test_follows_a_real_trainer_process(local_dir):
  steps, max_to_keep = 12, 3
  trainer = subprocess.Popen(
      child_command('trainer_child.py', local_dir, str(steps), str(max_to_keep),
            '0.3'), stdout=subprocess.PIPE, text=True,
      env=child_env())
  outputs, trained = [], threading.Event()

  def wait_for_trainer():
    outputs.append(trainer.communicate(timeout=300)[0])
    trained.set()

  watcher = threading.Thread(target=wait_for_trainer)
  watcher.start()
  exported = decoupled.run_exporter(local_dir, exporter_build.build,
                                   seconds_to_sleep=0.1, stop=trained)
  watcher.join()
  assert trainer.returncode == 0 and outputs[0].strip() == 'DONE'
  exported += decoupled.run_exporter(local_dir, exporter_build.build, timeout=0)
  assert exported == sorted(set(exported)) and exported[-1] == steps
  assert len(exported) > max_to_keep  # Exported while the trainer ran.
  exports = ckpt_export.list_savedmodels(local_dir)
  assert steps_of(exports) == list(range(steps - max_to_keep + 1, steps + 1))
  for export_dir in exports:
    assert served_value(export_dir) == paths.parse_export_step(export_dir)
  assert not [n for n in entries(local_dir) if n.startswith('.')]


def test_the_export_command_exports_each_checkpoint(local_dir):
  _write_checkpoints(local_dir, [1, 2, 3, 4])
  result = run_cli('export', local_dir, '--build-fn', 'exporter_build:build',
                   '--timeout', '0', '--seconds-to-sleep', '0.1')
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ckpt-export: exported steps 2, 3, 4'
  exports = ckpt_export.list_savedmodels(local_dir)
  assert [served_value(p) for p in exports] == [2.0, 3.0, 4.0]


@pytest.mark.parametrize('spec, message', [
    ('exporter_build', "'exporter_build'"),
    ('exporter_build:NOT_CALLABLE', "'exporter_build:NOT_CALLABLE'"),
    ('no_such_module:build', "'no_such_module:build'"),
])
def test_the_export_command_names_a_bad_build_fn(local_dir, spec, message):
  _write_checkpoints(local_dir, [1])
  result = run_cli('export', local_dir, '--build-fn', spec, '--timeout', '0')
  assert result.returncode == 2
  assert result.stderr.startswith('ckpt-export: error: ')
  assert message in result.stderr and len(result.stderr.splitlines()) == 1
  assert entries(local_dir) == ['checkpoint', 'ckpt-1.data-*',
                                'ckpt-1.index']
