"""An async save's first export is traced off the training thread.

With `CheckpointOptions(enable_async=True)`, a module without a template (the
first export of a process, or a changed structure) is saved by
`tf.saved_model.save` in the checkpoint's write callback, in TF's checkpoint
thread, and its export holds the values of the step's checkpoint. These tests
record the thread that calls `savedmodel.write_module` (the function that
runs `tf.saved_model.save`; it is wrapped, not replaced), change the
variables right after `save()` returns, and check that each export serves its
own step; and that each fallback (a variable the checkpoint does not save,
state other than plain variables, a graph the checkpoint cannot fill) keeps
today's behaviour or fails the step cleanly.
"""

import os
import subprocess
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from ckpt_export import _tf_internals
from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import savedmodel
from helpers import child_env
from helpers import N_FEATURES
from helpers import Scale
from helpers import served_value
from test_fast_export import WithTable
from test_linked_export import _counts
from test_linked_export import _manager
from test_linked_export import _served
from test_linked_export import _tensors
from test_linked_export import Affine
from test_linked_export import SAVED_MODEL_CLI

ASYNC = tf.train.CheckpointOptions(enable_async=True)
DEADLINE_SECONDS = 120


@pytest.fixture
def full_saves(monkeypatch):
  """The threads that ran `tf.saved_model.save` of a module, in order."""
  threads = []
  write_module = savedmodel.write_module

  def recording(*args, **kwargs):
    threads.append(threading.current_thread())
    return write_module(*args, **kwargs)

  monkeypatch.setattr(savedmodel, 'write_module', recording)
  return threads


def _on_training_thread(threads) -> list:
  return [t is threading.main_thread() for t in threads]


def test_the_first_async_export_is_traced_in_the_background(
    local_dir, tmp_path, full_saves):
  module = Affine()
  manager = _manager(local_dir, module)
  module.set_step(1)
  manager.save(checkpoint_number=1, options=ASYNC)
  # No tf.saved_model.save ran on the training thread before save() returned.
  assert not any(_on_training_thread(full_saves))
  module.set_step(-1)  # Training changes the variables at once.
  manager.sync()
  assert _on_training_thread(full_saves) == [False]
  assert _counts(manager) == (1, 0, 0)
  first = paths.export_path(local_dir, 'ckpt', 1)
  assert _served(first) == 1
  assert sorted(os.listdir(first)) == ['.ckpt_export_commit.json', 'm']
  # The values a full export of step 1 holds.
  module.set_step(1)
  full = str(tmp_path / 'full')
  savedmodel.write_module('m', module, full)
  want = _tensors(os.path.join(full, 'variables', 'variables'))
  got = _tensors(os.path.join(first, 'm', 'variables', 'variables'))
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    if key != '_CHECKPOINTABLE_OBJECT_GRAPH':
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  show = subprocess.run(
      [*SAVED_MODEL_CLI, 'show', '--all', '--dir', os.path.join(first, 'm')],
      capture_output=True, text=True, check=True,
      env=child_env(tf_log_level='3'), timeout=DEADLINE_SECONDS)
  assert "signature_def['serving_default']" in show.stdout

  # The next export uses the template made in the background: linked.
  full_saves.clear()
  module.set_step(2)
  manager.save(checkpoint_number=2, options=ASYNC)
  module.set_step(-1)
  manager.sync()
  assert full_saves == []
  assert _counts(manager) == (1, 1, 1)
  assert _served(paths.export_path(local_dir, 'ckpt', 2)) == 2
  assert _served(first) == 1


class Trained(Scale):
  """Serves `x * w`; `train()` adds 1 to `w` (a tf.function step)."""

  @tf.function
  def train(self):
    self.w.assign_add(tf.ones([N_FEATURES]))
    return self.w[0]


def test_exports_traced_while_training_steps_run_serve_their_step(
    local_dir, full_saves):
  module = Trained()
  manager = _manager(local_dir, module,
                     checkpoint=tf.train.Checkpoint(module=module))
  steps = 0
  for _ in range(3):
    steps += 1
    module.train()
    manager.save(checkpoint_number=steps, options=ASYNC)
    export_dir = paths.export_path(local_dir, 'ckpt', steps)
    deadline = time.monotonic() + DEADLINE_SECONDS
    step_while_exporting = 0
    # Train (and trace new functions) on this thread until it is published.
    while not commit.is_published(export_dir) or not step_while_exporting:
      assert time.monotonic() < deadline, f'{export_dir} never published'
      module.train()
      tf.function(lambda: module.w * 2.0)()  # A new trace, each time.
      steps += 1
      step_while_exporting += 1
    manager.sync()
    assert float(module.w.numpy()[0]) == steps
  assert not any(_on_training_thread(full_saves))
  saved = [paths.parse_export_step(p) for p in manager.savedmodels]
  assert len(saved) == 3
  for export_dir, step in zip(manager.savedmodels, saved):
    assert served_value(export_dir, 'm') == step


# Fallbacks: today's export on the training thread, or a clean failure.


def test_a_variable_the_checkpoint_does_not_save_gets_a_full_export_first(
    local_dir, full_saves):
  module = Affine()
  checkpoint = tf.train.Checkpoint(w=module.w, b=module.b)  # No `count`.
  manager = _manager(local_dir, module, checkpoint)
  for step in (1, 2):
    module.set_step(step)
    manager.save(checkpoint_number=step, options=ASYNC)
    assert _on_training_thread(full_saves) == [True]  # Before save() returned.
    module.set_step(-1)
  manager.sync()
  assert _counts(manager) == (1, 1, 0)
  for export_dir in manager.savedmodels:
    assert _served(export_dir) == paths.parse_export_step(export_dir)


def test_a_module_with_a_table_gets_full_exports_on_the_training_thread(
    local_dir, full_saves):
  module = WithTable()
  manager = _manager(local_dir, module,
                     checkpoint=tf.train.Checkpoint(module=module))
  for step in (1, 2, 3):
    module.w.assign(tf.fill([N_FEATURES], float(step)))
    module.table.insert(tf.constant(['step']), tf.constant([float(step)]))
    manager.save(checkpoint_number=step, options=ASYNC)
    module.w.assign(tf.fill([N_FEATURES], -1.0))
    module.table.insert(tf.constant(['step']), tf.constant([-1.0]))
  manager.sync()
  assert _on_training_thread(full_saves) == [True] * 3
  assert _counts(manager)[:2] == (3, 0)
  for export_dir in manager.savedmodels:
    assert served_value(export_dir, 'm') == 2 * paths.parse_export_step(
        export_dir)


class SavedModelOnly(Scale):
  """Serves `x * w + hidden`; `hidden` is not in its checkpoint."""

  def __init__(self):
    super().__init__()
    # Set past tf.Module's tracking: not a checkpoint dependency, but a
    # child in a SavedModel (below).
    object.__setattr__(self, 'hidden', tf.Variable(tf.ones([N_FEATURES])))

  def _trackable_children(self, save_type='checkpoint', **kwargs):
    children = super()._trackable_children(save_type, **kwargs)
    if save_type == 'savedmodel':
      children = dict(children, hidden=self.hidden)
    return children

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def __call__(self, x):
    return x * self.w + self.hidden


def test_a_graph_the_checkpoint_cannot_fill_fails_its_step_cleanly(
    local_dir, full_saves):
  module = SavedModelOnly()
  manager = _manager(local_dir, module,
                     checkpoint=tf.train.Checkpoint(module=module))
  module.w.assign(tf.fill([N_FEATURES], 1.0))
  manager.save(checkpoint_number=1, options=ASYNC)
  with pytest.raises(ValueError, match="Module 'm' cannot be exported from "
                     'checkpoint values'):
    manager.sync()
  assert _on_training_thread(full_saves) == [False]
  assert manager.checkpoints == []
  assert tf.train.latest_checkpoint(local_dir) is None
  assert [n for n in os.listdir(local_dir) if n.startswith('ckpt-1')] == []
  # Saving goes on, with today's full export on the training thread.
  module.w.assign(tf.fill([N_FEATURES], 2.0))
  manager.save(checkpoint_number=2, options=ASYNC)
  module.w.assign(tf.fill([N_FEATURES], -1.0))
  manager.sync()
  assert _on_training_thread(full_saves) == [False, True]
  assert served_value(manager.latest_savedmodel, 'm') == 2 + 1  # w + hidden.
  assert tf.train.latest_checkpoint(local_dir).endswith('ckpt-2')


def test_without_the_state_check_first_exports_stay_on_the_training_thread(
    monkeypatch, local_dir, full_saves):
  def missing():
    raise AttributeError('faked: saveable_object_util is gone')

  feature = 'first exports traced in the background'
  monkeypatch.setitem(_tf_internals.PROBLEMS, feature,
                      (missing, _tf_internals.PROBLEMS[feature][1]))
  _tf_internals.reset()
  try:
    module = Affine()
    manager = _manager(local_dir, module)
    for step in (1, 2):
      module.set_step(step)
      manager.save(checkpoint_number=step, options=ASYNC)
      module.set_step(-1)
    manager.sync()
  finally:
    _tf_internals.reset()
  assert _on_training_thread(full_saves) == [True]
  assert _counts(manager) == (1, 1, 1)
  for export_dir in manager.savedmodels:
    assert _served(export_dir) == paths.parse_export_step(export_dir)
