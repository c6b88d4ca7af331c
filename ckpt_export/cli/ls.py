"""`ckpt-export ls`: a table of the steps in MODEL_DIR."""

import argparse
import contextlib
import os
import re
import stat
import time
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export.cli import _common
from ckpt_export.cli import _model_dir

_CHECKPOINT_FILE_RE = re.compile(
    r'(?P<prefix>.+)\.(index|data-[0-9]+-of-[0-9]+)\Z', re.DOTALL)


def _human_size(size: int) -> str:
  if size < 1024:
    return f'{size} B'
  value = size / 1024
  for unit in ('KiB', 'MiB', 'GiB'):
    if value < 1024:
      break
    value /= 1024
  else:
    unit = 'TiB'
  return f'{value:.1f} {unit}'


def _human_age(seconds: float) -> str:
  seconds = max(0, int(seconds))
  for unit, length in (('d', 86400), ('h', 3600), ('m', 60)):
    if seconds >= length:
      return f'{seconds // length}{unit}'
  return f'{seconds}s'


def _local_tree_size(path: str) -> int:
  """`_tree_size` on local disk.

  Links are not followed (a link to a parent would never end).
  """
  try:
    st = os.lstat(path)
  except OSError:
    return 0
  size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
  for root, _, files in os.walk(path):
    for name in files:
      with contextlib.suppress(OSError):
        size += os.lstat(os.path.join(root, name)).st_size
  return size


def _tree_size(path: str) -> int:
  """Bytes of the files under `path` (or of the file), 0 if it is gone."""
  if _common.is_local(path):
    return _local_tree_size(path)
  try:
    if not tf.io.gfile.isdir(path):
      return tf.io.gfile.stat(path).length
    return sum(tf.io.gfile.stat(os.path.join(d, f)).length
               for d, _, files in tf.io.gfile.walk(path) for f in files)
  except tf.errors.NotFoundError:  # Deleted meanwhile by the trainer.
    return 0


def _mtime(path: str) -> Optional[float]:
  try:
    return tf.io.gfile.stat(path).mtime_nsec / 1e9
  except tf.errors.OpError:
    return None


class _Step:
  """What a model directory holds for one step."""

  def __init__(self) -> None:
    self.checkpoint = False  # Its `.index` file is there.
    self.export: Optional[str] = None  # The export-named directory.
    self.work = False  # A work directory of its export is there.
    self.entries: List[str] = []  # Every path that belongs to the step.


def _steps(model_dir: str, checkpoint_name: str,
           names: Sequence[str]) -> Dict[int, _Step]:
  """Groups the entries of MODEL_DIR by the step they belong to."""
  steps: Dict[int, _Step] = {}
  for name in names:
    work_of = commit.work_dir_export(name)
    checkpoint_file = _CHECKPOINT_FILE_RE.match(name)
    if work_of is not None:
      step = paths.parse_export_step(work_of, checkpoint_name)
    elif checkpoint_file is not None:
      step = paths.parse_checkpoint_step(checkpoint_file.group('prefix'),
                                         checkpoint_name)
    else:
      step = paths.parse_export_step(name, checkpoint_name)
    if step is None:
      continue
    entry = steps.setdefault(step, _Step())
    path = os.path.join(model_dir, name)
    entry.entries.append(path)
    if work_of is not None:
      entry.work = True
    elif checkpoint_file is not None:
      entry.checkpoint = entry.checkpoint or name.endswith('.index')
    else:
      entry.export = path
  return steps


def _export_columns(entry: _Step) -> List[str]:
  """The export (published, partial or none), modules and leases columns."""
  if entry.export is None or not commit.is_published(entry.export):
    return ['partial' if entry.export or entry.work else 'none', '-', '-']
  modules = _model_dir.module_names(entry.export)
  holders = leases.holders(entry.export)
  return ['published', ','.join(modules) or '-',
          f'{len(holders)}: ' + ','.join(
              f'{h.get("holder")}@{h.get("host")}:{h.get("pid")}'
              for h in holders)
          if holders else '-']


def run(args: argparse.Namespace) -> int:
  """Prints a table of the steps in MODEL_DIR."""
  names = _model_dir.list_model_dir(args.model_dir)
  steps = _steps(args.model_dir, args.checkpoint_name, names)
  if not steps:
    print(f'No checkpoints or exports named {args.checkpoint_name!r} in '
          f'{args.model_dir}.')
    return 0
  now = time.time()
  rows = []
  for step, entry in sorted(steps.items()):
    export, modules, holders = _export_columns(entry)
    times = [t for t in map(_mtime, entry.entries) if t is not None]
    rows.append([
        str(step), 'yes' if entry.checkpoint else 'no', export, modules,
        _human_size(sum(map(_tree_size, entry.entries))),
        _human_age(now - max(times)) if times else '-', holders])
  _common.print_table(['STEP', 'CHECKPOINT', 'EXPORT', 'MODULES', 'SIZE',
                       'AGE', 'LEASES'], rows)
  return 0
