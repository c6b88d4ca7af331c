"""Pure naming and parsing of checkpoint and export paths.

Nothing here touches a file system: these functions map between step numbers
and the names of the directories a manager writes, so that writers, readers
and garbage collection agree on one spelling. The layout is the reference's
(`official.core.savedmodel_checkpoint_manager`):

    <directory>/<checkpoint_name>-<step>                    checkpoint prefix
    <directory>/<checkpoint_name>-<step>_saved_modules/     published export
    <directory>/<checkpoint_name>-<step>_saved_modules/<module_name>/

plus work directories that no reader takes for an export (see `commit.py`):

    <directory>/.<checkpoint_name>-<step>_saved_modules.<kind>-<token>
"""

import os
import re
from typing import Optional, Union

SAVED_MODULES_PATH_SUFFIX = 'saved_modules'

# Written last into every export; its presence publishes an export where a
# directory rename is not atomic, and marks the export as ours everywhere.
COMMIT_MARKER = '.ckpt_export_commit.json'
# Every name ckpt_export writes for itself in a model directory or an export
# starts with this (markers, deletion requests, the lease directory), so no
# module or checkpoint name may: it would be taken for one of them.
RESERVED_PREFIX = '.ckpt_export'
INCOMPLETE_MARKER = RESERVED_PREFIX + '_incomplete'
DELETE_REQUEST = RESERVED_PREFIX + '_delete'
STATE_DIR = RESERVED_PREFIX

PathLike = Union[str, os.PathLike]

_STEP = r'(0|[1-9][0-9]*)'
_EXPORT_RE = re.compile(r'(?P<name>.+)-' + _STEP +
                        '_' + SAVED_MODULES_PATH_SUFFIX + r'\Z', re.DOTALL)
_CHECKPOINT_RE = re.compile(r'(?P<name>.+)-' + _STEP + r'\Z', re.DOTALL)
_CONTROL_RE = re.compile('[\x00-\x1f\x7f]')
_CHECKPOINT_TEMP_RE = re.compile(r'(?P<name>.+)-' + _STEP + r'_temp\Z',
                                 re.DOTALL)


def make_saved_modules_directory_name(checkpoint_name: str) -> str:
  """Returns the export directory name for a checkpoint prefix or path.

  Args:
    checkpoint_name: A checkpoint prefix such as `ckpt-5` or
      `/model_dir/ckpt-5`.

  Returns:
    `<checkpoint_name>_saved_modules`, the reference's spelling.
  """
  return f'{checkpoint_name}_{SAVED_MODULES_PATH_SUFFIX}'


def export_basename(checkpoint_name: str, step: int) -> str:
  """Returns the base name of the export directory of `step`."""
  return make_saved_modules_directory_name(f'{checkpoint_name}-{step}')


def export_path(directory: str, checkpoint_name: str, step: int) -> str:
  """Returns the path of the export directory of `step` in `directory`."""
  return os.path.join(directory, export_basename(checkpoint_name, step))


def basename(path: PathLike) -> str:
  """Returns the last component of a path or URL, ignoring a trailing '/'."""
  path = os.fspath(path)
  return path.rstrip('/').rsplit('/', 1)[-1]


def local_path(path: PathLike) -> Optional[str]:
  """The operating system's path of a local path or `file://` URL, or None.

  The one test of local versus remote: any other URL (`gs://`, `s3://`,
  `ram://`, ...) is not local. A path that equals its `local_path` is a plain
  operating-system path (not a `file://` URL).
  """
  path = os.fspath(path)
  if path.startswith('file://'):
    return path[len('file://'):]
  return None if '://' in path else path


def parse_export_step(path: PathLike,
                      checkpoint_name: Optional[str] = None) -> Optional[int]:
  """Returns the step of an export path, or None if it is not one.

  Never raises on a string. The last path component must be exactly
  `<checkpoint_name>-<step>_saved_modules` (with any non-empty checkpoint name
  when `checkpoint_name` is None) and `<step>` a canonical non-negative integer
  (no sign, no leading zeros), as `tf.train.CheckpointManager` writes it.

  Args:
    path: A path or URL, with or without a trailing separator.
    checkpoint_name: The checkpoint name the export must belong to.

  Returns:
    The step number, or None.
  """
  return _parse_step(_EXPORT_RE, path, checkpoint_name)


def parse_checkpoint_step(path: PathLike,
                          checkpoint_name: Optional[str] = None
                         ) -> Optional[int]:
  """Returns the step of a checkpoint prefix like `/dir/ckpt-5`, or None."""
  return _parse_step(_CHECKPOINT_RE, path, checkpoint_name)


def parse_checkpoint_temp_step(path: PathLike,
                               checkpoint_name: Optional[str] = None
                              ) -> Optional[int]:
  """Returns N for TF's checkpoint work directory `<name>-N_temp`, or None."""
  return _parse_step(_CHECKPOINT_TEMP_RE, path, checkpoint_name)


def _parse_step(pattern: 're.Pattern[str]', path: PathLike,
                checkpoint_name: Optional[str]) -> Optional[int]:
  match = pattern.match(basename(path))
  if match is None:
    return None
  if checkpoint_name is not None and match.group('name') != checkpoint_name:
    return None
  return int(match.group(2))


def validate_component(kind: str, name: object) -> str:
  """Checks that `name` is one plain path component and returns it.

  Args:
    kind: What the name is, for the error message (e.g. 'module name').
    name: The value to check.

  Returns:
    `name`, unchanged.

  Raises:
    ValueError: If `name` is not a non-empty string usable as one path
      component on every file system (no separators, no control characters,
      not '.' or '..'), or starts with `RESERVED_PREFIX`.
  """
  if (not isinstance(name, str) or not name or name in ('.', '..') or
      '/' in name or '\\' in name or _CONTROL_RE.search(name)):
    raise ValueError(
        f'Invalid {kind} {name!r}: it must be a non-empty string that is one '
        "plain path component (no '/', '\\', control characters, and not "
        "'.' or '..').")
  if name.startswith(RESERVED_PREFIX):
    raise ValueError(
        f'Invalid {kind} {name!r}: names starting with {RESERVED_PREFIX!r} '
        'are reserved for the files ckpt_export writes (markers, deletion '
        'requests, leases); choose another name.')
  return name


def validate_location(directory: object, name_kind: str, name: object) -> str:
  """Checks a model directory and the name prefixing its entries.

  Args:
    directory: The directory to write into (a path or URL).
    name_kind: What `name` is, for error messages (e.g. 'checkpoint_name').
    name: The prefix of the checkpoint or export names in `directory`.

  Returns:
    `directory` as a string.

  Raises:
    ValueError: If `name` is not one plain path component, `directory` is not
      a non-empty path, or either contains '[', under which TensorFlow can
      neither restore checkpoints nor load SavedModels.
  """
  validate_component(name_kind, name)
  if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
    raise ValueError(f'directory must be a non-empty path, got {directory!r}.')
  directory = os.fspath(directory)
  for kind, value in (('directory', directory), (name_kind, name)):
    if '[' in value:
      raise ValueError(
          f"{kind} {value!r} contains '[': TensorFlow can neither restore "
          'checkpoints nor load SavedModels under such a path.')
  return directory
