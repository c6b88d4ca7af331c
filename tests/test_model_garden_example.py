"""examples/model_garden_train.py run as a user runs Model Garden's train.py."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import serving
from helpers import assert_exports_match_checkpoints
from helpers import checkpoint_outputs
from helpers import child_env
from helpers import finish
from helpers import REPO
from helpers import served_outputs
from helpers import worker_envs

pytest.importorskip('official', reason='needs Model Garden (the orbit extra)')
from official.core import exp_factory
from official.core import task_factory
from official.vision import registry_imports  # pylint: disable=unused-import
from official.vision.serving import image_classification

EXAMPLE = os.path.join(REPO, 'examples', 'model_garden_train.py')
# The mock experiment is registered by a test module, imported first.
RUN_WITH_MOCK = ('import runpy; from official.utils.testing import mock_task; '
                 f'runpy.run_path({EXAMPLE!r}, run_name="__main__")')
SGD = {'optimizer': {'type': 'sgd'},
       'learning_rate': {'type': 'constant',
                         'constant': {'learning_rate': 0.1}}}


def run_example(args, timeout: float, mock: bool = False):
  command = [sys.executable] + (['-c', RUN_WITH_MOCK] if mock else [EXAMPLE])
  done = subprocess.run(command + args, capture_output=True, text=True,
                        timeout=timeout, env=child_env(CUDA_VISIBLE_DEVICES=''),
                        cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_mock_experiment(tmp_path):
  model_dir = str(tmp_path / 'model')
  override = {'trainer': {'train_steps': 6, 'steps_per_loop': 2,
                          'checkpoint_interval': 2, 'max_to_keep': 2,
                          'validation_steps': 1, 'validation_interval': 2,
                          'optimizer_config': SGD}}
  serving_dir = str(tmp_path / 'serving')
  run_example(['--experiment=mock', '--mode=train_and_eval',
               f'--model_dir={model_dir}', f'--serving_dir={serving_dir}',
               f'--params_override={json.dumps(override)}'], 120, mock=True)
  assert_exports_match_checkpoints(model_dir, [4, 6])
  assert os.path.exists(os.path.join(model_dir, 'params.yaml'))
  # The serving view: TF Serving's layout, the newest two versions.
  assert sorted(os.listdir(serving_dir)) == ['model', 'models.config']
  assert serving.versions(serving_dir, 'model') == [4, 6]
  assert sorted(os.listdir(os.path.join(serving_dir, 'model'))) == ['4', '6']
  for step in (4, 6):
    np.testing.assert_allclose(
        served_outputs(serving_dir, f'model/{step}'),
        checkpoint_outputs(model_dir, step), rtol=1e-6)


def write_jpeg_records(directory: str, count: int = 16) -> str:
  """Writes `count` random 32x32 JPEG examples in two files; returns a glob."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  for shard in range(2):
    path = os.path.join(directory, f'data-{shard}.tfrecord')
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(count // 2):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        feature = {
            'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[tf.io.encode_jpeg(image).numpy()])),
            'image/format': tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[b'jpeg'])),
            'image/class/label': tf.train.Feature(int64_list=tf.train.Int64List(
                value=[int(rng.integers(0, 10))])),
        }
        writer.write(tf.train.Example(features=tf.train.Features(
            feature=feature)).SerializeToString())
  return os.path.join(directory, 'data-*.tfrecord')


def vision_override(pattern: str) -> dict:
  data = {'input_path': pattern, 'global_batch_size': 4, 'dtype': 'float32'}
  return {
      'runtime': {'distribution_strategy': 'one_device', 'num_gpus': 0,
                  'mixed_precision_dtype': 'float32'},
      'task': {
          'model': {'num_classes': 10, 'input_size': [32, 32, 3],
                    'backbone': {'type': 'resnet',
                                 'resnet': {'model_id': 18}}},
          'train_data': data,
          'validation_data': {**data, 'is_training': False,
                              'drop_remainder': False}},
      'trainer': {'train_steps': 4, 'steps_per_loop': 2,
                  'checkpoint_interval': 2, 'max_to_keep': 3,
                  'validation_steps': 1, 'validation_interval': 4,
                  'summary_interval': 2, 'optimizer_config': SGD}}


@pytest.mark.slow
def test_resnet_imagenet_exports_classify_as_their_checkpoint(tmp_path):
  override = vision_override(write_jpeg_records(str(tmp_path / 'data')))
  model_dir = str(tmp_path / 'model')
  run_example(['--experiment=resnet_imagenet', '--mode=train_and_eval',
               f'--model_dir={model_dir}',
               f'--params_override={json.dumps(override)}'], 240)
  exports = readers.list_savedmodels(model_dir)
  assert [paths.parse_export_step(p) for p in exports] == [2, 4]

  params = exp_factory.get_exp_config('resnet_imagenet')
  params.override(override, is_strict=True)
  images = tf.constant(np.random.default_rng(1).integers(
      0, 256, (3, 40, 48, 3), dtype=np.uint8))
  served = []
  for export_dir in exports:
    loaded = tf.saved_model.load(os.path.join(export_dir, 'classifier'))
    out = loaded.signatures['serving_default'](images)
    model = task_factory.get_task(params.task).build_model()
    tf.train.Checkpoint(model=model).read(os.path.join(
        model_dir, f'ckpt-{paths.parse_export_step(export_dir)}')
                                         ).expect_partial()
    module = image_classification.ClassificationModule(
        params, batch_size=None, input_image_size=[32, 32], model=model)
    expected = module.inference_from_image_tensors(images)
    np.testing.assert_allclose(out['logits'].numpy(),
                               expected['logits'].numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(np.argmax(out['probs'], -1),
                                  np.argmax(expected['probs'], -1))
    served.append(out['logits'].numpy())
  # Each export serves its own step's weights.
  assert not np.allclose(served[0], served[1])


@pytest.mark.slow
def test_mock_experiment_on_two_workers(tmp_path):
  """MultiWorkerMirrored: the chief writes model_dir, worker 1 no temp dir."""
  model_dir = str(tmp_path / 'model')
  override = {'runtime': {'distribution_strategy': 'multi_worker_mirrored'},
              'trainer': {'train_steps': 4, 'steps_per_loop': 2,
                          'checkpoint_interval': 2, 'max_to_keep': 2,
                          'optimizer_config': SGD}}
  procs = [subprocess.Popen(
      [sys.executable, '-c', RUN_WITH_MOCK, '--experiment=mock',
       '--mode=train', f'--model_dir={model_dir}',
       f'--params_override={json.dumps(override)}'],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
      cwd=REPO) for env in worker_envs(tmp_path, 2, CUDA_VISIBLE_DEVICES='')]
  finish(procs, 240)
  assert_exports_match_checkpoints(model_dir, [2, 4])
  # Model Garden's runner would leave a mkdtemp() directory on worker 1.
  assert os.listdir(tmp_path / 'tmp1') == []


@pytest.mark.slow
def test_continuous_eval_of_exports_beside_the_trainer(tmp_path):
  """`--mode=continuous_eval --evaluate_exports` while the trainer runs."""
  model_dir = str(tmp_path / 'model')
  override = json.dumps({'trainer': {
      'train_steps': 8, 'steps_per_loop': 2, 'checkpoint_interval': 2,
      'max_to_keep': 2, 'validation_steps': 1, 'continuous_eval_timeout': 120,
      'optimizer_config': SGD}})
  env = child_env(CUDA_VISIBLE_DEVICES='')
  procs = [subprocess.Popen(
      [sys.executable, '-c', RUN_WITH_MOCK, '--experiment=mock',
       f'--mode={mode}', f'--model_dir={model_dir}',
       f'--params_override={override}', *extra],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
      cwd=REPO) for mode, extra in (('continuous_eval', ['--evaluate_exports']),
                                    ('train', []))]
  errors = [stderr for _, stderr in finish(procs, 240)]
  # orbit logs each evaluation with the global step, here the export's.
  evaluated = [int(s) for s in re.findall(r'eval \| step: +(\d+) \| running',
                                          errors[0])]
  assert evaluated and evaluated[-1] == 8, errors[0][-3000:]
  assert evaluated == sorted(set(evaluated))
  assert set(evaluated) <= {2, 4, 6, 8}
  print(f'\nexports evaluated: {evaluated}')
  assert_exports_match_checkpoints(model_dir, [6, 8])
  assert not tf.io.gfile.glob(os.path.join(model_dir, '.ckpt_export',
                                           'leases', '*'))
