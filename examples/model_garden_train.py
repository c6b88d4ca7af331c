"""Model Garden's vision training driver, exporting at each checkpoint.

A drop-in for `official/vision/train.py`, with the same flags, whose training
modes also export a serving module with every checkpoint
(`<model_dir>/ckpt-<step>_saved_modules/<module>/`, see
`ckpt_export.model_garden.default_export_modules`):

    python examples/model_garden_train.py --experiment=resnet_imagenet \
        --mode=train_and_eval --model_dir=/tmp/model \
        --config_file=my_config.yaml --params_override='trainer.train_steps=100'

`--serving_dir=DIR` also publishes the latest export after each save as a
TF Serving version, `DIR/<module>/<step>/` (see `ckpt_export.serving`).
`--evaluate_exports` makes `--mode=continuous_eval` evaluate each export
instead of each checkpoint.
"""

from absl import app
from absl import flags
import gin
from official.common import distribute_utils
from official.common import flags as tfm_flags
from official.core import task_factory
from official.core import train_utils
from official.modeling import performance
from official.vision import registry_imports  # pylint: disable=unused-import
from official.vision.utils import summary_manager

from ckpt_export import model_garden

FLAGS = flags.FLAGS

flags.DEFINE_bool(
    'enable_async_checkpointing', default=True,
    help='A boolean indicating whether to enable async checkpoint saving')
flags.DEFINE_string(
    'serving_dir', default=None,
    help='Also publish the latest export after each save as a TF Serving '
    'version, <serving_dir>/<module>/<step>/.')
flags.DEFINE_bool(
    'evaluate_exports', default=False,
    help='In continuous_eval mode, evaluate each export instead of each '
    'checkpoint.')


def main(_) -> None:
  gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_params)
  params = train_utils.parse_configuration(FLAGS)
  model_dir = FLAGS.model_dir
  if 'train' in FLAGS.mode:
    # Pure eval modes do not write the config: a continuous evaluator would
    # race the trainer writing it.
    train_utils.serialize_config(params, model_dir)
  if params.runtime.mixed_precision_dtype:
    performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)
  strategy = distribute_utils.get_distribution_strategy(
      distribution_strategy=params.runtime.distribution_strategy,
      all_reduce_alg=params.runtime.all_reduce_alg,
      num_gpus=params.runtime.num_gpus,
      tpu_address=params.runtime.tpu)
  with strategy.scope():
    task = task_factory.get_task(params.task, logging_dir=model_dir)
  model_garden.run_experiment(
      distribution_strategy=strategy,
      task=task,
      mode=FLAGS.mode,
      params=params,
      model_dir=model_dir,
      eval_summary_manager=summary_manager.maybe_build_eval_summary_manager(
          params=params, model_dir=model_dir),
      enable_async_checkpointing=FLAGS.enable_async_checkpointing,
      export_modules=model_garden.default_export_modules,
      evaluate_exports=FLAGS.evaluate_exports,
      serving_dir=FLAGS.serving_dir)
  train_utils.save_gin_config(FLAGS.mode, model_dir)


if __name__ == '__main__':
  tfm_flags.define_flags()
  flags.mark_flags_as_required(['experiment', 'mode', 'model_dir'])
  app.run(main)
