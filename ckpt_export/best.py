"""Keeping the best export by a metric at a stable path, crash-safely.

`BestExport` copies an export into `<model_dir>/<directory_name>/` whenever
its metrics beat the best so far:

    <model_dir>/best_export/<name>-<step>_saved_modules/<module>/   the copy
    <model_dir>/best_export/best.json       step, metric, metrics and path

The copy is published with the commit protocol (`commit.py`), so no reader
ever sees a partial one, and `best.json` is written atomically after it. Then
the previous best is removed. Each copy's commit marker holds its metrics and
a sequence number that grows with every new best, so after a crash at any
instant the copy with the highest sequence is the best one (a copy is only
written when it beats the one before): recovery keeps it, rewrites `best.json`
from it and removes the others. The manager's garbage collection only looks at
`<name>-<step>_saved_modules` entries of the model directory itself, so it
never touches this subdirectory.
"""

import json
import math
import numbers
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import housekeeping
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers

INFO_FILE = 'best.json'

Metrics = Dict[str, float]
CompareFn = Callable[[Metrics, Metrics], bool]


def as_metrics(metrics: Any, what: str) -> Metrics:
  """Checks that `metrics` maps names to real scalars; returns them as floats.

  Args:
    metrics: A mapping of str to Python, NumPy or scalar tensor numbers.
    what: What the metrics are of, for error messages (e.g. 'step 5').

  Returns:
    A new dict of str to float.

  Raises:
    ValueError: Naming `what` and the bad key or value.
  """
  if not isinstance(metrics, Mapping) or not metrics:
    raise ValueError(f'The metrics of {what} must be a non-empty dict of '
                     f'metric names to numbers, got {metrics!r}.')
  result = {}
  for key, value in metrics.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f'The metrics of {what} have a name that is not a '
                       f'non-empty string: {key!r}.')
    if tf.is_tensor(value) or hasattr(value, 'dtype'):
      value = tf.convert_to_tensor(value)
      if value.shape.rank != 0 or not (value.dtype.is_floating or
                                       value.dtype.is_integer):
        raise ValueError(f'Metric {key!r} of {what} must be a real scalar, got '
                         f'a {value.dtype.name} tensor of shape {value.shape}.')
      value = value.numpy().item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ValueError(f'Metric {key!r} of {what} must be a real number, got '
                       f'{value!r}.')
    result[key] = float(value)
  return result


def read_best(model_dir: str, directory_name: str = 'best_export'
             ) -> Optional[Dict[str, Any]]:
  """Returns the content of `best.json` (a reader's view), or None if absent.

  Its `path` is the published copy of the best export, whose modules are at
  `<path>/<module>/`.

  Raises:
    ValueError: Naming the file, if it is not JSON (edited by hand, say).
  """
  path = os.path.join(model_dir, directory_name, INFO_FILE)
  try:
    with tf.io.gfile.GFile(path) as f:
      content = f.read()
  except tf.errors.NotFoundError:
    return None
  try:
    return json.loads(content)
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); a BestExport for this '
                     'directory rewrites it from its best copy.') from e


class BestExport:
  """Keeps a copy of the best export by a metric under the model directory.

  One process updates a given best directory at a time (an evaluator, or the
  `BestExportAction` of one orbit Controller); any number may read it.
  """

  def __init__(self,
               model_dir: str,
               metric: str,
               higher_is_better: bool = True,
               compare_fn: Optional[CompareFn] = None,
               directory_name: str = 'best_export',
               checkpoint_name: str = 'ckpt'):
    """Reloads the best so far from disk, repairing what a crash left.

    Args:
      model_dir: The model directory (local path or URL).
      metric: The metric that ranks exports; every update must have it.
      higher_is_better: Whether a higher `metric` is better.
      compare_fn: Overrides the comparison: called as
        `compare_fn(best_metrics, new_metrics)`, returns whether the new
        metrics are better.
      directory_name: The subdirectory of `model_dir` holding the best export.
      checkpoint_name: The name its copy is published under,
        `<checkpoint_name>-<step>_saved_modules`.

    Raises:
      ValueError: For a bad argument, or a directory name the manager's
        garbage collection could take for an export.
    """
    if not isinstance(metric, str) or not metric:
      raise ValueError(f'metric must be a non-empty string, got {metric!r}.')
    if compare_fn is not None and not callable(compare_fn):
      raise ValueError(f'compare_fn must be callable, got {compare_fn!r}.')
    paths.validate_component('directory_name', directory_name)
    paths.validate_component('checkpoint_name', checkpoint_name)
    if (directory_name.startswith('.') or
        paths.parse_export_step(directory_name) is not None):
      raise ValueError(f'directory_name {directory_name!r} must not start with '
                       "'.' nor be named like an export.")
    self._metric = metric
    self._higher_is_better = bool(higher_is_better)
    self._compare_fn = compare_fn
    self._checkpoint_name = checkpoint_name
    self._directory = os.path.join(os.fspath(model_dir), directory_name)
    self._info: Optional[Dict[str, Any]] = None
    self._recover()

  @property
  def directory(self) -> str:
    """The directory holding the best export and `best.json`."""
    return self._directory

  @property
  def metric(self) -> str:
    return self._metric

  @property
  def best(self) -> Optional[Tuple[int, Metrics]]:
    """(step, metrics) of the best export so far, or None."""
    if self._info is None:
      return None
    return self._info['step'], dict(self._info['metrics'])

  @property
  def best_export(self) -> Optional[str]:
    """The path of the published copy of the best export, or None."""
    return None if self._info is None else self._info['path']

  def is_better(self, metrics: Metrics) -> bool:
    """Whether `metrics` beat the best so far (always, if there is none)."""
    value = metrics[self._metric]
    if math.isnan(value):
      return False
    if self._info is None:
      return True
    best = self._info['metrics']
    if self._compare_fn is not None:
      return bool(self._compare_fn(dict(best), dict(metrics)))
    if self._higher_is_better:
      return value > best[self._metric]
    return value < best[self._metric]

  def update(self, step: int, export_dir: str, metrics: Mapping[str, Any],
             holds_lease: bool = False) -> bool:
    """Makes `export_dir` the best export if its metrics beat the best so far.

    The export is copied under a reader lease, so no manager's garbage
    collection deletes it meanwhile: the caller's, or one taken here (which
    fails once the trainer asked to delete the export).

    Args:
      step: The step of the export.
      export_dir: A published export,
        `<model_dir>/<name>-<step>_saved_modules`.
      metrics: Its metrics; must contain `metric`. NaN never wins.
      holds_lease: Whether the caller holds a lease on `export_dir` (as
        inside a `savedmodels_iterator` loop).

    Returns:
      Whether it became the best export.

    Raises:
      ValueError: For a bad step, metrics without `metric` or with non-numbers,
        or an `export_dir` that is not a published export.
    """
    if (isinstance(step, bool) or not isinstance(step, numbers.Integral) or
        step < 0):
      raise ValueError(f'step must be a non-negative integer, got {step!r}.')
    step = int(step)
    metrics = as_metrics(metrics, f'step {step}')
    if self._metric not in metrics:
      raise ValueError(f'The metrics of step {step} have no {self._metric!r} '
                       f'to rank exports by; they have {sorted(metrics)}.')
    if not self.is_better(metrics):
      return False
    lease = None if holds_lease else leases.acquire(
        export_dir, holder='ckpt_export.BestExport')
    if not (holds_lease or lease) or not commit.is_published(export_dir):
      if lease is not None:
        lease.release()
      raise ValueError(f'{export_dir!r} is not a published export.')
    sequence = 1 if self._info is None else self._info['sequence'] + 1
    target = paths.export_path(self._directory, self._checkpoint_name, step)
    info = {'step': step, 'metric': self._metric,
            'value': metrics[self._metric], 'metrics': metrics,
            'sequence': sequence, 'path': target,
            'source': os.fspath(export_dir)}
    try:
      with commit.staged_export(target, info) as tmp:
        _copy_export(export_dir, tmp)
    finally:
      if lease is not None:
        lease.release()
    # The copy is the best from here on, even if what follows fails.
    self._info = info
    self._publish(info)
    logging.info('New best export: step %d with %s=%g, at %s', step,
                 self._metric, metrics[self._metric], target)
    return True

  def _publish(self, info: Dict[str, Any]) -> None:
    """Points `best.json` at the copy in `info`, then removes the others."""
    commit.write_file_atomically(os.path.join(self._directory, INFO_FILE),
                                 json.dumps(info, indent=1, sort_keys=True))
    self._info = info
    housekeeping.collect(self._directory, self._checkpoint_name,
                         lambda names, steps: {info['step']})

  def _read_info(self) -> Optional[Dict[str, Any]]:
    """`best.json`'s content; {} (rewritten by `_recover`) if not JSON."""
    try:
      return read_best(*os.path.split(self._directory))
    except ValueError as e:
      logging.warning('Rewriting %s: %s', INFO_FILE, e)
      return {}

  def _copies(self) -> List[Tuple[Dict[str, Any], str]]:
    """(commit info, path) of each published copy of ours, in the directory."""
    found = []
    for _, path in readers.export_candidates(self._directory,
                                             self._checkpoint_name):
      info = commit.read_commit_info(path)
      if (info is not None and commit.is_published(path) and
          isinstance(info.get('sequence'), int)):
        found.append((info, path))
    return found

  def _recover(self) -> None:
    """Removes crash leftovers and reloads the best copy and `best.json`."""
    names = commit.recover(self._directory, self._checkpoint_name,
                           readers.list_directory(self._directory))
    commit.remove_stale_files(self._directory, INFO_FILE, names)
    copies = self._copies()
    if not copies:
      if self._read_info() is not None:
        logging.warning('Removing %s: the export it names is gone.',
                        INFO_FILE)
        tf.io.gfile.remove(os.path.join(self._directory, INFO_FILE))
      return
    info, path = max(copies, key=lambda c: c[0]['sequence'])
    info = {key: info[key] for key in info if key != 'created'}
    info['path'] = path  # Where it is now, should the directory have moved.
    if self._read_info() != info or len(copies) > 1:
      self._publish(info)
    else:
      self._info = info


def _copy_export(export_dir: str, target: str) -> None:
  """Copies every file of an export but the protocols' marker files."""
  export_dir = os.fspath(export_dir).rstrip('/')
  skip = (paths.COMMIT_MARKER, commit.INCOMPLETE_MARKER,
          leases.DELETE_REQUEST)
  for directory, _, files in tf.io.gfile.walk(export_dir):
    relative = directory[len(export_dir):].lstrip('/')
    destination = os.path.join(target, relative) if relative else target
    tf.io.gfile.makedirs(destination)
    for name in files:
      if relative or name not in skip:
        tf.io.gfile.copy(os.path.join(directory, name),
                         os.path.join(destination, name), overwrite=True)
