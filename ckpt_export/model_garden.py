"""Model Garden training with ckpt_export's exports: a drop-in runner.

`run_experiment` takes `official.core.train_lib.run_experiment`'s arguments
plus `export_modules`, a callable `(task, model, params) -> {name: module}`
called once with the trainer's model; each checkpoint the training job saves
then gets an export of those modules, written by `SavedModelCheckpointManager`:

    from ckpt_export import model_garden
    model_garden.run_experiment(
        distribution_strategy=strategy, task=task, mode='train_and_eval',
        params=params, model_dir=model_dir,
        export_modules=model_garden.default_export_modules)

Modules may be Model Garden's serving modules (`export_base.ExportModule`) as
they are: their signatures come from `get_inference_signatures` (see
`savedmodel.py` for the function keys). `ExperimentRunner` is
`train_lib.OrbitExperimentRunner` with that manager, for code that builds its
runner itself.

Only the modes that train write the directory. The evaluation modes read it
with a plain `tf.train.CheckpointManager`, which never writes or deletes; with
`evaluate_exports`, `continuous_eval` evaluates each export instead of each
checkpoint: in step order, none skipped while it exists, each leased (so the
trainer's garbage collection keeps it) while the model is restored from it and
evaluated at its step.

With `serving_dir`, the chief also publishes the latest export after each
save into a TF Serving view there (`serving.py`): `<serving_dir>/<module>/
<step>/`. A failure to publish is logged, never fatal to training; the next
save publishes again.

Under tf.distribute every worker passes the same `model_dir`: the manager
writes it from the chief only, and other workers save into scratch
directories it removes (`distribution.py`), so unlike Model Garden's runner no
temporary directory is made (and left) for non-chief workers.

This module imports `official` (Model Garden); nothing else in ckpt_export
imports this module, so only its users need Model Garden installed.
"""

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from absl import logging
from official.core import train_lib
import tensorflow as tf

from ckpt_export import manager
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import serving

# (task, model, params) -> the modules to export at each checkpoint, by name.
ExportModulesFn = Callable[[Any, Any, Any], Mapping[str, tf.Module]]


def default_export_modules(task: Any, model: Any,
                           params: Any) -> Dict[str, tf.Module]:
  """A serving module for the trained model, by the experiment's task.

  Args:
    task: The experiment's task (unused; the config says what it is).
    model: The trainer's model, whose weights the exports hold.
    params: The experiment config.

  Returns:
    `{'classifier': ClassificationModule}` for an image classification task,
    serving uint8 image tensors of any size (resized to the model's input
    size) as `serving_default`, with `logits` and `probs`; `{'model': model}`
    (the Keras model's own signature) for any other task.
  """
  del task
  # Imported here: the vision package is large and only classification uses
  # it.
  # pylint: disable=g-import-not-at-top
  from official.vision.configs import image_classification as config
  from official.vision.serving import image_classification
  # pylint: enable=g-import-not-at-top
  if isinstance(params.task, config.ImageClassificationTask):
    height, width, channels = params.task.model.input_size
    return {'classifier': image_classification.ClassificationModule(
        params, batch_size=None, input_image_size=[height, width],
        num_channels=channels, model=model)}
  return {'model': model}


class _PublishingManager(manager.SavedModelCheckpointManager):
  """A manager publishing its latest export into a serving view (chief only)."""

  def __init__(self, *args: Any, serving_dir: str, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._serving_dir = serving_dir
    self._serving_view = None  # Opened (and recovered) by the chief only.

  def _publish(self) -> None:
    if not self._is_chief():
      return
    try:
      if self._serving_view is None:
        self._serving_view = serving.ServingView(self._serving_dir)
      self._serving_view.publish_latest(self.directory)
    except (tf.errors.OpError, OSError) as e:
      logging.warning('Could not publish the latest export into %s (the next '
                      'save tries again): %s', self._serving_dir, e)

  def save(self, *args: Any, **kwargs: Any) -> Optional[str]:
    path = super().save(*args, **kwargs)
    if path is not None:
      self._publish()
    return path

  def sync(self) -> None:
    super().sync()
    self._publish()


class ExperimentRunner(train_lib.OrbitExperimentRunner):
  """`train_lib.OrbitExperimentRunner` saving with ckpt_export's manager."""

  def __init__(self,
               *args: Any,
               export_modules: Optional[ExportModulesFn] = None,
               evaluate_exports: Union[bool, str] = False,
               serving_dir: Optional[str] = None,
               **kwargs: Any):
    """Builds the runner; arguments as `OrbitExperimentRunner`'s, plus:

    Args:
      *args: `OrbitExperimentRunner`'s positional arguments.
      export_modules: Called as `export_modules(task, model, params)` with
        the trainer's model in the modes that train, inside the strategy's
        scope; returns the modules to export at each checkpoint, by name.
        None exports nothing.
      evaluate_exports: In `continuous_eval` mode, evaluate exports instead
        of checkpoints: True if `export_modules` returns one module, else the
        name of the module to restore the model from.
      serving_dir: When training with `export_modules`, publish the latest
        export after each save into a `serving.ServingView` there.
      **kwargs: `OrbitExperimentRunner`'s keyword arguments.

    Raises:
      ValueError: For `evaluate_exports` or `serving_dir` without
        `export_modules`.
    """
    for name, value in (('evaluate_exports', evaluate_exports),
                        ('serving_dir', serving_dir)):
      if value and export_modules is None:
        raise ValueError(f'{name}={value!r} needs export_modules, to know '
                         'what the exports hold.')
    self._serving_dir = serving_dir
    self._export_modules = export_modules
    self._evaluate_exports = evaluate_exports
    super().__init__(*args, **kwargs)

  def _maybe_build_checkpoint_manager(
      self) -> Optional[tf.train.CheckpointManager]:
    """A `SavedModelCheckpointManager` when training, else a plain manager."""
    if not self.trainer.checkpoint:
      return None
    if self.model_dir is None:
      raise ValueError('model_dir must be specified, but got None')
    kwargs = dict(max_to_keep=self.params.trainer.max_to_keep,
                  step_counter=self.trainer.global_step,
                  checkpoint_interval=self.params.trainer.checkpoint_interval,
                  init_fn=self.trainer.initialize)
    if 'train' not in self._mode:
      return tf.train.CheckpointManager(self.trainer.checkpoint,
                                        self.model_dir, **kwargs)
    modules = None
    if self._export_modules is not None:
      with self.strategy.scope():
        modules = self._export_modules(self.trainer.task, self.trainer.model,
                                       self.params)
    if self._serving_dir:
      return _PublishingManager(
          self.trainer.checkpoint, self.model_dir, modules_to_export=modules,
          serving_dir=self._serving_dir, **kwargs)
    return manager.SavedModelCheckpointManager(
        self.trainer.checkpoint, self.model_dir, modules_to_export=modules,
        **kwargs)

  def run(self) -> Tuple[Any, Mapping[str, Any]]:
    """Runs the mode, as `OrbitExperimentRunner.run`; see `__init__`."""
    if self._mode == 'continuous_eval' and self._evaluate_exports:
      return self.trainer.model, self._evaluate_exports_continuously()
    return super().run()

  def _module_to_evaluate(self) -> Tuple[str, tf.Module]:
    """The exported module holding the trainer's model, and its name."""
    with self.strategy.scope():
      modules = self._export_modules(self.trainer.task, self.trainer.model,
                                     self.params)
    name = self._evaluate_exports
    if name is True:
      if len(modules) != 1:
        raise ValueError(
            f'evaluate_exports=True but export_modules returns modules '
            f'{sorted(modules)}: pass the name of the one to evaluate.')
      name = next(iter(modules))
    if name not in modules:
      raise ValueError(f'evaluate_exports={name!r} is none of the exported '
                       f'modules {sorted(modules)}.')
    module = modules[name]
    held = {id(v) for v in module.variables}
    if not all(id(v) in held for v in self.trainer.model.trainable_variables):
      raise ValueError(
          f'Module {name!r} does not hold the trainer\'s model: restoring it '
          'from an export would leave the evaluated model unchanged. Build it '
          'from the `model` export_modules is given.')
    return name, module

  def _evaluate_exports_continuously(self) -> Mapping[str, Any]:
    """Evaluates each new export, leased, until training's last step.

    Returns:
      The metrics of the last evaluation ({} if there was none).
    """
    params = self.params
    name, module = self._module_to_evaluate()
    checkpoint = tf.train.Checkpoint(root=module)
    global_step = self.trainer.global_step

    def timeout_fn() -> bool:
      return global_step.numpy() >= params.trainer.train_steps

    output = {}
    for path in readers.savedmodels_iterator(
        self.model_dir, timeout=params.trainer.continuous_eval_timeout,
        timeout_fn=timeout_fn):
      step = paths.parse_export_step(path)
      logging.info('Evaluating export %s.', path)
      with self.strategy.scope():
        checkpoint.read(os.path.join(path, name, 'variables', 'variables')
                       ).assert_existing_objects_matched().expect_partial()
        global_step.assign(step)
        output = self.controller.evaluate(
            steps=params.trainer.validation_steps)
      if timeout_fn():
        break
    return output or {}


def run_experiment(
    *args: Any,
    export_modules: Optional[ExportModulesFn] = None,
    evaluate_exports: Union[bool, str] = False,
    serving_dir: Optional[str] = None,
    **kwargs: Any) -> Tuple[Any, Mapping[str, Any]]:
  """`train_lib.run_experiment`, exporting `export_modules` at each save.

  Args:
    *args: `train_lib.run_experiment`'s positional arguments
      (distribution_strategy, task, mode, params, model_dir, ...).
    export_modules: See `ExperimentRunner`.
    evaluate_exports: See `ExperimentRunner`.
    serving_dir: See `ExperimentRunner`.
    **kwargs: `train_lib.run_experiment`'s keyword arguments.

  Returns:
    (model, eval logs), as `train_lib.run_experiment`.
  """
  return ExperimentRunner(*args, export_modules=export_modules,
                          evaluate_exports=evaluate_exports,
                          serving_dir=serving_dir, **kwargs).run()
