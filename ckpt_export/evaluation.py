"""Evaluating exports as they appear: metrics, TensorBoard summaries, best.

`evaluate_exports` is an evaluator's loop. For each published export, in step
order, it loads the modules, calls the user's `eval_fn(modules, step)`, writes
the metrics as TensorBoard scalars at that step, optionally offers the export
to a `BestExport`, and records the metrics in `<summary_dir>/metrics.json`
(written atomically). Recording comes last, so a restarted evaluator skips
exactly the steps it finished and evaluates again one it was killed during.

Every export it could have seen is accounted for in the record: evaluated, or
skipped with the reason (deleted by the trainer before the evaluator reached
it, passed over by `latest_only`, or failed `max_attempts` times). One
evaluator writes a given record at a time (a writer lease, see
`leases.acquire_writer`).
"""

import os
import sys
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set

from absl import logging
import tensorflow as tf

from ckpt_export import best as best_lib
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import strict_json
from ckpt_export import validate

SUMMARY_SUBDIR = 'eval_exports'
METRICS_FILE = 'metrics.json'

Metrics = Dict[str, float]
EvalFn = Callable[[Dict[str, Any], int], Mapping[str, Any]]


# Why a step was not evaluated (the `reason` of `Record.skipped` entries).
SKIPPED_DELETED = readers.SKIPPED_DELETED
SKIPPED_LATEST_ONLY = readers.SKIPPED_LATEST_ONLY
SKIPPED_FAILED = 'failed'
_MESSAGES = {
    SKIPPED_DELETED: 'deleted by the trainer before the evaluator reached it',
    SKIPPED_LATEST_ONLY: 'passed over: latest_only evaluates the newest only',
}


def default_summary_dir(model_dir: str, checkpoint_name: str = 'ckpt') -> str:
  """`<model_dir>/eval_exports`, or `<name>_eval_exports` for another name."""
  name = SUMMARY_SUBDIR if checkpoint_name == 'ckpt' else (
      f'{checkpoint_name}_{SUMMARY_SUBDIR}')
  return os.path.join(os.fspath(model_dir), name)


class Record(dict):
  """Recorded metrics by step (this dict), and the steps not evaluated.

  Attributes:
    checkpoint_name: The checkpoint name of the exports recorded, or None for
      a new record.
    skipped: By step, why it was not evaluated: a dict with `reason`
      (SKIPPED_DELETED, SKIPPED_LATEST_ONLY or SKIPPED_FAILED) and a
      `message`; a failed step also has `attempts` and the last `error`.
    attempts: By step, the failed evaluations (`count`, last `error`) of a
      step neither evaluated nor skipped yet (see `max_attempts`).
  """

  def __init__(self, checkpoint_name: Optional[str] = None) -> None:
    super().__init__()
    self.checkpoint_name = checkpoint_name
    self.skipped: Dict[int, Dict[str, Any]] = {}
    self.attempts: Dict[int, Dict[str, Any]] = {}

  @property
  def last_step(self) -> int:
    """The highest step evaluated or skipped; -1 if none."""
    return max([*self, *self.skipped], default=-1)

  @property
  def failed(self) -> Dict[int, Dict[str, Any]]:
    """The skipped steps whose evaluation failed `max_attempts` times."""
    return {step: info for step, info in self.skipped.items()
            if info['reason'] == SKIPPED_FAILED}

  def skip(self, step: int, reason: str, **details: Any) -> None:
    message = _MESSAGES.get(reason) or (
        f'failed {details.get("attempts")} times: {details.get("error")}')
    self.skipped[step] = dict(details, reason=reason, message=message)
    self.attempts.pop(step, None)
    logging.warning('Step %d not evaluated: %s.', step, message)

  def to_content(self) -> Dict[str, Any]:
    """The record as `metrics.json` holds it (steps as strings)."""
    def by_step(values: Dict[int, Any]) -> Dict[str, Any]:
      return {str(step): values[step] for step in sorted(values)}
    return {'checkpoint_name': self.checkpoint_name, 'metrics': by_step(self),
            'skipped': by_step(self.skipped),
            'attempts': by_step(self.attempts)}


def _parse_steps(value: Any, parse: Callable[[Any], Any]) -> Dict[int, Any]:
  if not isinstance(value, dict):
    raise ValueError('not a dict by step')
  parsed = {}
  for step, item in value.items():
    if not (isinstance(step, str) and step.isdigit() and step.isascii()):
      raise ValueError(f'{step!r} is not a step')
    parsed[int(step)] = parse(item)
  return parsed


def _parse_metrics(value: Any) -> Dict[str, float]:
  if not isinstance(value, dict):
    raise ValueError(f'{value!r} is not a dict of metrics')
  floats = {name: strict_json.as_float(number)
            for name, number in value.items()}
  if None in floats.values():
    raise ValueError(f'{value!r} has a value that is not a number')
  return floats


def _parse_entry(key: str, kind: type) -> Callable[[Any], Dict[str, Any]]:
  def parse(value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get(key), kind):
      raise ValueError(f'{value!r} has no {key!r}')
    return value
  return parse


def _parse_record(content: Any) -> Record:
  if not isinstance(content, dict):
    raise ValueError('not a JSON object')
  name = content.get('checkpoint_name')
  if name is not None and not isinstance(name, str):
    raise ValueError(f'checkpoint_name {name!r}')
  record = Record(name)
  record.update(sorted(_parse_steps(content.get('metrics'),
                                    _parse_metrics).items()))
  record.skipped = _parse_steps(content.get('skipped', {}),
                                _parse_entry('reason', str))
  record.attempts = _parse_steps(content.get('attempts', {}),
                                 _parse_entry('count', int))
  return record


def read_metrics(summary_dir: str,
                 checkpoint_name: Optional[str] = None) -> Record:
  """Returns the record in `<summary_dir>/metrics.json` (empty if absent).

  Args:
    summary_dir: The evaluator's summary directory.
    checkpoint_name: If given, the record must be of exports of this name.

  Returns:
    The metrics by step (sorted), with the skipped steps (`Record`).

  Raises:
    ValueError: Naming the file, if it is not a metrics record (not JSON, or
      JSON of another shape), or one of another checkpoint name.
  """
  path = os.path.join(summary_dir, METRICS_FILE)
  try:
    record = _parse_record(strict_json.load_file(path))
  except tf.errors.NotFoundError:
    return Record()
  except ValueError as e:
    raise ValueError(f'{path} is not a metrics record of ckpt_export ({e}); '
                     'move it away to evaluate again.') from None
  if checkpoint_name is not None and record.checkpoint_name not in (
      None, checkpoint_name):
    raise ValueError(
        f'{path} records the {record.checkpoint_name!r} exports, not the '
        f'{checkpoint_name!r} ones; pass another summary_dir (the default '
        f'for them is {default_summary_dir("<model_dir>", checkpoint_name)}).')
  return record


def _saved_module_names(export_dir: str) -> Sequence[str]:
  """The modules of an export: its subdirectories holding a SavedModel."""
  return [name for name in readers.list_directory(export_dir)
          if tf.io.gfile.exists(os.path.join(export_dir, name,
                                             'saved_model.pb'))]


def load_modules(export_dir: str, modules: Optional[Sequence[str]] = None
                ) -> Dict[str, Any]:
  """Loads the modules of an export with `tf.saved_model.load`, by name.

  Args:
    export_dir: A published export.
    modules: The names of the modules to load; None loads them all.

  Returns:
    The loaded modules, by name.

  Raises:
    ValueError: If a requested module is not in the export.
    tf.errors.NotFoundError: If the export is deleted meanwhile.
  """
  available = _saved_module_names(export_dir)
  names = available if modules is None else modules
  missing = sorted(set(names) - set(available))
  if missing or not names:
    raise ValueError(f'Export {export_dir!r} has no module {missing or names} '
                     f'to load; it has {sorted(available)}.')
  return {name: tf.saved_model.load(os.path.join(export_dir, name))
          for name in names}


def _check_arguments(eval_fn: Any, modules: Any, best: Any,
                     until_step: Any, checkpoint_name: str,
                     max_attempts: Any) -> None:
  if not callable(eval_fn):
    raise ValueError(f'eval_fn must be callable, got {eval_fn!r}.')
  if modules is not None:
    if isinstance(modules, str) or not isinstance(modules, Sequence) or (
        not modules):
      raise ValueError('modules must be a non-empty list of module names or '
                       f'None, got {modules!r}.')
    for name in modules:
      paths.validate_component('module name', name)
  if best is not None and not isinstance(best, best_lib.BestExport):
    raise ValueError(f'best must be a BestExport or None, got {best!r}.')
  if best is not None:
    best.check_checkpoint_name(checkpoint_name, 'evaluated')
  validate.integer('until_step', until_step, allow_none=True)
  validate.integer('max_attempts', max_attempts, 1, allow_none=True)


class _Deleted(Exception):
  """The export was deleted before it could be loaded."""


def _evaluate_one(export_dir: str, step: int, eval_fn: EvalFn,
                  modules: Optional[Sequence[str]],
                  best: Optional[best_lib.BestExport]) -> Metrics:
  """Loads an export and returns its checked metrics.

  Raises:
    _Deleted: If the export was deleted before it could be loaded.
  """
  try:
    loaded = load_modules(export_dir, modules)
  except (tf.errors.NotFoundError, ValueError):
    if commit.is_published(export_dir):
      raise
    raise _Deleted() from None
  metrics = best_lib.as_metrics(eval_fn(loaded, step),
                                f'step {step} (from eval_fn)')
  if best is not None and best.metric not in metrics:
    raise ValueError(f'eval_fn returned no {best.metric!r} for step '
                     f'{step}, which best ranks exports by; it returned '
                     f'{sorted(metrics)}.')
  return metrics


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:500]}'


class _Watcher:
  """Notes in a thread the steps of the exports published after a step.

  So that an export the trainer publishes and deletes while `eval_fn` is busy
  on an earlier one is known, and recorded as skipped. One that lives less
  than a look's interval can go unseen.
  """

  def __init__(self, directory: str, checkpoint_name: str, after_step: int,
               interval: float) -> None:
    self._directory = directory
    self._checkpoint_name = checkpoint_name
    self._after_step = after_step
    self._interval = interval
    self._lock = threading.Lock()
    self._steps: Set[int] = set()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='ckpt_export-evaluation-watcher')
    self._thread.start()

  @property
  def steps(self) -> Set[int]:
    with self._lock:
      return set(self._steps)

  def look(self) -> None:
    try:
      for step, path in readers.export_candidates(self._directory,
                                                  self._checkpoint_name):
        if step > self._after_step and step not in self.steps and (
            commit.is_published(path)):
          with self._lock:
            self._steps.add(step)
    except tf.errors.OpError as e:  # Looked again at the next interval.
      logging.debug('Could not list %s: %s', self._directory, e)

  def _run(self) -> None:
    while True:
      self.look()
      if self._stop.wait(self._interval):
        return

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def evaluate_exports(model_dir: str,
                     eval_fn: EvalFn,
                     *,
                     checkpoint_name: str = 'ckpt',
                     modules: Optional[Sequence[str]] = None,
                     best: Optional[best_lib.BestExport] = None,
                     latest_only: bool = False,
                     timeout: Optional[float] = None,
                     timeout_fn: Optional[Callable[[], bool]] = None,
                     seconds_to_sleep: float = 1.0,
                     min_interval_secs: float = 0,
                     summary_dir: Optional[str] = None,
                     until_step: Optional[int] = None,
                     max_attempts: Optional[int] = None,
                     lease_seconds: float = leases.DEFAULT_LEASE_SECONDS
                    ) -> Record:
  """Evaluates the exports of `model_dir` as they appear.

  Each published export (with `latest_only`, the newest one at each look)
  after the last step in the record is loaded and passed to `eval_fn`. Its
  metrics are written as TensorBoard scalars under `summary_dir`, offered to
  `best`, then recorded in `<summary_dir>/metrics.json`. A restart resumes
  after the last recorded step.

  Every export seen (listed by the evaluator, which looks at the directory
  every `seconds_to_sleep`, at most every second, also while `eval_fn` runs)
  and not evaluated is recorded as skipped, with a warning: deleted by the
  trainer before it was reached, passed over by `latest_only`, or failed
  `max_attempts` times (see `Record.skipped`).

  One evaluator writes a summary directory at a time: this function holds its
  writer lease (see `leases.acquire_writer`) while it runs.

  Args:
    model_dir: The model directory the trainer writes.
    eval_fn: Called as `eval_fn(modules, step)` with the loaded modules by name
      (`tf.saved_model.load` objects); returns a non-empty dict of metric
      names to real scalars (Python, NumPy or scalar tensors; see
      `best.as_metrics`: nested dicts are named 'outer/inner', a Keras metric
      object is an error).
    checkpoint_name: The checkpoint name of the exports.
    modules: The names of the modules to load; None loads all of each export.
    best: Keeps the best export by its metric, which every evaluation must
      then return; of the same `checkpoint_name`.
    latest_only: Evaluate only the newest export at each look, skipping older
      unevaluated ones (for an evaluator slower than the trainer).
    timeout: The maximum number of seconds to wait for a new export; None
      waits forever.
    timeout_fn: Called after a timeout; evaluation ends if it returns True
      (or if there is none), and goes on waiting otherwise.
    seconds_to_sleep: Seconds between looks for a new export.
    min_interval_secs: The minimum number of seconds between evaluations.
    summary_dir: Where to write summaries and `metrics.json`; by default
      `default_summary_dir(model_dir, checkpoint_name)`: `eval_exports` for
      'ckpt', `<checkpoint_name>_eval_exports` otherwise.
    until_step: Stop once an export of this step or a later one is evaluated
      (e.g. the last training step); None goes on until the timeout.
    max_attempts: None (the default): an error loading or evaluating an
      export (or bad metrics) is raised, every time the step is tried. N: the
      Nth failed attempt at a step, counted in the record across restarts,
      records it as skipped (SKIPPED_FAILED), logged, and evaluation goes on;
      earlier failures are recorded in `attempts` and raised.
    lease_seconds: How long the writer lease outlives this process's last
      renewal of it.

  Returns:
    The record (a dict of all recorded metrics by step, those of earlier runs
    included, with `skipped` and `attempts`).

  Raises:
    ValueError: For a bad argument, a record of another checkpoint name, or
      metrics from `eval_fn` that are not a dict of names to real scalars (or
      lack `best`'s metric); the message names the step. That step is not
      recorded.
    leases.WriterBusyError: If another evaluator writes `summary_dir`.
  """
  _check_arguments(eval_fn, modules, best, until_step, checkpoint_name,
                   max_attempts)
  summary_dir = os.fspath(summary_dir or
                          default_summary_dir(model_dir, checkpoint_name))
  writer_lease = leases.acquire_writer(
      summary_dir, f'evaluate_exports of the {checkpoint_name!r} exports '
      f'({os.path.basename(sys.argv[0] or "python")})', lease_seconds)
  try:
    record = _resume_record(summary_dir, checkpoint_name)
    if until_step is not None and record.last_step >= until_step:
      logging.info('Step %d >= %d already handled.', record.last_step,
                   until_step)
      return record
    run = _Run(model_dir, checkpoint_name, summary_dir, record, eval_fn,
               modules, best, max_attempts)
    run.loop(until_step, seconds_to_sleep, latest_only=latest_only,
             timeout=timeout, timeout_fn=timeout_fn,
             min_interval_secs=min_interval_secs)
    return record
  finally:
    writer_lease.release()


def _resume_record(summary_dir: str, checkpoint_name: str) -> Record:
  """The record of an earlier run, once a crashed write's leftovers are gone."""
  commit.remove_stale_files(summary_dir, METRICS_FILE,
                            readers.list_directory(summary_dir))
  record = read_metrics(summary_dir, checkpoint_name)
  record.checkpoint_name = checkpoint_name
  return record


class _Run:
  """The loop of `evaluate_exports`: evaluates exports, updating `record`.

  The record is written after each change, so a restart loses nothing.
  """

  def __init__(self, model_dir: str, checkpoint_name: str, summary_dir: str,
               record: Record, eval_fn: EvalFn,
               modules: Optional[Sequence[str]],
               best: Optional[best_lib.BestExport],
               max_attempts: Optional[int]) -> None:
    self._model_dir = model_dir
    self._checkpoint_name = checkpoint_name
    self._summary_dir = summary_dir
    self._record = record
    self._eval_fn = eval_fn
    self._modules = modules
    self._best = best
    self._max_attempts = max_attempts
    self._skips: Dict[int, str] = {}  # Reported by the iterator.

  def loop(self, until_step: Optional[int], seconds_to_sleep: float,
           **iterator_args: Any) -> None:
    """Evaluates each export `savedmodels_iterator` yields, to `until_step`.

    Args:
      until_step: Stop once an export of this step or a later one is
        evaluated; None goes on until the iterator ends.
      seconds_to_sleep: Seconds between looks for a new export.
      **iterator_args: The other arguments of `savedmodels_iterator`.
    """
    watcher = _Watcher(self._model_dir, self._checkpoint_name,
                       self._record.last_step,
                       min(max(seconds_to_sleep, 0.05), 1.0))
    writer = tf.summary.create_file_writer(self._summary_dir)
    try:
      exports = readers.savedmodels_iterator(
          self._model_dir, seconds_to_sleep=seconds_to_sleep,
          checkpoint_name=self._checkpoint_name,
          after_step=self._record.last_step, on_skip=self._skips.__setitem__,
          **iterator_args)
      for export_dir in exports:
        step = paths.parse_export_step(export_dir, self._checkpoint_name)
        self._record_skipped(watcher, below=step)
        metrics = self._evaluate(export_dir, step)
        if metrics is None:
          continue
        self._record_metrics(writer, step, export_dir, metrics)
        if until_step is not None and step >= until_step:
          break
      else:
        self._record_skipped(watcher, below=None)
    finally:
      watcher.stop()
      writer.close()

  def _write(self) -> None:
    commit.write_json(os.path.join(self._summary_dir, METRICS_FILE),
                      self._record.to_content(), indent=1, sort_keys=True)

  def _record_skipped(self, watcher: _Watcher, below: Optional[int]) -> None:
    """Records the seen steps below `below` (or all gone) as skipped."""
    watcher.look()
    record = self._record
    new = False
    for step in sorted(watcher.steps | set(self._skips)):
      if step in record or step in record.skipped or (
          below is not None and step >= below):
        continue
      if below is None and commit.is_published(paths.export_path(
          self._model_dir, self._checkpoint_name, step)):
        continue  # Published after the last look: the next run's.
      record.skip(step, self._skips.get(step, SKIPPED_DELETED))
      new = True
    if new:
      self._write()

  def _evaluate(self, export_dir: str, step: int) -> Optional[Metrics]:
    """The metrics of an export; None if it is recorded as skipped.

    Raises:
      Exception: What loading or evaluating the export raised, recorded as a
        failed attempt, unless it is the `max_attempts`th.
    """
    try:
      return _evaluate_one(export_dir, step, self._eval_fn, self._modules,
                           self._best)
    except _Deleted:
      self._record.skip(step, SKIPPED_DELETED)
    except Exception as e:  # pylint: disable=broad-except
      count = self._record.attempts.get(step, {}).get('count', 0) + 1
      if self._max_attempts is None or count < self._max_attempts:
        self._record.attempts[step] = {'count': count, 'error': _one_line(e)}
        self._write()
        raise
      self._record.skip(step, SKIPPED_FAILED, attempts=count,
                        error=_one_line(e))
    self._write()
    return None

  def _record_metrics(self, writer: tf.summary.SummaryWriter, step: int,
                      export_dir: str, metrics: Metrics) -> None:
    """Writes the summaries, offers the export to `best`, records it."""
    with writer.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(name, value)
    writer.flush()
    if self._best is not None:
      self._best.update(step, export_dir, metrics, holds_lease=True)
    self._record[step] = metrics
    self._record.attempts.pop(step, None)
    self._write()
    logging.info('Evaluated step %d: %s', step, metrics)
