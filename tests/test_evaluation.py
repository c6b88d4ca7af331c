"""evaluate_exports: metrics per step, TensorBoard summaries, resume, best."""

import json
import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import entries
from helpers import make_manager
from helpers import N_FEATURES
from helpers import save_step
from helpers import served_value
import ckpt_export
from ckpt_export import best as best_lib
from ckpt_export import evaluation
from ckpt_export import writers

FAST = dict(timeout=0, seconds_to_sleep=0.01)


def _manager(directory, scale):
  return make_manager(directory, scale, None,
                      modules_to_export={'scale': scale, 'twice': scale})


@pytest.fixture
def manager(model_dir, scale):
  return _manager(model_dir, scale)


@pytest.fixture
def local_manager(local_dir, scale):
  return _manager(local_dir, scale)


def _save(manager, scale, *steps):
  for step in steps:
    save_step(manager, scale, step)


class Recorder:
  """An eval_fn that serves each module and records what it was given."""

  def __init__(self):
    self.calls = []

  def __call__(self, modules, step):
    self.calls.append((step, sorted(modules)))
    out = modules['scale'].signatures['serving_default'](
        tf.ones([1, N_FEATURES]))
    value = list(out.values())[0][0, 0]
    return {'value': value, 'neg': -float(value), 'count': len(self.calls)}


def _scalars(summary_dir: str):
  """{tag: {step: value}} from the TensorBoard event files in a directory."""
  found = {}
  for path in tf.io.gfile.glob(os.path.join(summary_dir, 'events.out.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        found.setdefault(value.tag, {})[event.step] = float(
            tf.make_ndarray(value.tensor))
  return found


def test_metrics_and_summaries_of_every_export(manager, scale, model_dir):
  _save(manager, scale, 1, 2, 5)
  eval_fn = Recorder()
  result = evaluation.evaluate_exports(model_dir, eval_fn, **FAST)
  assert eval_fn.calls == [(s, ['scale', 'twice']) for s in (1, 2, 5)]
  expected = {s: {'value': float(s), 'neg': -float(s), 'count': float(i)}
              for i, s in enumerate((1, 2, 5), start=1)}
  assert result == expected
  summary_dir = os.path.join(model_dir, 'eval_exports')
  assert evaluation.read_metrics(summary_dir) == expected
  with tf.io.gfile.GFile(os.path.join(summary_dir, 'metrics.json')) as f:
    assert json.loads(f.read())['metrics']['5'] == expected[5]
  assert _scalars(summary_dir) == {
      'value': {1: 1.0, 2: 2.0, 5: 5.0}, 'neg': {1: -1.0, 2: -2.0, 5: -5.0},
      'count': {1: 1.0, 2: 2.0, 5: 3.0}}
  # Nothing but summaries, the record and the (released) writer lease's
  # directory, and no stray temporary file.
  assert [n for n in entries(summary_dir) if not n.startswith('events.')
         ] == ['.ckpt_export', 'metrics.json']
  assert entries(os.path.join(summary_dir, '.ckpt_export', 'leases')) == []


def test_only_the_requested_modules_are_loaded(manager, scale, model_dir,
                                               tmp_path):
  _save(manager, scale, 3)
  eval_fn = Recorder()
  evaluation.evaluate_exports(model_dir, eval_fn, modules=['scale'],
                              summary_dir=str(tmp_path / 'a'), **FAST)
  assert eval_fn.calls == [(3, ['scale'])]
  with pytest.raises(ValueError, match=r"no module \['nope'\].*'scale', 'tw"):
    evaluation.evaluate_exports(model_dir, eval_fn, modules=['nope'],
                                summary_dir=str(tmp_path / 'b'), **FAST)
  assert evaluation.read_metrics(str(tmp_path / 'b')) == {}


@pytest.mark.parametrize('output, match', [
    ({'acc': 'high'}, r"Metric 'acc' of step 2 \(from eval_fn\).*'high'"),
    ({'acc': None}, r"Metric 'acc' of step 2 .*None"),
    ({'acc': np.ones(3)}, r"Metric 'acc' of step 2 .*shape \(3,\)"),
    ({3: 1.0}, r'step 2 \(from eval_fn\) have a name .*: 3'),
    (0.5, r'step 2 \(from eval_fn\) must be a non-empty dict.*0.5'),
    ({}, r'step 2 \(from eval_fn\) must be a non-empty dict'),
])
def test_bad_metrics_name_the_step_and_value(local_manager, scale, local_dir,
                                             output, match):
  _save(local_manager, scale, 1, 2)

  def eval_fn(unused_modules, step):
    return {'acc': 1.0} if step == 1 else output

  with pytest.raises(ValueError, match=match):
    evaluation.evaluate_exports(local_dir, eval_fn, **FAST)
  # Step 1 stays recorded; step 2 is not, so a fixed eval_fn evaluates it.
  summary_dir = os.path.join(local_dir, 'eval_exports')
  assert evaluation.read_metrics(summary_dir) == {1: {'acc': 1.0}}
  assert list(_scalars(summary_dir)['acc']) == [1]


def test_resumes_after_the_recorded_steps(manager, scale, model_dir):
  _save(manager, scale, 1, 2, 3)
  first = Recorder()
  assert list(evaluation.evaluate_exports(model_dir, first, until_step=2,
                                          **FAST)) == [1, 2]
  assert [c[0] for c in first.calls] == [1, 2]
  # Already done: returns at once, without evaluating anything.
  again = Recorder()
  assert list(evaluation.evaluate_exports(model_dir, again, until_step=2,
                                          **FAST)) == [1, 2]
  assert again.calls == []
  _save(manager, scale, 4)
  second = Recorder()
  result = evaluation.evaluate_exports(model_dir, second, **FAST)
  assert [c[0] for c in second.calls] == [3, 4]
  assert list(result) == [1, 2, 3, 4]
  assert result[2]['count'] == 2.0 and result[4]['count'] == 2.0


def test_until_step_stops_without_waiting(local_manager, scale, local_dir):
  _save(local_manager, scale, 1, 2, 3)
  eval_fn = Recorder()
  # No timeout: only until_step can end it.
  evaluation.evaluate_exports(local_dir, eval_fn, until_step=2,
                              seconds_to_sleep=0.01)
  assert [c[0] for c in eval_fn.calls] == [1, 2]


def test_keeps_the_best_export(manager, scale, model_dir):
  _save(manager, scale, 1, 2, 3, 4)
  best = best_lib.BestExport(model_dir, 'loss', higher_is_better=False)

  def eval_fn(modules, step):
    return {'loss': (served_value_of(modules) - 3.0) ** 2}

  evaluation.evaluate_exports(model_dir, eval_fn, best=best, **FAST)
  assert best.best == (3, {'loss': 0.0})
  assert served_value(best.best_export) == 3.0
  with pytest.raises(ValueError, match="no 'acc' for step 5.*'loss'"):
    _save(manager, scale, 5)
    evaluation.evaluate_exports(model_dir, eval_fn,
                                best=best_lib.BestExport(
                                    model_dir, 'acc',
                                    directory_name='best_by_acc'),
                                **FAST)
  assert 5 not in evaluation.read_metrics(
      os.path.join(model_dir, 'eval_exports'))


def served_value_of(modules) -> float:
  out = modules['scale'].signatures['serving_default'](tf.ones([1, N_FEATURES]))
  return float(list(out.values())[0][0, 0])


@pytest.mark.parametrize('kwargs, match', [
    (dict(eval_fn=None), 'eval_fn must be callable'),
    (dict(modules='scale'), 'modules must be a non-empty list'),
    (dict(modules=['a/b']), 'Invalid module name'),
    (dict(until_step=-1), 'until_step must be'),
    (dict(best='best'), 'best must be a BestExport'),
    (dict(seconds_to_sleep=-1), 'seconds_to_sleep'),
])
def test_bad_arguments(local_dir, kwargs, match):
  kwargs = dict(dict(eval_fn=Recorder(), timeout=0), **kwargs)
  with pytest.raises(ValueError, match=match):
    evaluation.evaluate_exports(local_dir, **kwargs)


def test_a_corrupt_record_is_an_error_and_is_kept(local_manager, scale,
                                                  local_dir):
  _save(local_manager, scale, 1)
  summary_dir = os.path.join(local_dir, 'eval_exports')
  os.makedirs(summary_dir)
  with open(os.path.join(summary_dir, 'metrics.json'), 'w') as f:
    f.write('{"metrics": ')
  with pytest.raises(ValueError, match='metrics.json is not a metrics record'):
    evaluation.evaluate_exports(local_dir, Recorder(), **FAST)
  with open(os.path.join(summary_dir, 'metrics.json')) as f:
    assert f.read() == '{"metrics": '


def test_a_dead_writers_temporary_record_is_removed(local_manager, scale,
                                                    local_dir):
  _save(local_manager, scale, 1)
  summary_dir = os.path.join(local_dir, 'eval_exports')
  os.makedirs(summary_dir)
  dead = (f'.metrics.json.tmp-{int(time.time() * 1000)}-999999999-'
          f'{writers.HOST}-0123abcd')
  open(os.path.join(summary_dir, dead), 'w').close()
  evaluation.evaluate_exports(local_dir, Recorder(), **FAST)
  assert dead not in os.listdir(summary_dir)
  assert evaluation.read_metrics(summary_dir)[1]['value'] == 1.0


def test_latest_only_evaluates_the_newest_export(manager, scale, model_dir):
  _save(manager, scale, 1, 2, 3)
  eval_fn = Recorder()
  evaluation.evaluate_exports(model_dir, eval_fn, latest_only=True, **FAST)
  _save(manager, scale, 4, 5)
  result = evaluation.evaluate_exports(model_dir, eval_fn, latest_only=True,
                                       **FAST)
  assert [c[0] for c in eval_fn.calls] == [3, 5]
  assert list(result) == [3, 5]


def test_every_export_is_evaluated_or_recorded_as_skipped(local_dir, scale):
  # The case, scaled down: a slow evaluator against max_to_keep=2; the
  # trainer deletes exports while eval_fn is busy on an earlier one. Those
  # used to vanish without a word.
  manager = make_manager(local_dir, scale, 2)
  last = 8
  save_step(manager, scale, 1)

  def train():
    for step in range(2, last + 1):
      time.sleep(0.3)
      save_step(manager, scale, step)

  trainer = threading.Thread(target=train)
  trainer.start()

  def slow_eval(modules, step):
    time.sleep(1.0)
    return {'value': served_value_of(modules)}

  try:
    record = evaluation.evaluate_exports(
        local_dir, slow_eval, until_step=last, timeout=60,
        seconds_to_sleep=0.05)
  finally:
    trainer.join(timeout=120)
  assert not trainer.is_alive()
  assert all(record[s] == {'value': float(s)} for s in record)
  assert last in record
  assert record.skipped, 'the trainer outpaced a 1 s evaluator'
  assert set(record) | set(record.skipped) == set(range(1, last + 1))
  assert not set(record) & set(record.skipped)
  assert {i['reason'] for i in record.skipped.values()} == {'deleted'}
  reread = evaluation.read_metrics(os.path.join(local_dir, 'eval_exports'))
  assert (reread, reread.skipped) == (record, record.skipped)


def test_latest_only_records_the_steps_it_passes_over(local_manager, scale,
                                                      local_dir):
  _save(local_manager, scale, 1, 2, 3)
  record = evaluation.evaluate_exports(local_dir, Recorder(), latest_only=True,
                                       **FAST)
  assert sorted(record) == [3]
  assert {s: i['reason'] for s, i in record.skipped.items()} == {
      1: 'latest_only', 2: 'latest_only'}


def test_a_step_failing_max_attempts_times_is_recorded_and_passed(
    local_manager, scale, local_dir):
  _save(local_manager, scale, 1, 2, 3)

  def eval_fn(modules, step):
    if step == 2:
      raise RuntimeError('out of memory, say')
    return {'value': served_value_of(modules)}

  # Each failed attempt is counted in the record, across restarts.
  with pytest.raises(RuntimeError, match='out of memory'):
    evaluation.evaluate_exports(local_dir, eval_fn, max_attempts=2, **FAST)
  summary_dir = os.path.join(local_dir, 'eval_exports')
  assert evaluation.read_metrics(summary_dir).attempts == {
      2: {'count': 1, 'error': 'RuntimeError: out of memory, say'}}
  record = evaluation.evaluate_exports(local_dir, eval_fn, max_attempts=2,
                                       **FAST)
  assert sorted(record) == [1, 3]
  assert record.failed == record.skipped == {2: {
      'reason': 'failed', 'attempts': 2,
      'error': 'RuntimeError: out of memory, say',
      'message': 'failed 2 times: RuntimeError: out of memory, say'}}
  assert record.attempts == {}
  assert evaluation.read_metrics(summary_dir).failed == record.failed


def test_records_are_per_checkpoint_name(local_manager, scale, local_dir):
  _save(local_manager, scale, 1, 5)
  evaluation.evaluate_exports(local_dir, Recorder(), **FAST)
  action = ckpt_export.orbit_actions.ExportSavedModel(
      {'scale': scale}, local_dir, global_step=tf.Variable(3, dtype=tf.int64))
  action.export()
  # It used to resume after the 'ckpt' steps and return their metrics.
  record = evaluation.evaluate_exports(local_dir, Recorder(),
                                       checkpoint_name='export', **FAST)
  assert sorted(record) == [3] and record.checkpoint_name == 'export'
  assert os.path.exists(os.path.join(local_dir, 'export_eval_exports',
                                     'metrics.json'))
  with pytest.raises(ValueError, match="records the 'ckpt' exports, not the "
                     "'export' ones.*export_eval_exports"):
    evaluation.evaluate_exports(
        local_dir, Recorder(), checkpoint_name='export',
        summary_dir=os.path.join(local_dir, 'eval_exports'), **FAST)
  assert sorted(evaluation.read_metrics(
      os.path.join(local_dir, 'eval_exports'))) == [1, 5]


def test_one_evaluator_per_record(local_manager, scale, local_dir):
  _save(local_manager, scale, 1)
  started, go_on = threading.Event(), threading.Event()

  def blocking_eval(modules, step):
    started.set()
    assert go_on.wait(60)
    return {'value': served_value_of(modules)}

  first = threading.Thread(target=evaluation.evaluate_exports, args=(
      local_dir, blocking_eval), kwargs=FAST)
  first.start()
  try:
    assert started.wait(60)
    with pytest.raises(ckpt_export.leases.WriterBusyError,
                       match=rf"eval_exports is being written by "
                       rf"evaluate_exports of the 'ckpt' exports .*pid "
                       rf'{os.getpid()}'):
      evaluation.evaluate_exports(local_dir, Recorder(), **FAST)
  finally:
    go_on.set()
    first.join(timeout=60)
  assert sorted(evaluation.evaluate_exports(local_dir, Recorder(), **FAST)
               ) == [1]


def test_non_finite_metrics_are_standard_json_and_nested_dicts_flat(
    local_manager, scale, local_dir):
  _save(local_manager, scale, 1)
  record = evaluation.evaluate_exports(
      local_dir, lambda modules, step: {'loss': np.float32('nan'),
                                        'eval': {'top': float('inf')}},
      **FAST)
  path = os.path.join(local_dir, 'eval_exports', 'metrics.json')
  with open(path) as f:
    content = json.loads(f.read(), parse_constant=lambda c: 1 / 0)
  assert content['metrics'] == {'1': {'loss': 'NaN', 'eval/top': 'Infinity'}}
  assert np.isnan(record[1]['loss']) and record[1]['eval/top'] == np.inf
  reread = evaluation.read_metrics(os.path.dirname(path))
  assert np.isnan(reread[1]['loss']) and reread[1]['eval/top'] == np.inf


def test_a_keras_metric_is_named_with_its_step(local_manager, scale,
                                               local_dir):
  _save(local_manager, scale, 4)
  metric = tf.keras.metrics.Mean()
  with pytest.raises(ValueError, match=r"'acc' of step 4 \(from eval_fn\) is "
                     r'a Mean object.*result\(\)'):
    evaluation.evaluate_exports(local_dir, lambda m, s: {'acc': metric},
                                **FAST)


@pytest.mark.parametrize('content', ['[]', '{"metrics": {"x": {}}}',
                                     '{"metrics": {"1": {"a": "b"}}}'])
def test_a_record_of_the_wrong_shape_is_named(local_manager, scale, local_dir,
                                              content):
  summary_dir = os.path.join(local_dir, 'eval_exports')
  os.makedirs(summary_dir)
  with open(os.path.join(summary_dir, 'metrics.json'), 'w') as f:
    f.write(content)
  with pytest.raises(ValueError, match='metrics.json is not a metrics record'):
    evaluation.evaluate_exports(local_dir, Recorder(), **FAST)
