"""SavedModelCheckpointManager: parity with the reference's API, and correctness."""

import inspect
import os
import threading
import time

import keras
import pytest
import tensorflow as tf
import tf_keras

import ckpt_export
from ckpt_export import commit
from ckpt_export import housekeeping
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import writers
from helpers import entries
from helpers import make_manager
from helpers import N_FEATURES
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import steps_of




def _checkpoint_steps(model_dir):
  return sorted(paths.parse_checkpoint_step(n[:-len('.index')])
                for n in entries(model_dir) if n.endswith('.index'))


# Drop-in parity.


def test_public_names_match_the_reference(reference):
  assert issubclass(ckpt_export.SavedModelCheckpointManager,
                    tf.train.CheckpointManager)
  assert ckpt_export.SAVED_MODULES_PATH_SUFFIX == reference.SAVED_MODULES_PATH_SUFFIX
  for name in ('ckpt-3', '/a/b/ckpt-3', 'gs://b/ckpt-3'):
    assert (ckpt_export.make_saved_modules_directory_name(name) ==
            reference.make_saved_modules_directory_name(name))


def test_constructor_and_methods_match_the_reference(reference):
  ours = inspect.signature(ckpt_export.SavedModelCheckpointManager.__init__)
  theirs = inspect.signature(reference.SavedModelCheckpointManager.__init__)
  assert [(p.name, p.default) for p in ours.parameters.values()] == [
      (p.name, p.default) for p in theirs.parameters.values()]
  for name, member in vars(reference.SavedModelCheckpointManager).items():
    if name.startswith('_'):
      continue
    ours_member = getattr(ckpt_export.SavedModelCheckpointManager, name)
    assert isinstance(ours_member, property) == isinstance(member, property), name
    if callable(member):
      ref_params = list(inspect.signature(member).parameters)
      our_params = list(inspect.signature(ours_member).parameters)
      assert our_params[:len(ref_params)] == ref_params, name


# Exports: content, retention, order.


def test_each_export_serves_the_values_of_its_own_step(model_dir, scale):
  manager = make_manager(model_dir, scale, max_to_keep=3)
  for step in (1, 2, 3):
    path = save_step(manager, scale, step)
    assert path == os.path.join(model_dir, f'ckpt-{step}')
  assert steps_of(manager.savedmodels) == [1, 2, 3]
  for export_dir in manager.savedmodels:
    assert served_value(export_dir) == paths.parse_export_step(export_dir)


def test_max_to_keep_leaves_exactly_the_kept_directories(model_dir, scale):
  manager = make_manager(model_dir, scale, max_to_keep=2)
  for step in range(1, 6):
    save_step(manager, scale, step)
  manager.sync()
  assert entries(model_dir) == [
      'checkpoint',
      'ckpt-4.data-*', 'ckpt-4.index', 'ckpt-4_saved_modules',
      'ckpt-5.data-*', 'ckpt-5.index', 'ckpt-5_saved_modules']
  assert entries(manager.latest_savedmodel) == sorted(
      ['scale', paths.COMMIT_MARKER])
  assert manager.latest_savedmodel == ckpt_export.make_saved_modules_directory_name(
      manager.latest_checkpoint)


def test_savedmodels_are_in_step_order_after_a_restart(model_dir, scale):
  manager = make_manager(model_dir, scale, max_to_keep=3)
  for step in (9, 10, 100):  # Listing order: 10, 100, 9.
    save_step(manager, scale, step)
  restarted = make_manager(model_dir, Scale(), max_to_keep=3)
  assert steps_of(restarted.savedmodels) == [9, 10, 100]
  assert steps_of([restarted.latest_savedmodel]) == [100]
  assert steps_of(restarted.get_existing_savedmodels()) == [9, 10, 100]
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [9, 10, 100]


def test_savedmodels_lists_only_the_managed_checkpoints(local_dir, scale):
  other = make_manager(local_dir, scale, 5, checkpoint_name='other')
  save_step(other, scale, 1)
  manager = make_manager(local_dir, scale)
  save_step(manager, scale, 2)
  assert steps_of(manager.savedmodels) == [2]
  assert steps_of(make_manager(local_dir, Scale()).savedmodels) == [2]
  assert steps_of(other.savedmodels) == [1]


def test_saving_a_step_again_replaces_its_export(model_dir, scale):
  manager = make_manager(model_dir, scale)
  save_step(manager, scale, 1)
  save_step(manager, scale, 2)
  # A job restored to step 1 trains to step 2 again, with other values.
  restarted = make_manager(model_dir, scale)
  scale.w.assign(tf.fill([N_FEATURES], 42.0))
  restarted.save(checkpoint_number=2)
  assert steps_of(restarted.savedmodels) == [1, 2]
  assert served_value(restarted.latest_savedmodel) == 42.0
  assert not [n for n in entries(model_dir) if 'saved_modules' in n and
              paths.parse_export_step(n) is None]


def test_checkpoints_kept_every_n_hours_keep_their_exports(local_dir, scale):
  manager = make_manager(local_dir, scale, max_to_keep=1,
                         keep_checkpoint_every_n_hours=1e-9)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  assert _checkpoint_steps(local_dir) == [1, 2, 3]
  assert steps_of(manager.get_existing_savedmodels()) == [1, 2, 3]
  assert steps_of(manager.savedmodels) == [3]
  for export_dir in manager.get_existing_savedmodels():
    assert served_value(export_dir) == paths.parse_export_step(export_dir)


def test_async_checkpointing_keeps_every_export(local_dir):
  # A checkpoint large enough that its write is still in flight after save().
  big = Scale()
  big.payload = tf.Variable(tf.zeros([4_000_000]))
  manager = make_manager(local_dir, big, max_to_keep=2)
  options = tf.train.CheckpointOptions(enable_async=True)
  for step in (1, 2, 3):
    save_step(manager, big, step, options=options)
    big.w.assign(tf.fill([N_FEATURES], -1.0))  # Training goes on at once.
    manager.sync()
    assert steps_of([manager.latest_savedmodel]) == [step]
    assert served_value(manager.latest_savedmodel) == step
  assert _checkpoint_steps(local_dir) == [2, 3]
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [2, 3]
  assert steps_of(manager.savedmodels) == [2, 3]


def test_checkpoint_interval_saves_at_the_same_steps_as_the_base_class(tmp_path):
  def run(cls, directory, **kwargs):
    module = Scale()
    step = tf.Variable(0, dtype=tf.int64)
    manager = cls(tf.train.Checkpoint(module=module, step=step), directory,
                  max_to_keep=None, step_counter=step, checkpoint_interval=3,
                  **kwargs)
    saved = []
    for i in range(1, 11):
      step.assign(i)
      if manager.save(checkpoint_number=step, check_interval=i != 7):
        saved.append(i)
    manager.save(checkpoint_number=step)  # Same step again: skipped.
    return saved, manager
  base_saved, _ = run(tf.train.CheckpointManager, str(tmp_path / 'base'))
  saved, manager = run(ckpt_export.SavedModelCheckpointManager,
                       str(tmp_path / 'ours'),
                       modules_to_export={'scale': Scale()})
  assert saved == base_saved == [1, 4, 7, 10]
  assert steps_of(manager.savedmodels) == saved


def test_default_numbering_follows_the_save_counter(model_dir, scale):
  manager = make_manager(model_dir, scale, max_to_keep=5)
  assert manager.save().endswith('ckpt-1')
  assert manager.save().endswith('ckpt-2')
  assert manager.save(checkpoint_number=tf.Variable(10, dtype=tf.int64)).endswith(
      'ckpt-10')
  assert manager.save().endswith('ckpt-4')
  assert steps_of(manager.savedmodels) == [1, 2, 4, 10]


def test_without_modules_only_checkpoints_are_written(model_dir, scale):
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=scale), model_dir, 2)
  manager.save()
  assert entries(model_dir) == ['checkpoint', 'ckpt-1.data-*',
                                'ckpt-1.index']
  assert manager.savedmodels == [] and manager.latest_savedmodel is None


def test_restore_or_initialize_restores_the_latest_checkpoint(local_dir, scale):
  manager = make_manager(local_dir, scale)
  save_step(manager, scale, 4)
  fresh = Scale()
  restarted = make_manager(local_dir, fresh)
  assert restarted.restore_or_initialize().endswith('ckpt-4')
  assert float(fresh.w[0]) == 4.0
  calls = []
  empty = make_manager(local_dir + '_empty', Scale(),
                       init_fn=lambda: calls.append(1))
  assert empty.restore_or_initialize() is None and calls == [1]


# Module kinds.


class _TfKerasRegressor(tf_keras.Model):
  """A tf_keras subclassed model with the reference's signature convention."""

  def __init__(self):
    super().__init__()
    self.dense = tf_keras.layers.Dense(2)

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES])])
  def call(self, inputs):
    return self.dense(inputs)

  @property
  def saved_model_signatures(self):
    return {'serving_default': self.call}


def _tf_keras_functional():
  inputs = tf_keras.Input((N_FEATURES,))
  return tf_keras.Model(inputs, tf_keras.layers.Dense(3)(inputs))


def _keras3_sequential():
  return keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(3)])


@pytest.mark.parametrize('make_module', [
    Scale, _TfKerasRegressor, _tf_keras_functional, _keras3_sequential],
                         ids=['tf.Module', 'tf_keras-subclass',
                              'tf_keras-functional', 'keras3'])
def test_exports_tf_modules_tf_keras_and_keras3_models(model_dir, make_module):
  module = make_module()
  x = tf.random.stateless_normal([5, N_FEATURES], seed=[1, 2])
  expected = module(x)
  manager = make_manager(model_dir, module, 1, module_name='m')
  manager.save()
  loaded = tf.saved_model.load(os.path.join(manager.latest_savedmodel, 'm'))
  outputs = loaded.signatures['serving_default'](tf.constant(x))
  assert len(outputs) == 1
  assert list(outputs.values())[0].numpy() == pytest.approx(expected.numpy())


# Bad input: a clear ValueError naming the value, nothing written.


@pytest.mark.parametrize('bad', [0, -1, '3', 2.5, True])
def test_bad_max_to_keep(local_dir, scale, bad):
  with pytest.raises(ValueError, match=f'max_to_keep.*{bad!r}'):
    make_manager(local_dir, scale, max_to_keep=bad)
  assert not os.path.exists(local_dir)


@pytest.mark.parametrize('bad', ['', 'a/b', '..', '.', paths.COMMIT_MARKER, 7])
def test_bad_module_names(local_dir, scale, bad):
  with pytest.raises(ValueError, match='module name') as info:
    ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(), local_dir, 1, modules_to_export={bad: scale})
  assert repr(bad) in str(info.value)
  assert not os.path.exists(local_dir)


@pytest.mark.parametrize('bad', ['', 'a/b', '..'])
def test_bad_checkpoint_names(local_dir, scale, bad):
  with pytest.raises(ValueError, match='checkpoint_name') as info:
    make_manager(local_dir, scale, checkpoint_name=bad)
  assert repr(bad) in str(info.value)


def test_module_with_no_way_to_get_signatures(local_dir):
  class NoSignature(tf.Module):
    def __init__(self):
      super().__init__()
      self.v = tf.Variable(1.0)
  with pytest.raises(ValueError, match="'plain'.*NoSignature.*signatures"):
    ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(), local_dir, 1,
        modules_to_export={'plain': NoSignature()})
  with pytest.raises(ValueError, match="'fn'.*function"):
    ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(), local_dir, 1, modules_to_export={'fn': len})
  with pytest.raises(ValueError, match='mapping'):
    ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(), local_dir, 1, modules_to_export=[Scale()])
  assert not os.path.exists(local_dir)


def test_unbuilt_keras_model_fails_at_save_and_writes_nothing(local_dir, scale):
  unbuilt = tf_keras.Sequential([tf_keras.layers.Dense(2)])
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=scale), local_dir, 2,
      modules_to_export={'scale': scale, 'unbuilt': unbuilt})
  with pytest.raises(ValueError, match="'unbuilt'.*no serving signature"):
    manager.save()
  assert entries(local_dir) == []
  unbuilt(tf.zeros([1, 3]))  # Built now: the next save works.
  manager.save()  # The failed save did not count: this is step 1.
  assert steps_of(manager.savedmodels) == [1]


@pytest.mark.parametrize('bad', [1.5, '3', -1, True, tf.constant(2.0),
                                 tf.constant([1, 2])])
def test_bad_checkpoint_number(model_dir, scale, bad):
  manager = make_manager(model_dir, scale)
  save_step(manager, scale, 1)
  before = entries(model_dir)
  with pytest.raises(ValueError, match='checkpoint_number'):
    manager.save(checkpoint_number=bad)
  assert entries(model_dir) == before
  assert served_value(manager.latest_savedmodel) == 1.0


def test_failed_checkpoint_write_publishes_no_export(local_dir, scale):
  manager = make_manager(local_dir, scale)
  save_step(manager, scale, 1)
  before = entries(local_dir)
  with pytest.raises(Exception):
    save_step(manager, scale, 2, options=tf.train.CheckpointOptions(
        experimental_io_device='/job:nowhere/device:CPU:0'))
  assert entries(local_dir) == before
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [1]



def test_restart_after_a_kill_mid_deletion_leaves_no_leftovers(local_dir,
                                                               scale):
  """Killed while TF deleted the oldest checkpoint: its index was gone."""
  manager = make_manager(local_dir, scale, max_to_keep=3)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  # What a save of step 3 with max_to_keep=2 leaves if killed in TF's sweep:
  # the state file already updated, the index of step 1 removed, not its data.
  tf.__internal__.train.update_checkpoint_state(
      local_dir, os.path.join(local_dir, 'ckpt-3'),
      [os.path.join(local_dir, f'ckpt-{s}') for s in (2, 3)],
      all_model_checkpoint_timestamps=[time.time()] * 2)
  os.remove(os.path.join(local_dir, 'ckpt-1.index'))
  restarted = make_manager(local_dir, Scale(), max_to_keep=2)
  assert restarted.restore_or_initialize() == os.path.join(local_dir,
                                                           'ckpt-3')
  assert entries(local_dir) == [
      'checkpoint', 'ckpt-2.data-*', 'ckpt-2.index',
      'ckpt-2_saved_modules', 'ckpt-3.data-*', 'ckpt-3.index',
      'ckpt-3_saved_modules']
  assert steps_of(restarted.savedmodels) == [2, 3]


def test_failed_save_spares_its_export_while_a_reader_holds_it(local_dir,
                                                               scale):
  manager = make_manager(local_dir, scale)
  save_step(manager, scale, 1)
  export_dir = paths.export_path(local_dir, 'ckpt', 2)
  held = []

  def reader_then_failure():
    # A reader leases the new export just before the checkpoint write fails.
    held.append(leases.acquire(export_dir))
    raise RuntimeError('checkpoint write failed')

  with pytest.raises(RuntimeError, match='checkpoint write failed'):
    save_step(manager, scale, 2, options=tf.train.CheckpointOptions(
        experimental_write_callbacks=[reader_then_failure]))
  assert held[0] is not None
  assert served_value(export_dir) == 2  # Still there for its reader.
  assert steps_of(manager.savedmodels) == [1]
  held[0].release()
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [1]

# Names, paths, and what is not ours.


@pytest.mark.parametrize('dirname, checkpoint_name', [
    ('plain', 'my.model'), ('plain/', 'ckpt-v2'), ('with space/', 'saved_modules'),
    ('plain', 'ck(1)'), ('dir{x}*?/', 'a*b?'), ('dir*?', 'ckpt'),
    ('ram://{uid}/model/', 'my.model'), ('ram://{uid}/model', 'ckpt-v2')])
def test_any_legal_names_and_trailing_separators(tmp_path, dirname,
                                                 checkpoint_name):
  if dirname.startswith('ram://'):
    model_dir = dirname.format(uid=tmp_path.name)
  else:
    model_dir = str(tmp_path) + '/' + dirname
  scale = Scale()
  manager = make_manager(model_dir, scale, max_to_keep=2,
                         checkpoint_name=checkpoint_name)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  assert steps_of(manager.savedmodels) == [2, 3]
  assert manager.get_savedmodel_number_from_path(manager.latest_savedmodel) == 3
  assert served_value(manager.latest_savedmodel) == 3.0
  on_disk = steps_of(ckpt_export.list_savedmodels(model_dir, checkpoint_name))
  checkpointed = sorted(
      paths.parse_checkpoint_step(n[:-len('.index')], checkpoint_name)
      for n in entries(model_dir) if n.endswith('.index'))
  # An export lives exactly as long as its checkpoint. TF's own sweep deletes
  # by glob, so it keeps old checkpoints whose path has * or ?.
  assert on_disk == checkpointed
  if not set('*?') & set(model_dir + checkpoint_name):
    assert on_disk == [2, 3]


@pytest.mark.parametrize('directory, checkpoint_name', [
    ('dir[1]', 'ckpt'), ('dir', 'ckpt[1]')])
def test_names_tensorflow_cannot_read_back_are_refused(tmp_path, directory,
                                                       checkpoint_name):
  with pytest.raises(ValueError, match=r"contains '\['"):
    make_manager(str(tmp_path / directory), Scale(),
                 checkpoint_name=checkpoint_name)
  assert not os.path.exists(tmp_path / directory)


def test_garbage_collection_never_touches_what_is_not_ours(local_dir, scale):
  os.makedirs(local_dir)
  users = ['ckpt-1_saved_modules',            # A directory with an export's name.
           'ckpt-1_saved_modules_backup', 'ckpt-x_saved_modules', 'notes.txt',
           'ckpt-9_saved_modules_temp']
  for name in users:
    if name.endswith('.txt'):
      open(os.path.join(local_dir, name), 'w').close()
    else:
      os.makedirs(os.path.join(local_dir, name, 'inner'))
  open(os.path.join(local_dir, 'ckpt-3_saved_modules'), 'w').close()  # A file.
  manager = make_manager(local_dir, scale, max_to_keep=1)
  for step in (2, 4, 5):
    save_step(manager, scale, step)
  for name in users + ['ckpt-3_saved_modules']:
    assert os.path.exists(os.path.join(local_dir, name)), name
  assert os.path.isdir(os.path.join(local_dir, 'ckpt-1_saved_modules', 'inner'))
  # Its own export slot taken by a user's file: a clear error, nothing lost.
  with pytest.raises(ValueError, match='ckpt-3_saved_modules.*not an export'):
    save_step(manager, scale, 3)
  assert os.path.isfile(os.path.join(local_dir, 'ckpt-3_saved_modules'))
  assert steps_of(manager.savedmodels) == [5]


def test_reads_exports_the_reference_wrote(local_dir, reference):
  module = Scale()
  module.w.assign(tf.fill([N_FEATURES], 7.0))
  ref = reference.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=module), local_dir, 3,
      modules_to_export={'scale': module})
  ref.save(checkpoint_number=7)
  ref.save(checkpoint_number=8)
  ours = make_manager(local_dir, Scale(), max_to_keep=3)
  assert steps_of(ours.savedmodels) == [7, 8]
  assert steps_of([ours.wait_for_new_savedmodel(timeout=0)]) == [7]
  assert served_value(ckpt_export.latest_savedmodel(local_dir)) == 7.0
  # A re-save of step 8 replaces the reference's export with ours.
  ours.save(checkpoint_number=8)
  assert served_value(ours.latest_savedmodel) == 0.0


def test_the_reference_reads_exports_ckpt_export_wrote(local_dir, scale,
                                                       reference):
  manager = make_manager(local_dir, scale, max_to_keep=3)
  for step in (3, 4):
    save_step(manager, scale, step)
  ref = reference.SavedModelCheckpointManager(
      tf.train.Checkpoint(module=Scale()), local_dir, 3,
      modules_to_export={'scale': Scale()})
  assert sorted(ref.get_existing_savedmodels()) == manager.savedmodels
  first = ref.wait_for_new_savedmodel(timeout=0.5, seconds_to_sleep=0.1)
  assert ref.get_savedmodel_number_from_path(first) == 3
  assert served_value(first) == 3.0


def test_crash_leftovers_are_removed_on_restore_and_save(local_dir, scale):
  manager = make_manager(local_dir, scale)
  save_step(manager, scale, 1)
  leftovers = {
      # TF's checkpoint work directory of a write killed midway.
      'ckpt-2_temp': 'part-00000-of-00001.index.tempstate123',
      # ckpt_export's work directory of an export killed midway, written by
      # a process (pid 999999999) that no longer runs.
      '.ckpt-2_saved_modules.tmp-1-999999999-' + writers.HOST + '-0123abcd':
          'scale',
  }
  kept = {'ckpt-2_saved_modules_temp': 'x',   # The reference's: not ours.
          'other-2_temp': 'x'}                # Another checkpoint name's.
  for name, child in {**leftovers, **kept}.items():
    os.makedirs(os.path.join(local_dir, name))
    open(os.path.join(local_dir, name, child), 'w').close()
  # TF's temporary checkpoint state file of a write killed midway; a file
  # named otherwise is not TF's.
  state_temp, not_tf = 'checkpoint.tmp' + '0123abcd' * 4, 'checkpoint.tmp-x'
  for name in (state_temp, not_tf):
    open(os.path.join(local_dir, name), 'w').close()
  restarted = make_manager(local_dir, Scale())
  restarted.restore_or_initialize()
  assert not (set(leftovers) | {state_temp}) & set(entries(local_dir))
  assert set(kept) | {not_tf} <= set(entries(local_dir))
  os.makedirs(os.path.join(local_dir, 'ckpt-3_temp'))
  save_step(restarted, scale, 2)
  restarted.sync()
  assert 'ckpt-3_temp' not in entries(local_dir)
  assert steps_of(restarted.savedmodels) == [1, 2]


# Housekeeping.


class _HeldRemoval:
  """`commit.remove_now`, held back until `release()`; records its threads."""

  def __init__(self, monkeypatch):
    self._real = commit.remove_now
    self._go = threading.Event()
    self.started = threading.Event()
    self.threads = []
    monkeypatch.setattr(commit, 'remove_now', self)

  def __call__(self, doomed, token):
    self.threads.append(threading.current_thread().name)
    self.started.set()
    assert self._go.wait(60), 'never released'
    return self._real(doomed, token)

  def release(self):
    self._go.set()


def test_an_old_export_is_unpublished_by_save_and_removed_off_its_thread(
    local_dir, scale, monkeypatch):
  manager = make_manager(local_dir, scale, max_to_keep=1)
  save_step(manager, scale, 1)
  manager.sync()
  held = _HeldRemoval(monkeypatch)
  save_step(manager, scale, 2)  # Returns while the removal is held.
  assert held.started.wait(60)
  names = entries(local_dir)
  # Gone for readers when save() returns, as with the reference.
  assert [n for n in names if n.endswith('_saved_modules')] == [
      'ckpt-2_saved_modules']
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [2]
  removing = [n for n in names if n.startswith('.ckpt-1_saved_modules.del-')]
  assert len(removing) == 1, names
  # Another housekeeping pass leaves the tree being removed alone.
  housekeeping.collect(local_dir, 'ckpt', lambda names, steps: steps)
  assert removing[0] in entries(local_dir)
  releaser = threading.Timer(0.3, held.release)
  releaser.start()
  manager.sync()  # Waits for the removal.
  releaser.join(60)
  assert held.threads == ['ckpt_export-removal']
  assert [n for n in entries(local_dir) if 'saved_modules' in n] == [
      'ckpt-2_saved_modules']
  assert served_value(manager.latest_savedmodel) == 2.0


def test_a_failed_removal_is_logged_and_done_by_the_next_pass(
    local_dir, scale, monkeypatch, caplog):
  manager = make_manager(local_dir, scale, max_to_keep=1)
  save_step(manager, scale, 1)
  real = commit.remove_tree

  def refuse_deleted_exports(path):
    if '.del-' in path:
      raise tf.errors.PermissionDeniedError(None, None, 'refused by the test')
    real(path)

  monkeypatch.setattr(commit, 'remove_tree', refuse_deleted_exports)
  save_step(manager, scale, 2)
  manager.sync()
  assert 'refused by the test' in caplog.text
  assert [n for n in entries(local_dir) if 'ckpt-1_saved_modules' in n]
  monkeypatch.undo()
  save_step(manager, scale, 3)  # Its recovery removes what is left.
  manager.sync()
  assert [n for n in entries(local_dir) if 'saved_modules' in n] == [
      'ckpt-3_saved_modules']


def test_housekeeping_never_deletes_a_leased_export(local_dir, scale):
  manager = make_manager(local_dir, scale, max_to_keep=1)
  save_step(manager, scale, 1)
  manager.sync()
  lease = leases.acquire(paths.export_path(local_dir, 'ckpt', 1))
  for step in (2, 3):
    save_step(manager, scale, step)
  manager.sync()
  assert served_value(lease.export_dir) == 1.0
  lease.release()  # Carries out the deletion deferred while it was held.
  save_step(manager, scale, 4)
  manager.sync()
  assert [n for n in entries(local_dir) if n.endswith('_saved_modules')] == [
      'ckpt-4_saved_modules']


def test_a_housekeeping_failure_is_logged_not_raised(
    local_dir, scale, monkeypatch, caplog):
  manager = make_manager(local_dir, scale, max_to_keep=1)

  def broken(*args, **kwargs):
    raise RuntimeError('housekeeping bug')

  monkeypatch.setattr(housekeeping, 'collect', broken)
  for step in (1, 2):
    save_step(manager, scale, step)
  manager.sync()
  assert 'housekeeping bug' in caplog.text
  assert 'ckpt-1_saved_modules' in entries(local_dir)
  monkeypatch.undo()
  save_step(manager, scale, 3)  # The next pass catches up.
  manager.sync()
  assert [n for n in entries(local_dir) if n.endswith('_saved_modules')] == [
      'ckpt-3_saved_modules']
  assert served_value(manager.latest_savedmodel) == 3.0
