"""BestExport: the best export by a metric, at a stable path, crash-safe."""

import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import entries
from helpers import make_manager
from helpers import save_step
from helpers import served_value
import ckpt_export
from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import writers


def _dead_token() -> str:
  """A work-file token of a process on this host that no longer exists."""
  return f'{int(time.time() * 1000)}-999999999-{writers.HOST}-0123abcd'


@pytest.fixture
def manager(model_dir, scale):
  return make_manager(model_dir, scale, None)


def _export(manager, scale, step: int) -> str:
  save_step(manager, scale, step)
  return paths.export_path(manager.directory, 'ckpt', step)


def _assert_best(model_dir: str, step: int, metrics: dict) -> None:
  """Exactly one published copy, of `step`, serving it; best.json naming it."""
  best_dir = os.path.join(model_dir, 'best_export')
  copy = paths.export_path(best_dir, 'ckpt', step)
  # .ckpt_export holds the writer lease (see leases.acquire_writer).
  assert entries(best_dir) == ['.ckpt_export', 'best.json',
                               f'ckpt-{step}_saved_modules', 'offered.json']
  assert commit.is_published(copy)
  assert served_value(copy) == float(step)
  info = best_lib.read_best(model_dir)
  assert (info['step'], info['metrics'], info['path']) == (step, metrics, copy)
  reloaded = best_lib.BestExport(model_dir, info['metric'],
                                 higher_is_better=info['higher_is_better'])
  with reloaded:
    assert reloaded.best == (step, metrics)


@pytest.mark.parametrize('higher, values, expected', [
    (True, [1.0, 3.0, 2.0, 3.0], 2),
    (False, [1.0, 3.0, 0.5, 0.5], 3),
])
def test_keeps_the_best_by_metric(manager, scale, model_dir, higher, values,
                                  expected):
  best = best_lib.BestExport(model_dir, 'm', higher_is_better=higher)
  assert best.best is None and best.best_export is None
  won = [best.update(step, _export(manager, scale, step), {'m': value})
         for step, value in enumerate(values, start=1)]
  assert won == [True, higher, not higher, False]
  assert best.best == (expected, {'m': values[expected - 1]})
  best.close()  # One writer at a time: let _assert_best read.
  _assert_best(model_dir, expected, {'m': values[expected - 1]})
  # Copied under a lease, released since.
  assert not leases.holders(paths.export_path(model_dir, 'ckpt', expected))


def test_compare_fn_decides(manager, scale, model_dir):
  # Better: higher accuracy, ties broken by lower loss.
  def better(old, new):
    return (new['acc'], -new['loss']) > (old['acc'], -old['loss'])
  best = best_lib.BestExport(model_dir, 'acc', compare_fn=better)
  metrics = [{'acc': 0.5, 'loss': 2.0}, {'acc': 0.5, 'loss': 1.0},
             {'acc': 0.4, 'loss': 0.1}]
  for step, m in enumerate(metrics, start=1):
    best.update(step, _export(manager, scale, step), m)
  best.close()  # One writer at a time: let _assert_best read.
  _assert_best(model_dir, 2, metrics[1])


def test_reloads_the_best_after_a_restart(manager, scale, model_dir):
  best_lib.BestExport(model_dir, 'loss', higher_is_better=False).update(
      4, _export(manager, scale, 4), {'loss': 0.25})
  again = best_lib.BestExport(model_dir, 'loss', higher_is_better=False)
  assert again.best == (4, {'loss': 0.25})
  assert not again.update(5, _export(manager, scale, 5), {'loss': 0.5})
  assert again.update(6, _export(manager, scale, 6), {'loss': 0.125})
  again.close()
  _assert_best(model_dir, 6, {'loss': 0.125})


def test_nan_never_wins_and_bad_input_changes_nothing(manager, scale,
                                                      model_dir):
  best = best_lib.BestExport(model_dir, 'm')
  assert not best.update(1, _export(manager, scale, 1), {'m': math.nan})
  assert best.best is None
  best.update(2, _export(manager, scale, 2), {'m': np.float32(1.5)})
  export = _export(manager, scale, 3)
  for metrics, match in [({'x': 9.0}, "step 3 have no 'm'"),
                         ({'m': 'high'}, "Metric 'm' of step 3 .*'high'"),
                         ({'m': True}, "Metric 'm' of step 3"),
                         ({'m': tf.ones([2])}, "Metric 'm' of step 3.*shape"),
                         ([('m', 9.0)], 'step 3 must be a non-empty dict'),
                         ({}, 'step 3 must be a non-empty dict')]:
    with pytest.raises(ValueError, match=match):
      best.update(3, export, metrics)
  with pytest.raises(ValueError, match='step must be a non-negative'):
    best.update(-1, export, {'m': 9.0})
  missing = paths.export_path(model_dir, 'ckpt', 99)
  with pytest.raises(ValueError, match='ckpt-99_saved_modules.*not a publ'):
    best.update(99, missing, {'m': 9.0})
  best.close()  # One writer at a time: let _assert_best read.
  _assert_best(model_dir, 2, {'m': 1.5})


@pytest.mark.parametrize('kwargs, match', [
    (dict(metric=''), 'metric must be'),
    (dict(metric='m', compare_fn=3), 'compare_fn must be callable'),
    (dict(metric='m', directory_name='a/b'), 'directory_name'),
    (dict(metric='m', directory_name='ckpt-3_saved_modules'), 'like an exp'),
    (dict(metric='m', directory_name='.hidden'), "start with '.'"),
])
def test_bad_arguments(local_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    best_lib.BestExport(local_dir, **kwargs)
  assert not os.path.exists(local_dir)


def test_a_tensor_metric_is_accepted(manager, scale, model_dir):
  best = best_lib.BestExport(model_dir, 'm')
  assert best.update(1, _export(manager, scale, 1), {'m': tf.constant(2)})
  assert best.best == (1, {'m': 2.0})


def test_recovers_from_a_crash_between_publishing_and_best_json(
    manager, scale, model_dir):
  best = best_lib.BestExport(model_dir, 'm')
  best.update(1, _export(manager, scale, 1), {'m': 1.0})
  best_dir = best.directory
  # The state a kill leaves after publishing a better copy, before best.json:
  # both copies, best.json naming the old one; plus dead writers' leftovers.
  newer = paths.export_path(best_dir, 'ckpt', 2)
  source = _export(manager, scale, 2)
  info = dict(best_lib.read_best(model_dir), step=2, metrics={'m': 2.0},
              value=2.0, sequence=2, path=newer, source=source)
  with commit.staged_export(newer, info) as tmp:
    best_lib._copy_export(source, tmp)
  leftovers = [f'.best.json.tmp-{_dead_token()}',
               f'.ckpt-3_saved_modules.tmp-{_dead_token()}']
  with tf.io.gfile.GFile(os.path.join(best_dir, leftovers[0]), 'w') as f:
    f.write('{"step": 3')
  tf.io.gfile.makedirs(os.path.join(best_dir, leftovers[1], 'scale'))
  assert best_lib.read_best(model_dir)['step'] == 1
  best.close()  # As the kill would have (its lease is gone with its pid).
  assert best_lib.BestExport(model_dir, 'm').best == (2, {'m': 2.0})
  _assert_best(model_dir, 2, {'m': 2.0})


def test_a_corrupt_best_json_is_named_then_rewritten(manager, scale,
                                                     model_dir):
  best_lib.BestExport(model_dir, 'm').update(1, _export(manager, scale, 1),
                                             {'m': 1.0})
  info_file = os.path.join(model_dir, 'best_export', 'best.json')
  with tf.io.gfile.GFile(info_file, 'w') as f:
    f.write('{"step": 1, "path"')  # Edited by hand, say.
  with pytest.raises(ValueError, match=re.escape(info_file)):
    best_lib.read_best(model_dir)
  assert best_lib.BestExport(model_dir, 'm').best == (1, {'m': 1.0})
  _assert_best(model_dir, 1, {'m': 1.0})


def test_best_json_without_its_copy_is_removed(local_dir):
  os.makedirs(os.path.join(local_dir, 'best_export'))
  with open(os.path.join(local_dir, 'best_export', 'best.json'), 'w') as f:
    json.dump({'step': 1, 'path': '/nowhere'}, f)
  assert best_lib.BestExport(local_dir, 'm').best is None
  assert os.listdir(os.path.join(local_dir, 'best_export')) == [
      '.ckpt_export']


def test_garbage_collection_never_touches_the_best_export(model_dir, scale):
  manager = make_manager(model_dir, scale, 1)
  best = best_lib.BestExport(model_dir, 'm')
  for step in range(1, 6):
    best.update(step, _export(manager, scale, step), {'m': -abs(step - 2)})
  manager.sync()
  assert ckpt_export.list_savedmodels(model_dir) == [
      paths.export_path(model_dir, 'ckpt', 5)]
  assert 'best_export' in entries(model_dir)
  best.close()  # One writer at a time: let _assert_best read.
  _assert_best(model_dir, 2, {'m': 0.0})
  manager.restore_or_initialize()
  save_step(manager, scale, 6)
  best.close()  # One writer at a time: let _assert_best read.
  _assert_best(model_dir, 2, {'m': 0.0})


def test_an_export_being_deleted_is_copied_only_under_a_held_lease(
    local_dir, scale):
  manager = make_manager(local_dir, scale, 1)
  first = _export(manager, scale, 1)
  lease = leases.acquire(first)  # An evaluator's, say.
  _export(manager, scale, 2)  # Its GC asks to delete step 1; the lease holds.
  assert commit.is_published(first)
  best = best_lib.BestExport(local_dir, 'm')
  with pytest.raises(ValueError, match='ckpt-1_saved_modules.*not a publ'):
    best.update(1, first, {'m': 1.0})
  assert best.update(1, first, {'m': 1.0}, holds_lease=True)
  lease.release()
  assert not os.path.exists(first)
  best.close()  # One writer at a time: let _assert_best read.
  _assert_best(local_dir, 1, {'m': 1.0})


def _strict_json(path: str):
  """The JSON in `path`, refusing the non-standard NaN and Infinity."""
  def refuse(constant):
    raise ValueError(f'{path} holds a bare {constant}: not standard JSON')
  with tf.io.gfile.GFile(path) as f:
    return json.loads(f.read(), parse_constant=refuse)


def test_higher_is_better_must_be_a_bool(local_dir):
  # A config file's 'False' used to be taken as True, flipping the direction.
  for value in ('False', 0, None):
    with pytest.raises(ValueError, match=f'higher_is_better.*{value!r}'):
      best_lib.BestExport(local_dir, 'm', higher_is_better=value)
  assert not os.path.exists(local_dir)


def test_non_finite_metrics_never_win_and_files_stay_standard_json(
    manager, scale, model_dir):
  best = best_lib.BestExport(model_dir, 'm')
  for step, value in [(1, math.inf), (2, -math.inf), (3, math.nan)]:
    assert not best.update(step, _export(manager, scale, step), {'m': value})
  assert best.best is None
  metrics = {'m': 1.0, 'other': math.nan, 'big': math.inf}
  assert best.update(4, _export(manager, scale, 4), metrics)
  assert not best.update(5, _export(manager, scale, 5), {'m': math.inf})
  info = _strict_json(os.path.join(best.directory, 'best.json'))
  assert info['metrics'] == {'m': 1.0, 'other': 'NaN', 'big': 'Infinity'}
  marker = _strict_json(os.path.join(best.best_export, paths.COMMIT_MARKER))
  assert marker['metrics'] == info['metrics']
  read = best_lib.read_best(model_dir)['metrics']
  assert read['m'] == 1.0 and math.isnan(read['other'])
  assert read['big'] == math.inf
  best.close()
  with best_lib.BestExport(model_dir, 'm') as again:
    assert again.best[0] == 4 and math.isnan(again.best[1]['other'])


def test_a_keras_metric_is_named_and_nested_dicts_are_flattened(
    manager, scale, model_dir):
  best = best_lib.BestExport(model_dir, 'eval/acc')
  export = _export(manager, scale, 1)
  accuracy = tf.keras.metrics.Mean(name='accuracy')
  with pytest.raises(ValueError, match=r"'eval/acc' of step 1 is a Mean.*"
                     r'result\(\)'):
    best.update(1, export, {'eval': {'acc': accuracy}})
  assert best.best is None
  assert best.update(1, export, {'eval': {'acc': 0.5, 'n': np.int64(3)}})
  assert best.best == (1, {'eval/acc': 0.5, 'eval/n': 3.0})
  with pytest.raises(ValueError, match="'eval/acc' twice"):
    best.update(2, _export(manager, scale, 2),
                {'eval': {'acc': 0.9}, 'eval/acc': 0.9})


@pytest.mark.parametrize('changed, match', [
    (dict(metric='acc'), r"by 'loss' \(lower is better\).*ranks by 'acc'"),
    (dict(metric='loss', higher_is_better=True),
     r"by 'loss' \(lower is better\).*'loss' \(higher is better\)"),
])
def test_a_changed_metric_or_direction_is_a_clear_error(
    manager, scale, model_dir, changed, match):
  with best_lib.BestExport(model_dir, 'loss', higher_is_better=False) as best:
    best.update(1, _export(manager, scale, 1), {'loss': 0.5})
  # Used to raise a bare KeyError: 'acc' at every update after the restart.
  with pytest.raises(ValueError, match=match):
    best_lib.BestExport(model_dir, **changed)
  _assert_best(model_dir, 1, {'loss': 0.5})
  with best_lib.BestExport(model_dir, directory_name='best_by_new',
                           **changed) as fresh:
    assert fresh.best is None


def test_one_writer_per_best_directory(manager, scale, model_dir):
  first = best_lib.BestExport(model_dir, 'm')
  first.update(2, _export(manager, scale, 2), {'m': 2.0})
  with pytest.raises(leases.WriterBusyError,
                     match=rf"best_export is being written by a BestExport "
                     rf".*'m'.*pid {os.getpid()}"):
    best_lib.BestExport(model_dir, 'm')
  _assert_best_unchanged = best_lib.read_best(model_dir)
  assert _assert_best_unchanged['step'] == 2
  first.close()
  with best_lib.BestExport(model_dir, 'm') as second:
    assert second.best == (2, {'m': 2.0})


def test_best_of_another_checkpoint_name_is_kept_apart(manager, scale,
                                                        model_dir):
  with best_lib.BestExport(model_dir, 'm') as best:
    best.update(1, _export(manager, scale, 1), {'m': 1.0})
    with pytest.raises(ValueError, match="named 'ckpt'-<step>"):
      best.update(1, paths.export_path(model_dir, 'export', 1), {'m': 1.0})
  # It used to delete the first one's best.json.
  with pytest.raises(ValueError, match="best of the 'ckpt' exports, not of "
                     "'export' ones.*'export_best_export'"):
    best_lib.BestExport(model_dir, 'm', directory_name='best_export',
                        checkpoint_name='export')
  with best_lib.BestExport(model_dir, 'm', checkpoint_name='export') as other:
    assert other.directory == os.path.join(model_dir, 'export_best_export')
    assert other.best is None
  _assert_best(model_dir, 1, {'m': 1.0})


@pytest.mark.parametrize('content', ['[1, 2]', '{"step": "one"}', '3'])
def test_best_json_of_the_wrong_shape_is_named_then_rewritten(
    manager, scale, model_dir, content):
  with best_lib.BestExport(model_dir, 'm') as best:
    best.update(1, _export(manager, scale, 1), {'m': 1.0})
  info_file = os.path.join(model_dir, 'best_export', 'best.json')
  tf.io.gfile.remove(info_file)  # ram:// would keep the old file's tail.
  with tf.io.gfile.GFile(info_file, 'w') as f:
    f.write(content)
  with pytest.raises(ValueError, match=re.escape(info_file) + '.*not a best'):
    best_lib.read_best(model_dir)
  with best_lib.BestExport(model_dir, 'm') as best:
    assert best.best == (1, {'m': 1.0})
  _assert_best(model_dir, 1, {'m': 1.0})


@pytest.mark.slow
def test_a_second_writer_process_is_refused_until_the_first_dies(local_dir):
  code = ('import sys, time; from ckpt_export import best; '
          'b = best.BestExport(sys.argv[1], "m"); print("ready", flush=True); '
          'time.sleep(120)')
  child = subprocess.Popen([sys.executable, '-c', code, local_dir],
                           stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == 'ready\n'
    with pytest.raises(leases.WriterBusyError, match=f'pid {child.pid}'):
      best_lib.BestExport(local_dir, 'm')
  finally:
    child.kill()
    child.wait(timeout=60)
  with best_lib.BestExport(local_dir, 'm') as best:  # The dead do not block.
    assert best.best is None
