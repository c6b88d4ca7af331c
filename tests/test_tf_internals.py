"""The fence around TensorFlow's internals: each assumption, and each fallback.

The first test checks, per feature, that what ckpt_export assumes about this
TensorFlow holds; on a TensorFlow that breaks one, it fails naming it (and the
library then falls back, see `_tf_internals`). The others make the fence
report an internal as missing (TensorFlow itself is real and unchanged) and
check that the fallback still writes correct exports.
"""

import logging
import os
import threading

import keras
import pytest
import tensorflow as tf
# Loaded, so that its Model is checked too.
import tf_keras  # pylint: disable=unused-import

import ckpt_export
from ckpt_export import _tf_internals
from ckpt_export import commit
from ckpt_export import paths
from helpers import entries
from helpers import make_manager
from helpers import N_FEATURES
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import wait_for


@pytest.fixture(autouse=True)
def fresh_checks():
  _tf_internals.reset()
  yield
  _tf_internals.reset()


def fake_missing(monkeypatch, feature: str) -> None:
  """Makes the fence's check of `feature` report its internal as missing."""

  def missing() -> None:
    raise AttributeError(f'faked: the internal behind {feature} is gone')

  _, fallback = _tf_internals.PROBLEMS[feature]
  monkeypatch.setitem(_tf_internals.PROBLEMS, feature, (missing, fallback))


def fallback_warnings(caplog) -> list:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and 'are off on TensorFlow' in
          r.getMessage()]


@pytest.mark.parametrize('feature', sorted(_tf_internals.PROBLEMS))
def test_this_tensorflow_meets_each_assumption(feature):
  check, fallback = _tf_internals.PROBLEMS[feature]
  problem = _tf_internals._problem_of(check)  # pylint: disable=protected-access
  assert problem is None, (
      f'TensorFlow {tf.__version__} breaks what ckpt_export assumes for '
      f'{feature}: {problem}. ckpt_export falls back ({fallback}); update '
      'ckpt_export/_tf_internals.py for this version.')


@pytest.mark.parametrize('missing, full, fast', [(True, 3, 0), (False, 1, 2)])
def test_fast_exports_or_their_fallback_serve_each_step(
    monkeypatch, caplog, local_dir, scale, missing, full, fast):
  if missing:
    fake_missing(monkeypatch, 'fast exports')
  manager = make_manager(local_dir, scale)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  exporter = manager._exporter.modules[0]  # pylint: disable=protected-access
  assert (exporter.full_exports, exporter.fast_exports) == (full, fast)
  assert [served_value(p) for p in manager.savedmodels] == [2.0, 3.0]
  # A second manager in the same process: still at most one warning.
  save_step(make_manager(local_dir + '2', scale), scale, 4)
  warnings = fallback_warnings(caplog)
  assert len(warnings) == int(missing), warnings
  if missing:
    assert 'fast exports' in warnings[0] and tf.__version__ in warnings[0]


def test_without_background_exports_async_saves_export_first(
    monkeypatch, caplog, local_dir, scale):
  fake_missing(monkeypatch, 'background exports')
  manager = make_manager(local_dir, scale)
  options = tf.train.CheckpointOptions(enable_async=True)
  for step in (1, 2, 3):
    save_step(manager, scale, step, options=options)
    # Published before save() returned: nothing left in the background.
    assert not manager._exporter.pending  # pylint: disable=protected-access
    assert served_value(paths.export_path(local_dir, 'ckpt', step)) == step
  manager.sync()
  assert [served_value(p) for p in manager.savedmodels] == [2.0, 3.0]
  assert tf.train.latest_checkpoint(local_dir).endswith('ckpt-3')
  exporter = manager._exporter.modules[0]  # pylint: disable=protected-access
  assert exporter.fast_exports == 2  # Fast, though not in the background.
  assert len(fallback_warnings(caplog)) == 1


def test_a_manager_runs_the_export_checks_off_its_thread(
    monkeypatch, local_dir, scale):
  features = ['background exports', 'fast exports',
              'first exports traced in the background']
  threads = {}
  for feature in features:
    check, fallback = _tf_internals.PROBLEMS[feature]

    def recording(check=check, feature=feature):
      threads.setdefault(feature, []).append(threading.current_thread())
      check()

    monkeypatch.setitem(_tf_internals.PROBLEMS, feature, (recording, fallback))
  manager = make_manager(local_dir, scale)
  wait_for(lambda: sorted(threads) == features, 'the checks')
  assert threading.main_thread() not in sum(threads.values(), [])
  options = tf.train.CheckpointOptions(enable_async=True)
  for step in (1, 2):
    save_step(manager, scale, step, options=options)
  manager.sync()
  assert [served_value(p) for p in manager.savedmodels] == [1.0, 2.0]
  assert [len(threads[feature]) for feature in features] == [1, 1, 1]


def test_without_manager_internals_the_interval_and_exports_hold(
    monkeypatch, caplog, local_dir, scale):
  fake_missing(monkeypatch, "reads of CheckpointManager's state")
  step = tf.Variable(0, dtype=tf.int64)
  manager = make_manager(local_dir, scale, step_counter=step,
                         checkpoint_interval=3)
  saved = []
  for value in range(1, 9):
    step.assign(value)
    if save_step(manager, scale, value) is not None:
      saved.append(value)
  assert saved == [1, 4, 7]
  assert [served_value(p) for p in manager.savedmodels] == [4.0, 7.0]
  assert len(fallback_warnings(caplog)) == 1
  # After a restart, the restored step counts as the last save.
  step.assign(7)
  again = make_manager(local_dir, Scale(), step_counter=step,
                       checkpoint_interval=3)
  assert again.restore_or_initialize().endswith('ckpt-7')
  step.assign(8)
  assert again.save(checkpoint_number=8) is None
  step.assign(10)
  assert again.save(checkpoint_number=10).endswith('ckpt-10')


def test_without_the_temp_name_pattern_tf_leftovers_stay(
    monkeypatch, local_dir, scale):
  fake_missing(monkeypatch, 'removal of checkpoint state temporaries')
  fake_missing(monkeypatch, 'removal of checkpoint work directories')
  os.makedirs(os.path.join(local_dir, 'ckpt-5_temp'))
  state_temp = 'checkpoint.tmp' + '0123abcd' * 4
  with open(os.path.join(local_dir, state_temp), 'w') as f:
    f.write('x')
  manager = make_manager(local_dir, scale)
  save_step(manager, scale, 1)
  assert {'ckpt-5_temp', state_temp} <= set(entries(local_dir))
  assert served_value(manager.latest_savedmodel) == 1.0


def test_without_keras_signature_attributes_keras_models_still_export(
    monkeypatch, caplog, local_dir):
  fake_missing(monkeypatch, 'Keras signature checks')
  model = keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(1)])
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model), local_dir, max_to_keep=2,
      modules_to_export={'model': model})
  manager.save(checkpoint_number=1)
  loaded = tf.saved_model.load(os.path.join(manager.latest_savedmodel,
                                            'model'))
  out = loaded.signatures['serving_default'](tf.ones([1, N_FEATURES]))
  assert list(out.values())[0].numpy() == pytest.approx(
      model(tf.ones([1, N_FEATURES])).numpy())
  assert commit.is_published(manager.latest_savedmodel)
  assert len(fallback_warnings(caplog)) == 1
  # A plain tf.Module still needs its own signatures.
  with pytest.raises(ValueError, match='no way to get serving signatures'):
    ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(), local_dir, 1, modules_to_export={
            'plain': tf.Module()})


@pytest.mark.parametrize('missing, full, fast', [(True, 3, 0), (False, 1, 2)])
def test_keras3_fast_exports_or_their_fallback_serve_each_step(
    monkeypatch, caplog, local_dir, missing, full, fast):
  if missing:
    fake_missing(monkeypatch, 'fast exports of Keras 3 models')
  model = keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(1)])
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model), local_dir, max_to_keep=3,
      modules_to_export={'model': model})
  for step in (1, 2, 3):
    for v in model.trainable_variables:
      v.assign(tf.fill(v.shape, float(step)))
    manager.save(checkpoint_number=step)
  exporter = manager._exporter.modules[0]  # pylint: disable=protected-access
  assert (exporter.full_exports, exporter.fast_exports) == (full, fast)
  for step, export_dir in enumerate(manager.savedmodels, start=1):
    loaded = tf.saved_model.load(os.path.join(export_dir, 'model'))
    out, = loaded.signatures['serving_default'](
        tf.ones([1, N_FEATURES])).values()
    assert out.numpy().tolist() == [[step * (N_FEATURES + 1)]]
  warnings = fallback_warnings(caplog)
  assert len(warnings) == int(missing), warnings
  if missing:
    assert 'Keras 3' in warnings[0] and tf.__version__ in warnings[0]
