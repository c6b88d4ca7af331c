"""Side by side: the same scenario on the reference class and on ckpt_export.

Where the reference is right, both must agree. Where it is not, the test
states what the reference does (as observed with tf-models-official 2.20.0,
pinned) and what ckpt_export does instead.
"""

import os

import pytest
import tensorflow as tf

import ckpt_export
from helpers import entries
from helpers import make_manager
from helpers import MODEL_GARDEN_REFERENCE
from helpers import N_FEATURES
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import steps_of

reference = pytest.importorskip(MODEL_GARDEN_REFERENCE)

IMPLEMENTATIONS = {
    'reference': reference.SavedModelCheckpointManager,
    'ckpt_export': ckpt_export.SavedModelCheckpointManager,
}


def _make(impl, model_dir, module, max_to_keep=2, **kwargs):
  return make_manager(model_dir, module, max_to_keep,
                      manager_class=IMPLEMENTATIONS[impl], **kwargs)


def _export_dirs(model_dir):
  return sorted(n for n in entries(model_dir) if 'saved_modules' in n)


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
  return request.param


def test_same_exports_and_values_across_saves(impl, local_dir, scale):
  manager = _make(impl, local_dir, scale, max_to_keep=2)
  for step in (1, 2, 3):
    assert save_step(manager, scale, step) == os.path.join(local_dir, f'ckpt-{step}')
  manager.sync()
  assert _export_dirs(local_dir) == ['ckpt-2_saved_modules',
                                     'ckpt-3_saved_modules']
  assert steps_of(manager.savedmodels) == [2, 3]
  assert manager.latest_savedmodel == os.path.join(local_dir,
                                                   'ckpt-3_saved_modules')
  assert [served_value(p) for p in manager.savedmodels] == [2.0, 3.0]
  assert os.listdir(os.path.join(manager.latest_savedmodel, 'scale')) != []


def test_same_iteration_over_exports(impl, local_dir, scale):
  manager = _make(impl, local_dir, scale, max_to_keep=3)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  # (With a timeout under the 1 s sleep the reference would never look.)
  found = list(manager.savedmodels_iterator(timeout=1.5))
  assert found == manager.savedmodels
  assert manager.get_savedmodel_number_from_path(found[-1]) == 3


def test_same_checkpoint_behaviour(impl, local_dir, scale):
  manager = _make(impl, local_dir, scale, max_to_keep=1)
  save_step(manager, scale, 5)
  fresh = Scale()
  restarted = _make(impl, local_dir, fresh, max_to_keep=1)
  assert restarted.latest_checkpoint == os.path.join(local_dir, 'ckpt-5')
  assert restarted.restore_or_initialize() == os.path.join(local_dir, 'ckpt-5')
  assert float(fresh.w[0]) == 5.0


def test_after_a_restart_order_is_by_step(local_dir, scale):
  manager = _make('ckpt_export', local_dir, scale, max_to_keep=3)
  for step in (9, 10, 100):
    save_step(manager, scale, step)
  ref = _make('reference', local_dir, Scale(), max_to_keep=3)
  # The reference lists in file-listing order; its "latest" may be any step.
  assert sorted(steps_of(ref.savedmodels)) == [9, 10, 100]
  ours = _make('ckpt_export', local_dir, Scale(), max_to_keep=3)
  assert steps_of(ours.savedmodels) == [9, 10, 100]
  assert steps_of([ours.latest_savedmodel]) == [100]


def test_saving_a_step_twice(local_dir, scale):
  ref_dir, our_dir = local_dir + '_ref', local_dir + '_ours'
  ref = _make('reference', ref_dir, scale)
  save_step(ref, scale, 1)
  with pytest.raises(tf.errors.AlreadyExistsError):
    save_step(ref, scale, 1)
  assert 'ckpt-1_saved_modules_temp' in entries(ref_dir)  # Never cleaned up.
  ours = _make('ckpt_export', our_dir, scale)
  save_step(ours, scale, 1)
  scale.w.assign(tf.fill([N_FEATURES], 11.0))
  ours.save(checkpoint_number=1)
  assert served_value(ours.latest_savedmodel) == 11.0
  assert _export_dirs(our_dir) == ['ckpt-1_saved_modules']


def test_checkpoints_kept_every_n_hours(local_dir, scale):
  results = {}
  for impl in sorted(IMPLEMENTATIONS):
    model_dir = f'{local_dir}_{impl}'
    manager = _make(impl, model_dir, scale, max_to_keep=1,
                    keep_checkpoint_every_n_hours=1e-9)
    for step in (1, 2, 3):
      save_step(manager, scale, step)
    results[impl] = _export_dirs(model_dir)
    assert {n for n in entries(model_dir) if n.endswith('.index')} == {
        'ckpt-1.index', 'ckpt-2.index', 'ckpt-3.index'}
  assert results['reference'] == ['ckpt-3_saved_modules']
  assert results['ckpt_export'] == ['ckpt-1_saved_modules',
                                    'ckpt-2_saved_modules',
                                    'ckpt-3_saved_modules']


def test_module_without_signatures(local_dir):
  class NoSignature(tf.Module):
    pass
  ref = _make('reference', local_dir, NoSignature(), max_to_keep=1)
  ref.save()
  assert _export_dirs(local_dir) == []  # Silently nothing exported.
  with pytest.raises(ValueError, match='signatures'):
    _make('ckpt_export', local_dir + '_ours', NoSignature())
