"""The manager and the export action driven by a real orbit.Controller."""

import os
from typing import Dict, List, Optional

import numpy as np
import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import orbit_actions
from ckpt_export import paths
from ckpt_export import writers
from helpers import entries
from helpers import N_FEATURES

orbit = pytest.importorskip('orbit')  # It ships in tf-models-official.

MODULE = 'linear'
X = np.random.default_rng(0).normal(size=(64, N_FEATURES)).astype(np.float32)
Y = X @ np.arange(1, N_FEATURES + 1, dtype=np.float32)[:, None]


class Linear(tf.Module):
  """y = x @ w, served by its one tf.function (no explicit signatures)."""

  def __init__(self) -> None:
    super().__init__()
    self.w = tf.Variable(tf.zeros([N_FEATURES, 1]))

  @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32)])
  def __call__(self, x: tf.Tensor) -> tf.Tensor:
    return tf.matmul(x, self.w)


def dataset(batch_size: int = 8) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices((X, Y)).repeat().batch(batch_size)


class Trainer(orbit.StandardTrainer):
  """Plain SGD on the squared error; the weights change at every step."""

  def __init__(self, model: Linear, global_step: tf.Variable) -> None:
    super().__init__(dataset())
    self.model = model
    self.global_step = global_step
    self.loss = tf.Variable(0.0)

  def train_step(self, iterator) -> None:
    x, y = next(iterator)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(self.model(x) - y))
    self.model.w.assign_sub(0.01 * tape.gradient(loss, self.model.w))
    self.loss.assign(loss)
    self.global_step.assign_add(1)

  def train_loop_end(self) -> Dict[str, tf.Tensor]:
    return {'loss': self.loss.read_value()}


class Evaluator(orbit.StandardEvaluator):
  """Mean squared error over `steps` batches."""

  def __init__(self, model: Linear) -> None:
    super().__init__(dataset())
    self.model = model
    self.total = tf.Variable(0.0)
    self.count = tf.Variable(0.0)

  def eval_begin(self) -> None:
    self.total.assign(0.0)
    self.count.assign(0.0)

  def eval_step(self, iterator) -> None:
    x, y = next(iterator)
    self.total.assign_add(tf.reduce_mean(tf.square(self.model(x) - y)))
    self.count.assign_add(1.0)

  def eval_end(self) -> Dict[str, tf.Tensor]:
    return {'loss': self.total / self.count}


class Job:
  """One training process: model, step, manager and Controller on a dir."""

  def __init__(self, model_dir: str, *, async_checkpointing: bool = False,
               checkpoint_interval: int = 4, max_to_keep: int = 3,
               export_action: Optional[Dict[str, int]] = None) -> None:
    self.model = Linear()
    self.step = tf.Variable(0, dtype=tf.int64)
    train_actions = [self.record]
    self.action = None
    if export_action is not None:
      self.action = orbit_actions.ExportSavedModel(
          {MODULE: self.model}, directory=model_dir, global_step=self.step,
          **export_action)
      train_actions.append(self.action)
    self.weights = {}  # step -> the weights after that step's train loop.
    checkpoint = tf.train.Checkpoint(model=self.model, step=self.step)
    if async_checkpointing:
      # Large enough that a checkpoint write is still in flight after save().
      checkpoint.payload = tf.Variable(tf.zeros([4_000_000]))
    self.manager = ckpt_export.SavedModelCheckpointManager(
        checkpoint,
        directory=model_dir, max_to_keep=max_to_keep,
        modules_to_export={MODULE: self.model}, step_counter=self.step,
        checkpoint_interval=checkpoint_interval)
    self.controller = orbit.Controller(
        global_step=self.step,
        trainer=Trainer(self.model, self.step),
        evaluator=Evaluator(self.model),
        steps_per_loop=2,
        checkpoint_manager=self.manager,
        enable_async_checkpointing=async_checkpointing,
        train_actions=train_actions)

  def record(self, output) -> None:
    assert 'loss' in output
    self.weights[int(self.step.numpy())] = self.model.w.numpy()


def served(export_dir: str) -> np.ndarray:
  """What the export's module serves for X."""
  loaded = tf.saved_model.load(os.path.join(export_dir, MODULE))
  outputs = loaded.signatures['serving_default'](tf.constant(X))
  return list(outputs.values())[0].numpy()


def checkpointed(path: str) -> np.ndarray:
  """The weights stored in a checkpoint."""
  model = Linear()
  tf.train.Checkpoint(model=model).restore(path).expect_partial()
  return model.w.numpy()


def export_steps(directory: str, name: str = 'ckpt') -> List[int]:
  return [paths.parse_export_step(p)
          for p in ckpt_export.list_savedmodels(directory, name)]


def checkpoint_steps(manager) -> List[int]:
  return [paths.parse_checkpoint_step(p) for p in manager.checkpoints]


def assert_exports_serve(directory: str, steps: List[int],
                         weights: Dict[int, np.ndarray],
                         name: str = 'ckpt') -> None:
  """Exactly `steps` are exported, each serving its step's weights."""
  assert export_steps(directory, name) == steps
  for step in steps:
    export_dir = paths.export_path(directory, name, step)
    # float32 sums in another order than NumPy's: absolute error ~1e-7 on
    # values near 0, where a relative tolerance alone fails.
    np.testing.assert_allclose(served(export_dir), X @ weights[step],
                               rtol=1e-6, atol=1e-6)


def assert_no_leftovers(directory: str) -> None:
  hidden = [n for n in entries(directory) if n.startswith('.')]
  assert not hidden
  assert not [n for n in entries(directory) if n.endswith('_temp')]


@pytest.mark.parametrize('async_checkpointing', [False, True])
def test_controller_train_exports_every_kept_checkpoint(
    local_dir, async_checkpointing):
  job = Job(local_dir, async_checkpointing=async_checkpointing)
  job.controller.train(steps=12)
  # Saves at 2 (first loop), 6 and 10 (interval 4), 12 (at completion).
  assert checkpoint_steps(job.manager) == [6, 10, 12]
  assert ckpt_export.parse_export_step(job.manager.latest_savedmodel) == 12
  assert_exports_serve(local_dir, [6, 10, 12], job.weights)
  for path in job.manager.checkpoints:
    np.testing.assert_array_equal(
        checkpointed(path), job.weights[paths.parse_checkpoint_step(path)])
  assert_no_leftovers(local_dir)


@pytest.mark.parametrize('async_checkpointing', [False, True])
def test_controller_train_and_evaluate_then_restart_continues(
    local_dir, async_checkpointing):
  job = Job(local_dir, async_checkpointing=async_checkpointing)
  output = job.controller.train_and_evaluate(train_steps=8, eval_steps=2,
                                             eval_interval=4)
  assert np.isfinite(output['loss'])
  # Saves at 2, 6 and 8 (at completion).
  assert_exports_serve(local_dir, [2, 6, 8], job.weights)
  # A new process: the Controller restores step 8 and its weights.
  restarted = Job(local_dir, async_checkpointing=async_checkpointing)
  assert int(restarted.step.numpy()) == 8
  np.testing.assert_array_equal(restarted.model.w.numpy(), job.weights[8])
  restarted.controller.train_and_evaluate(train_steps=16, eval_steps=2,
                                          eval_interval=4)
  # Saves at 12 (8 + interval) and 16; the oldest exports went with their
  # checkpoints.
  assert checkpoint_steps(restarted.manager) == [8, 12, 16]
  assert_exports_serve(local_dir, [8, 12, 16],
                       {**job.weights, **restarted.weights})
  assert_no_leftovers(local_dir)


def test_export_action_keeps_its_own_schedule_beside_the_manager(local_dir):
  schedule = dict(export_interval=3, max_to_keep=2)
  job = Job(local_dir, export_action=schedule)
  job.controller.train(steps=12)
  # Called at 2, 4, ..., 12: exports at the first call (2), then at the
  # first call at or after each multiple of 3 (4, 6, 10, 12); keeps two.
  assert_exports_serve(local_dir, [10, 12], job.weights, name='export')
  assert job.action.exports == [paths.export_path(local_dir, 'export', s)
                                for s in (10, 12)]
  # Neither deleted the other's exports.
  assert_exports_serve(local_dir, [6, 10, 12], job.weights)
  assert_no_leftovers(local_dir)
  for export_dir in job.action.exports:
    assert commit.read_commit_info(export_dir)['modules'] == [MODULE]

  # A restarted job continues both sequences: the action exports at 16 (the
  # first call past 15), the manager saves at 16 (>= 12 + 4, and at
  # completion).
  restarted = Job(local_dir, export_action=schedule)
  restarted.controller.train(steps=16)
  weights = {**job.weights, **restarted.weights}
  assert_exports_serve(local_dir, [12, 16], weights, name='export')
  assert_exports_serve(local_dir, [10, 12, 16], weights)
  assert_no_leftovers(local_dir)


def test_export_action_exports_on_multiples_of_its_interval(local_dir):
  # It used to count from its first call: 3, 13, 23 with an interval of 10,
  # never on an evaluation step that is a multiple of 10.
  model, step = Linear(), tf.Variable(0, dtype=tf.int64)
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                          export_interval=10, max_to_keep=None)
  exported = []
  for s in range(3, 43, 3):  # steps_per_loop=3
    step.assign(s)
    if action() is not None:
      exported.append(s)
  assert exported == [3, 12, 21, 30, 42]
  step.assign(40)  # Restored from a checkpoint of step 40, say.
  again = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                         export_interval=10, max_to_keep=None)
  assert again() is not None  # 40 reached a multiple since its export 30.


def test_export_action_without_interval_exports_at_every_call(local_dir):
  model, step = Linear(), tf.Variable(0, dtype=tf.int64)
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                          max_to_keep=None, export_name='x')
  weights = {}
  for s in (0, 1, 5):
    step.assign(s)
    model.w.assign(tf.fill([N_FEATURES, 1], float(s)))
    weights[s] = model.w.numpy()
    assert action({}) == paths.export_path(local_dir, 'x', s)
  assert_exports_serve(local_dir, [0, 1, 5], weights, name='x')
  # The same step again replaces its export with the current weights.
  model.w.assign(tf.fill([N_FEATURES, 1], -1.0))
  weights[5] = model.w.numpy()
  action({})
  assert_exports_serve(local_dir, [0, 1, 5], weights, name='x')
  assert_no_leftovers(local_dir)


def test_export_action_after_going_back_drops_the_abandoned_steps(local_dir):
  model, step = Linear(), tf.Variable(0, dtype=tf.int64)
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                          export_interval=2, max_to_keep=3)
  for s in (2, 4, 6, 8):
    step.assign(s)
    action({})
  assert export_steps(local_dir, 'export') == [4, 6, 8]
  # A new run restored at step 4: 5 is too early after 4, 6 replaces the
  # abandoned 6 and drops 8, so the latest export is the newest.
  step.assign(4)
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                          export_interval=2, max_to_keep=3)
  step.assign(5)
  assert action({}) is None
  assert export_steps(local_dir, 'export') == [4, 6, 8]
  step.assign(6)
  action({})
  assert export_steps(local_dir, 'export') == [4, 6]
  assert ckpt_export.latest_savedmodel(local_dir, 'export') == (
      paths.export_path(local_dir, 'export', 6))


def test_export_action_recovers_crash_leftovers_and_spares_others(local_dir):
  model, step = Linear(), tf.Variable(3, dtype=tf.int64)
  dead = f'-1-999999999-{writers.HOST}-0123abcd'  # A pid that does not run.
  ours = os.path.join(local_dir, '.export-2_saved_modules.tmp' + dead)
  managers = os.path.join(local_dir, '.ckpt-2_saved_modules.tmp' + dead)
  users = os.path.join(local_dir, 'export-1_saved_modules')
  for path in (ours, managers, users):
    tf.io.gfile.makedirs(os.path.join(path, MODULE))
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                          max_to_keep=1)
  assert not tf.io.gfile.exists(ours)
  assert tf.io.gfile.exists(managers)  # Another name: not this action's.
  action({})
  step.assign(4)
  action({})
  # Only its own exports count and go; a user's directory stays.
  assert action.exports == [paths.export_path(local_dir, 'export', 4)]
  assert tf.io.gfile.isdir(users)


def test_export_action_spares_a_leased_export_until_released(local_dir):
  model, step = Linear(), tf.Variable(1, dtype=tf.int64)
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step,
                                          max_to_keep=1)
  first = action({})
  with leases.leased(first):
    step.assign(2)
    action({})
    assert tf.io.gfile.isdir(os.path.join(first, MODULE))
    np.testing.assert_array_equal(served(first), np.zeros([len(X), 1]))
  # Released: its deferred deletion is carried out.
  assert action.exports == [paths.export_path(local_dir, 'export', 2)]


def test_export_action_refuses_a_managers_checkpoint_name(local_dir):
  job = Job(local_dir)
  action = orbit_actions.ExportSavedModel({MODULE: job.model}, local_dir,
                                          job.step, export_name='ckpt')
  job.controller.train(steps=2)  # The manager saves ckpt-2.
  job.step.assign(3)
  with pytest.raises(ValueError, match="checkpoints named 'ckpt'"):
    action({})
  with pytest.raises(ValueError, match="checkpoints named 'ckpt'"):
    orbit_actions.ExportSavedModel({MODULE: job.model}, local_dir, job.step,
                                   export_name='ckpt')
  assert export_steps(local_dir) == [2]
  assert_no_leftovers(local_dir)


@pytest.mark.parametrize('kwargs, match', [
    (dict(modules_to_export={}), 'modules_to_export'),
    (dict(modules_to_export=None), 'modules_to_export'),
    (dict(modules_to_export={'a/b': Linear()}), 'module name'),
    (dict(modules_to_export={MODULE: object()}), 'cannot save'),
    (dict(directory=''), 'directory'),
    (dict(directory=None), 'directory'),
    (dict(directory='/tmp/a[1]'), r"contains '\['"),
    (dict(export_name='a/b'), 'export_name'),
    (dict(export_name=''), 'export_name'),
    (dict(global_step=3), 'global_step'),
    (dict(global_step=tf.Variable(1.0)), 'global_step'),
    (dict(global_step=tf.Variable([1, 2])), 'global_step'),
    (dict(export_interval=0), 'export_interval.*0'),
    (dict(export_interval=True), 'export_interval.*True'),
    (dict(export_interval=2.5), 'export_interval.*2.5'),
    (dict(max_to_keep=0), 'max_to_keep.*0'),
    (dict(max_to_keep=-1), 'max_to_keep.*-1'),
])
def test_export_action_bad_arguments(local_dir, kwargs, match):
  args = dict(modules_to_export={MODULE: Linear()}, directory=local_dir,
              global_step=tf.Variable(0, dtype=tf.int64))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    orbit_actions.ExportSavedModel(**args)
  assert not tf.io.gfile.exists(local_dir)


def test_export_action_module_without_signature_leaves_nothing(local_dir):
  model, step = tf.Module(), tf.Variable(1, dtype=tf.int64)
  model.w = tf.Variable(1.0)
  model.f = tf.function(lambda x: x * model.w,
                        input_signature=[tf.TensorSpec([], tf.float32)])
  model.g = tf.function(lambda x: x + model.w,
                        input_signature=[tf.TensorSpec([], tf.float32)])
  action = orbit_actions.ExportSavedModel({MODULE: model}, local_dir, step)
  with pytest.raises(ValueError, match='no serving signature'):
    action({})
  assert entries(local_dir) == []
