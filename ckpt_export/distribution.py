"""Which process of a distributed job writes the model directory.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same
script and must take part in every save: writing a checkpoint or a SavedModel
reads the variables, and reading some of them (SyncOnRead ones, say) runs
collectives across all workers. Only the chief
(`strategy.extended.should_checkpoint`) may write the model directory: two
workers writing one directory collide. The others write the same checkpoint and
export into a scratch directory of their own on local disk, then delete it.

The strategy is the one in scope, or else the one that owns the checkpoint's
distributed variables, so a manager built outside `strategy.scope()` still
finds it.
"""

import re
import tempfile
from typing import Optional

import tensorflow as tf

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
  model directory: no reader, garbage collection or other worker sees it.

  Args:
    strategy: The job's strategy, to name the directory after the task.

  Returns:
    The directory's path; the caller removes it.
  """
  return tempfile.mkdtemp(prefix=f'{SCRATCH_PREFIX}{task_name(strategy)}-')
