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

import math
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import housekeeping
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import strict_json
from ckpt_export import validate

INFO_FILE = 'best.json'
OFFERED_FILE = 'offered.json'  # The step last offered to `update`.

Metrics = Dict[str, float]
CompareFn = Callable[[Metrics, Metrics], bool]


def _describe(value: Any) -> str:
  if tf.is_tensor(value) or hasattr(value, 'shape'):
    return (f'a {getattr(value.dtype, "name", value.dtype)} value of shape '
            f'{tuple(value.shape)}')
  return repr(value)


def _scalar(value: Any) -> Optional[float]:
  """`value` as a float if it is a real scalar (Python, NumPy, tensor)."""
  if tf.is_tensor(value) or hasattr(value, 'dtype'):
    try:
      value = tf.convert_to_tensor(value)
    except (TypeError, ValueError):
      return None
    if value.shape.rank != 0 or not (value.dtype.is_floating or
                                     value.dtype.is_integer):
      return None
    value = value.numpy().item()
  return float(value) if validate.is_number(value) else None


def _flatten(metrics: Mapping[Any, Any], prefix: str, what: str,
             drop_non_scalars: bool, result: Metrics) -> None:
  for key, value in metrics.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f'The metrics of {what} have a name that is not a '
                       f'non-empty string: {key!r}.')
    name = prefix + key
    if isinstance(value, Mapping):
      _flatten(value, name + '/', what, drop_non_scalars, result)
      continue
    if callable(getattr(value, 'result', None)) and not tf.is_tensor(value):
      raise ValueError(
          f'Metric {name!r} of {what} is a {type(value).__name__} object, not '
          'a number: return its value, metric.result().')
    number = _scalar(value)
    if number is None:
      if drop_non_scalars:
        logging.debug('Not a scalar metric: %s', name)
        continue
      raise ValueError(f'Metric {name!r} of {what} must be a real scalar, got '
                       f'{_describe(value)}.')
    if name in result:
      raise ValueError(f'The metrics of {what} name {name!r} twice (nested '
                       'dicts are named outer/inner).')
    result[name] = number


def as_metrics(metrics: Any, what: str,
               drop_non_scalars: bool = False) -> Metrics:
  """Checks that `metrics` maps names to real scalars; returns them as floats.

  The one rule for metrics everywhere (`evaluate_exports`, `BestExport`,
  `BestExportAction`): nested dicts are flattened, their names joined by '/'
  as orbit names its summaries (`{'eval': {'acc': 1}}` is `eval/acc`); NaN
  and infinities are kept (recorded, but never the best).

  Args:
    metrics: A mapping of str to Python, NumPy or scalar tensor numbers, or
      to such mappings.
    what: What the metrics are of, for error messages (e.g. 'step 5').
    drop_non_scalars: Leave out values that are not real scalars (as arrays
      of predictions in an orbit eval output) instead of raising.

  Returns:
    A new flat dict of str to float.

  Raises:
    ValueError: Naming `what` and the bad key or value; for a Keras metric
      object (pass its `.result()`), always.
  """
  if not isinstance(metrics, Mapping) or not metrics:
    raise ValueError(f'The metrics of {what} must be a non-empty dict of '
                     f'metric names to numbers, got {metrics!r}.')
  result = {}
  _flatten(metrics, '', what, drop_non_scalars, result)
  if not result:
    raise ValueError(f'The metrics of {what} have no real scalar: '
                     f'{sorted(map(str, metrics))}.')
  return result


def default_directory_name(checkpoint_name: str) -> str:
  """`best_export`, or `<name>_best_export` for another checkpoint name.

  Never a name `best_export` is a prefix of (TF's `ram://` file system lists
  a directory's entries by prefix).
  """
  return ('best_export' if checkpoint_name == 'ckpt' else
          f'{checkpoint_name}_best_export')


def _parse_info(content: Any) -> Optional[Dict[str, Any]]:
  """Validated best info (best.json or a copy's marker), metrics as floats.

  Returns:
    None if `content` is not of that shape.
  """
  if not isinstance(content, dict):
    return None
  step, metric = content.get('step'), content.get('metric')
  metrics = content.get('metrics')
  if (not validate.is_step(step) or not isinstance(metric, str) or
      not isinstance(metrics, dict) or
      not isinstance(content.get('path'), str) or
      content.get('higher_is_better') not in (None, True, False)):
    return None
  floats = {key: strict_json.as_float(value) for key, value in metrics.items()}
  if None in floats.values() or metric not in floats:
    return None
  return dict(content, metrics=floats, value=floats[metric])


def _checkpoint_name_of(info: Dict[str, Any]) -> str:
  name = info.get('checkpoint_name')
  if isinstance(name, str):
    return name
  return paths.basename(info['path'].rstrip('/')).rsplit('-', 1)[0]


def read_best(model_dir: str, directory_name: str = 'best_export'
             ) -> Optional[Dict[str, Any]]:
  """Returns the content of `best.json` (a reader's view), or None if absent.

  Its `path` is the published copy of the best export, whose modules are at
  `<path>/<module>/`. Non-finite metrics, written as the strings "NaN",
  "Infinity" and "-Infinity" (standard JSON), are returned as floats.

  Raises:
    ValueError: Naming the file, if it is not JSON or not a best record
      (edited by hand, say).
  """
  path = os.path.join(model_dir, directory_name, INFO_FILE)
  try:
    info = _parse_info(strict_json.load_file(path))
  except tf.errors.NotFoundError:
    return None
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); a BestExport for this '
                     'directory rewrites it from its best copy.') from e
  if info is None:
    raise ValueError(f'{path} is JSON but not a best record of ckpt_export '
                     '(step, metric, metrics, path); a BestExport for this '
                     'directory rewrites it from its best copy.')
  return info


def _check_ranking(metric: Any, higher_is_better: Any,
                   compare_fn: Any) -> None:
  """Raises a ValueError naming the bad one unless the ranking is usable."""
  if not isinstance(metric, str) or not metric:
    raise ValueError(f'metric must be a non-empty string, got {metric!r}.')
  if not isinstance(higher_is_better, bool):
    raise ValueError('higher_is_better must be True or False, got '
                     f'{higher_is_better!r}.')
  if compare_fn is not None and not callable(compare_fn):
    raise ValueError(f'compare_fn must be callable, got {compare_fn!r}.')


def _checked_directory_name(directory_name: Optional[str],
                            checkpoint_name: str) -> str:
  """`directory_name`, or the default one, once checked.

  Raises:
    ValueError: If it is not one path component, or garbage collection could
      take it for an export.
  """
  if directory_name is None:
    directory_name = default_directory_name(checkpoint_name)
  paths.validate_component('directory_name', directory_name)
  if (directory_name.startswith('.') or
      paths.parse_export_step(directory_name) is not None):
    raise ValueError(f'directory_name {directory_name!r} must not start with '
                     "'.' nor be named like an export.")
  return directory_name


class BestExport:
  """Keeps a copy of the best export by a metric under the model directory.

  One writer updates a given best directory at a time (an evaluator, or the
  `BestExportAction` of one orbit Controller): each BestExport holds the
  directory's writer lease (`leases.acquire_writer`) from its creation until
  `close()` (or until it is garbage-collected), and another one on the same
  directory, in any process, gets a `leases.WriterBusyError` naming it. A
  writer that died stops blocking once its pid is gone (or, from another
  host, once its lease expired). Any number may read it.
  """

  def __init__(self,
               model_dir: str,
               metric: str,
               higher_is_better: bool = True,
               compare_fn: Optional[CompareFn] = None,
               directory_name: Optional[str] = None,
               checkpoint_name: str = 'ckpt',
               lease_seconds: float = leases.DEFAULT_LEASE_SECONDS):
    """Reloads the best so far from disk, repairing what a crash left.

    Args:
      model_dir: The model directory (local path or URL).
      metric: The metric that ranks exports; every update must have it.
      higher_is_better: Whether a higher `metric` is better; a bool (a
        string such as 'False' is an error).
      compare_fn: Overrides the comparison: called as
        `compare_fn(best_metrics, new_metrics)`, returns whether the new
        metrics are better.
      directory_name: The subdirectory of `model_dir` holding the best export;
        by default `default_directory_name(checkpoint_name)`: `best_export`
        for 'ckpt', `<checkpoint_name>_best_export` otherwise.
      checkpoint_name: The checkpoint name of the exports it is offered, and
        the name its copy is published under,
        `<checkpoint_name>-<step>_saved_modules`.
      lease_seconds: How long the writer lease outlives this process's last
        renewal of it (see `leases.acquire_writer`).

    Raises:
      ValueError: For a bad argument, a directory name the manager's
        garbage collection could take for an export, a directory holding
        the best of another checkpoint name, or a stored best ranked by
        another metric or direction (naming both: the old best is not
        comparable; use another `directory_name` for a new best).
      leases.WriterBusyError: If another writer holds the directory.
    """
    _check_ranking(metric, higher_is_better, compare_fn)
    paths.validate_component('checkpoint_name', checkpoint_name)
    directory_name = _checked_directory_name(directory_name, checkpoint_name)
    self._metric = metric
    self._higher_is_better = higher_is_better
    self._compare_fn = compare_fn
    self._checkpoint_name = checkpoint_name
    self._directory = os.path.join(os.fspath(model_dir), directory_name)
    self._info: Optional[Dict[str, Any]] = None
    self._writer = leases.acquire_writer(
        self._directory, f'a BestExport of {checkpoint_name!r} exports by '
        f'{metric!r} ({os.path.basename(sys.argv[0] or "python")})',
        lease_seconds)
    try:
      self._recover()
      self._last_offered = self._read_offered()
    except BaseException:
      self._writer.release()
      raise

  def close(self) -> None:
    """Lets go of the directory's writer lease; no update may follow."""
    self._writer.release()

  def __enter__(self) -> 'BestExport':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  @property
  def directory(self) -> str:
    """The directory holding the best export and `best.json`."""
    return self._directory

  @property
  def metric(self) -> str:
    return self._metric

  @property
  def checkpoint_name(self) -> str:
    """The checkpoint name of the exports it keeps the best of."""
    return self._checkpoint_name

  def check_checkpoint_name(self, checkpoint_name: str, use: str) -> None:
    """Raises a ValueError unless it keeps the best of `checkpoint_name`.

    Args:
      checkpoint_name: The checkpoint name of the exports it will get.
      use: What is done with them, for the message: 'evaluated', 'offered'.
    """
    if self._checkpoint_name != checkpoint_name:
      raise ValueError(
          f'best keeps the best of the {self._checkpoint_name!r} exports, not '
          f'of the {checkpoint_name!r} ones {use}; make it with '
          f'checkpoint_name={checkpoint_name!r}.')

  @property
  def best(self) -> Optional[Tuple[int, Metrics]]:
    """(step, metrics) of the best export so far, or None."""
    if self._info is None:
      return None
    return self._info['step'], dict(self._info['metrics'])

  @property
  def last_offered(self) -> int:
    """The step last offered to `update` (in any run); -1 if none."""
    return self._last_offered

  def _read_offered(self) -> int:
    path = os.path.join(self._directory, OFFERED_FILE)
    try:
      content = strict_json.load_file(path)
    except tf.errors.NotFoundError:
      return -1
    except ValueError:
      content = None
    step = content.get('step') if isinstance(content, dict) else None
    if not validate.is_step(step):
      logging.warning('Ignoring %s: not a record of the step last offered.',
                      path)
      return -1
    return step

  def _note_offered(self, step: int) -> None:
    commit.write_json(os.path.join(self._directory, OFFERED_FILE),
                      {'step': step})
    self._last_offered = step

  @property
  def best_export(self) -> Optional[str]:
    """The path of the published copy of the best export, or None."""
    return None if self._info is None else self._info['path']

  def is_better(self, metrics: Metrics) -> bool:
    """Whether `metrics` beat the best so far (always, if there is none).

    A non-finite metric (NaN, infinity) never does; any finite one beats a
    non-finite best (which a BestExport no longer keeps).
    """
    value = metrics[self._metric]
    if not math.isfinite(value):
      return False
    if self._info is None:
      return True
    best = self._info['metrics']
    if self._compare_fn is not None:
      return bool(self._compare_fn(dict(best), dict(metrics)))
    if not math.isfinite(best[self._metric]):
      return True
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
      metrics: Its metrics (see `as_metrics`); must contain `metric`. A
        non-finite value never wins.
      holds_lease: Whether the caller holds a lease on `export_dir` (as
        inside a `savedmodels_iterator` loop).

    Returns:
      Whether it became the best export.

    Raises:
      ValueError: For a bad step, metrics without `metric` or with non-numbers,
        or an `export_dir` that is not a published export of this
        BestExport's checkpoint name.
    """
    step, metrics = self._checked_offer(step, export_dir, metrics)
    if not self.is_better(metrics):
      self._note_offered(step)
      return False
    info = self._copy_as_best(step, export_dir, metrics, holds_lease)
    # The copy is the best from here on, even if what follows fails.
    self._info = info
    self._record_best(info)
    self._note_offered(step)
    logging.info('New best export: step %d with %s=%g, at %s', step,
                 self._metric, metrics[self._metric], info['path'])
    return True

  def _checked_offer(self, step: Any, export_dir: str,
                     metrics: Mapping[str, Any]) -> Tuple[int, Metrics]:
    """The step and metrics offered to `update`, checked (see there)."""
    step = validate.integer('step', step)
    if paths.parse_export_step(os.fspath(export_dir),
                               self._checkpoint_name) is None:
      raise ValueError(
          f'{export_dir!r} is not an export named {self._checkpoint_name!r}'
          '-<step>_saved_modules, the checkpoint name this BestExport keeps '
          'the best of; make one with checkpoint_name= for those exports.')
    metrics = as_metrics(metrics, f'step {step}')
    if self._metric not in metrics:
      raise ValueError(f'The metrics of step {step} have no {self._metric!r} '
                       f'to rank exports by; they have {sorted(metrics)}.')
    return step, metrics

  def _copy_as_best(self, step: int, export_dir: str, metrics: Metrics,
                    holds_lease: bool) -> Dict[str, Any]:
    """Publishes a copy of `export_dir` in the best directory; its info.

    Under the caller's lease on `export_dir`, or one taken here.

    Raises:
      ValueError: If `export_dir` is not a published export (or no longer).
    """
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
            'higher_is_better': self._higher_is_better,
            'checkpoint_name': self._checkpoint_name,
            'sequence': sequence, 'path': target,
            'source': os.fspath(export_dir)}
    try:
      with commit.staged_export(target, info) as tmp:
        _copy_export(export_dir, tmp)
    finally:
      if lease is not None:
        lease.release()
    return info

  def _record_best(self, info: Dict[str, Any]) -> None:
    """Points `best.json` at the copy in `info`, then removes the others."""
    commit.write_json(os.path.join(self._directory, INFO_FILE), info,
                      indent=1, sort_keys=True)
    self._info = info
    housekeeping.collect(self._directory, self._checkpoint_name,
                         lambda names, steps: {info['step']})

  def _read_info(self) -> Optional[Dict[str, Any]]:
    """`best.json`'s content; {} (rewritten by `_recover`) if not JSON."""
    try:
      return read_best(*os.path.split(self._directory))
    except ValueError as e:
      logging.warning('Rewriting %s: %s', INFO_FILE, str(e))
      return {}

  def _copies(self) -> List[Tuple[Dict[str, Any], str]]:
    """(commit info, path) of each published copy of ours, in the directory."""
    found = []
    for _, path in readers.export_candidates(self._directory,
                                             self._checkpoint_name):
      info = _parse_info(dict(commit.read_commit_info(path) or {}, path=path))
      if (info is not None and commit.is_published(path) and
          isinstance(info.get('sequence'), int)):
        found.append((info, path))
    return found

  def _check_comparable(self, info: Dict[str, Any]) -> None:
    """Raises a ValueError unless the stored best ranks as this one does."""
    def ranking(metric: str, higher: Optional[bool]) -> str:
      direction = {True: 'higher is better', False: 'lower is better',
                   None: 'direction not recorded'}[higher]
      return f'{metric!r} ({direction})'
    stored = info.get('higher_is_better')
    if info['metric'] == self._metric and (
        self._compare_fn is not None or stored in (None,
                                                   self._higher_is_better)):
      return
    message = (
        f'{self._directory} holds the best export by '
        f'{ranking(info["metric"], stored)}, step {info["step"]}; this '
        'BestExport ranks by '
        f'{ranking(self._metric, self._higher_is_better)}: the stored best is '
        'not comparable. Pass another directory_name to start a new best, or '
        'move that directory away.')
    logging.error('%s', message)
    raise ValueError(message)

  def _recover(self) -> None:
    """Removes crash leftovers and reloads the best copy and `best.json`."""
    names = commit.recover(self._directory, self._checkpoint_name,
                           readers.list_directory(self._directory))
    names = commit.remove_stale_files(self._directory, INFO_FILE, names)
    commit.remove_stale_files(self._directory, OFFERED_FILE, names)
    copies = self._copies()
    if not copies:
      stored = self._read_info()
      if stored and _checkpoint_name_of(stored) != self._checkpoint_name:
        raise ValueError(
            f'{self._directory} holds the best of the '
            f'{_checkpoint_name_of(stored)!r} exports, not of '
            f'{self._checkpoint_name!r} ones; pass another directory_name '
            f'(the default for them is '
            f'{default_directory_name(self._checkpoint_name)!r}).')
      if stored is not None:
        logging.warning('Removing %s: the export it names is gone.',
                        INFO_FILE)
        tf.io.gfile.remove(os.path.join(self._directory, INFO_FILE))
      return
    info, path = max(copies, key=lambda c: c[0]['sequence'])
    info = {key: info[key] for key in info if key != 'created'}
    info['path'] = path  # Where it is now, should the directory have moved.
    self._check_comparable(info)
    if self._read_info() != info or len(copies) > 1:
      self._record_best(info)
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
