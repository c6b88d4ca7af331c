"""Linked fast exports: the checkpoint's data shared, never a wrong export.

On local disk, the checkpoint writes the exported variables into a shard of
their own, and a fast export hard-links it beside a small shard with its
object graph and an index of its own (`bundle.py`). These tests prove that
such an export is a standard SavedModel holding exactly what a full export of
the same step holds, that it outlives its checkpoint and survives a copy, that
it holds the module's bytes only, and that whatever cannot be shared falls
back to writing the variables, with the right values.
"""

import logging
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
# pylint: disable=g-direct-tensorflow-import
from tensorflow.python.saved_model import fingerprinting_utils
# pylint: enable=g-direct-tensorflow-import

import ckpt_export
from ckpt_export import commit
from ckpt_export import savedmodel
from ckpt_export import fast_export
from ckpt_export import paths
from helpers import child_env
from helpers import make_manager
from helpers import N_FEATURES
from helpers import steps_of

ASYNC = tf.train.CheckpointOptions(enable_async=True)
OPTIONS = [None, ASYNC]
OPTION_IDS = ['sync', 'async']
SAVED_MODEL_CLI = [sys.executable, '-m',
                   'tensorflow.python.tools.saved_model_cli']
DATA = os.path.join('variables', 'variables.data-00000-of-00002')


class Affine(tf.Module):
  """Serves `x @ w + b`; every weight is `step` once set to `step`."""

  def __init__(self):
    super().__init__()
    self.w = tf.Variable(tf.zeros([N_FEATURES, 3]), name='w')
    self.b = tf.Variable(tf.zeros([3]), name='b')
    self.count = tf.Variable(0, dtype=tf.int64, name='count')

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def serve(self, x):
    return {'y': tf.matmul(x, self.w) + self.b, 'count': self.count + 0}

  @property
  def saved_model_signatures(self):
    return {'serving_default': self.serve}

  def set_step(self, step: int) -> None:
    self.w.assign(tf.fill(self.w.shape, float(step)))
    self.b.assign(tf.fill(self.b.shape, float(step)))
    self.count.assign(step)

  @property
  def nbytes(self) -> int:
    return sum(v.numpy().nbytes for v in self.variables)


def _trained(module: Affine) -> tf_keras.optimizers.Optimizer:
  """An Adam optimizer with slots for the module's float variables."""
  optimizer = tf_keras.optimizers.Adam()
  weights = [module.w, module.b]
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(module.serve(tf.ones([1, N_FEATURES]))['y'])
  optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
  return optimizer


def _manager(model_dir, module, checkpoint=None, max_to_keep=5):
  return make_manager(model_dir, module, max_to_keep, module_name='m',
                      checkpoint=checkpoint or tf.train.Checkpoint(
                          module=module, optimizer=_trained(module)))


def _counts(manager):
  module, = manager._exporter.modules  # pylint: disable=protected-access
  return module.full_exports, module.fast_exports, module.linked_exports


def _served(export_dir: str) -> float:
  loaded = tf.saved_model.load(os.path.join(export_dir, 'm'))
  out = loaded.signatures['serving_default'](tf.ones([1, N_FEATURES]))
  y, count = out['y'].numpy(), int(out['count'].numpy())
  assert (y == y.flat[0]).all(), y
  assert y.flat[0] == count * (N_FEATURES + 1), (y, count)
  return count


def _tensors(prefix: str) -> dict:
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(prefix)}


def _save_steps(manager, module, steps, options=None):
  for step in steps:
    module.set_step(step)
    manager.save(checkpoint_number=step, options=options)
    module.set_step(-1)  # Training overwrites the variables at once.
  manager.sync()


@pytest.mark.parametrize('options', OPTIONS, ids=OPTION_IDS)
def test_a_linked_export_holds_what_a_full_export_holds(
    local_dir, tmp_path, options):
  module = Affine()
  manager = _manager(local_dir, module)
  _save_steps(manager, module, [1, 2, 3], options)
  assert _counts(manager) == (1, 2, 2)
  module.set_step(3)
  full = str(tmp_path / 'full')
  savedmodel.write_module('m', module, full)
  linked = os.path.join(manager.latest_savedmodel, 'm')
  want = _tensors(os.path.join(full, 'variables', 'variables'))
  got = _tensors(os.path.join(linked, 'variables', 'variables'))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if key != '_CHECKPOINTABLE_OBJECT_GRAPH':
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert _served(manager.latest_savedmodel) == 3
  # The checkpoint's own shard of the module's bytes, shared, and only those
  # (not the optimizer's slots).
  checkpoint_data = os.path.join(local_dir, 'ckpt-3.data-00000-of-00002')
  assert os.path.samefile(os.path.join(linked, DATA), checkpoint_data)
  assert os.path.getsize(checkpoint_data) == module.nbytes
  # Its fingerprint is the one TF computes for it.
  ours = tf.saved_model.experimental.read_fingerprint(linked)
  fingerprinting_utils.write_fingerprint(linked)
  assert ours == tf.saved_model.experimental.read_fingerprint(linked)


@pytest.mark.parametrize('options', OPTIONS, ids=OPTION_IDS)
def test_without_optimizer_state_the_checkpoint_has_one_shard_to_share(
    local_dir, tmp_path, options):
  # Beside the module, only the checkpoint's bookkeeping (its object graph,
  # `save_counter` and a step): no shard of their own, and the export links
  # the checkpoint's only shard without referencing them.
  module = Affine()
  step = tf.Variable(0, dtype=tf.int64)
  checkpoint = tf.train.Checkpoint(module=module, step=step)
  manager = _manager(local_dir, module, checkpoint)
  _save_steps(manager, module, [1, 2, 3], options)
  assert _counts(manager) == (1, 2, 2)
  assert sorted(name for name in os.listdir(local_dir)
                if name.startswith('ckpt-3.')) == [
                    'ckpt-3.data-00000-of-00001', 'ckpt-3.index']
  shard = os.path.join(local_dir, 'ckpt-3.data-00000-of-00001')
  linked = os.path.join(manager.latest_savedmodel, 'm')
  assert os.path.samefile(os.path.join(linked, DATA), shard)
  bookkeeping = {name for name, _ in tf.train.list_variables(
      os.path.join(local_dir, 'ckpt-3')) if not name.startswith('module/')}
  assert bookkeeping == {'_CHECKPOINTABLE_OBJECT_GRAPH',
                         'save_counter/.ATTRIBUTES/VARIABLE_VALUE',
                         'step/.ATTRIBUTES/VARIABLE_VALUE'}
  full = str(tmp_path / 'full')
  savedmodel.write_module('m', module, full)
  want = _tensors(os.path.join(full, 'variables', 'variables'))
  got = _tensors(os.path.join(linked, 'variables', 'variables'))
  assert sorted(got) == sorted(want)
  assert _served(manager.latest_savedmodel) == 3
  os.remove(shard)
  assert _served(manager.latest_savedmodel) == 3


@pytest.mark.parametrize('rest', ['slot', 'scalars'])
def test_more_than_bookkeeping_gets_a_shard_of_its_own(local_dir, rest):
  module = Affine()
  if rest == 'slot':  # A non-scalar, as an optimizer's slot.
    extra = {'slot': tf.Variable(tf.zeros([2]))}
  else:  # More scalars than counters.
    counters = fast_export._MAX_COUNTERS  # pylint: disable=protected-access
    extra = {f's{i}': tf.Variable(float(i)) for i in range(counters + 1)}
  manager = _manager(local_dir, module,
                     tf.train.Checkpoint(module=module, **extra))
  _save_steps(manager, module, [1, 2])
  assert _counts(manager) == (1, 1, 1)
  shard = os.path.join(local_dir, 'ckpt-2.data-00000-of-00002')
  assert os.path.getsize(shard) == module.nbytes
  assert os.path.samefile(
      os.path.join(manager.latest_savedmodel, 'm', DATA), shard)
  assert _served(manager.latest_savedmodel) == 2


def test_saved_model_cli_shows_and_runs_a_linked_export(local_dir):
  module = Affine()
  manager = _manager(local_dir, module)
  _save_steps(manager, module, [1, 2])
  assert _counts(manager) == (1, 1, 1)
  linked = os.path.join(manager.latest_savedmodel, 'm')
  env = child_env(tf_log_level='3')
  show = subprocess.run([*SAVED_MODEL_CLI, 'show', '--all', '--dir', linked],
                        capture_output=True, text=True, check=True, env=env)
  assert "signature_def['serving_default']" in show.stdout
  run = subprocess.run(
      [*SAVED_MODEL_CLI, 'run', '--dir', linked, '--tag_set', 'serve',
       '--signature_def', 'serving_default', '--input_exprs',
       f'x=[[{", ".join(["1.0"] * N_FEATURES)}]]'],
      capture_output=True, text=True, check=True, env=env)
  assert f'[[{2 * (N_FEATURES + 1)}.' in run.stdout, run.stdout


def test_a_linked_export_outlives_its_checkpoint_and_survives_a_copy(
    local_dir, tmp_path):
  module = Affine()
  manager = _manager(local_dir, module, max_to_keep=2)
  _save_steps(manager, module, [1, 2, 3])
  exports = manager.savedmodels
  assert steps_of(exports) == [2, 3]
  copy = str(tmp_path / 'copy')
  subprocess.run(['cp', '-r', local_dir, copy], check=True)
  for name in os.listdir(local_dir):
    if name.startswith('ckpt-') and not name.endswith('_saved_modules'):
      os.remove(os.path.join(local_dir, name))
  for export_dir in exports:
    assert _served(export_dir) == paths.parse_export_step(export_dir)
  shutil.rmtree(local_dir)
  copied = ckpt_export.list_savedmodels(copy)
  assert steps_of(copied) == [2, 3]
  for export_dir in copied:
    assert _served(export_dir) == paths.parse_export_step(export_dir)
    assert os.stat(os.path.join(export_dir, 'm', DATA)).st_nlink == 1  # Copied.


@pytest.mark.parametrize('options', OPTIONS, ids=OPTION_IDS)
def test_an_export_is_published_after_its_checkpoint_data_and_before_record(
    local_dir, options):
  module = Affine()
  manager = _manager(local_dir, module)
  seen = []

  def after_export(save_path: str) -> None:
    step = paths.parse_checkpoint_step(save_path)
    state = tf.train.get_checkpoint_state(local_dir)
    export_dir = paths.export_path(local_dir, 'ckpt', step)
    seen.append((step, tf.io.gfile.exists(save_path + '.index'),
                 commit.is_published(export_dir),
                 state is not None and save_path in
                 state.all_model_checkpoint_paths))

  options = tf.train.CheckpointOptions(
      enable_async=bool(options), experimental_write_callbacks=[after_export])
  _save_steps(manager, module, [1, 2, 3], options)
  assert seen == [(1, True, True, False), (2, True, True, False),
                  (3, True, True, False)]
  assert _counts(manager) == (1, 2, 2)


def test_exports_on_ram_write_their_variables():
  ram_dir = f'ram://ckpt_export_test/{uuid.uuid4().hex}/model'
  module = Affine()
  manager = _manager(ram_dir, module)
  _save_steps(manager, module, [1, 2, 3], ASYNC)
  assert _counts(manager) == (1, 2, 0)
  for export_dir in manager.savedmodels:
    assert _served(export_dir) == paths.parse_export_step(export_dir)


def test_a_user_sharding_callback_shards_the_rest(local_dir):
  module = Affine()
  checkpoint = tf.train.Checkpoint(module=module, optimizer=_trained(module))
  manager = _manager(local_dir, module, checkpoint)
  options = tf.train.CheckpointOptions(
      experimental_sharding_callback=(
          tf.train.experimental.MaxShardSizePolicy(max_shard_size=16)))
  _save_steps(manager, module, [1, 2, 3], options)
  assert _counts(manager) == (1, 2, 2)
  for export_dir in manager.savedmodels:
    assert _served(export_dir) == paths.parse_export_step(export_dir)
  assert len(tf.io.gfile.glob(os.path.join(local_dir, 'ckpt-3.data-*'))) > 2
  restored = Affine()
  tf.train.Checkpoint(module=restored, optimizer=_trained(restored)).read(
      os.path.join(local_dir, 'ckpt-3')).assert_existing_objects_matched()
  assert float(restored.b.numpy()[0]) == 3.0


# Fallbacks: what cannot be shared is written, and the export is right.


def test_a_variable_the_checkpoint_does_not_hold_is_written(local_dir):
  module = Affine()
  checkpoint = tf.train.Checkpoint(w=module.w, b=module.b)  # No `count`.
  manager = _manager(local_dir, module, checkpoint)
  _save_steps(manager, module, [1, 2, 3])
  assert _counts(manager) == (1, 2, 0)
  for export_dir in manager.savedmodels:
    assert _served(export_dir) == paths.parse_export_step(export_dir)


def _export_after(exporter, checkpoint, directory, step, sharding_callback):
  """Exports step `step` after a checkpoint written with another sharding."""
  export_dir = paths.export_path(directory, 'ckpt', step)
  exporter.export(export_dir, {'step': step}, after_checkpoint=True)
  options = exporter.checkpoint_options(None, directory)
  options.experimental_sharding_callback = sharding_callback
  checkpoint.write(os.path.join(directory, f'ckpt-{step}'), options=options)
  exporter.wait()
  return export_dir


def _exported_step_1(directory):
  """A module, its checkpoint and exporter, after step 1's full export."""
  module = Affine()
  checkpoint = tf.train.Checkpoint(module=module, optimizer=_trained(module))
  exporter = fast_export.Exporter({'m': module}, checkpoint)
  module.set_step(1)
  exporter.export(paths.export_path(directory, 'ckpt', 1), {'step': 1})
  checkpoint.write(os.path.join(directory, 'ckpt-1'),
                   options=exporter.checkpoint_options(None, directory))
  return module, checkpoint, exporter


@pytest.mark.parametrize('sharding_callback', [
    tf.train.experimental.MaxShardSizePolicy(max_shard_size=32),
    None], ids=['sliced', 'shared_shard'])
def test_a_checkpoint_that_slices_or_mixes_the_variables_is_not_shared(
    local_dir, sharding_callback, caplog):
  caplog.set_level(logging.WARNING, logger='absl')
  module, checkpoint, exporter = _exported_step_1(local_dir)
  module.set_step(2)
  export_dir = _export_after(exporter, checkpoint, local_dir, 2,
                             sharding_callback)
  (module_exporter,) = exporter.modules
  assert (module_exporter.fast_exports, module_exporter.linked_exports) == (
      1, 0)
  assert _served(export_dir) == 2
  if sharding_callback is None:  # It names a slot, not a counter.
    assert "also holds 'optimizer/_variables/" in caplog.text, caplog.text
  module.set_step(3)
  own_shard = exporter.checkpoint_options(None, local_dir)
  export_dir = _export_after(exporter, checkpoint, local_dir, 3,
                             own_shard.experimental_sharding_callback)
  assert module_exporter.linked_exports == 1
  assert _served(export_dir) == 3


def test_the_best_export_copy_holds_the_module_bytes_only(local_dir):
  module = Affine()
  manager = _manager(local_dir, module)
  _save_steps(manager, module, [1, 2])
  best = ckpt_export.BestExport(local_dir, 'accuracy')
  assert best.update(2, manager.latest_savedmodel, {'accuracy': 0.5})
  copied = os.path.join(best.best_export, 'm', DATA)
  assert os.path.getsize(copied) == module.nbytes
  assert _served(best.best_export) == 2


def test_an_async_export_that_cannot_link_reads_its_values_back(local_dir):
  # In async mode a snapshot of the values would cost a copy of the variables
  # at their next update; where the checkpoint holds them, an export that
  # cannot share its data (here: the variables sliced) reads them back.
  module, checkpoint, exporter = _exported_step_1(local_dir)
  module.set_step(2)
  export_dir = paths.export_path(local_dir, 'ckpt', 2)
  exporter.export(export_dir, {'step': 2}, after_checkpoint=True,
                  keep_values=True)
  kept = exporter._deferred[1].args[2]  # pylint: disable=protected-access
  assert kept == [fast_export._IN_CHECKPOINT]  # pylint: disable=protected-access
  options = exporter.checkpoint_options(ASYNC, local_dir)
  options.experimental_sharding_callback = (
      tf.train.experimental.MaxShardSizePolicy(max_shard_size=32))
  checkpoint.write(os.path.join(local_dir, 'ckpt-2'), options=options)
  module.set_step(-1)  # Training goes on while the checkpoint is written.
  checkpoint.sync()
  exporter.wait()
  (module_exporter,) = exporter.modules
  assert (module_exporter.fast_exports, module_exporter.linked_exports) == (
      1, 0)
  assert _served(export_dir) == 2


def test_an_async_export_snapshots_what_the_checkpoint_does_not_hold(
    local_dir):
  module = Affine()
  checkpoint = tf.train.Checkpoint(w=module.w, b=module.b)  # No `count`.
  manager = _manager(local_dir, module, checkpoint)
  _save_steps(manager, module, [1, 2, 3], ASYNC)
  assert _counts(manager) == (1, 2, 0)
  for export_dir in manager.savedmodels:
    assert _served(export_dir) == paths.parse_export_step(export_dir)
