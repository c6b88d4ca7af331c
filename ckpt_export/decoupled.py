"""Decoupled exports: export each new checkpoint of a model directory.

For big jobs the trainer can write checkpoints only (a plain
`tf.train.CheckpointManager`, or `SavedModelCheckpointManager` without
`modules_to_export`) and leave the exports to another process, or a thread
that builds its own copy of the modules. `run_exporter` builds the modules
once with a user's `build_fn`, then for every checkpoint recorded in the
directory's `checkpoint` state file that has no export yet, restores it into
them and publishes `<name>-<step>_saved_modules/` with the same commit
protocol and layout as the manager (fast exports after the first, see
`fast_export.py`). Exports whose checkpoint is gone are deleted, as the
manager does. `ckpt-export export` runs it from the command line.
"""

import importlib
import os
import threading
import time
from typing import Any, Callable, List, Mapping, Optional, Set, Tuple

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import savedmodel
from ckpt_export import fast_export
from ckpt_export import housekeeping
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import validate

BuildFn = Callable[[], Tuple[tf.train.Checkpoint, Mapping[str, Any]]]


def load_build_fn(spec: str) -> BuildFn:
  """Returns the function named by `package.module:function`.

  Args:
    spec: The module's import path and the function's name, separated by
      ':'. The function takes no argument and returns the pair
      `(tf.train.Checkpoint, modules_to_export)`.

  Raises:
    ValueError: Naming `spec`, if it is malformed, its module cannot be
      imported, or it names no callable.
  """
  module_name, sep, attribute = str(spec).partition(':')
  if not sep or not module_name or not attribute:
    raise ValueError(f'Invalid build function {spec!r}: expected '
                     "'package.module:function'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'Cannot import module {module_name!r} of build function '
                     f'{spec!r}: {e}') from e
  build_fn = module
  for name in attribute.split('.'):
    build_fn = getattr(build_fn, name, None)
  if not callable(build_fn):
    raise ValueError(f'Build function {spec!r}: module {module_name!r} has no '
                     f'callable {attribute!r}.')
  return build_fn


def _build(build_fn: BuildFn) -> Tuple[tf.train.Checkpoint, Mapping[str, Any]]:
  """Calls `build_fn` and checks what it returns."""
  built = build_fn()
  if not (isinstance(built, tuple) and len(built) == 2 and
          isinstance(built[0], tf.train.Checkpoint)):
    raise ValueError('The build function must return (tf.train.Checkpoint, '
                     f'modules_to_export), got {built!r}.')
  checkpoint, modules = built
  savedmodel.validate_modules(modules)
  if not modules:
    raise ValueError('The build function returned no modules to export.')
  return checkpoint, modules


def _recorded_steps(model_dir: str, checkpoint_name: str) -> List[int]:
  """Steps of the checkpoints recorded in the directory's state file."""
  state = tf.train.get_checkpoint_state(model_dir)
  if state is None:
    return []
  steps = {paths.parse_checkpoint_step(path, checkpoint_name)
           for path in state.all_model_checkpoint_paths}
  steps.discard(None)
  return sorted(steps)


def _collect_garbage(model_dir: str, checkpoint_name: str) -> None:
  """Housekeeping: keeps the exports whose checkpoint's `.index` is there."""
  housekeeping.collect(
      model_dir, checkpoint_name,
      lambda names, steps: {step for step in steps
                            if f'{checkpoint_name}-{step}.index' in names})


def run_exporter(model_dir: str,
                 build_fn: BuildFn,
                 checkpoint_name: str = 'ckpt',
                 timeout: Optional[float] = None,
                 seconds_to_sleep: float = 1.0,
                 stop: Optional[threading.Event] = None) -> List[int]:
  """Exports every checkpoint of `model_dir` that has no export, as they come.

  Checkpoints are exported in step order; one deleted by the trainer before
  its turn is skipped. Runs until no new checkpoint has come for `timeout`
  seconds, or `stop` is set.

  Args:
    model_dir: The trainer's model directory.
    build_fn: Returns `(checkpoint, modules_to_export)`: a
      `tf.train.Checkpoint` shaped like (a part of) the trainer's, and the
      modules in it to export, by name, as for `SavedModelCheckpointManager`.
    checkpoint_name: The trainer's checkpoint name.
    timeout: Seconds to wait for a new checkpoint before returning; None
      waits forever.
    seconds_to_sleep: Seconds between looks at the directory.
    stop: Returns once this event is set.

  Returns:
    The steps exported, in order.

  Raises:
    ValueError: For a bad argument or build function, or a checkpoint that
      does not hold the modules' variables.
  """
  model_dir = os.fspath(model_dir)
  paths.validate_component('checkpoint_name', checkpoint_name)
  validate.seconds('timeout', timeout, allow_none=True)
  readers.check_seconds_to_sleep(seconds_to_sleep)
  checkpoint, modules = _build(build_fn)
  exporter = fast_export.Exporter(modules)
  exported, skipped = [], set()
  last_new = time.monotonic()
  while stop is None or not stop.is_set():
    _collect_garbage(model_dir, checkpoint_name)
    step = _first_unexported(model_dir, checkpoint_name, skipped)
    if step is not None:
      if _export_step(model_dir, checkpoint_name, step, checkpoint, modules,
                      exporter):
        exported.append(step)
      else:
        skipped.add(step)
      last_new = time.monotonic()
      continue
    if timeout is not None and time.monotonic() - last_new >= timeout:
      break
    if stop is not None:
      stop.wait(seconds_to_sleep)
    else:
      time.sleep(seconds_to_sleep)
  return exported


def _first_unexported(model_dir: str, checkpoint_name: str,
                      skipped: Set[int]) -> Optional[int]:
  """The lowest recorded checkpoint step without a published export."""
  for step in _recorded_steps(model_dir, checkpoint_name):
    if step not in skipped and not commit.is_published(
        paths.export_path(model_dir, checkpoint_name, step)):
      return step
  return None


def _export_step(model_dir: str, checkpoint_name: str, step: int,
                 checkpoint: tf.train.Checkpoint, modules: Mapping[str, Any],
                 exporter: fast_export.Exporter) -> bool:
  """Restores checkpoint `step` and publishes its export; False if gone."""
  prefix = os.path.join(model_dir, f'{checkpoint_name}-{step}')
  export_dir = paths.export_path(model_dir, checkpoint_name, step)
  commit.check_replaceable(export_dir, step)
  try:
    status = checkpoint.read(prefix)
  except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:
    logging.warning('Skipping checkpoint %s, deleted before its export: %s',
                    prefix, e)
    return False
  try:
    status.expect_partial().assert_existing_objects_matched()
  except AssertionError as e:
    raise ValueError(f'Checkpoint {prefix!r} does not hold all variables of '
                     f'the build function\'s checkpoint: {e}') from e
  exporter.export(export_dir, commit.export_info(step, modules))
  logging.info('Exported checkpoint %s as %s.', prefix, export_dir)
  return True
