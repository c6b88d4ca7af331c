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

A manager's fast export is made once the step's checkpoint data is written
(`Exporter.checkpoint_options`). On local disk and `gs://` it then shares that
data: the checkpoint writes the exported variables into a shard of their own,
which the export hard-links (local disk) or copies server-side (`gs://`, see
`_GcsRewrites`), beside a small shard with its object graph and an index of
its own keys pointing at the checkpoint's entries (`bundle.py`). Whatever
cannot be shared is written instead, from values snapshot on the calling
thread in async mode (`read_value()`, which on CPU shares the variable's
buffer until the next update copies it: copy on write), so that they are
exactly the values of the step being saved.

In async mode a module without a usable template (the first export of a
process, or a changed structure) is traced after the checkpoint too, if cheap
checks on the training thread pass (`Exporter._plan_traces`: only plain
variables, all saved by the checkpoint): in the write callback,
`tf.saved_model.save` writes the graph into a scratch directory, the template
is taken from it, and the export is written from the checkpoint's values
(`ModuleExporter.write_traced`). Otherwise the full export is made on the
calling thread, before the checkpoint.
"""

import collections
import concurrent.futures
import copy
import dataclasses
import functools
import os
import tempfile
import urllib.parse
import uuid
import weakref
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence,
                    Tuple, Union)

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import fingerprint_pb2
from tensorflow.core.protobuf import tensor_bundle_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ckpt_export import _tf_internals
from ckpt_export import bundle
from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import savedmodel

_OBJECT_GRAPH_KEY = _tf_internals.OBJECT_GRAPH_KEY
_VARIABLE_VALUE = 'VARIABLE_VALUE'
_VARIABLES_DIR = 'variables'
_FINGERPRINT = 'fingerprint.pb'
# Instead of values kept for an export: they are read back from the checkpoint.
_IN_CHECKPOINT = object()
# Instead of values kept for an export: the module has no usable template; it
# is traced once the checkpoint is written (`ModuleExporter.write_traced`).
_TRACED = object()
# Where a module traced in the background is saved in full, in the export's
# work directory (removed before it is published).
_TRACE_DIR = paths.RESERVED_PREFIX + '_trace'

# Names of the class attributes that are tf.functions, by class.
_class_functions = weakref.WeakKeyDictionary()
# Whether instances of a type are tf.functions (an ABC check, slow), by type:
# a plain dict, looked up for every attribute of every object at each save
# (a weak one costs a weak reference per lookup); it holds the few types seen.
_is_function_type: Dict[type, bool] = {}


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
  found = []
  for name, value in getattr(obj, '__dict__', {}).items():
    kind = type(value)
    is_function = _is_function_type.get(kind)
    if is_function is None:
      is_function = isinstance(value, tf.types.experimental.PolymorphicFunction)
      _is_function_type[kind] = is_function
    if is_function:
      found.append((name, value))
  for name in _function_names_of_class(type(obj)):
    found.append((name, getattr(obj, name)))
  return found


def _fixed(function: Any) -> bool:
  """Whether `function` is a tf.function with an `input_signature`.

  Such a function is traced by `tf.saved_model.save` itself (at the first
  save of a process, even after `get_concrete_function()`), and no call
  makes it trace a graph with other shapes.
  """
  return getattr(function, 'input_signature', None) is not None


class _Structure:
  """What a module's exported graph depends on, compared by identity."""

  def __init__(self, module: Any):
    objects = []  # Kept alive, so that the ids below stay theirs.
    described = []
    fixed = []  # Tracing counts of the functions with an input_signature.
    seen = {id(module)}
    queue = collections.deque([module])
    while queue:
      obj = queue.popleft()
      objects.append(obj)
      children = tf.train.TrackableView.children(obj)
      entry = [type(obj), tuple((name, id(child))
                                for name, child in sorted(children.items()))]
      variable = _tf_internals.saved_variable(obj)
      if variable is not None:
        objects.append(variable)
        entry += [id(variable), tuple(variable.shape.as_list())
                  if variable.shape.rank is not None else None,
                  variable.dtype]
      for name, function in _functions_of(obj):
        objects.append(function)
        count = function.experimental_get_tracing_count()
        if _fixed(function):
          fixed.append(count)
          count = 'fixed'
        entry.append((name, id(function), count))
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
        if _fixed(function):
          fixed.append(count)
          count = 'fixed'
        described.append(('signature', key, id(function), count))
    else:
      objects.append(signatures)
      described.append(('signatures', id(signatures)))
    self._objects = objects
    self._described = tuple(described)
    self._fixed = tuple(fixed)

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, _Structure) and
            self._described == other._described and
            self._fixed == other._fixed)

  def __hash__(self) -> int:
    return hash(self._described)

  def traced_alike(self, other: '_Structure') -> bool:
    """Whether only functions with an `input_signature` traced in between.

    Compares a structure taken before a `tf.saved_model.save` with one taken
    after it: the save traces those functions itself; any other difference
    (a retrace by training meanwhile, a new variable) means the save may
    lack what the later structure holds.
    """
    return self._described == other._described


class _Template:
  """A full export's files and variable layout, to write fast exports from."""

  def __init__(self, module_dir: str, module: Any):
    self.dirs = []  # Relative paths, such as an empty assets/.
    self.files = {}  # Relative path -> bytes, but variables/ and fingerprint.
    self.fingerprint = None  # The full export's, if it has one.
    for directory, _, names in tf.io.gfile.walk(module_dir):
      relative_dir = os.path.relpath(directory.rstrip('/'), module_dir)
      if relative_dir.split(os.sep)[0] == _VARIABLES_DIR:
        continue
      self.dirs.append(relative_dir)
      for name in names:
        relative = os.path.normpath(os.path.join(relative_dir, name))
        with tf.io.gfile.GFile(os.path.join(directory, name), 'rb') as f:
          content = f.read()
        if relative == _FINGERPRINT:
          self.fingerprint = fingerprint_pb2.FingerprintDef.FromString(content)
        else:
          self.files[relative] = content
    prefix = _variables_prefix(module_dir)
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    self.object_graph = reader.get_tensor(_OBJECT_GRAPH_KEY)
    self.keys, self.variables = _variables_by_key(module, self.object_graph)
    with tf.io.gfile.GFile(prefix + '.index', 'rb') as f:
      self.header, _ = bundle.read_index(f.read())
    # The data shard of a linked export that holds the object graph.
    self.graph_shard, crc = bundle.string_tensor_data([self.object_graph])
    self.graph_entry = tensor_bundle_pb2.BundleEntryProto(
        dtype=tf.string.as_datatype_enum, size=len(self.graph_shard),
        crc32c=crc)

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

  def _write_files(self, module_dir: str, local: bool) -> None:
    """Writes the template's files (with `open` if `local`, else gfile)."""
    opener = open if local else tf.io.gfile.GFile
    for relative in self.dirs + [_VARIABLES_DIR]:
      # No normpath: it would turn `ram://x` into `ram:/x`, a local path.
      _makedirs(module_dir if relative == '.' else
                os.path.join(module_dir, relative), local)
    for relative, content in self.files.items():
      with opener(os.path.join(module_dir, relative), 'wb') as f:
        f.write(content)

  def _write_fingerprint(self, module_dir: str, index: bytes,
                         local: bool) -> None:
    """Writes the template's fingerprint with the hash of the new `index`.

    The other hashes cover `saved_model.pb`, which is the template's.
    """
    if self.fingerprint is None:
      return
    fingerprint = copy.copy(self.fingerprint)
    fingerprint.checkpoint_hash = _tf_internals.index_hash(index)
    if 'uuid' in fingerprint.DESCRIPTOR.fields_by_name:  # TF 2.19 and later.
      fingerprint.uuid = str(uuid.uuid4().int)
    opener = open if local else tf.io.gfile.GFile
    with opener(os.path.join(module_dir, _FINGERPRINT), 'wb') as f:
      f.write(fingerprint.SerializeToString())

  def write(self, module_dir: str, values: Sequence[tf.Tensor]) -> None:
    """Writes a complete SavedModel of `values` into `module_dir`."""
    self._write_files(module_dir, local=False)
    self.write_variables(module_dir, values)
    with tf.io.gfile.GFile(_variables_prefix(module_dir) + '.index',
                           'rb') as f:
      self._write_fingerprint(module_dir, f.read(), local=False)

  def write_linked(self, module_dir: str, link: '_Link',
                   sharer: '_Sharer') -> None:
    """Writes a SavedModel whose variables are a checkpoint's (see `_Link`)."""
    local = sharer.local
    self._write_files(module_dir, local)
    prefix = _variables_prefix(module_dir)
    shards = 2 if link.shard_path else 1
    entries = {}
    for key, entry in link.entries.items():
      entries[key] = copy.copy(entry)
      entries[key].shard_id = 0
    entries[_OBJECT_GRAPH_KEY] = copy.copy(self.graph_entry)
    entries[_OBJECT_GRAPH_KEY].shard_id = shards - 1
    if link.shard_path:
      sharer.share(link.shard_path, f'{prefix}.data-00000-of-{shards:05d}')
    opener = open if local else tf.io.gfile.GFile
    with opener(f'{prefix}.data-{shards - 1:05d}-of-{shards:05d}', 'wb') as f:
      f.write(self.graph_shard)
    header = copy.copy(self.header)
    header.num_shards = shards
    index = bundle.write_index(header, entries)
    with opener(prefix + '.index', 'wb') as f:
      f.write(index)
    self._write_fingerprint(module_dir, index, local)


def _makedirs(path: str, local: bool) -> None:
  if local:
    os.makedirs(path, exist_ok=True)
  else:
    tf.io.gfile.makedirs(path)


def _variables_prefix(module_dir: str) -> str:
  return os.path.join(module_dir, _VARIABLES_DIR, _VARIABLES_DIR)


def _objects_by_node(root: Any, object_graph: bytes
                    ) -> Tuple[trackable_object_graph_pb2.TrackableObjectGraph,
                               Dict[int, Any]]:
  """Maps the nodes of a serialized object graph of `root` to its objects.

  The graph is walked from its root along the children a checkpoint sees
  (a SavedModel's own extra paths, such as Keras's `variables/<i>`, lead to
  the same nodes).

  Raises:
    ValueError: If one node would be two objects.
  """
  graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
      object_graph)
  objects = {0: root}
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
  return graph, objects


def _variables_by_key(module: Any, object_graph: bytes
                     ) -> Tuple[List[str], List[tf.Variable]]:
  """Maps the checkpoint keys of a full export to the module's variables.

  Args:
    module: The exported module.
    object_graph: The serialized `TrackableObjectGraph` of its export.

  Returns:
    The keys, sorted, and the variable of each.

  Raises:
    ValueError: If some saved value is not a plain variable's, or its object
      cannot be found on the module.
  """
  graph, objects = _objects_by_node(module, object_graph)
  by_key = {}
  for node_id, node in enumerate(graph.nodes):
    if node.slot_variables:
      raise ValueError('slot variables are exported')
    for attribute in node.attributes:
      variable = _tf_internals.saved_variable(objects.get(node_id))
      if attribute.name != _VARIABLE_VALUE or variable is None:
        raise ValueError(f'{attribute.checkpoint_key} is not a plain '
                         "variable's value")
      by_key[attribute.checkpoint_key] = variable
  keys = sorted(by_key)
  return keys, [by_key[key] for key in keys]


def _checkpoint_keys(checkpoint: Any, object_graph: bytes) -> Dict[int, str]:
  """The checkpoint key of each plain variable of a checkpoint, by its id."""
  graph, objects = _objects_by_node(checkpoint, object_graph)
  keys = {}
  for node_id, obj in objects.items():
    variable = _tf_internals.saved_variable(obj)
    for attribute in graph.nodes[node_id].attributes:
      if attribute.name == _VARIABLE_VALUE and variable is not None:
        keys[id(variable)] = attribute.checkpoint_key
  return keys


def _same_variables(prefix_a: str, prefix_b: str,
                    values_of: Optional[Sequence[str]] = None) -> bool:
  """Whether two checkpoints hold the same keys, dtypes, shapes and values.

  Args:
    prefix_a: A checkpoint.
    prefix_b: Another.
    values_of: The keys whose values are compared; by default all.
  """
  a, b = (tf.compat.v1.train.NewCheckpointReader(prefix)
          for prefix in (prefix_a, prefix_b))
  if (a.get_variable_to_dtype_map() != b.get_variable_to_dtype_map() or
      a.get_variable_to_shape_map() != b.get_variable_to_shape_map()):
    return False
  for key in (a.get_variable_to_shape_map() if values_of is None else
              values_of):
    x, y = a.get_tensor(key), b.get_tensor(key)
    if isinstance(x, np.ndarray):
      x, y = x.tobytes(), np.asarray(y).tobytes()
    if x != y:
      return False
  return True


def _variable_ids(root: Any) -> Optional[set]:
  """The ids of the plain variables a checkpoint of `root` saves, if only those.

  Returns:
    The ids, or None if some object reachable from `root` (as a checkpoint
    sees it) saves other state of its own (a lookup table, a custom saver, an
    optimizer with slots).
  """
  found = set()
  for obj in tf.train.TrackableView(root).descendants():
    variable = _tf_internals.saved_variable(obj)
    if variable is not None:
      found.add(id(variable))
    elif _tf_internals.saves_state(obj):
      return None
  return found


def _tracked_variable_ids(checkpoint: Any) -> set:
  """The ids of the plain variables a checkpoint of `checkpoint` saves."""
  variables = (_tf_internals.saved_variable(obj)
               for obj in tf.train.TrackableView(checkpoint).descendants())
  return {id(v) for v in variables if v is not None}


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
    self.linked_exports = 0  # Those of the fast exports that were linked.

  @property
  def keys(self) -> List[str]:
    """The checkpoint keys of a fast export (those of the template)."""
    return self._template.keys if self._template else []

  @property
  def variables(self) -> List[tf.Variable]:
    """The variable of each of `keys`."""
    return self._template.variables if self._template else []

  def can_export_fast(self, structure: Optional[_Structure] = None) -> bool:
    """Whether the next export can be a fast one (the structure unchanged).

    Args:
      structure: The module's structure now, if already taken.
    """
    return self._template is not None and (
        structure or _Structure(self.module)) == self._structure

  def can_trace_from(self, structure: _Structure, tracked: set) -> bool:
    """Whether an export without template can be traced in the background.

    Cheap checks only, on the training thread (`Exporter._plan_traces`).

    Args:
      structure: The module's structure now.
      tracked: The ids of the variables the checkpoint saves.

    Returns:
      Whether the module saves plain variables only, all saved by the
      checkpoint (so that its export can take their values from there), and
      its structure did not already fail to make a template.
    """
    if structure == self._unusable:
      return False
    variables = _variable_ids(self.module)
    return variables is not None and variables <= tracked

  def forget_template(self) -> None:
    """Drops a template that no longer fits (an export is traced instead)."""
    self._template = None

  def snapshot(self) -> Optional[List[tf.Tensor]]:
    """Values for a fast export, or None if the next export must be full."""
    return self.current_values() if self.can_export_fast() else None

  def current_values(self) -> List[tf.Tensor]:
    """The values of `variables` now, for a fast export (copy on write)."""
    return self._template.snapshot()

  def write_full(self, export_dir: str) -> None:
    """Exports in full with `tf.saved_model.save`; makes it the template."""
    module_dir = os.path.join(export_dir, self.name)
    savedmodel.write_module(self.name, self.module, module_dir)
    self.full_exports += 1
    # Taken after the export, which may trace functions it then includes.
    self._structure = _Structure(self.module)
    self._template = None
    if self._structure != self._unusable:
      self._template = self._make_template(module_dir)
      if self._template is None:
        self._unusable = self._structure

  def write_fast(self, export_dir: str,
                 values: Optional[Sequence[tf.Tensor]] = None) -> None:
    """Writes a SavedModel of `values` (from `snapshot()`, by default now)."""
    if values is None:
      values = self.current_values()
    self._template.write(os.path.join(export_dir, self.name), values)
    self.fast_exports += 1

  def write_linked(self, export_dir: str, link: '_Link',
                   sharer: '_Sharer') -> None:
    """Writes a SavedModel whose variables are a checkpoint's data."""
    self._template.write_linked(os.path.join(export_dir, self.name), link,
                                sharer)
    self.fast_exports += 1
    self.linked_exports += 1

  def write_traced(self, export_dir: str,
                   read_values: Callable[[Sequence[tf.Variable]],
                                         Sequence[Any]]) -> None:
    """Exports in full, traced now, holding the values of a checkpoint.

    Runs in the checkpoint's write callback while training goes on: the
    graph is saved by `tf.saved_model.save` into a scratch directory (whose
    variables, read while training changes them, are dropped); the export is
    that graph's files and a `variables/` written the fast way with the values
    `read_values` returns (those of the step's checkpoint), checked to have
    the scratch export's keys, dtypes, shapes and object graph. Why these are
    the values a full export of the step holds: `_Template` accepts only
    exports whose every saved tensor is the `VARIABLE_VALUE` of a plain
    variable (`_variables_by_key`), and the checkpoint saves that same
    variable's `VARIABLE_VALUE` through the same saver serialization, as
    TF copied it on the training thread when `save()` was called.

    The template made this way becomes the module's only if its structure
    did not change during the save (a retrace by training meanwhile): else
    the next export is a full one again.

    Args:
      export_dir: The export's work directory.
      read_values: Returns the checkpoint's values of the given variables.

    Raises:
      ValueError: If the export cannot be made this way (state other than
        plain variables; variables the checkpoint does not hold as the export
        does). The step's checkpoint then fails, and the module's next
        export is a full one before its checkpoint.
    """
    module_dir = os.path.join(export_dir, self.name)
    scratch_root = os.path.join(export_dir, _TRACE_DIR)
    scratch = os.path.join(scratch_root, self.name)
    before = _Structure(self.module)
    savedmodel.write_module(self.name, self.module, scratch)
    after = _Structure(self.module)
    self.full_exports += 1
    try:
      template = _Template(scratch, self.module)
      template.write(module_dir, read_values(template.variables))
      if not _same_variables(_variables_prefix(module_dir),
                             _variables_prefix(scratch),
                             values_of=[_OBJECT_GRAPH_KEY]):
        raise ValueError('its variables cannot be written as '
                         'tf.saved_model.save does')
    except ValueError as e:
      self._unusable = after
      raise ValueError(
          f'Module {self.name!r} cannot be exported from checkpoint values '
          f'({e}); its next exports are full ones, made before their '
          'checkpoint.') from e
    tf.io.gfile.rmtree(scratch_root)
    self._structure = after
    self._template = template if before.traced_alike(after) else None

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


@dataclasses.dataclass
class _Link:
  """How a module's export shares a checkpoint's data.

  Attributes:
    shard_path: The checkpoint's data shard holding the module's variables,
      and nothing else; None if the module has no variables.
    entries: The checkpoint's index entry of each of the export's keys.
  """
  shard_path: Optional[str]
  entries: Dict[str, tensor_bundle_pb2.BundleEntryProto]


class _ModuleShard(tf.train.experimental.ShardingCallback):
  """Writes the exported variables into a checkpoint shard of their own.

  Tensors whose key is one of `keys()` (whole, not slices) go to the first
  shard; the others are sharded by the user's callback if there is one, else
  all into a second shard, or into the first if they are only the
  checkpoint's bookkeeping (`_beyond_bookkeeping`). No tensor is sliced. The
  keys are asked for when the checkpoint is written (in TF's thread for an
  async checkpoint), so that they are those learned from the checkpoint
  before.
  """

  def __init__(self, keys: Callable[[], frozenset],
               user_callback: Optional[tf.train.experimental.ShardingCallback]):
    self.keys = keys
    self.user_callback = user_callback

  @property
  def description(self) -> str:
    user = self.user_callback.description if self.user_callback else 'one'
    return f'ckpt_export: exported variables in a shard; the rest: {user}'

  def __call__(self, shardable_tensors):
    own, rest = {}, []
    keys = self.keys()
    for tensor in shardable_tensors:
      whole = (isinstance(tensor.slice_spec, str) and
               not tensor.slice_spec.strip())
      if whole and tensor.checkpoint_key in keys:
        own.setdefault(tensor.checkpoint_key, {})[''] = tensor.tensor
      else:
        rest.append(tensor)
    if self.user_callback is not None:
      return ([own] if own else []) + list(self.user_callback(rest))
    shards = [own] if own else []
    joins_own = bool(own) and _beyond_bookkeeping(
        [(t.checkpoint_key, t.dtype, t.shape.rank) for t in rest]) is None
    if rest and not joins_own:
      shards.append({})
    for tensor in rest:  # Into the last shard.
      shards[-1].setdefault(tensor.checkpoint_key, {})[tensor.slice_spec] = (
          tensor.tensor)
    return shards


# How many scalar counters may share the exported variables' shard.
_MAX_COUNTERS = 16


def _beyond_bookkeeping(tensors: Sequence[Tuple[str, tf.DType, Optional[int]]]
                       ) -> Optional[str]:
  """The key of a tensor (key, dtype, rank) that is not bookkeeping, or None.

  A checkpoint's bookkeeping is its object graph and a few numeric scalars
  (`save_counter`, a step, an optimizer's iterations): all a checkpoint holds
  besides the exported variables when there is no optimizer state. A shard
  of their own would cost a file per save for a few bytes, so they join the
  exported variables' shard. An export sharing it does not reference them
  (its apparent size grows by their bytes only). Anything else (an
  optimizer's slots, other strings, more scalars) gets a shard of its own.

  Returns:
    None if all of `tensors` are bookkeeping; else, by key, the first that is
    not a numeric scalar, or the first scalar beyond `_MAX_COUNTERS`.
  """
  scalars, others = [], []
  for key, dtype, rank in sorted(tensors, key=lambda t: t[0]):
    if key == _OBJECT_GRAPH_KEY:
      continue
    numeric = dtype.is_integer or dtype.is_floating or dtype.is_bool
    (scalars if rank == 0 and numeric else others).append(key)
  if others:
    return others[0]
  return scalars[_MAX_COUNTERS] if len(scalars) > _MAX_COUNTERS else None


class _Sharer:
  """How exports share a checkpoint's data file on one file system.

  Attributes:
    local: Whether paths are local ones (written with `open`).
  """
  local = True

  def share(self, source: str, target: str) -> None:
    """Makes `target` a file with `source`'s bytes without writing them.

    Raises:
      OSError: If it cannot; the export then writes its variables.
    """
    raise NotImplementedError


class _HardLinks(_Sharer):
  """Local disk: a hard link (a `cp -r` of the export makes it a copy)."""

  def share(self, source: str, target: str) -> None:
    os.link(source, target)


class _GcsRewrites(_Sharer):
  """`gs://`: a server-side copy, the JSON API's `rewriteTo`.

  TF's `gs://` client copies by downloading and uploading (`tf.io.gfile.copy`;
  it rewrites server-side only to rename, deleting the source), so this calls
  the API itself, on the host TF's client uses, with the credentials
  `google.auth.default()` finds: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
  application default credentials, then the GCE metadata server (not with
  `NO_GCE_CHECK=true`), the order TF's client looks in; without any, the
  requests go unauthenticated, as TF's do. HTTPS proxy and CA bundle come from
  the same variables (`HTTPS_PROXY`, `CURL_CA_BUNDLE`).
  """
  local = False
  _API = 'https://www.googleapis.com/storage/v1'
  _SCOPE = 'https://www.googleapis.com/auth/devstorage.read_write'
  _TIMEOUT_SECONDS = 300

  def __init__(self, session: Any):
    self._session = session

  @classmethod
  def create(cls) -> Optional['_GcsRewrites']:
    """The sharer, or None without the `google-auth` package."""
    try:
      # pylint: disable=g-import-not-at-top
      import google.auth
      from google.auth import credentials as auth_credentials
      from google.auth import exceptions as auth_exceptions
      from google.auth.transport import requests as auth_requests
      # pylint: enable=g-import-not-at-top
    except ImportError:
      return None
    try:
      credentials, _ = google.auth.default(scopes=[cls._SCOPE])
    except auth_exceptions.DefaultCredentialsError:
      credentials = auth_credentials.AnonymousCredentials()
    return cls(auth_requests.AuthorizedSession(credentials))

  def share(self, source: str, target: str) -> None:
    (source_bucket, source_name), (target_bucket, target_name) = (
        _gcs_object(path) for path in (source, target))
    url = (f'{self._API}/b/{source_bucket}/o/{_quote(source_name)}/rewriteTo/'
           f'b/{target_bucket}/o/{_quote(target_name)}')
    params = {}
    while True:  # Large objects may take several calls, each with a token.
      try:
        response = self._session.post(url, params=params,
                                      timeout=self._TIMEOUT_SECONDS)
        body = response.json() if response.ok else None
      except (OSError, ValueError) as e:  # requests' errors are OSErrors.
        raise OSError(f'rewriting {source} to {target}: {e}') from e
      if body is None:
        raise OSError(f'rewriting {source} to {target}: HTTP '
                      f'{response.status_code} {response.text[:200]}')
      if body.get('done'):
        return
      params = {'rewriteToken': body['rewriteToken']}


def _gcs_object(path: str) -> Tuple[str, str]:
  """The bucket and object name of a `gs://` path."""
  bucket, _, name = path[len('gs://'):].partition('/')
  return bucket, name


def _quote(name: str) -> str:
  return urllib.parse.quote(name, safe='')


# File system -> its `_Sharer` (None: exports write their variables).
_sharers: Dict[str, Optional[_Sharer]] = {}


def _sharer(path: str) -> Optional[_Sharer]:
  """How exports under `path` share checkpoint data, chosen once per scheme."""
  scheme = '' if paths.local_path(path) == path else path.partition('://')[0]
  if scheme not in _sharers:
    if not scheme:
      _sharers[scheme] = _HardLinks()
    elif scheme == 'gs':
      _sharers[scheme] = _GcsRewrites.create()
      if _sharers[scheme] is None:
        logging.warning('Exports on gs:// upload their variables again: '
                        'install google-auth for server-side copies.')
    else:
      _sharers[scheme] = None
  return _sharers[scheme]


class Exporter:
  """Writes the exports of `modules_to_export`, one step after another.

  `export()` publishes a step's export through the commit protocol, on the
  calling thread, or, when asked to and every module can be exported fast,
  once the step's checkpoint data is written: `checkpoint_options()` adds the
  write callback that does it. Such an export shares the checkpoint's data
  where it can (see `_link`), else writes the values; in an async checkpoint
  it runs in TF's checkpoint thread, and its error is raised once, by the next
  `export()` or `wait()`.

  Args:
    modules_to_export: The modules, by name.
    checkpoint: The `tf.train.Checkpoint` the manager saves, whose data
      exports may share; None for exports that never do.
  """

  def __init__(self, modules_to_export: Mapping[str, Any],
               checkpoint: Optional[tf.train.Checkpoint] = None):
    self.modules = [ModuleExporter(name, module)
                    for name, module in modules_to_export.items()]
    self._checkpoint = checkpoint
    if self.modules:  # Not on the training thread at the first export.
      _tf_internals.check_soon(
          ['fast exports'] + (['background exports',
                               'first exports traced in the background']
                              if checkpoint is not None else []))
    self._pending = []
    # The export waiting for its checkpoint's data: (future, callback).
    self._deferred = None
    # Checkpoint keys of the checkpoint's variables (by id), and the size and
    # checksum of the object graph they were read from.
    self._checkpoint_keys = {}
    self._graph_signature = None
    self._fallback_reason = None

  @property
  def pending(self) -> bool:
    """Whether exports were started and not waited for."""
    return bool(self._pending)

  def export(self, export_dir: str, commit_info: Mapping[str, Any],
             after_checkpoint: bool = False, keep_values: bool = False
            ) -> Optional[concurrent.futures.Future]:
    """Exports every module as `export_dir`, now or after the checkpoint.

    Args:
      export_dir: The final export path.
      commit_info: Metadata for the commit marker.
      after_checkpoint: Whether the export may wait for the step's checkpoint
        data (only if every module can be exported fast): it is then written
        by the callback `checkpoint_options()` adds.
      keep_values: Whether the values must be those of now, for an export
        after the checkpoint that cannot share its data (the values may
        change meanwhile: an async checkpoint). They are then read back from
        the checkpoint where it holds them, else taken now (a snapshot, which
        costs a copy of the variables at their next update while it lives).
        Modules without a template are then traced after the checkpoint too,
        where `_plan_traces` allows it.

    Returns:
      The future of the export after the checkpoint (its result is None once
      published), or None if the export is already published.

    Raises:
      Exception: An earlier export's error, or this export's.
    """
    self.wait()
    values = None
    if after_checkpoint and _tf_internals.background_exports_supported():
      if all(m.can_export_fast() for m in self.modules):
        values = [self._values_to_keep(m) if keep_values else None
                  for m in self.modules]
      elif keep_values:
        values = self._plan_traces()
    if values is not None:
      future = concurrent.futures.Future()
      future.set_running_or_notify_cancel()
      self._pending.append(future)
      self._deferred = future, functools.partial(
          self._export_checkpoint, export_dir, commit_info, values)
      return future
    snapshots = [m.snapshot() for m in self.modules]
    with commit.staged_export(export_dir, dict(commit_info)) as tmp:
      for module, values in zip(self.modules, snapshots):
        if values is None:
          module.write_full(tmp)
        else:
          module.write_fast(tmp, values)
    return None

  def checkpoint_options(self, options: Optional[tf.train.CheckpointOptions],
                         directory: str) -> tf.train.CheckpointOptions:
    """Options for the checkpoint of the step `export()` was just called for.

    Where exports can share the checkpoint's data, the exported variables go
    into a shard of their own (`_ModuleShard`, composed with the caller's
    sharding callback). A write callback, run after the checkpoint's data is
    written and before `tf.train.CheckpointManager` records it (so that a
    checkpoint is never recorded before its export is published), writes and
    publishes a pending export; if that fails, it deletes the checkpoint's
    files and raises, so that the checkpoint is never recorded. Otherwise it
    only learns the checkpoint's keys.

    Args:
      options: The caller's options (not modified).
      directory: The directory the checkpoint is written to.

    Returns:
      A copy of `options` (default options if None) with the callbacks.
    """
    options = copy.copy(options) or tf.train.CheckpointOptions()
    if self._checkpoint is None:
      return options
    if self.modules and _sharer(directory):
      options.experimental_sharding_callback = _ModuleShard(
          self._exported_keys, options.experimental_sharding_callback)
    deferred, self._deferred = self._deferred, None
    if deferred is None:
      callback = self._learn_keys
    else:
      future, export_fn = deferred

      def callback(save_path: str) -> None:
        try:
          if future.done():  # Abandoned by `wait()`, which raised for it.
            raise RuntimeError(f'The export of {save_path} was abandoned.')
          export_fn(save_path)
        except BaseException as e:
          if not future.done():
            future.set_exception(e)
          _remove_checkpoint(save_path)
          raise
        future.set_result(None)

    options.experimental_write_callbacks = [callback] + list(
        options.experimental_write_callbacks or [])
    return options

  def wait(self, raise_errors: bool = True) -> None:
    """Ends the pending exports; raises the first one's error.

    Called once the checkpoint writes are over: an export whose checkpoint
    data was never written (its write failed) ends with an error then.
    """
    pending, self._pending = self._pending, []
    self._deferred = None
    for future in pending:
      if not future.done():
        future.set_exception(RuntimeError(
            'The checkpoint of this export was not written.'))
    errors = [e for e in (f.exception() for f in pending) if e is not None]
    for error in errors[1:]:
      logging.error('Another export failed too: %r', error)
    if errors:
      if raise_errors:
        raise errors[0]
      logging.error('Export failed: %r', errors[0])

  def _plan_traces(self) -> Optional[List[Any]]:
    """What to keep of each module for an export traced after the checkpoint.

    Modules without a usable template (the first export of a process, or a
    changed structure) can be traced in the checkpoint's write callback,
    with the values of the step read back from the checkpoint, if each
    passes cheap checks made here, on the training thread: it saves plain
    variables only, all of which the checkpoint saves
    (`ModuleExporter.can_trace_from`), and fast exports are possible here.

    Returns:
      Per module, `_TRACED`, or for a module with a usable template what
      `_values_to_keep` returns; None if some module cannot be traced then
      (its export is then made now, as in a synchronous save).
    """
    if (self._checkpoint is None or
        not _tf_internals.fast_exports_supported() or
        not _tf_internals.background_tracing_supported()):
      return None
    tracked = _tracked_variable_ids(self._checkpoint)
    plan = []
    for module in self.modules:
      structure = _Structure(module.module)
      if module.can_export_fast(structure):
        plan.append(self._values_to_keep(module))
      elif module.can_trace_from(structure, tracked):
        plan.append(_TRACED)
      else:
        return None
    for module, kept in zip(self.modules, plan):
      if kept is _TRACED:
        module.forget_template()
    return plan

  def _export_checkpoint(self, export_dir: str,
                         commit_info: Mapping[str, Any],
                         values: Sequence[Any], save_path: str) -> None:
    """Publishes the export of checkpoint `save_path`, written just now.

    `values` holds, per module, its kept values, `_IN_CHECKPOINT`, None
    (the values of now) or `_TRACED` (no usable template: traced now).
    """
    links = self._link(save_path)
    sharer = _sharer(save_path)
    with commit.staged_export(export_dir, dict(commit_info)) as tmp:
      for module, link, module_values in zip(self.modules, links, values):
        if module_values is _TRACED:
          module.write_traced(tmp, functools.partial(
              self._read_values, module.name, save_path=save_path))
          continue
        if link is not None:
          try:
            module.write_linked(tmp, link, sharer)
            continue
          except (OSError, tf.errors.OpError) as e:
            self._fall_back(f'sharing {link.shard_path} failed: {e}')
            tf.io.gfile.rmtree(os.path.join(tmp, module.name))
        if module_values is _IN_CHECKPOINT:
          module_values = self._read_values(module.name, module.variables,
                                            save_path)
        module.write_fast(tmp, module_values)

  def _values_to_keep(self, module: ModuleExporter
                     ) -> Union[List[tf.Tensor], object]:
    """A snapshot of `module`'s values, or `_IN_CHECKPOINT`.

    `_IN_CHECKPOINT` where the checkpoint about to be written holds each of
    the module's variables (each has a checkpoint key, learned from the last
    checkpoint of this directory on local disk): its values are read back
    from there if the export cannot share them.
    """
    if self._checkpoint_keys and all(
        id(v) in self._checkpoint_keys for v in module.variables):
      return _IN_CHECKPOINT
    return module.current_values()

  def _read_values(self, name: str, variables: Sequence[tf.Variable],
                   save_path: str) -> List[np.ndarray]:
    """The values of module `name`'s `variables` in checkpoint `save_path`.

    Raises:
      ValueError: If the checkpoint lacks one, or holds another dtype or
        shape (the checkpoint then fails: its export cannot be made).
    """
    # Not tf.train.load_checkpoint: on ram:// it takes a prefix for a folder.
    reader = tf.compat.v1.train.NewCheckpointReader(save_path)
    if not _sharer(save_path) or any(
        id(v) not in self._checkpoint_keys for v in variables):
      # Keys not learned from this checkpoint's index (`_read_index`): none
      # is read where exports cannot share data, and the first checkpoint of
      # a process may save variables the last one learned did not.
      self._checkpoint_keys = _checkpoint_keys(
          self._checkpoint, reader.get_tensor(_OBJECT_GRAPH_KEY))
    values = []
    for variable in variables:
      key = self._checkpoint_keys.get(id(variable))
      value = (reader.get_tensor(key)
               if key is not None and reader.has_tensor(key) else None)
      if (value is None or tf.as_dtype(value.dtype) != variable.dtype or
          list(np.shape(value)) != variable.shape.as_list()):
        raise ValueError(
            f'Cannot export {name!r} from checkpoint {save_path}: it '
            f'does not hold variable {variable.name} ({key}) as the module '
            'does. Was the tf.train.Checkpoint changed during training?')
      values.append(value)
    return values

  def _exported_keys(self) -> frozenset:
    """The checkpoint keys of the exported variables, as last learned."""
    return frozenset(self._checkpoint_keys.get(id(v))
                     for m in self.modules for v in m.variables)

  def _learn_keys(self, save_path: str) -> None:
    """Reads the checkpoint keys of checkpoint `save_path`, for later saves."""
    if not _sharer(save_path) or not self.modules:
      return
    try:
      self._read_index(save_path)
    except (ValueError, tf.errors.OpError) as e:
      self._fall_back(f'the checkpoint index cannot be read: {e}')

  def _read_index(self, save_path: str
                 ) -> Tuple[tensor_bundle_pb2.BundleHeaderProto,
                            Dict[str, tensor_bundle_pb2.BundleEntryProto]]:
    """Checkpoint `save_path`'s index; updates the keys if its graph changed."""
    opener = open if _sharer(save_path).local else tf.io.gfile.GFile
    with opener(save_path + '.index', 'rb') as f:
      header, entries = bundle.read_index(f.read())
    graph = entries.get(_OBJECT_GRAPH_KEY)
    signature = graph and (graph.size, graph.crc32c)
    if signature != self._graph_signature:
      self._checkpoint_keys = _checkpoint_keys(
          self._checkpoint, tf.compat.v1.train.NewCheckpointReader(
              save_path).get_tensor(_OBJECT_GRAPH_KEY))
      self._graph_signature = signature
    return header, entries

  def _link(self, save_path: str) -> List[Optional[_Link]]:
    """How each module's export can share checkpoint `save_path`'s data.

    A module's export shares it (None otherwise) if each of its variables is
    in the checkpoint, whole (not sliced), with its dtype and shape, and all
    of them in one data shard that holds nothing else but the checkpoint's
    bookkeeping (`_beyond_bookkeeping`).

    Args:
      save_path: The checkpoint prefix.

    Returns:
      A `_Link` or None for each module.
    """
    links = [None] * len(self.modules)
    if not _sharer(save_path):
      return links
    try:
      header, entries = self._read_index(save_path)
    except (ValueError, tf.errors.OpError, OSError) as e:
      self._fall_back(f'the checkpoint index cannot be read: {e}')
      return links
    exported_keys = set()
    shards = set()
    for i, module in enumerate(self.modules):
      found = {}
      for key, variable in zip(module.keys, module.variables):
        checkpoint_key = self._checkpoint_keys.get(id(variable))
        entry = entries.get(checkpoint_key)
        problem = _unlinkable(entry, variable)
        if problem:
          self._fall_back(f'{module.name!r} variable {variable.name} '
                          f'{problem}')
          break
        found[key] = entry
        exported_keys.add(checkpoint_key)
      else:
        shards.update(entry.shard_id for entry in found.values())
        links[i] = _Link(None, found)
    if len(shards) > 1:
      self._fall_back(f'the exported variables are in shards {sorted(shards)}')
      return [None] * len(self.modules)
    for shard in shards:
      other = _beyond_bookkeeping([
          (key, tf.dtypes.as_dtype(entry.dtype),
           None if entry.shape.unknown_rank else len(entry.shape.dim))
          for key, entry in entries.items()
          if entry.shard_id == shard and key not in exported_keys])
      if other is not None:
        self._fall_back(f'the shard of the exported variables also holds '
                        f'{other!r}')
        return [None] * len(self.modules)
      for link in links:
        if link is not None and link.entries:
          link.shard_path = (f'{save_path}.data-{shard:05d}-of-'
                             f'{header.num_shards:05d}')
    return links

  def _fall_back(self, reason: str) -> None:
    """Logs why an export writes its variables instead of sharing them."""
    if reason != self._fallback_reason:
      logging.warning('An export writes its variables instead of sharing '
                      "its checkpoint's: %s.", reason)
      self._fallback_reason = reason


def _unlinkable(entry: Optional[tensor_bundle_pb2.BundleEntryProto],
                variable: tf.Variable) -> Optional[str]:
  """Why a checkpoint `entry` cannot be `variable`'s export, or None."""
  if entry is None:
    return 'is not in the checkpoint'
  if entry.slices:
    return 'is sliced in the checkpoint'
  if entry.dtype != variable.dtype.as_datatype_enum:
    return 'has another dtype in the checkpoint'
  if ([dim.size for dim in entry.shape.dim] != variable.shape.as_list() or
      entry.shape.unknown_rank):
    return 'has another shape in the checkpoint'
  return None


def _remove_checkpoint(save_path: str) -> None:
  """Deletes the files of checkpoint `save_path`."""
  directory, name = os.path.split(save_path)
  for entry in tf.io.gfile.listdir(directory):
    if entry == name + '.index' or entry.startswith(name + '.data-'):
      tf.io.gfile.remove(os.path.join(directory, entry))

