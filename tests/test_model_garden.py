"""Model Garden: the experiment runner, and its serving modules as modules."""

import os
from typing import Dict, Mapping

import numpy as np
import pytest
import tensorflow as tf

from ckpt_export import manager as manager_lib
from ckpt_export import readers
from ckpt_export import serving

pytest.importorskip('official', reason='needs Model Garden (the orbit extra)')
from official.core import export_base
from official.core import task_factory
from official.utils.testing import mock_task  # pylint: disable=unused-import
from ckpt_export import model_garden

from helpers import assert_exports_match_checkpoints
from helpers import checkpoint_outputs
from helpers import entries
from helpers import MOCK_INPUT
from helpers import mock_params
from helpers import served_outputs

X = MOCK_INPUT


def run(model_dir: str, mode: str, params=None, **kwargs):
  params = params or mock_params()
  strategy = tf.distribute.get_strategy()
  task = task_factory.get_task(params.task, logging_dir=model_dir)
  runner = model_garden.ExperimentRunner(
      distribution_strategy=strategy, task=task, mode=mode, params=params,
      model_dir=model_dir, **kwargs)
  return runner, runner.run()


@pytest.mark.parametrize('async_checkpointing', [False, True])
@pytest.mark.parametrize('mode', ['train', 'train_and_eval'])
def test_training_exports_each_kept_checkpoint(tmp_path, mode,
                                               async_checkpointing):
  model_dir, serving_dir = str(tmp_path / 'model'), str(tmp_path / 'serving')
  runner, _ = run(model_dir, mode,
                  export_modules=model_garden.default_export_modules,
                  enable_async_checkpointing=async_checkpointing,
                  serving_dir=serving_dir)
  assert isinstance(runner.checkpoint_manager,
                    manager_lib.SavedModelCheckpointManager)
  assert_exports_match_checkpoints(model_dir, [4, 6])
  assert [n for n in entries(model_dir) if n.startswith('ckpt')] == [
      'ckpt-4.data-*', 'ckpt-4.index', 'ckpt-4_saved_modules',
      'ckpt-6.data-*', 'ckpt-6.index', 'ckpt-6_saved_modules']
  for step in (4, 6):
    np.testing.assert_allclose(
        served_outputs(serving_dir, f'model/{step}'),
        checkpoint_outputs(model_dir, step), rtol=1e-6)
  # The serving view got each save's export; it keeps the newest two.
  assert serving.versions(serving_dir, 'model') == [4, 6]
  assert sorted(os.listdir(os.path.join(serving_dir, 'model'))) == ['4', '6']
  # Training moved the weights between the two kept steps.
  assert not np.allclose(checkpoint_outputs(model_dir, 4),
                         checkpoint_outputs(model_dir, 6))


def test_without_export_modules_checkpoints_only(tmp_path):
  model_dir = str(tmp_path / 'model')
  run(model_dir, 'train')
  assert readers.list_savedmodels(model_dir) == []
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-6')


def test_eval_modes_read_without_writing(tmp_path):
  model_dir = str(tmp_path / 'model')
  run(model_dir, 'train', export_modules=model_garden.default_export_modules)
  before = [n for n in entries(model_dir) if n != 'validation']
  runner, _ = run(model_dir, 'eval',
                  export_modules=model_garden.default_export_modules)
  assert not isinstance(runner.checkpoint_manager,
                        manager_lib.SavedModelCheckpointManager)
  assert int(runner.trainer.global_step.numpy()) == 6
  assert [n for n in entries(model_dir) if n != 'validation'] == before


@pytest.mark.parametrize('evaluate_exports', [True, 'model'])
def test_continuous_eval_of_exports(tmp_path, evaluate_exports):
  model_dir = str(tmp_path / 'model')
  run(model_dir, 'train', export_modules=model_garden.default_export_modules)
  seen = []

  def record(output: Mapping[str, np.ndarray]) -> None:
    del output
    seen.append((int(runner.trainer.global_step.numpy()),
                 runner.trainer.model(X).numpy()))

  params = mock_params(continuous_eval_timeout=30)
  runner = model_garden.ExperimentRunner(
      distribution_strategy=tf.distribute.get_strategy(),
      task=task_factory.get_task(params.task, logging_dir=model_dir),
      mode='continuous_eval', params=params, model_dir=model_dir,
      eval_actions=[record], evaluate_exports=evaluate_exports,
      export_modules=model_garden.default_export_modules)
  _, logs = runner.run()
  assert 'counter' in logs
  assert [step for step, _ in seen] == [4, 6]
  for step, outputs in seen:
    np.testing.assert_allclose(outputs, checkpoint_outputs(model_dir, step),
                               rtol=1e-6)
  # The leases were released.
  assert not tf.io.gfile.glob(os.path.join(model_dir, '.ckpt_export',
                                           'leases', '*'))


def test_evaluate_exports_errors(tmp_path):
  model_dir = str(tmp_path / 'model')
  with pytest.raises(ValueError, match='evaluate_exports=True needs '
                     'export_modules'):
    run(model_dir, 'continuous_eval', evaluate_exports=True)
  with pytest.raises(ValueError, match="serving_dir='s' needs export_modules"):
    run(model_dir, 'train', serving_dir='s')
  run(model_dir, 'train', export_modules=model_garden.default_export_modules)

  def two(task, model, params):
    del task, params
    return {'a': model, 'b': tf.Module()}

  def other_model(task, model, params):
    del model
    return {'model': task.build_model()} if params else {}

  for export_modules, evaluate_exports, message in [
      (two, True, r"modules \['a', 'b'\]: pass the name"),
      (two, 'c', "evaluate_exports='c' is none of"),
      (other_model, True, "does not hold the trainer's model")]:
    with pytest.raises(ValueError, match=message):
      run(model_dir, 'continuous_eval', export_modules=export_modules,
          evaluate_exports=evaluate_exports)


class Doubler(export_base.ExportModule):
  """A Model Garden serving module: twice the model's output."""

  @tf.function
  def serve(self, inputs: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {'outputs': 2.0 * self.inference_step(inputs)}

  @tf.function
  def serve_half(self, inputs: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {'half': 0.5 * self.inference_step(inputs)}

  def get_inference_signatures(self, function_keys: Dict[str, str]):
    spec = tf.TensorSpec([None, 2], tf.float32)
    functions = {'serve': self.serve, 'half': self.serve_half}
    unknown = set(function_keys) - set(functions)
    if unknown:
      raise ValueError(f'Unrecognized keys {sorted(unknown)}')
    return {key: functions[function].get_concrete_function(spec)
            for function, key in function_keys.items()}


def dense() -> tf.keras.layers.Layer:
  import tf_keras  # pylint: disable=g-import-not-at-top
  layer = tf_keras.layers.Dense(1)
  layer(X)
  return layer


@pytest.mark.parametrize('function_keys, signatures', [
    (None, {'serving_default': 'outputs'}),
    ('half', {'serving_default': 'half'}),
    (['half', 'serve'], {'serving_default': 'half', 'serve': 'outputs'}),
    ({'serve': 'doubled', 'half': 'halved'},
     {'doubled': 'outputs', 'halved': 'half'}),
])
def test_manager_exports_model_garden_modules(local_dir, function_keys,
                                              signatures):
  layer = dense()
  module = Doubler(params=None, model=layer)
  if function_keys is not None:
    module.serving_function_keys = function_keys
  manager = manager_lib.SavedModelCheckpointManager(
      tf.train.Checkpoint(layer=layer), local_dir, max_to_keep=2,
      modules_to_export={'doubler': module})
  for step in (1, 2):  # The second export is a fast one.
    layer.kernel.assign(tf.fill([2, 1], float(step)))
    manager.save(checkpoint_number=step)
    loaded = tf.saved_model.load(
        os.path.join(manager.latest_savedmodel, 'doubler'))
    assert sorted(loaded.signatures) == sorted(signatures)
    expected = layer(X).numpy()
    for key, output in signatures.items():
      served = loaded.signatures[key](tf.constant(X))[output].numpy()
      factor = 0.5 if output == 'half' else 2.0
      np.testing.assert_allclose(served, factor * expected, rtol=1e-6)
  # The signatures' functions keep their traces: the second export was fast.
  exporters = manager._exporter.modules  # pylint: disable=protected-access
  assert [m.fast_exports for m in exporters] == [1]


@pytest.mark.parametrize('function_keys, message', [
    (3, 'serving_function_keys 3: give a mapping'),
    ([], r'serving_function_keys \[\]: give a mapping'),
    ({'serve': 1}, "serving_function_keys {'serve': 1}"),
])
def test_bad_function_keys_rejected_up_front(local_dir, function_keys,
                                             message):
  layer = dense()
  module = Doubler(params=None, model=layer)
  module.serving_function_keys = function_keys
  with pytest.raises(ValueError, match=message):
    manager_lib.SavedModelCheckpointManager(
        tf.train.Checkpoint(layer=layer), local_dir, max_to_keep=2,
        modules_to_export={'doubler': module})
  assert not tf.io.gfile.exists(local_dir)


def test_function_keys_the_module_rejects(local_dir):
  layer = dense()
  module = Doubler(params=None, model=layer)
  module.serving_function_keys = ['image_bytes']
  manager = manager_lib.SavedModelCheckpointManager(
      tf.train.Checkpoint(layer=layer), local_dir, max_to_keep=2,
      modules_to_export={'doubler': module})
  with pytest.raises(ValueError, match=r"Module 'doubler' \(Doubler\) "
                     r"rejected function keys {'image_bytes': "
                     "'serving_default'}"):
    manager.save(checkpoint_number=1)
  assert readers.list_savedmodels(local_dir) == []
  assert tf.train.latest_checkpoint(local_dir) is None
