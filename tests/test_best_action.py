"""BestExportAction in a real orbit.Controller's train_and_evaluate."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import entries
from helpers import N_FEATURES
from helpers import Scale
from helpers import served_value
import ckpt_export
from ckpt_export import best as best_lib
from ckpt_export import orbit_actions
from ckpt_export import paths

orbit = pytest.importorskip('orbit')  # It ships in tf-models-official.

TARGET = 6.0  # The evaluator's score is best when the weights equal this.


class Trainer(orbit.StandardTrainer):
  """Adds 1 to every weight per step: after step s they all equal s."""

  def __init__(self, model: Scale):
    self.model = model
    self.global_step = orbit.utils.create_global_step()
    super().__init__(tf.data.Dataset.range(1).repeat())

  def train_step(self, iterator):
    next(iterator)
    self.model.w.assign_add(tf.ones([N_FEATURES]))
    self.global_step.assign_add(1)


class Evaluator(orbit.StandardEvaluator):
  """Scores the model by how close its weights are to TARGET."""

  def __init__(self, model: Scale):
    self.model = model
    super().__init__(tf.data.Dataset.range(1))

  def eval_step(self, iterator):
    next(iterator)

  def eval_end(self):
    w = self.model.w[0]
    return {'score': -tf.square(w - TARGET),
            'nested': {'w': w}, 'per_feature': self.model.w.read_value()}


def _controller(model_dir, model, action, **manager_kwargs):
  trainer, evaluator = Trainer(model), Evaluator(model)
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(model=model, step=trainer.global_step), model_dir,
      max_to_keep=2, step_counter=trainer.global_step,
      modules_to_export={'scale': model}, **manager_kwargs)
  eval_actions = [action(manager, trainer.global_step)]
  return orbit.Controller(trainer=trainer, evaluator=evaluator,
                          global_step=trainer.global_step, steps_per_loop=2,
                          checkpoint_manager=manager,
                          eval_actions=eval_actions), manager


@pytest.mark.parametrize('metric, higher, expected', [
    ('score', True, 6), ('nested/w', False, 2)])
def test_train_and_evaluate_keeps_the_best_step(model_dir, metric, higher,
                                                expected):
  best = best_lib.BestExport(model_dir, metric, higher_is_better=higher)
  controller, manager = _controller(
      model_dir, Scale(),
      lambda m, step: orbit_actions.BestExportAction(best, m, step),
      checkpoint_interval=2)
  controller.train_and_evaluate(train_steps=10, eval_interval=2)
  assert best.best[0] == expected
  assert served_value(best.best_export) == float(expected)
  info = best_lib.read_best(model_dir)
  assert info['step'] == expected and info['path'] == best.best_export
  assert info['metrics']['nested/w'] == float(expected)
  assert 'per_feature' not in info['metrics']  # Not a scalar.
  # The trainer kept only its last two exports; the best one is a copy.
  assert [ckpt_export.parse_export_step(p) for p in manager.savedmodels
         ] == [8, 10]
  assert entries(os.path.join(model_dir, 'best_export')) == [
      '.ckpt_export', 'best.json', f'ckpt-{expected}_saved_modules',
      'offered.json']


def test_a_step_without_export_is_skipped(local_dir, caplog):
  best = best_lib.BestExport(local_dir, 'score')
  # Evaluations every 2 steps, exports at 2 (the first save), 6 and 10.
  controller, _ = _controller(
      local_dir, Scale(),
      lambda m, step: orbit_actions.BestExportAction(best, local_dir, step),
      checkpoint_interval=4)
  controller.train_and_evaluate(train_steps=10, eval_interval=2)
  assert best.best == (6, {'score': 0.0, 'nested/w': 6.0})
  warned = '\n'.join(r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING)
  # The warnings name the export each skipped step lacked, and no other.
  assert [s for s in range(1, 11)
          if paths.export_path(local_dir, 'ckpt', s) in warned] == [4, 8]


def test_bad_output_and_arguments(local_dir):
  best = best_lib.BestExport(local_dir, 'score')
  step = tf.Variable(1, dtype=tf.int64)
  action = orbit_actions.BestExportAction(best, local_dir, step)
  with pytest.raises(ValueError, match=r"no scalar 'score'.*\['loss'\]"):
    action({'loss': np.float32(1.0), 'score': np.ones(2)})
  with pytest.raises(ValueError, match='best must be a BestExport'):
    orbit_actions.BestExportAction('best', local_dir, step)
  with pytest.raises(ValueError, match='manager_or_model_dir must be'):
    orbit_actions.BestExportAction(best, 3, step)
  with pytest.raises(ValueError, match='global_step must be'):
    orbit_actions.BestExportAction(best, local_dir, 5)
  with pytest.raises(ValueError, match='global step must be an integer'):
    orbit_actions.BestExportAction(best, local_dir, lambda: 1.5)({'score': 1})
  assert best.best is None


def test_the_final_step_is_a_candidate(local_dir, caplog):
  # orbit saves the final step after its final evaluation: with exports at 2,
  # 6 and 10, step 12's metrics wait until offer_pending().
  best = best_lib.BestExport(local_dir, 'nested/w')
  action = None

  def make(manager, step):
    nonlocal action
    action = orbit_actions.BestExportAction(best, manager, step)
    return action

  controller, _ = _controller(local_dir, Scale(), make, checkpoint_interval=4)
  controller.train_and_evaluate(train_steps=12, eval_interval=2)
  assert best.best[0] == 10
  assert "checkpoint_interval a divisor" in caplog.text
  assert action.offer_pending()
  assert best.best == (12, {'score': -36.0, 'nested/w': 12.0})
  assert served_value(best.best_export) == 12.0
  assert not action.offer_pending()


class FailingEvaluator(Evaluator):
  """Dies (as a kill would) during the evaluation of step `fail_at`."""

  def __init__(self, model, fail_at):
    super().__init__(model)
    self.fail_at = fail_at

  def eval_end(self):
    if int(self.model.w[0]) == self.fail_at:
      raise SystemExit('killed during the evaluation')
    return super().eval_end()


def test_a_kill_during_evaluation_loses_no_step(local_dir):

  def job(evaluator_class, *args):
    best = best_lib.BestExport(local_dir, 'nested/w')
    model = Scale()
    trainer = Trainer(model)
    manager = ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(model=model, step=trainer.global_step), local_dir,
        max_to_keep=2, step_counter=trainer.global_step, checkpoint_interval=2,
        modules_to_export={'scale': model})
    action = orbit_actions.BestExportAction(best, manager, trainer.global_step)
    controller = orbit.Controller(
        trainer=trainer, evaluator=evaluator_class(model, *args),
        global_step=trainer.global_step, steps_per_loop=2,
        checkpoint_manager=manager, eval_actions=[action])
    return best, action, controller, trainer.global_step

  best, _, controller, _ = job(FailingEvaluator, 4)
  with pytest.raises(SystemExit):
    controller.train_and_evaluate(train_steps=8, eval_interval=2)
  assert best.best[0] == 2 and best.last_offered == 2
  best.close()

  # The restart: the Controller restores step 4, whose export exists; it used
  # to evaluate only later steps.
  best, action, controller, step = job(Evaluator)
  assert int(step.numpy()) == 4
  assert action.unevaluated_step() == 4
  controller.evaluate(steps=1)
  assert best.best[0] == 4 and action.unevaluated_step() is None
  controller.train_and_evaluate(train_steps=8, eval_interval=2)
  assert best.best[0] == 8


def test_best_and_action_must_agree_on_the_checkpoint_name(local_dir):
  best = best_lib.BestExport(local_dir, 'score')
  with pytest.raises(ValueError, match="'ckpt' exports, not of the 'export'"):
    orbit_actions.BestExportAction(best, local_dir, tf.Variable(1),
                                 checkpoint_name='export')


def test_the_warning_names_the_interval_of_the_exports_offered(local_dir,
                                                               caplog):
  # Paired with ExportSavedModel, it used to blame checkpoint_interval.
  best = best_lib.BestExport(local_dir, 'score', checkpoint_name='export')
  action = orbit_actions.BestExportAction(best, local_dir, tf.Variable(5),
                                        checkpoint_name='export')
  action({'score': 1.0})
  assert "ExportSavedModel's export_interval" in caplog.text
  assert best.best is None and not action.offer_pending()
