"""Which process of a distributed job writes the model directory.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same
script and must take part in every save: writing a checkpoint or a SavedModel
reads the variables, and reading some of them (SyncOnRead ones, say) runs
collectives across all workers. Only the chief
(`strategy.extended.should_checkpoint`) may write the model directory: two
workers writing one directory collide. The others write the same checkpoint and
export into a scratch directory of their own on local disk, then delete it; the
next manager on the host deletes those of a worker killed meanwhile.

A single-host `tf.distribute.MirroredStrategy` is one process holding every
replica: nothing to match with other processes, so its exports are fast ones
as without a strategy (`fast_exports_allowed`). A mirrored variable is one
`tf.Variable` to a checkpoint and to a SavedModel (its primary copy, saved
once); a SyncOnRead one is saved as its aggregate, which is what a fast
export reads too.

The strategy is the one in scope, or else the one that owns the checkpoint's
distributed variables, so a manager built outside `strategy.scope()` still
finds it.
"""

import os
import re
import tempfile
from typing import List, Optional

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import writers

SCRATCH_PREFIX = 'ckpt_export-scratch-'


def find_strategy(checkpoint: tf.train.Checkpoint
                 ) -> Optional[tf.distribute.Strategy]:
  """Returns the strategy in scope, else that of `checkpoint`'s variables.

  Args:
    checkpoint: The checkpoint a manager saves.

  Returns:
    The strategy, or None when there is none in scope and no variable of the
    checkpoint is a distributed one (yet).
  """
  if tf.distribute.has_strategy():
    return tf.distribute.get_strategy()
  for obj in tf.train.TrackableView(checkpoint).descendants():
    if isinstance(obj, tf.distribute.DistributedValues):
      strategy = getattr(obj, 'distribute_strategy', None)
      if strategy is not None:
        return strategy
  return None


def is_chief(strategy: Optional[tf.distribute.Strategy]) -> bool:
  """Whether this process writes checkpoints and exports for `strategy`."""
  return strategy is None or strategy.extended.should_checkpoint


def fast_exports_allowed(strategy: Optional[tf.distribute.Strategy]) -> bool:
  """Whether exports under `strategy` may be fast ones, after the checkpoint.

  Only where one process runs every replica: no strategy, or a single-host
  `MirroredStrategy`. Under a multi-worker strategy every worker must run the
  same operations (see the module docstring), and the chief's fast export
  would run none of the non-chiefs' full ones: those get full exports.

  Args:
    strategy: The job's strategy, or None.

  Returns:
    Whether the manager may export fast.
  """
  return strategy is None or isinstance(strategy,
                                        tf.distribute.MirroredStrategy)


def task_name(strategy: Optional[tf.distribute.Strategy]) -> str:
  """This process's task, e.g. `worker1`, or `local` outside a cluster."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return 'local'
  return re.sub(r'[^A-Za-z0-9_]', '_',
                f'{resolver.task_type}{resolver.task_id or 0}')


def make_scratch_directory(strategy: Optional[tf.distribute.Strategy]) -> str:
  """Creates a new, unique local directory for a non-chief's writes.

  It lives in the temporary directory (`$TMPDIR`, else `/tmp`), never in the
  model directory: no reader, garbage collection or other worker sees it. Its
  name carries the token of an operation in flight (`writers.begin_operation`)
  until `remove_scratch_directory`, so `remove_stale_scratch_directories` can
  tell it from the leftover of a process killed mid-save.

  Args:
    strategy: The job's strategy, to name the directory after the task.

  Returns:
    The directory's path; the caller removes it with
    `remove_scratch_directory`.
  """
  token = writers.begin_operation()
  path = os.path.join(tempfile.gettempdir(),
                      f'{SCRATCH_PREFIX}{task_name(strategy)}.{token}')
  try:
    os.mkdir(path, 0o700)
  except BaseException:
    writers.end_operation(token)
    raise
  return path


def _token(path: str) -> str:
  """The token in a scratch directory's name (the task name has no '.')."""
  return os.path.basename(path)[len(SCRATCH_PREFIX):].partition('.')[2]


def remove_scratch_directory(path: str) -> None:
  """Removes a directory `make_scratch_directory` made, and ends its token."""
  try:
    commit.remove_tree(path)
  except tf.errors.NotFoundError:
    pass
  finally:
    writers.end_operation(_token(path))


def remove_stale_scratch_directories() -> List[str]:
  """Removes the scratch directories of processes that are gone.

  A worker killed mid-save leaves its scratch directory (a checkpoint and an
  export's worth of bytes); a restarted worker removes it, on its first save.
  Those of running processes on this host (other workers sharing `/tmp`) and
  of other hosts (a shared `$TMPDIR`) are left alone.

  Returns:
    The paths removed.
  """
  directory = tempfile.gettempdir()
  removed = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if (name.startswith(SCRATCH_PREFIX) and
        not writers.token_alive(_token(path), stale_seconds=None) and
        not commit.skip_link(path)):
      logging.info('Removing %s, left by a worker killed while saving.', path)
      if commit.attempt(path, 'remove the scratch directory',
                        remove_scratch_directory, path):
        removed.append(path)
  return removed
