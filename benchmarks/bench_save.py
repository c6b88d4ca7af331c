"""Benchmarks ckpt_export against Model Garden's reference manager.

Measures, in one process: the time `save()` blocks the training thread (and
the following `sync()`), the peak resident memory and the bytes each save
writes, for a plain `tf.train.CheckpointManager`, the reference
`official.core.savedmodel_checkpoint_manager.SavedModelCheckpointManager` and
`ckpt_export.SavedModelCheckpointManager`, each synchronous and asynchronous;
then the cost of one poll of `wait_for_new_savedmodel` (and of listing the
exports) in a directory holding 1,000 and 10,000 exports.

Run by hand, never in the test suite (see benchmarks/README.md):

  PYTHONPATH=. /work/venv/bin/python benchmarks/bench_save.py [--repeats=7]
"""

import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import platform
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
from typing import (Any, Callable, Dict, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple)
from unittest import mock

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import psutil
import tensorflow as tf
import tf_keras
from official.core import savedmodel_checkpoint_manager as reference

import ckpt_export
from ckpt_export import decoupled as decoupled_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed saves per variant.')
_PARAMS = flags.DEFINE_list(
    'params', ['5000000'], 'Approximate numbers of model parameters: one save '
    'benchmark per size, then a summary of all sizes side by side.')
_VARIANTS = flags.DEFINE_list(
    'variants', list('abcdefg'), 'The save variants to run, by key.')
_POLLS = flags.DEFINE_integer(
    'polls', 15, 'Timed polls per reader and directory size.')
_POLL_SIZES = flags.DEFINE_list(
    'poll_sizes', ['1000', '10000'], 'Numbers of exports to poll among.')
_SKIP_SAVE = flags.DEFINE_bool('skip_save', False, 'Skip the save benchmark.')
_SKIP_POLL = flags.DEFINE_bool('skip_poll', False, 'Skip the poll benchmark.')
_SETTLE = flags.DEFINE_bool(
    'settle', True, 'Flush dirty pages (os.sync(), untimed) before each save, '
    'so that no save pays for the writeback of an earlier one.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the order of the saves.')
_OPTIMIZER = flags.DEFINE_bool(
    'optimizer', False, "Checkpoint an Adam optimizer's state with the model "
    "(slots of twice the model's bytes), as a training job does.")

MAX_TO_KEEP = 3
MODULE_NAME = 'model'
SAMPLE_SECONDS = 0.002
MB = 1e6
_CKPT_INDEX_RE = re.compile(r'ckpt-([0-9]+)\.index')

_PROCESS = psutil.Process()
_LIBC = ctypes.CDLL(None)


class MLP(tf_keras.Model):
  """The issue's model: a tf_keras MLP with a serving signature."""

  def __init__(self, width: int):
    super().__init__()
    self.hidden = [tf_keras.layers.Dense(units, activation='relu')
                   for units in (2 * width, width, width)]
    self.head = tf_keras.layers.Dense(1)
    self.serve = tf.function(
        self._serve,
        input_signature=[tf.TensorSpec([None, width], tf.float32, 'features')])
    self(tf.zeros([1, width]))

  def call(self, inputs: tf.Tensor) -> tf.Tensor:
    for layer in self.hidden:
      inputs = layer(inputs)
    return self.head(inputs)

  def _serve(self, features: tf.Tensor) -> Dict[str, tf.Tensor]:
    return {'prediction': self(features)}

  @property
  def saved_model_signatures(self) -> Dict[str, Callable[..., Any]]:
    return {'serving_default': self.serve}


def _width_for(params: int) -> int:
  """The layer width (a multiple of 64) giving about `params` parameters."""
  # The MLP has 5 * width**2 + 5 * width + 1 parameters.
  return max(64, round(math.sqrt(params / 5) / 64) * 64)


class Sample(NamedTuple):
  """The cost of one save, and whether its export was there."""

  save_s: float
  update_s: float
  sync_s: float
  rss_mb: float
  new_files_mb: float
  write_calls_mb: float
  export_space_mb: float
  exported_at_return: bool
  exported_after_sync: bool


@dataclasses.dataclass
class Variant:
  """One way of saving, with its manager and its timed samples."""

  key: str
  label: str
  make_manager: Callable[[tf.train.Checkpoint, str], Any]
  enable_async: bool
  exports: bool
  manager: Any = None
  directory: str = ''
  first_save_s: float = 0.0
  first_total_s: float = 0.0
  samples: List[Sample] = dataclasses.field(default_factory=list)

  def values(self, field: str) -> List[float]:
    return [getattr(sample, field) for sample in self.samples]

  def save(self, train: Callable[[], None]) -> Sample:
    """Saves once, trains a step (`train`), then syncs; returns the costs."""
    options = tf.train.CheckpointOptions(enable_async=self.enable_async)
    before = _file_sizes(self.directory)
    written = _PROCESS.io_counters().write_chars
    with _RssPeak() as rss:
      start = time.perf_counter()
      checkpoint = self.manager.save(options=options)
      returned = time.perf_counter()
      exported_at_return = _has_export(checkpoint)
      train()
      sync_start = time.perf_counter()
      self.manager.sync()
      synced = time.perf_counter()
    return Sample(
        save_s=returned - start,
        update_s=sync_start - returned,
        sync_s=synced - sync_start,
        rss_mb=rss.increase / MB,
        new_files_mb=sum(
            size for path, size in _file_sizes(self.directory).items()
            if path not in before) / MB,
        write_calls_mb=(_PROCESS.io_counters().write_chars - written) / MB,
        export_space_mb=_export_space(self.directory) / MB,
        exported_at_return=exported_at_return,
        exported_after_sync=_has_export(checkpoint))


def _export_space(directory: str) -> int:
  """The disk space only exports hold: files not shared with checkpoints."""
  sizes = {}
  shared = set()
  for root, _, names in os.walk(directory):
    in_export = any(ckpt_export.parse_export_step(part) is not None
                    for part in os.path.relpath(root, directory).split(os.sep))
    for name in names:
      stat = os.stat(os.path.join(root, name))
      if in_export:
        sizes[stat.st_ino] = stat.st_blocks * 512
      else:
        shared.add(stat.st_ino)
  return sum(size for inode, size in sizes.items() if inode not in shared)


def _has_export(checkpoint: str) -> bool:
  """Whether the export of checkpoint prefix `checkpoint` is on disk."""
  return os.path.isfile(os.path.join(
      ckpt_export.make_saved_modules_directory_name(checkpoint), MODULE_NAME,
      'saved_model.pb'))


class DecoupledTrainer:
  """A plain `CheckpointManager`, exported by `run_exporter` in a thread.

  The exporter builds its own copy of the model (as a `ckpt-export export`
  process would) and exports each checkpoint the trainer writes. `sync()`
  waits for the plain manager, then for the export of its latest checkpoint.
  """

  def __init__(self, ckpt: tf.train.Checkpoint, directory: str, width: int):
    self._manager = tf.train.CheckpointManager(ckpt, directory, MAX_TO_KEEP)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=decoupled_lib.run_exporter, daemon=True,
        args=(directory, lambda: _build_for_exporter(width)),
        kwargs={'seconds_to_sleep': 0.02, 'stop': self._stop})
    self._thread.start()

  def save(self, options: Optional[tf.train.CheckpointOptions] = None) -> str:
    return self._manager.save(options=options)

  def sync(self) -> None:
    self._manager.sync()
    while not _has_export(self._manager.latest_checkpoint):
      time.sleep(0.001)

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


def _build_for_exporter(width: int) -> Tuple[tf.train.Checkpoint,
                                             Dict[str, tf.Module]]:
  model = MLP(width)
  return tf.train.Checkpoint(model=model), {MODULE_NAME: model}


def _variants(modules: Dict[str, tf.Module], width: int) -> List[Variant]:
  """The save variants: plain, reference and ckpt_export, sync and async."""

  def plain(ckpt: tf.train.Checkpoint,
            directory: str) -> tf.train.CheckpointManager:
    return tf.train.CheckpointManager(ckpt, directory, MAX_TO_KEEP)

  def ref(ckpt: tf.train.Checkpoint,
          directory: str) -> tf.train.CheckpointManager:
    return reference.SavedModelCheckpointManager(
        ckpt, directory, MAX_TO_KEEP, modules_to_export=modules)

  def ours(ckpt: tf.train.Checkpoint,
           directory: str) -> tf.train.CheckpointManager:
    return ckpt_export.SavedModelCheckpointManager(
        ckpt, directory, MAX_TO_KEEP, modules_to_export=modules)

  def decoupled(ckpt: tf.train.Checkpoint, directory: str) -> DecoupledTrainer:
    return DecoupledTrainer(ckpt, directory, width)

  return [
      Variant('a', 'plain CheckpointManager', plain, False, False),
      Variant('b', 'reference', ref, False, True),
      Variant('c', 'ckpt_export', ours, False, True),
      Variant('d', 'ckpt_export async', ours, True, True),
      Variant('e', 'plain CheckpointManager async', plain, True, False),
      Variant('f', 'reference async', ref, True, True),
      Variant('g', 'plain + decoupled exporter', decoupled, False, True),
  ]


class _RssPeak:
  """Samples the resident set size in a thread; `increase` is peak - start."""

  def __init__(self):
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._start = 0
    self._peak = 0

  def _sample(self) -> None:
    while not self._stop.wait(SAMPLE_SECONDS):
      self._peak = max(self._peak, _PROCESS.memory_info().rss)

  def __enter__(self) -> '_RssPeak':
    # Returns freed heap to the OS so that memory freed by an earlier save
    # (of any variant) does not hide this save's allocations.
    gc.collect()
    _LIBC.malloc_trim(0)
    self._start = self._peak = _PROCESS.memory_info().rss
    self._thread.start()
    return self

  def __exit__(self, *unused_exc_info) -> None:
    self._stop.set()
    self._thread.join()
    self._peak = max(self._peak, _PROCESS.memory_info().rss)

  @property
  def increase(self) -> int:
    return self._peak - self._start


def _file_sizes(directory: str) -> Dict[str, int]:
  """Returns the size of every file under `directory`, by path."""
  return {os.path.join(root, name): os.path.getsize(os.path.join(root, name))
          for root, _, names in os.walk(directory) for name in names}


def _leftovers(variant: Variant) -> str:
  """Describes what is left in a variant's directory after its saves."""
  names = os.listdir(variant.directory)
  ckpts = {int(m.group(1)) for m in map(_CKPT_INDEX_RE.fullmatch, names) if m}
  exports = {ckpt_export.parse_export_step(name) for name in names
             if os.path.isfile(os.path.join(variant.directory, name,
                                            MODULE_NAME, 'saved_model.pb'))}
  exports.discard(None)
  others = sorted(name for name in names
                  if os.path.isdir(os.path.join(variant.directory, name)) and
                  ckpt_export.parse_export_step(name) not in exports)
  notes = []
  if variant.exports and ckpts - exports:
    notes.append(f'no export for ckpt steps {sorted(ckpts - exports)}')
  if exports - ckpts:
    notes.append(f'no ckpt for export steps {sorted(exports - ckpts)}')
  if others:
    notes.append(f'other dirs {others}')
  return f'{len(ckpts):5} {len(exports):7}  {"; ".join(notes) or "-"}'


def _missing(variant: Variant, field: str) -> str:
  """How many timed saves had no export of their step, of how many."""
  if not variant.exports:
    return 'n/a'
  return f'{variant.values(field).count(False)}/{len(variant.samples)}'


def _stats(values: Sequence[float]) -> str:
  """Median, min and max, in seconds."""
  return (f'{statistics.median(values):13.3f} {min(values):8.3f} '
          f'{max(values):8.3f}')


class Summary(NamedTuple):
  """One variant's figures at one model size, for the closing table."""

  variables_mb: float
  label: str
  save_s: List[float]
  total_s: List[float]
  update_s: List[float]
  first_save_s: float
  first_total_s: float
  plain_save_s: float
  plain_total_s: float
  written_mb: float
  export_space_mb: float


def bench_save(root: str, repeats: int, params: int,
               keys: Sequence[str]) -> List[Summary]:
  """Times the save variants, and measures their memory and bytes written."""
  model = MLP(_width_for(params))
  variables_mb = sum(v.numpy().nbytes for v in model.variables) / MB
  print(f'Model: tf_keras MLP, {model.count_params():,} parameters, '
        f'{variables_mb:.1f} MB of variables; max_to_keep={MAX_TO_KEEP}; '
        f'{repeats} timed saves per variant after one warm-up, in rounds of '
        f'one save each, the order shuffled per round (seed {_SEED.value})'
        f'{"; dirty pages flushed before each save" if _SETTLE.value else ""}'
        '.\n')
  trackables = {'model': model}
  if _OPTIMIZER.value:
    optimizer = tf_keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    trackables['optimizer'] = optimizer
    state_mb = sum(v.numpy().nbytes for v in optimizer.variables) / MB
    print(f"Checkpoints hold an Adam optimizer's state too: {state_mb:.1f} "
          'MB.\n')
  variants = [v for v in _variants({MODULE_NAME: model}, _width_for(params))
              if v.key in keys]
  for variant in variants:
    variant.directory = os.path.join(root, variant.key)
    variant.manager = variant.make_manager(tf.train.Checkpoint(**trackables),
                                           variant.directory)

  def train_a_little() -> None:
    for v in model.trainable_variables:
      v.assign_add(tf.fill(v.shape, 1e-3))

  def settle() -> None:
    # Each save starts with no dirty pages of another (as in training, where
    # minutes pass between saves): otherwise whoever saves right after a
    # variant writing much pays for its writeback.
    if _SETTLE.value:
      os.sync()

  start = time.perf_counter()
  for variant in variants:
    train_a_little()
    settle()
    first = variant.save(train_a_little)
    variant.first_save_s = first.save_s
    variant.first_total_s = first.save_s + first.sync_s
  order = random.Random(_SEED.value)
  for _ in range(repeats):
    # Shuffled, not rotated: in a rotation a variant always follows the same
    # other one, whose aftermath (writeback, freed memory) it inherits.
    for variant in order.sample(variants, len(variants)):
      train_a_little()
      settle()
      variant.samples.append(variant.save(train_a_little))
  print(f'({len(variants) * (repeats + 1)} saves took '
        f'{time.perf_counter() - start:.0f} s)\n')

  def totals(variant: Variant) -> List[float]:
    return [s.save_s + s.sync_s for s in variant.samples]

  plain = statistics.median(variants[0].values('save_s'))
  plain_total = statistics.median(totals(variants[0]))
  print('Save time, seconds. save() = time the training thread is blocked; '
        'sync() = the wait that follows.')
  print(f'{"variant":34} {"save() median":>13} {"min":>8} {"max":>8} '
        f'{"x plain":>7} | {"sync() median":>13} | {"save+sync median":>16} '
        f'{"x plain":>7}')
  for v in variants:
    save_median = statistics.median(v.values('save_s'))
    total = statistics.median(totals(v))
    print(f'({v.key}) {v.label:30} {_stats(v.values("save_s"))} '
          f'{save_median / plain:7.2f} | '
          f'{statistics.median(v.values("sync_s")):13.3f} | '
          f'{total:16.3f} {total / plain_total:7.2f}')

  print(f'\nMemory and bytes per save, MB (exported variables: '
        f'{variables_mb:.1f} MB).')
  print(f'{"variant":34} {"peak dRSS median":>16} {"max":>7} | '
        f'{"new files":>9} | {"write() calls":>13} | {"export space":>12}')
  for v in variants:
    rss = v.values('rss_mb')
    print(f'({v.key}) {v.label:30} {statistics.median(rss):16.1f} '
          f'{max(rss):7.1f} | '
          f'{statistics.median(v.values("new_files_mb")):9.1f} | '
          f'{statistics.median(v.values("write_calls_mb")):13.1f} | '
          f'{statistics.median(v.values("export_space_mb")):12.1f}')

  print('\nExports: saves whose own export was missing when save() returned / '
        'after sync(); what is left in the directory.')
  print(f'{"variant":34} {"missing at return":>17} {"after sync":>10} | '
        f'{"ckpts":>5} {"exports":>7}  notes')
  for v in variants:
    print(f'({v.key}) {v.label:30} {_missing(v, "exported_at_return"):>17} '
          f'{_missing(v, "exported_after_sync"):>10} | {_leftovers(v)}')
  for v in variants:
    if isinstance(v.manager, DecoupledTrainer):
      v.manager.close()
    elif isinstance(v.manager, ckpt_export.SavedModelCheckpointManager):
      module, = v.manager._exporter.modules  # pylint: disable=protected-access
      print(f'({v.key}) {v.label}: {module.full_exports} full exports '
            f'(tf.saved_model.save), {module.fast_exports} fast ones '
            f'({module.linked_exports} sharing the checkpoint\'s data).')
  plain = variants[0]
  return [Summary(variables_mb, v.label, v.values('save_s'), totals(v),
                  v.values('update_s'), v.first_save_s, v.first_total_s,
                  statistics.median(plain.values('save_s')),
                  statistics.median(totals(plain)),
                  statistics.median(v.values('write_calls_mb')),
                  statistics.median(v.values('export_space_mb')))
          for v in variants]


def _spread(values: Sequence[float]) -> str:
  return (f'{statistics.median(values):7.3f} '
          f'[{min(values):.3f}-{max(values):.3f}]')


def print_summary(summaries: Sequence[Summary]) -> None:
  """All sizes side by side: medians [min-max], ratios to plain, bytes."""
  print('\nSummary (seconds: median [min-max]; x plain: ratio of medians to '
        '(a) at the same size; MB written per save by write() calls; space '
        'held by exports on disk alone, MB).')
  print('| variables MB | variant | save() | x plain | save+sync | x plain '
        '| update after save() | first save() | first save+sync '
        '| MB written/save | export space MB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for s in summaries:
    print(f'| {s.variables_mb:.1f} | {s.label} | {_spread(s.save_s)} | '
          f'{statistics.median(s.save_s) / s.plain_save_s:.2f} | '
          f'{_spread(s.total_s)} | '
          f'{statistics.median(s.total_s) / s.plain_total_s:.2f} | '
          f'{statistics.median(s.update_s):.3f} | {s.first_save_s:.3f} | '
          f'{s.first_total_s:.3f} | {s.written_mb:.1f} | '
          f'{s.export_space_mb:.1f} |')


@contextlib.contextmanager
def _one_poll_only() -> Iterator[None]:
  """Makes the reference's wait loop stop where it would first sleep."""

  class OnePollDone(Exception):
    pass

  def sleep(unused_seconds: float) -> None:
    raise OnePollDone()

  with mock.patch.object(reference, 'time',
                         mock.Mock(time=time.time, sleep=sleep)):
    try:
      yield
    except OnePollDone:
      pass


def _time_pair_ms(ref_fn: Callable[[], object], ours_fn: Callable[[], object],
                  polls: int) -> Tuple[List[float], List[float]]:
  """Times two calls alternately after a warm-up of each; milliseconds."""
  ref_fn()
  ours_fn()
  times = ([], [])
  for i in range(polls):
    for j in (0, 1) if i % 2 == 0 else (1, 0):
      start = time.perf_counter()
      (ref_fn, ours_fn)[j]()
      times[j].append((time.perf_counter() - start) * 1000)
  return times


def bench_poll(root: str, sizes: Sequence[int], polls: int) -> None:
  """Times one poll, and one listing, among each number of exports."""
  directory = os.path.join(root, 'poll')
  ref_manager = reference.SavedModelCheckpointManager(
      tf.train.Checkpoint(), directory, MAX_TO_KEEP)
  print('\nReaders, milliseconds: one poll of wait_for_new_savedmodel('
        'last_savedmodel=<newest>), which finds nothing; one listing of all '
        'exports.')
  print(f'{"exports":>7} {"call":43} {"reference":>20} {"ckpt_export":>20} '
        f'{"ours/ref":>8}')
  print(f'{"":51} {"median":>10} {"min":>9} {"median":>10} {"min":>9}')
  made = 0
  for size in sizes:
    for step in range(made + 1, size + 1):
      os.makedirs(os.path.join(directory, f'ckpt-{step}_saved_modules'))
    made = size
    newest = os.path.join(directory, f'ckpt-{made}_saved_modules')

    def ref_poll() -> None:
      with _one_poll_only():
        ref_manager.wait_for_new_savedmodel(newest, seconds_to_sleep=0)

    def ours_poll() -> None:
      found = ckpt_export.wait_for_new_savedmodel(
          directory, newest, seconds_to_sleep=0, timeout=0)
      assert found is None, found

    assert len(ckpt_export.list_savedmodels(directory)) == made
    assert len(ref_manager.get_existing_savedmodels()) == made
    for label, ref_fn, ours_fn in (
        ('one poll of wait_for_new_savedmodel', ref_poll, ours_poll),
        ('get_existing_savedmodels / list_savedmodels',
         ref_manager.get_existing_savedmodels,
         lambda: ckpt_export.list_savedmodels(directory))):
      ref_ms, ours_ms = _time_pair_ms(ref_fn, ours_fn, polls)
      print(f'{made:7,} {label:43} {statistics.median(ref_ms):10.2f} '
            f'{min(ref_ms):9.2f} {statistics.median(ours_ms):10.2f} '
            f'{min(ours_ms):9.2f} '
            f'{statistics.median(ours_ms) / statistics.median(ref_ms):8.2f}')


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel('ERROR')
  print(f'TensorFlow {tf.__version__}, tf_keras {tf_keras.__version__}, '
        f'ckpt_export {ckpt_export.__version__}, Python '
        f'{platform.python_version()}, {platform.platform()}')
  print(f'CPUs: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable); '
        f'load average {", ".join(f"{x:.2f}" for x in os.getloadavg())}; '
        f'temp dir {tempfile.gettempdir()}\n')
  if 'a' not in _VARIANTS.value:
    raise app.UsageError('--variants must include a (plain), the baseline.')
  root = tempfile.mkdtemp(prefix='bench_save_')
  start = time.perf_counter()
  try:
    if not _SKIP_SAVE.value:
      summaries = []
      for params in _PARAMS.value:
        summaries += bench_save(os.path.join(root, params), _REPEATS.value,
                                int(params), _VARIANTS.value)
        shutil.rmtree(os.path.join(root, params), ignore_errors=True)
      print_summary(summaries)
    if not _SKIP_POLL.value:
      bench_poll(root, sorted({int(n) for n in _POLL_SIZES.value}),
                 _POLLS.value)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f'\nTotal run time: {time.perf_counter() - start:.0f} s; load average '
        f'now {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__':
  app.run(main)
