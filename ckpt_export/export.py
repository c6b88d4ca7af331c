"""Writing `modules_to_export` as SavedModels with serving signatures.

Each module's signatures come from its `saved_model_signatures` attribute (the
reference's convention) or, without one, from what `tf.saved_model.save`
derives itself: a built Keras model's call, or a tf.Module's single
`tf.function` with an `input_signature`. Unlike the reference, a module that
ends up with no signature at all is an error, not a silent skip.
"""

import inspect
import os
from typing import Any, List, Mapping, Optional

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from ckpt_export import paths


def _has_static(obj: Any, name: str) -> bool:
  try:
    inspect.getattr_static(obj, name)
  except AttributeError:
    return False
  return True


def _could_have_signature(module: Any) -> bool:
  """Cheap check, without tracing, that a signature could be found later."""
  if _has_static(module, 'saved_model_signatures'):
    return True
  # Keras 3 and tf_keras models derive one from their inputs once built.
  if (_has_static(module, '_default_save_signature') or
      _has_static(module, '_get_save_spec')):
    return True
  candidates = list(vars(module).values()) + [
      inspect.getattr_static(module, n) for n in dir(type(module))]
  return any(isinstance(c, tf.types.experimental.PolymorphicFunction) and
             c.input_signature is not None for c in candidates)


def validate_modules(modules_to_export: Optional[Mapping[str, Any]]) -> None:
  """Checks `modules_to_export` before anything is written.

  Args:
    modules_to_export: None, or a mapping of module names to trackable objects
      (tf.Module, tf_keras or Keras 3 models).

  Raises:
    ValueError: For a mapping that is not one, a name that is not one plain
      path component or is reserved, an object that cannot be saved, or a
      module with no way to get serving signatures.
  """
  if modules_to_export is None:
    return
  if not isinstance(modules_to_export, Mapping):
    raise ValueError('modules_to_export must be a mapping of names to modules, '
                     f'got {modules_to_export!r}.')
  for name, module in modules_to_export.items():
    paths.validate_component('module name', name)
    if not isinstance(module, tf.__internal__.tracking.Trackable):
      raise ValueError(f'Module {name!r} is a {type(module).__name__}, which '
                       'tf.saved_model.save cannot save: pass a tf.Module or a '
                       'Keras model.')
    if not _could_have_signature(module):
      raise ValueError(
          f'Module {name!r} ({type(module).__name__}) has no way to get '
          'serving signatures: give it a `saved_model_signatures` attribute, '
          'or a tf.function with an input_signature.')


def signature_keys(saved_model_dir: str) -> List[str]:
  """Returns the serving signature keys of the SavedModel in a directory."""
  proto = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(saved_model_dir, 'saved_model.pb'),
                         'rb') as f:
    proto.ParseFromString(f.read())
  return sorted(key for graph in proto.meta_graphs
                for key in graph.signature_def if not key.startswith('__'))


def write_modules(modules_to_export: Mapping[str, Any], export_dir: str,
                  options: Optional[tf.saved_model.SaveOptions] = None) -> None:
  """Saves every module as `<export_dir>/<name>/`, each with its signatures.

  Args:
    modules_to_export: Validated modules, by name.
    export_dir: The (work) directory to write into.
    options: Passed to `tf.saved_model.save`.

  Raises:
    ValueError: If a module ends up with no serving signature.
  """
  for name, module in modules_to_export.items():
    write_module(name, module, os.path.join(export_dir, name), options)


def write_module(name: str, module: Any, module_dir: str,
                 options: Optional[tf.saved_model.SaveOptions] = None) -> None:
  """Saves one module as the SavedModel `module_dir`, with its signatures.

  Args:
    name: The module's name, for error messages.
    module: A validated module.
    module_dir: The directory to write the SavedModel into.
    options: Passed to `tf.saved_model.save`.

  Raises:
    ValueError: If the module ends up with no serving signature.
  """
  signatures = getattr(module, 'saved_model_signatures', None)
  tf.saved_model.save(module, module_dir, signatures=signatures,
                      options=options)
  if not signature_keys(module_dir):
    raise ValueError(
        f'Module {name!r} ({type(module).__name__}) has no serving signature:'
        ' it has no `saved_model_signatures` and TensorFlow derived none (a '
        'Keras model must be built with known input shapes first). Nothing '
        'was exported or checkpointed for this step.')
