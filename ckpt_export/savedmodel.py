"""Writing `modules_to_export` as SavedModels with serving signatures.

Each module's signatures come from its `saved_model_signatures` attribute (the
reference's convention) or, without one, from what `tf.saved_model.save`
derives itself: a built Keras model's call, or a tf.Module's single
`tf.function` with an `input_signature`. Unlike the reference, a module that
ends up with no signature at all is an error, not a silent skip.

Model Garden's serving modules (`official.core.export_base.ExportModule`)
have no `saved_model_signatures`: theirs come from
`get_inference_signatures(function_keys)`, as in Model Garden's own
`export_base.export`. The function keys are the module's
`serving_function_keys` attribute if it has one: a mapping of function keys to
signature keys, or a list (or one string) of function keys, the first served
as `serving_default` and the others under their own names. Without it, a
vision module (which has an input type) serves its input type as
`serving_default`, as Model Garden's export script does, and any other module
serves `serve`.
"""

import inspect
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from ckpt_export import _tf_internals
from ckpt_export import paths


def _has_static(obj: Any, name: str) -> bool:
  try:
    inspect.getattr_static(obj, name)
  except AttributeError:
    return False
  return True


def _is_trackable(module: Any) -> bool:
  """Whether `tf.saved_model.save` can save `module` (it has children)."""
  try:
    tf.train.TrackableView.children(module)
  except (AttributeError, TypeError):
    return False
  return True


def _could_have_signature(module: Any) -> bool:
  """Cheap check, without tracing, that a signature could be found later."""
  if (_has_static(module, 'saved_model_signatures') or
      _has_static(module, 'get_inference_signatures')):
    return True
  # Keras 3 and tf_keras models derive one from their inputs once built.
  attributes = _tf_internals.keras_signature_attributes()
  if attributes is None and _tf_internals.is_keras_model(module):
    return True
  if any(_has_static(module, name) for name in attributes or ()):
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
      module with no way to get serving signatures or malformed
      `serving_function_keys`.
  """
  if modules_to_export is None:
    return
  if not isinstance(modules_to_export, Mapping):
    raise ValueError('modules_to_export must be a mapping of names to modules, '
                     f'got {modules_to_export!r}.')
  for name, module in modules_to_export.items():
    paths.validate_component('module name', name)
    if not _is_trackable(module):
      raise ValueError(f'Module {name!r} is a {type(module).__name__}, which '
                       'tf.saved_model.save cannot save: pass a tf.Module or a '
                       'Keras model.')
    if not _has_static(module, 'saved_model_signatures') and _has_static(
        module, 'get_inference_signatures'):
      _function_keys(name, module)
    if not _could_have_signature(module):
      raise ValueError(
          f'Module {name!r} ({type(module).__name__}) has no way to get '
          'serving signatures: give it a `saved_model_signatures` attribute, '
          'or a tf.function with an input_signature.')


def _function_keys(name: str, module: Any) -> Dict[str, str]:
  """The function keys to pass to a module's `get_inference_signatures`."""
  keys = getattr(module, 'serving_function_keys', None)
  if keys is None:
    keys = getattr(module, '_input_type', 'serve')
  if isinstance(keys, str):
    keys = [keys]
  if isinstance(keys, (dict, Mapping)):  # tf.Module wraps a dict in a proxy.
    keys = dict(keys)
  elif isinstance(keys, Sequence):
    keys = list(keys)  # Not tf.Module's wrapper, in messages.
  if isinstance(keys, list) and keys:
    keys = {k: k for k in keys}
    keys[next(iter(keys))] = tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
  if not (isinstance(keys, dict) and keys and all(
      isinstance(k, str) and isinstance(v, str) for k, v in keys.items())):
    raise ValueError(
        f'Module {name!r} has serving_function_keys {keys!r}: give a mapping '
        'of function keys to signature keys, or a list of function keys.')
  return keys


def signatures_of(name: str, module: Any) -> Any:
  """The `signatures` argument of `tf.saved_model.save` for a module.

  Args:
    name: The module's name, for error messages.
    module: A validated module.

  Returns:
    Its `saved_model_signatures`, the signatures its
    `get_inference_signatures` makes (see above), or None.

  Raises:
    ValueError: If the module's function keys are malformed or it rejects
      them.
  """
  signatures = getattr(module, 'saved_model_signatures', None)
  if signatures is not None or not callable(
      getattr(module, 'get_inference_signatures', None)):
    return signatures
  keys = _function_keys(name, module)
  try:
    return module.get_inference_signatures(keys)
  except ValueError as e:
    raise ValueError(
        f'Module {name!r} ({type(module).__name__}) rejected function keys '
        f'{keys!r} ({e}): set its `serving_function_keys` attribute to keys '
        'its get_inference_signatures knows.') from e


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
  signatures = signatures_of(name, module)
  tf.saved_model.save(module, module_dir, signatures=signatures,
                      options=options)
  if not signature_keys(module_dir):
    raise ValueError(
        f'Module {name!r} ({type(module).__name__}) has no serving signature:'
        ' it has no `saved_model_signatures` and TensorFlow derived none (a '
        'Keras model must be built with known input shapes first). Nothing '
        'was exported or checkpointed for this step.')
