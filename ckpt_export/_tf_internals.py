"""Every private TensorFlow and Keras access of ckpt_export, each checked once.

TensorFlow can change its internals in any minor release. Each assumption this
package makes about them is checked once per process, at the first use of the
feature that needs it, by probing what TensorFlow does (tiny writes into a
temporary directory) rather than by its version number. If an assumption does
not hold, that feature falls back to TensorFlow's public path, with one
warning naming the TensorFlow version:

- *Fast exports*: a SavedModel fingerprint's `checkpoint_hash` being the
  farmhash64 of `variables.index`, and the checkpoint key
  `_CHECKPOINTABLE_OBJECT_GRAPH` of a SavedModel's object graph. Fallback:
  every export is a full `tf.saved_model.save`.
- *Background exports* (async checkpointing): the error TF's async thread
  keeps in `Checkpoint._async_checkpointer_impl._async_error`, and write
  callbacks put first running before `CheckpointManager` records the
  checkpoint. Fallback: the export is written before the checkpoint, as in a
  synchronous save (TF still writes the checkpoint asynchronously).
- *First exports traced in the background* (async checkpointing): which
  objects save state of their own (`saveable_object_util.
  trackable_has_serialize_to_tensor`, `_gather_saveables_for_checkpoint`, an
  optimizer's `_create_or_restore_slot_variable`). Fallback: a module's first
  export is a full one on the training thread, before its checkpoint.
- *Keras signature checks*: Keras' `_default_save_signature` and
  `_get_save_spec`, which TF derives a model's signature from. Fallback: Keras
  models pass validation; one that gets no signature is refused by its first
  export, before any checkpoint is written.
- *Fast exports of Keras 3 models*: a Keras 3 variable (`keras.Variable`,
  TensorFlow backend) saving the `tf.Variable` its `value` returns, under that
  variable's own `VARIABLE_VALUE` key. Fallback: Keras 3 models get full
  exports only (tf.Modules and tf_keras models still get fast ones).
- *Removal of crash leftovers*: the name `checkpoint.tmp<32 hex digits>` of
  `atomic_write_string_to_file`'s temporary file, and `<prefix>_temp/` of a
  checkpoint write's work directory. Fallback: they are left, as a plain
  `CheckpointManager` leaves them.
- *Reads of CheckpointManager's state*: its `_directory`, `_checkpoint`,
  `_max_to_keep`, `_step_counter`, `_checkpoint_interval`,
  `_last_checkpoint_step`, `_maybe_delete` and `_latest_checkpoint`. Fallback:
  the manager keeps its own copies; a non-chief worker's `checkpoints` no
  longer follow the chief's.

`PROBLEMS` maps each feature to its check; tests replace a check to see the
fallback. `check_soon` runs checks on a thread of their own ahead of use.
"""

import collections
import inspect
import os
import re
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import tensorflow as tf

# The checkpoint key of a checkpoint's serialized object graph.
OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
# The temporary file `file_io.atomic_write_string_to_file` writes the
# checkpoint state file `checkpoint` to before renaming it over.
_STATE_TEMP_RE = re.compile(r'checkpoint\.tmp[0-9a-f]{32}')
_STATE_TEMP_SOURCE = 'filename + ".tmp" + uuid.uuid4().hex'
# How a checkpoint write names its work directory `<prefix>_temp/`
# (`functional_saver`; `paths.parse_checkpoint_temp_step` parses it).
_CHECKPOINT_TEMP_SOURCE = '"_temp/part"'
# Attributes of Keras models TensorFlow derives serving signatures from.
_KERAS_SIGNATURE_ATTRIBUTES = ('_default_save_signature', '_get_save_spec')
_KERAS_PACKAGES = ('keras', 'tf_keras')

_warned = set()


def _warn_once(feature: str, problem: str, fallback: str) -> None:
  if feature not in _warned:
    _warned.add(feature)
    logging.warning(
        'ckpt_export: %s are off on TensorFlow %s (%s); %s. ckpt_export was '
        'tested with the TensorFlow versions its pyproject.toml allows.',
        feature, tf.__version__, problem, fallback)


def _problem_of(check: Callable[[], None]) -> Optional[str]:
  """Runs `check`; returns None if it passed, else what failed."""
  try:
    check()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def _expect(condition: bool, what: str) -> None:
  if not condition:
    raise AssertionError(what)


class _Module(tf.Module):

  def __init__(self):
    super().__init__()
    self.v = tf.Variable([1.0, 2.0])

  @tf.function(input_signature=[])
  def serve(self):
    return self.v + 0.0


def _check_fast_export() -> None:
  """A SavedModel's fingerprint and object graph are where fast exports expect.

  Fast exports reuse their template's `fingerprint.pb` with `checkpoint_hash`
  renewed as the farmhash64 of `variables.index` (`tf.fingerprint`), and find
  the object graph under `OBJECT_GRAPH_KEY` in a SavedModel's variables.
  """
  with tempfile.TemporaryDirectory(prefix='ckpt_export_probe_') as scratch:
    module = _Module()
    tf.saved_model.save(module, scratch, signatures=module.serve)
    prefix = os.path.join(scratch, 'variables', 'variables')
    keys = {name for name, _ in tf.train.list_variables(prefix)}
    _expect(OBJECT_GRAPH_KEY in keys,
            f'no {OBJECT_GRAPH_KEY} in a SavedModel variables: {keys}')
    if not tf.io.gfile.exists(os.path.join(scratch, 'fingerprint.pb')):
      return  # A TF that writes no fingerprint: fast exports write none.
    saved = tf.saved_model.experimental.read_fingerprint(scratch)
    with tf.io.gfile.GFile(prefix + '.index', 'rb') as f:
      _expect(saved.checkpoint_hash == index_hash(f.read()),
              'checkpoint_hash is not the farmhash64 of variables.index')


def index_hash(index: bytes) -> int:
  """The `checkpoint_hash` of a SavedModel fingerprint for its `index` bytes."""
  return struct.unpack('<Q', tf.fingerprint(
      tf.constant([index]), 'farmhash64').numpy().tobytes())[0]


def _check_background_export() -> None:
  """An error raised by a write callback of an async save can be forgotten.

  The callback put first runs before the manager records the checkpoint in its
  state file; TF keeps its error in `_async_checkpointer_impl._async_error`,
  which `forget_async_error` clears so that it is not raised again.
  """
  with tempfile.TemporaryDirectory(prefix='ckpt_export_probe_') as scratch:
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(checkpoint, scratch, max_to_keep=1)
    error = RuntimeError('probe')
    recorded = []

    def callback(save_path: str) -> None:
      del save_path
      recorded.append(tf.train.latest_checkpoint(scratch))
      raise error

    manager.save(options=tf.train.CheckpointOptions(
        enable_async=True, experimental_write_callbacks=[callback]))
    checkpoint.sync()
    _expect(recorded == [None], f'checkpoint recorded before its callback: '
            f'{recorded}')
    helper = getattr(checkpoint, '_async_checkpointer_impl')
    _expect(getattr(helper, '_async_error') is error,
            'the callback error is not in _async_error')
    forget_async_error(checkpoint, error)
    manager.save(options=tf.train.CheckpointOptions(enable_async=True))
    manager.sync()
    _expect(tf.train.latest_checkpoint(scratch) is not None,
            'no checkpoint recorded after the error was forgotten')
    # Ends the probe's own async thread (it would idle until exit).
    getattr(helper, '_join_async_save_thread', lambda: None)()


def saves_state(obj: Any) -> bool:
  """Whether a checkpoint or SavedModel of `obj` saves state of `obj` itself.

  True for a variable (its value), a lookup table, anything with its own
  saver, and an optimizer with slot variables; False for containers such as
  a `tf.Module` or a Keras layer, which save only their children.
  """
  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  from tensorflow.python.training.saving import saveable_object_util
  # pylint: enable=g-import-not-at-top,g-direct-tensorflow-import
  gather = getattr(obj, '_gather_saveables_for_checkpoint', None)
  return bool(saveable_object_util.trackable_has_serialize_to_tensor(obj) or
              (gather is not None and gather()) or
              hasattr(obj, '_create_or_restore_slot_variable'))


def _check_saved_state() -> None:
  """`saves_state` tells containers from objects with state of their own."""
  stateful = {
      'a variable': tf.Variable(1.0),
      'a lookup table': tf.lookup.experimental.MutableHashTable(
          tf.string, tf.float32, default_value=-1.0),
      'an optimizer with slots': tf.compat.v1.train.AdamOptimizer(0.1)}
  for what, obj in stateful.items():
    _expect(saves_state(obj), f'saves_state misses the state of {what}')
  _expect(not saves_state(tf.Module()), 'saves_state finds state in a '
          'tf.Module')


def _check_keras_signatures() -> None:
  """Loaded Keras packages' models have an attribute TF derives signatures of.

  Keras is not imported here: a package that is not loaded has no models.
  """
  for package in _KERAS_PACKAGES:
    keras = sys.modules.get(package)
    model = getattr(keras, 'Model', None)
    if model is not None:
      _expect(any(hasattr(model, name) for name in _KERAS_SIGNATURE_ATTRIBUTES),
              f'{package}.Model has none of {_KERAS_SIGNATURE_ATTRIBUTES}')


def _check_keras_variables() -> None:
  """A loaded Keras 3's variables save the `tf.Variable` of their `value`.

  Keras is not imported here: a package that is not loaded has no variables.
  """
  keras = sys.modules.get('keras')
  if keras is None or not hasattr(keras, 'Variable'):
    return
  variable = keras.Variable([1.0, 2.0])
  value = variable.value
  _expect(isinstance(value, tf.Variable),
          f'keras.Variable.value is a {type(value).__name__}, not a '
          'tf.Variable')
  with tempfile.TemporaryDirectory(prefix='ckpt_export_probe_') as scratch:
    prefix = tf.train.Checkpoint(v=variable).write(
        os.path.join(scratch, 'probe'))
    value.assign([3.0, 4.0])
    restored = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(v=restored).read(prefix).assert_consumed()
  _expect(restored.numpy().tolist() == [1.0, 2.0],
          'a keras.Variable does not save its value under a tf.Variable key')


def _check_state_temp_name() -> None:
  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  from tensorflow.python.lib.io import file_io
  # pylint: enable=g-import-not-at-top,g-direct-tensorflow-import
  source = inspect.getsource(file_io.atomic_write_string_to_file)
  _expect(_STATE_TEMP_SOURCE in source,
          f'atomic_write_string_to_file does not name its temporary file '
          f'{_STATE_TEMP_SOURCE}')


def _check_checkpoint_temp_name() -> None:
  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  from tensorflow.python.checkpoint import functional_saver
  # pylint: enable=g-import-not-at-top,g-direct-tensorflow-import
  _expect(_CHECKPOINT_TEMP_SOURCE in inspect.getsource(functional_saver),
          'functional_saver does not name its work directory '
          f'{_CHECKPOINT_TEMP_SOURCE}')


def _check_manager() -> None:
  """`CheckpointManager` keeps its settings and state where expected."""
  with tempfile.TemporaryDirectory(prefix='ckpt_export_probe_') as scratch:
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    step = tf.Variable(3, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        checkpoint, scratch, max_to_keep=2, checkpoint_name='probe',
        step_counter=step, checkpoint_interval=2)
    expected = dict(_directory=scratch, _checkpoint=checkpoint,
                    _max_to_keep=2, _step_counter=step, _checkpoint_interval=2,
                    _last_checkpoint_step=None, _latest_checkpoint=None)
    # pylint: disable=protected-access
    for name, value in expected.items():
      found = getattr(manager, name)
      _expect(found is value or found == value,
              f'CheckpointManager.{name} is not {value!r}')
    _expect(isinstance(manager._maybe_delete, collections.OrderedDict),
            'CheckpointManager._maybe_delete is not an OrderedDict')
    path = manager.save()
    _expect(manager._last_checkpoint_step == 3, 'save() did not record its '
            'step in CheckpointManager._last_checkpoint_step')
    _expect(manager._latest_checkpoint == path and
            list(manager._maybe_delete) == [path],
            'save() did not record its path in _latest_checkpoint and '
            '_maybe_delete')
    # pylint: enable=protected-access


# Feature -> (check, fallback). Tests replace a check to see the fallback.
PROBLEMS: Dict[str, Tuple[Callable[[], None], str]] = {
    'fast exports': (_check_fast_export,
                     'every export is a full tf.saved_model.save'),
    'background exports': (
        _check_background_export,
        'exports are written before the checkpoint, as in a synchronous save'),
    'first exports traced in the background': (
        _check_saved_state, "a module's first export is made on the training "
        'thread'),
    'Keras signature checks': (
        _check_keras_signatures,
        'a Keras model that gets no signature is refused at its first export'),
    'fast exports of Keras 3 models': (
        _check_keras_variables, 'Keras 3 models get full exports only'),
    'removal of checkpoint state temporaries': (
        _check_state_temp_name, 'they are left, as CheckpointManager leaves '
        'them'),
    'removal of checkpoint work directories': (
        _check_checkpoint_temp_name, 'they are left, as CheckpointManager '
        'leaves them'),
    "reads of CheckpointManager's state": (
        _check_manager, 'the manager keeps its own copies, and non-chief '
        "workers' checkpoints list stops following the chief's"),
}

_results = {}
# Held while a check runs: a feature is checked once, by one thread.
_lock = threading.RLock()
# Counts `reset()`s: checks started in the background before one stop.
_generation = [0]


def problem(feature: str) -> Optional[str]:
  """What breaks `feature` on this TensorFlow (warned once), or None.

  Waits for the check if another thread runs it (see `check_soon`).

  Args:
    feature: A key of `PROBLEMS`.

  Returns:
    None if the feature's assumptions hold, else a description.
  """
  result = _results.get(feature, _lock)
  if result is not _lock:
    return result
  with _lock:
    if feature not in _results:
      check, fallback = PROBLEMS[feature]
      _results[feature] = _problem_of(check)
      if _results[feature] is not None:
        _warn_once(feature, _results[feature], fallback)
    return _results[feature]


def check_soon(features: Sequence[str]) -> None:
  """Checks `features` on a thread of its own, if not checked yet.

  Some checks write a SavedModel or an async checkpoint (about 0.5 s in
  all); started when a manager is made, they are usually over by its first
  `save()`, which would otherwise run them on the training thread.

  Args:
    features: Keys of `PROBLEMS`.
  """
  if all(feature in _results for feature in features):
    return
  generation = _generation[0]

  def check_all() -> None:
    for feature in features:
      with _lock:
        if _generation[0] != generation:
          return
        problem(feature)

  # Not a daemon: interpreter exit waits for a check rather than cut it.
  threading.Thread(target=check_all, name='ckpt_export_checks').start()


def reset() -> None:
  """Forgets the checks' results and warnings (for tests)."""
  with _lock:
    _results.clear()
    _warned.clear()
    _generation[0] += 1


def fast_exports_supported() -> bool:
  return problem('fast exports') is None


def background_exports_supported() -> bool:
  return problem('background exports') is None


def background_tracing_supported() -> bool:
  return problem('first exports traced in the background') is None


def forget_async_error(checkpoint: tf.train.Checkpoint,
                       error: BaseException) -> None:
  """Keeps TF from raising again an error it stored from its async thread.

  A write callback's error is stored by TF's async thread and raised at the
  next write; once ckpt_export raised it, the stored copy is dropped.
  """
  helper = getattr(checkpoint, '_async_checkpointer_impl', None)
  if helper is not None and getattr(helper, '_async_error', None) is error:
    helper._async_error = None  # pylint: disable=protected-access


def saved_variable(obj: Any) -> Optional[tf.Variable]:
  """The `tf.Variable` whose value `obj` saves as `VARIABLE_VALUE`, if any.

  Args:
    obj: A trackable object: a `tf.Variable` (or distributed variable), a
      Keras 3 variable (TensorFlow backend), or anything else.

  Returns:
    `obj` itself for a `tf.Variable`, a Keras 3 variable's `value` where
    that is its `tf.Variable` (and the fence's check holds), else None.
  """
  if isinstance(obj, tf.Variable):
    return obj
  if (type(obj).__module__.split('.')[0] != 'keras' or
      not hasattr(obj, 'value') or
      problem('fast exports of Keras 3 models') is not None):
    return None
  value = obj.value
  return value if isinstance(value, tf.Variable) else None


def is_keras_model(obj: Any) -> bool:
  return any(klass.__module__.split('.')[0] in _KERAS_PACKAGES
             for klass in type(obj).__mro__)


def keras_signature_attributes() -> Optional[Tuple[str, ...]]:
  """Attributes of a Keras model TF derives a signature from; None: unknown."""
  _results.pop('Keras signature checks', None)  # Keras may be loaded since.
  if problem('Keras signature checks') is not None:
    return None
  return _KERAS_SIGNATURE_ATTRIBUTES


def is_state_temp_file(name: str) -> bool:
  """Whether `name` is a temporary file of TF's checkpoint state file."""
  return (problem('removal of checkpoint state temporaries') is None and
          bool(_STATE_TEMP_RE.fullmatch(name)))


def is_checkpoint_temp_name_known() -> bool:
  """Whether a checkpoint write's work directory is `<prefix>_temp`."""
  return problem('removal of checkpoint work directories') is None


def adopt_manager_settings(manager: tf.train.CheckpointManager,
                           **settings: Any) -> None:
  """Makes sure `manager` holds its settings where ckpt_export reads them.

  Args:
    manager: A freshly constructed `tf.train.CheckpointManager` subclass.
    **settings: Its constructor's values: `_directory`, `_checkpoint`,
      `_max_to_keep`, `_step_counter`, `_checkpoint_interval`.
  """
  if problem("reads of CheckpointManager's state") is None:
    return
  for name, value in settings.items():
    setattr(manager, name, value)
  if not hasattr(manager, '_last_checkpoint_step'):
    manager._last_checkpoint_step = None  # pylint: disable=protected-access


def last_checkpoint_step(manager: tf.train.CheckpointManager) -> Optional[int]:
  """The step counter's value at `manager`'s last checkpoint, or None.

  TF's own record where it is (see `adopt_manager_settings`), else the copy
  `note_checkpoint` keeps.
  """
  return manager._last_checkpoint_step  # pylint: disable=protected-access


def note_checkpoint(manager: tf.train.CheckpointManager,
                    checkpoint_path: Optional[str], step: Optional[int],
                    by_base: bool) -> None:
  """Records a checkpoint of `manager` where TF's own save would.

  Args:
    manager: The manager.
    checkpoint_path: The checkpoint's path, or None if restored.
    step: The step counter's value, or None without `checkpoint_interval`.
    by_base: Whether TF's `CheckpointManager` itself saved or restored it
      (and so recorded it, if its state is where expected).
  """
  native = problem("reads of CheckpointManager's state") is None
  if by_base and native:
    return
  if step is not None:
    manager._last_checkpoint_step = step  # pylint: disable=protected-access
  if checkpoint_path is None or not native:
    return
  # pylint: disable=protected-access
  pending = manager._maybe_delete
  pending.pop(checkpoint_path, None)
  pending[checkpoint_path] = time.time()
  while manager._max_to_keep and len(pending) > manager._max_to_keep:
    pending.popitem(last=False)
  manager._latest_checkpoint = checkpoint_path
  # pylint: enable=protected-access
