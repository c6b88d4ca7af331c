"""Fast exports: a module's graph traced once, its variables written per save.

Most of `tf.saved_model.save`'s cost is tracing and serializing a graph that
does not change between saves; only variable values do. A `ModuleExporter`
keeps a *template* per module: the files of its last full export except the
variables (`saved_model.pb`, `keras_metadata.pb`, assets), the checkpoint keys
of its variables and its serialized object graph, all taken from what
`tf.saved_model.save` wrote. While the module's *structure* is unchanged, an
export is the template's files plus a fresh `variables/` checkpoint with the
same keys, dtypes, shapes and object graph, holding the current values, and a
regenerated `fingerprint.pb` (it hashes the variables' index): a standard
SavedModel, the same as a full export of the same values.

The structure is everything a full export's graph depends on and that can
change during training: the trackable objects reachable from the module (as a
checkpoint sees them) with their children's names, the variables' shapes and
dtypes, every `tf.function` attribute of those objects with its tracing count
(a retrace with new shapes adds a concrete function to the export), and the
module's `saved_model_signatures`. Any change makes the next export a full one,
which becomes the new template.

A template is used only if writing its variables the fast way reproduces the
full export's variables exactly (keys, dtypes, shapes, object graph, values);
that is checked once per template. Modules holding state other than plain
variables (lookup tables, custom savers) fail that check and always get full
exports.

Values are snapshot on the calling thread (`read_value()`, which on CPU shares
the variable's buffer until the next update copies it: copy on write), so the
variables can be written later, off the training thread, and still hold
exactly the values of the step being saved.
"""

import collections
import concurrent.futures
import copy
import os
import tempfile
import weakref
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ckpt_export import _tf_internals
from ckpt_export import commit
from ckpt_export import export

_OBJECT_GRAPH_KEY = _tf_internals.OBJECT_GRAPH_KEY
_VARIABLE_VALUE = 'VARIABLE_VALUE'
_VARIABLES_DIR = 'variables'
_FINGERPRINT = 'fingerprint.pb'

# Names of the class attributes that are tf.functions, by class.
_class_functions = weakref.WeakKeyDictionary()


def _function_names_of_class(cls: type) -> Tuple[str, ...]:
  names = _class_functions.get(cls)
  if names is None:
    names = tuple(
        name for klass in cls.__mro__ for name, value in vars(klass).items()
        if isinstance(value, tf.types.experimental.PolymorphicFunction))
    _class_functions[cls] = names
  return names


def _functions_of(obj: Any) -> List[Tuple[str, Any]]:
  """The tf.functions reachable as attributes of `obj`, by name."""
  found = [(name, value) for name, value in getattr(obj, '__dict__', {}).items()
           if isinstance(value, tf.types.experimental.PolymorphicFunction)]
  for name in _function_names_of_class(type(obj)):
    found.append((name, getattr(obj, name)))
  return found


class _Structure:
  """What a module's exported graph depends on, compared by identity."""

  def __init__(self, module: Any):
    objects = []  # Kept alive, so that the ids below stay theirs.
    described = []
    seen = {id(module)}
    queue = collections.deque([module])
    while queue:
      obj = queue.popleft()
      objects.append(obj)
      children = tf.train.TrackableView.children(obj)
      entry = [type(obj), tuple((name, id(child))
                                for name, child in sorted(children.items()))]
      if isinstance(obj, tf.Variable):
        entry += [tuple(obj.shape.as_list()) if obj.shape.rank is not None
                  else None, obj.dtype]
      for name, function in _functions_of(obj):
        objects.append(function)
        entry.append((name, id(function),
                      function.experimental_get_tracing_count()))
      described.append((id(obj), tuple(entry)))
      for child in children.values():
        if id(child) not in seen:
          seen.add(id(child))
          queue.append(child)
    signatures = getattr(module, 'saved_model_signatures', None)
    if isinstance(signatures, Mapping):
      for key in sorted(signatures):
        function = signatures[key]
        objects.append(function)
        count = (function.experimental_get_tracing_count() if isinstance(
            function, tf.types.experimental.PolymorphicFunction) else None)
        described.append(('signature', key, id(function), count))
    else:
      objects.append(signatures)
      described.append(('signatures', id(signatures)))
    self._objects = objects
    self._described = tuple(described)

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, _Structure) and
            self._described == other._described)

  def __hash__(self) -> int:
    return hash(self._described)


class _Template:
  """A full export's files and variable layout, to write fast exports from."""

  def __init__(self, module_dir: str, module: Any):
    self.dirs = []  # Relative paths, such as an empty assets/.
    self.files = {}  # Relative path -> bytes, but variables/ and fingerprint.
    self.has_fingerprint = False
    for directory, _, names in tf.io.gfile.walk(module_dir):
      relative_dir = os.path.relpath(directory.rstrip('/'), module_dir)
      if relative_dir.split(os.sep)[0] == _VARIABLES_DIR:
        continue
      self.dirs.append(relative_dir)
      for name in names:
        relative = os.path.normpath(os.path.join(relative_dir, name))
        if relative == _FINGERPRINT:
          self.has_fingerprint = True
          continue
        with tf.io.gfile.GFile(os.path.join(directory, name), 'rb') as f:
          self.files[relative] = f.read()
    reader = tf.compat.v1.train.NewCheckpointReader(
        _variables_prefix(module_dir))
    self.object_graph = reader.get_tensor(_OBJECT_GRAPH_KEY)
    self.keys, self.variables = _variables_by_key(module, self.object_graph)

  def snapshot(self) -> List[tf.Tensor]:
    """The variables' current values, in key order (copy on write on CPU)."""
    return [v.read_value() for v in self.variables]

  def write_variables(self, module_dir: str, values: Sequence[tf.Tensor]
                     ) -> None:
    """Writes `values` as the SavedModel's checkpoint `variables/`."""
    tf.io.gfile.makedirs(os.path.join(module_dir, _VARIABLES_DIR))
    with tf.device('CPU:0'):
      tf.raw_ops.SaveV2(
          prefix=_variables_prefix(module_dir),
          tensor_names=self.keys + [_OBJECT_GRAPH_KEY],
          shape_and_slices=[''] * (len(self.keys) + 1),
          tensors=list(values) + [tf.constant(self.object_graph)])

  def write(self, module_dir: str, values: Sequence[tf.Tensor]) -> None:
    """Writes a complete SavedModel of `values` into `module_dir`."""
    for relative in self.dirs:
      tf.io.gfile.makedirs(os.path.normpath(os.path.join(module_dir, relative)))
    for relative, content in self.files.items():
      with tf.io.gfile.GFile(os.path.join(module_dir, relative), 'wb') as f:
        f.write(content)
    self.write_variables(module_dir, values)
    if self.has_fingerprint:
      _tf_internals.write_fingerprint(module_dir)


def _variables_prefix(module_dir: str) -> str:
  return os.path.join(module_dir, _VARIABLES_DIR, _VARIABLES_DIR)


def _variables_by_key(module: Any, object_graph: bytes
                     ) -> Tuple[List[str], List[tf.Variable]]:
  """Maps the checkpoint keys of a full export to the module's variables.

  The export's object graph is walked from its root along the children a
  checkpoint sees (the SavedModel's own extra paths, such as Keras's
  `variables/<i>`, lead to the same nodes).

  Args:
    module: The exported module.
    object_graph: The serialized `TrackableObjectGraph` of its export.

  Returns:
    The keys, sorted, and the variable of each.

  Raises:
    ValueError: If some saved value is not a plain variable's, or its object
      cannot be found on the module.
  """
  graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
      object_graph)
  objects = {0: module}
  queue = collections.deque([0])
  while queue:
    node_id = queue.popleft()
    children = tf.train.TrackableView.children(objects[node_id])
    for reference in graph.nodes[node_id].children:
      child = children.get(reference.local_name)
      if child is None or reference.node_id in objects:
        if child is not None and objects[reference.node_id] is not child:
          raise ValueError(f'node {reference.node_id} is two objects')
        continue
      objects[reference.node_id] = child
      queue.append(reference.node_id)
  by_key = {}
  for node_id, node in enumerate(graph.nodes):
    if node.slot_variables:
      raise ValueError('slot variables are exported')
    for attribute in node.attributes:
      obj = objects.get(node_id)
      if attribute.name != _VARIABLE_VALUE or not isinstance(obj, tf.Variable):
        raise ValueError(f'{attribute.checkpoint_key} is not a plain '
                         "variable's value")
      by_key[attribute.checkpoint_key] = obj
  keys = sorted(by_key)
  return keys, [by_key[key] for key in keys]


def _same_variables(prefix_a: str, prefix_b: str) -> bool:
  """Whether two checkpoints hold the same keys, dtypes, shapes and values."""
  a, b = (tf.compat.v1.train.NewCheckpointReader(prefix)
          for prefix in (prefix_a, prefix_b))
  if (a.get_variable_to_dtype_map() != b.get_variable_to_dtype_map() or
      a.get_variable_to_shape_map() != b.get_variable_to_shape_map()):
    return False
  for key in a.get_variable_to_shape_map():
    x, y = a.get_tensor(key), b.get_tensor(key)
    if isinstance(x, np.ndarray):
      x, y = x.tobytes(), np.asarray(y).tobytes()
    if x != y:
      return False
  return True


class ModuleExporter:
  """Exports one module: in full when its structure changed, else fast."""

  def __init__(self, name: str, module: Any):
    self.name = name
    self.module = module
    self._structure = None
    self._template = None  # None while the structure has no usable template.
    self._unusable = None  # A structure whose template failed its check.
    self.full_exports = 0
    self.fast_exports = 0

  def snapshot(self) -> Optional[List[tf.Tensor]]:
    """Values for a fast export, or None if the next export must be full."""
    if self._template is None or _Structure(self.module) != self._structure:
      return None
    return self._template.snapshot()

  def write_full(self, export_dir: str) -> None:
    """Exports in full with `tf.saved_model.save`; makes it the template."""
    module_dir = os.path.join(export_dir, self.name)
    export.write_module(self.name, self.module, module_dir)
    self.full_exports += 1
    # Taken after the export, which may trace functions it then includes.
    self._structure = _Structure(self.module)
    self._template = None
    if self._structure != self._unusable:
      self._template = self._make_template(module_dir)
      if self._template is None:
        self._unusable = self._structure

  def write_fast(self, export_dir: str, values: Sequence[tf.Tensor]) -> None:
    """Writes a SavedModel of `values` (from `snapshot()`) from the template."""
    self._template.write(os.path.join(export_dir, self.name), values)
    self.fast_exports += 1

  def _make_template(self, module_dir: str) -> Optional[_Template]:
    """The template of a fresh full export, or None if it cannot be used."""
    if not _tf_internals.fast_exports_supported():
      return None
    try:
      template = _Template(module_dir, self.module)
    except ValueError as e:
      logging.warning('Module %r gets full exports only: %s.', self.name, e)
      return None
    with tempfile.TemporaryDirectory(prefix='ckpt_export_check_') as scratch:
      template.write_variables(scratch, template.snapshot())
      if not _same_variables(_variables_prefix(scratch),
                             _variables_prefix(module_dir)):
        logging.warning('Module %r gets full exports only: its variables '
                        'cannot be written as tf.saved_model.save does.',
                        self.name)
        return None
    return template


class Exporter:
  """Writes the exports of `modules_to_export`, one step after another.

  `export()` publishes a step's export through the commit protocol, on the
  calling thread, or, when asked to and every module can be exported fast, in
  a background thread from values snapshot on the calling thread. Background
  exports run one at a time, in order; the first error among them is raised
  once, by the next `export()` or `wait()`.
  """

  def __init__(self, modules_to_export: Mapping[str, Any]):
    self.modules = [ModuleExporter(name, module)
                    for name, module in modules_to_export.items()]
    self._executor = None
    self._pending = []

  @property
  def pending(self) -> bool:
    """Whether background exports were started and not waited for."""
    return bool(self._pending)

  def export(self, export_dir: str, commit_info: Mapping[str, Any],
             background: bool = False
            ) -> Optional[concurrent.futures.Future]:
    """Exports every module as `export_dir`, now or in the background.

    Args:
      export_dir: The final export path.
      commit_info: Metadata for the commit marker.
      background: Whether the export may be written and published in a
        background thread (only if every module can be exported fast).

    Returns:
      The background export's future (its result is None once published), or
      None if the export is already published.

    Raises:
      Exception: An earlier background export's error, or this export's.
    """
    self.wait()
    snapshots = [module.snapshot() for module in self.modules]
    if (background and all(values is not None for values in snapshots) and
        _tf_internals.background_exports_supported()):
      if self._executor is None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix='ckpt_export')
      future = self._executor.submit(self._write, export_dir, commit_info,
                                     snapshots)
      future.add_done_callback(_log_failure)
      self._pending.append(future)
      return future
    self._write(export_dir, commit_info, snapshots)
    return None

  def wait(self, raise_errors: bool = True) -> None:
    """Waits for the background exports; raises the first one's error."""
    pending, self._pending = self._pending, []
    errors = [e for e in (f.exception() for f in pending) if e is not None]
    for error in errors[1:]:
      logging.error('Another background export failed too: %r', error)
    if errors:
      if raise_errors:
        raise errors[0]
      logging.error('Background export failed: %r', errors[0])

  def _write(self, export_dir: str, commit_info: Mapping[str, Any],
             snapshots: Sequence[Optional[List[tf.Tensor]]]) -> None:
    with commit.staged_export(export_dir, dict(commit_info)) as tmp:
      for module, values in zip(self.modules, snapshots):
        if values is None:
          module.write_full(tmp)
        else:
          module.write_fast(tmp, values)


def _log_failure(future: concurrent.futures.Future) -> None:
  """Logs a background export's error when it happens (it is raised later)."""
  if future.exception() is not None:
    logging.error('Background export failed (raised by the next save() or '
                  'sync()): %r', future.exception())


def publish_before_recording(options: tf.train.CheckpointOptions,
                             export_future: concurrent.futures.Future
                            ) -> tf.train.CheckpointOptions:
  """Options for an async checkpoint that is recorded only after its export.

  `tf.train.CheckpointManager` records a checkpoint in its state file (and
  deletes old ones) in a write callback, run in TF's async thread after the
  checkpoint's files are written. The callback added here runs before it: it
  waits for the export to be published, or, if the export failed, deletes the
  checkpoint's files and raises, so that the checkpoint is never recorded.

  Args:
    options: The caller's options (not modified).
    export_future: The export of the same step, from `Exporter.export`.

  Returns:
    A copy of `options` with the callback first.
  """

  def wait_for_export(save_path: str) -> None:
    try:
      export_future.result()
    except BaseException:
      directory, name = os.path.split(save_path)
      for entry in tf.io.gfile.listdir(directory):
        if entry == name + '.index' or entry.startswith(name + '.data-'):
          tf.io.gfile.remove(os.path.join(directory, entry))
      raise

  options = copy.copy(options)
  options.experimental_write_callbacks = [wait_for_export] + list(
      options.experimental_write_callbacks or [])
  return options
