"""Fast exports: right values at every step, standard SavedModels, fall-backs.

A fast export reuses the graph of the module's last full export and writes
only the variables. These tests prove that each one is what a full export of
the same values is, that it serves its own step even though training
overwrites the variables right after `save()` (sync and async), and that any
change of structure gets a full export again.
"""

import functools
import os
import subprocess
import sys
import tempfile
from typing import Optional

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import ckpt_export
from ckpt_export import commit
from ckpt_export import fast_export
from ckpt_export import paths
from ckpt_export import savedmodel
from ckpt_export import writers
from helpers import child_env
from helpers import make_manager
from helpers import N_FEATURES
from helpers import Scale
from helpers import served_value
from helpers import steps_of

ASYNC = tf.train.CheckpointOptions(enable_async=True)
SAVED_MODEL_CLI = [sys.executable, '-m',
                   'tensorflow.python.tools.saved_model_cli']


def _regressor_class(keras_package) -> type:
  """A model of `keras_package` serving `sum(x) * step + step` at `step`."""

  class Regressor(keras_package.Model):

    def __init__(self):
      super().__init__()
      self.dense = keras_package.layers.Dense(1)
      self.serve = tf.function(
          lambda x: {'y': self(x)},
          input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
      self(tf.zeros([1, N_FEATURES]))

    def call(self, inputs):
      return self.dense(inputs)

    @property
    def saved_model_signatures(self):
      return {'serving_default': self.serve}

  return Regressor


KerasRegressor = _regressor_class(tf_keras)
Keras3Regressor = _regressor_class(keras)  # `keras`, which `tf.keras` is.


MODULES = [Scale, KerasRegressor, Keras3Regressor]
MODULE_IDS = ['tf.Module', 'tf_keras', 'keras3']


@functools.lru_cache(maxsize=None)
def _tf_async_error_on_keras3() -> Optional[str]:
  """TF's own error at a Keras 3 model's second async save, or None.

  TF's async checkpoint copies each variable to the CPU in a tf.function, and
  a Keras 3 variable makes a new tf.Variable there: with Keras 3.15 and TF
  2.20 the second async save fails with a plain tf.train.CheckpointManager.
  """
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  with tempfile.TemporaryDirectory() as directory:
    plain = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                       directory, 2)
    try:
      for _ in range(2):
        plain.save(options=ASYNC)
        plain.sync()
    except ValueError as e:
      return str(e)
  return None


def _check_fails_as_tf_does(manager, module) -> None:
  """The second async save raises TF's error; step 1 stays whole."""
  _set_step(module, 1)
  manager.save(checkpoint_number=1, options=ASYNC)
  _set_step(module, 2)
  with pytest.raises(ValueError) as raised:
    manager.save(checkpoint_number=2, options=ASYNC)
    manager.sync()
  assert str(raised.value) == _tf_async_error_on_keras3()
  assert steps_of(manager.savedmodels) == [1]
  assert tf.train.latest_checkpoint(manager.directory).endswith('ckpt-1')
  assert _served_step(manager.latest_savedmodel, module) == 1


def _set_step(module, step: float) -> None:
  for v in module.trainable_variables:
    v.assign(tf.fill(v.shape, float(step)))


def _served_step(export_dir: str, module) -> float:
  """The step a `_set_step` module's export serves (reads its weights)."""
  if isinstance(module, (KerasRegressor, Keras3Regressor)):
    loaded = tf.saved_model.load(os.path.join(export_dir, 'm'))
    y = loaded.signatures['serving_default'](tf.ones([1, N_FEATURES]))['y']
    return float(y.numpy()[0, 0]) / (N_FEATURES + 1)
  return served_value(export_dir, 'm')


def _manager(model_dir, module, max_to_keep=5):
  return make_manager(model_dir, module, max_to_keep, module_name='m')


def _counts(manager):
  module, = manager._exporter.modules  # pylint: disable=protected-access
  return module.full_exports, module.fast_exports


@pytest.mark.parametrize('make_module', MODULES, ids=MODULE_IDS)
@pytest.mark.parametrize('options', [None, ASYNC], ids=['sync', 'async'])
def test_each_export_serves_its_step_despite_an_overwrite_right_after_save(
    model_dir, make_module, options):
  module = make_module()
  manager = _manager(model_dir, module)
  if (make_module is Keras3Regressor and options and
      _tf_async_error_on_keras3()):
    _check_fails_as_tf_does(manager, module)
    return
  for step in range(1, 5):
    _set_step(module, step)
    manager.save(checkpoint_number=step, options=options)
    _set_step(module, -1)  # Training overwrites the variables at once.
  manager.sync()
  assert _counts(manager) == (1, 3)
  assert steps_of(manager.savedmodels) == [1, 2, 3, 4]
  for export_dir in manager.savedmodels:
    assert _served_step(export_dir, module) == paths.parse_export_step(
        export_dir)
  assert manager.restore_or_initialize() == os.path.join(model_dir, 'ckpt-4')
  assert _served_step(manager.latest_savedmodel, module) == 4


def test_an_optimizer_step_right_after_an_async_save_changes_no_export(
    local_dir):
  model = KerasRegressor()
  optimizer = tf_keras.optimizers.SGD(learning_rate=0.5)
  manager = _manager(local_dir, model)
  x = tf.ones([2, N_FEATURES])
  for step in range(1, 5):
    _set_step(model, step)
    manager.save(checkpoint_number=step, options=ASYNC)
    with tf.GradientTape() as tape:  # Updates the variables in place.
      loss = tf.reduce_sum(model(x) ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, model.variables),
                                  model.variables))
  manager.sync()
  assert _counts(manager) == (1, 3)
  for export_dir in manager.savedmodels:
    assert _served_step(export_dir, model) == paths.parse_export_step(
        export_dir)


def _variables(module_dir: str) -> dict:
  # Not tf.train.load_checkpoint: on ram:// it takes the prefix for a folder.
  reader = tf.compat.v1.train.NewCheckpointReader(
      os.path.join(module_dir, 'variables', 'variables'))
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if name != '_CHECKPOINTABLE_OBJECT_GRAPH'}


def test_a_keras3_model_trained_by_fit_gets_fast_exports_of_its_steps(
    model_dir, tmp_path):
  """A Keras 3 Sequential model (signature derived by TF), Adam, `fit`."""
  model = keras.Sequential([keras.Input((N_FEATURES,)),
                            keras.layers.Dense(3), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.Adam(0.1), loss='mse')
  x, y = np.ones([8, N_FEATURES], np.float32), np.full([8, 1], 5.0, np.float32)
  model.fit(x, y, epochs=1, verbose=0)
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model, optimizer=model.optimizer), model_dir,
      5, modules_to_export={'m': model})
  served = {}
  for step in (1, 2, 3):
    model.fit(x, y, epochs=1, verbose=0)
    served[step] = model(x[:1]).numpy()
    manager.save(checkpoint_number=step)
    model.fit(x, y, epochs=1, verbose=0)  # Training goes on at once.
  manager.sync()
  module, = manager._exporter.modules  # pylint: disable=protected-access
  assert (module.full_exports, module.fast_exports) == (1, 2)
  assert module.linked_exports == (2 if '://' not in model_dir else 0)
  for export_dir in manager.savedmodels:
    step = paths.parse_export_step(export_dir)
    loaded = tf.saved_model.load(os.path.join(export_dir, 'm'))
    out, = loaded.signatures['serving_default'](tf.constant(x[:1])).values()
    np.testing.assert_array_equal(out.numpy(), served[step])
  # A full export of step 3's values (the optimizer's too: Keras exports it).
  tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
      manager.latest_checkpoint).assert_existing_objects_matched()
  full = str(tmp_path / 'full')
  savedmodel.write_module('m', model, full)
  want = _variables(full)
  got = _variables(os.path.join(manager.latest_savedmodel, 'm'))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize('make_module', MODULES, ids=MODULE_IDS)
def test_a_fast_export_has_the_files_of_a_full_export(tmp_path, make_module):
  module = make_module()
  _set_step(module, 3)
  exporter = fast_export.ModuleExporter('m', module)
  exporter.write_full(str(tmp_path / 'full'))
  exporter.write_fast(str(tmp_path / 'fast'), exporter.snapshot())
  full, fast = tmp_path / 'full' / 'm', tmp_path / 'fast' / 'm'
  assert sorted(p.relative_to(full) for p in full.rglob('*')) == sorted(
      p.relative_to(fast) for p in fast.rglob('*'))
  for name in ('saved_model.pb', 'variables/variables.index',
               'variables/variables.data-00000-of-00001'):
    assert (full / name).read_bytes() == (fast / name).read_bytes(), name
  fingerprints = [tf.saved_model.experimental.read_fingerprint(str(d))
                  for d in (full, fast)]
  assert fingerprints[0] == fingerprints[1]


def test_the_fingerprint_follows_the_variables(tmp_path, scale):
  exporter = fast_export.ModuleExporter('m', scale)
  exporter.write_full(str(tmp_path / '1'))
  scale.w.assign(tf.fill([N_FEATURES], 2.0))
  exporter.write_fast(str(tmp_path / '2'), exporter.snapshot())
  first, second = (tf.saved_model.experimental.read_fingerprint(
      str(tmp_path / step / 'm')) for step in ('1', '2'))
  assert first.saved_model_checksum == second.saved_model_checksum
  assert first.checkpoint_hash != second.checkpoint_hash
  exporter.write_full(str(tmp_path / '3'))
  full = tf.saved_model.experimental.read_fingerprint(str(tmp_path / '3' / 'm'))
  for field in ('checkpoint_hash', 'graph_def_program_hash',
                'signature_def_hash', 'saved_object_graph_hash'):
    assert getattr(full, field) == getattr(second, field), field


def test_saved_model_cli_shows_a_fast_export(local_dir, scale):
  manager = _manager(local_dir, scale)
  for step in (1, 2):
    _set_step(scale, step)
    manager.save(checkpoint_number=step)
  assert _counts(manager) == (1, 1)
  out = subprocess.run(
      [*SAVED_MODEL_CLI, 'show', '--all', '--dir',
       os.path.join(manager.latest_savedmodel, 'm')],
      capture_output=True, text=True, check=True,
      env=child_env(tf_log_level='3'))
  assert "signature_def['serving_default']" in out.stdout
  assert f'shape: (-1, {N_FEATURES})' in out.stdout


# Structure changes: each gets a full export, and the export is right.


class Growing(tf.Module):
  """A module that gains state and functions during training."""

  def __init__(self):
    super().__init__()
    self.w = tf.Variable(tf.zeros([N_FEATURES]))
    self.extra_signatures = {}

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def serve(self, x):
    return {'y': x * self.w}

  @tf.function
  def scale_any(self, x):
    return x * self.w[0]

  @property
  def saved_model_signatures(self):
    return dict({'serving_default': self.serve}, **self.extra_signatures)


def _save(manager, module, step, options=None):
  module.w.assign(tf.fill([N_FEATURES], float(step)))
  manager.save(checkpoint_number=step, options=options)
  module.w.assign(tf.fill([N_FEATURES], -1.0))
  manager.sync()
  return tf.saved_model.load(os.path.join(manager.latest_savedmodel, 'm'))


# (full, fast) exports after each save of the test below. In async mode a
# full export is traced in the checkpoint's write callback, and becomes the
# template only if no function but those with an input_signature traced
# during it: the first save after a new trace of `scale_any` traces it once
# more itself, so the export after it is traced again.
_STRUCTURE_COUNTS = {
    'sync': [(1, 0), (1, 1), (2, 1), (3, 1), (4, 1), (4, 2), (4, 3)],
    'async': [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0), (6, 1)],
}


@pytest.mark.parametrize('mode', ['sync', 'async'])
def test_structure_changes_get_full_exports(local_dir, mode):
  options = ASYNC if mode == 'async' else None
  counts = []
  module = Growing()
  module.scale_any(tf.ones([2]))
  manager = _manager(local_dir, module)
  _save(manager, module, 1, options)
  counts.append(_counts(manager))
  _save(manager, module, 2, options)
  counts.append(_counts(manager))

  module.bias = tf.Variable(7.0)  # A new variable.
  loaded = _save(manager, module, 3, options)
  counts.append(_counts(manager))
  assert float(loaded.bias.numpy()) == 7.0

  module.extra_signatures['double'] = tf.function(  # A new signature.
      lambda x: {'y': 2.0 * x * module.w},
      input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  loaded = _save(manager, module, 4, options)
  counts.append(_counts(manager))
  assert sorted(loaded.signatures) == ['double', 'serving_default']
  y = loaded.signatures['double'](tf.ones([1, N_FEATURES]))['y']
  assert y.numpy().tolist() == [[8.0] * N_FEATURES]

  module.scale_any(tf.ones([3, 3]))  # A retrace with other shapes.
  loaded = _save(manager, module, 5, options)
  counts.append(_counts(manager))
  assert loaded.scale_any(tf.ones([3, 3])).numpy().tolist() == [[5.0] * 3] * 3

  for step in (6, 7):
    loaded = _save(manager, module, step, options)
    counts.append(_counts(manager))
    assert loaded.scale_any(tf.ones([2])).numpy().tolist() == [step] * 2
    assert loaded.scale_any(tf.ones([3, 3])).numpy().tolist() == [
        [step] * 3] * 3
    assert float(loaded.bias.numpy()) == 7.0
  assert counts == _STRUCTURE_COUNTS[mode]


class WithTable(tf.Module):
  """A module with state that is not a plain variable: a mutable table."""

  def __init__(self):
    super().__init__()
    self.w = tf.Variable(tf.zeros([N_FEATURES]))
    self.table = tf.lookup.experimental.MutableHashTable(
        tf.string, tf.float32, default_value=-1.0)

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def __call__(self, x):
    return x * self.w + self.table.lookup(tf.constant('step'))

  @property
  def saved_model_signatures(self):
    return {'serving_default': self.__call__}


def test_modules_with_other_state_always_get_full_exports(local_dir):
  module = WithTable()
  manager = _manager(local_dir, module)
  for step in (1, 2, 3):
    module.w.assign(tf.fill([N_FEATURES], float(step)))
    module.table.insert(tf.constant(['step']), tf.constant([float(step)]))
    manager.save(checkpoint_number=step)
  assert _counts(manager) == (3, 0)
  for export_dir in manager.savedmodels:
    assert served_value(export_dir, 'm') == 2 * paths.parse_export_step(
        export_dir)


# Errors and recovery.


def _failing_name(directory: str) -> str:
  """A checkpoint name whose step-10**11 export cannot be staged (too long).

  Checkpoint files and the published export still fit in a file name; the
  work directory `.<name>-<step>_saved_modules.tmp-<token>` does not for a
  12-digit step, but does for step 1. A real error, from the file system.
  """
  # pylint: disable=protected-access
  work = writers.work_dir(paths.export_path(directory, 'c', 1), 'tmp',
                          writers.new_token())
  # pylint: enable=protected-access
  return 'c' * (256 - len(os.path.basename(work)) - 5)


def test_a_failed_background_export_is_raised_and_its_checkpoint_dropped(
    local_dir, scale):
  name = _failing_name(local_dir)
  manager = make_manager(local_dir, scale, 5, module_name='m',
                         checkpoint_name=name)
  _set_step(scale, 1)
  manager.save(checkpoint_number=1)
  bad_step = 10**11
  _set_step(scale, 2)
  manager.save(checkpoint_number=bad_step, options=ASYNC)
  with pytest.raises(tf.errors.InvalidArgumentError, match='too long'):
    manager.sync()
  manager.sync()  # Raised once only.
  assert [paths.parse_checkpoint_step(p, name)
          for p in manager.checkpoints] == [1]
  assert tf.train.latest_checkpoint(local_dir).endswith(f'{name}-1')
  assert not any(str(bad_step) in entry for entry in os.listdir(local_dir))
  _set_step(scale, 3)
  manager.save(checkpoint_number=3, options=ASYNC)  # Saving goes on.
  manager.sync()
  assert [paths.parse_export_step(p, name) for p in manager.savedmodels] == [
      1, 3]
  assert served_value(manager.latest_savedmodel, 'm') == 3


def test_a_failed_background_export_is_raised_by_the_next_save(
    local_dir, scale):
  name = _failing_name(local_dir)
  manager = make_manager(local_dir, scale, 5, module_name='m',
                         checkpoint_name=name)
  manager.save(checkpoint_number=1)
  manager.save(checkpoint_number=10**11, options=ASYNC)
  with pytest.raises(tf.errors.InvalidArgumentError, match='too long'):
    manager.save(checkpoint_number=2, options=ASYNC)
  manager.save(checkpoint_number=3, options=ASYNC)
  manager.sync()
  assert [paths.parse_checkpoint_step(p, name)
          for p in manager.checkpoints] == [1, 3]


def test_restore_exports_a_checkpoint_that_has_none(local_dir, scale):
  plain = tf.train.CheckpointManager(tf.train.Checkpoint(module=scale),
                                     local_dir, 3)
  _set_step(scale, 4)
  plain.save(checkpoint_number=4)
  _set_step(scale, 0)
  restored = Scale()
  manager = _manager(local_dir, restored)
  assert manager.restore_or_initialize() == os.path.join(local_dir, 'ckpt-4')
  assert steps_of(manager.savedmodels) == [4]
  assert served_value(manager.latest_savedmodel, 'm') == 4
  assert commit.has_commit_marker(manager.latest_savedmodel)


_EXIT_WITHOUT_SYNC = '''
import sys
import tensorflow as tf
from helpers import make_manager, N_FEATURES, Scale
scale = Scale()
manager = make_manager(sys.argv[1], scale, 5, module_name='m')
options = tf.train.CheckpointOptions(enable_async=True)
for step in (1, 2, 3):
  scale.w.assign(tf.fill([N_FEATURES], float(step)))
  manager.save(checkpoint_number=step, options=options)
  scale.w.assign(tf.fill([N_FEATURES], -1.0))
'''


def test_an_async_export_completes_when_the_process_exits_without_sync(
    local_dir):
  subprocess.run([sys.executable, '-c', _EXIT_WITHOUT_SYNC, local_dir],
                 check=True, env=child_env(tf_log_level='3'))
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [1, 2, 3]
  assert [paths.parse_checkpoint_step(p) for p in tf.train.get_checkpoint_state(
      local_dir).all_model_checkpoint_paths] == [1, 2, 3]
  for export_dir in ckpt_export.list_savedmodels(local_dir):
    assert served_value(export_dir, 'm') == paths.parse_export_step(export_dir)
