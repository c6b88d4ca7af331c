"""Reading a model directory, for the subcommands (imports TensorFlow)."""

import argparse
import contextlib
import os
from typing import Any, List

import tensorflow as tf

from ckpt_export import commit
from ckpt_export import leases
from ckpt_export.cli import _common


def reason(error: tf.errors.OpError, path: str) -> str:
  """The first line of a TensorFlow error about `path`, without the path."""
  text = _common.one_line(error.message)
  return text[len(path) + 2:] if text.startswith(f'{path}; ') else text


def list_model_dir(model_dir: str) -> List[str]:
  """Returns the entries of MODEL_DIR, or raises UsageError saying why not."""
  _common.check_model_dir(model_dir)
  if _common.is_local(model_dir):
    try:
      return os.listdir(model_dir)
    except OSError as e:
      raise _common.UsageError(
          f'cannot read MODEL_DIR {model_dir}: {e.strerror}') from None
  try:
    if not tf.io.gfile.isdir(model_dir):
      raise _common.UsageError(f'MODEL_DIR {model_dir} does not exist or is '
                               'not a directory')
    return [name.rstrip('/') for name in tf.io.gfile.listdir(model_dir)]
  except tf.errors.OpError as e:
    raise _common.UsageError(
        f'cannot read MODEL_DIR {model_dir}: {reason(e, model_dir)}') from None


def _module_directories(export_dir: str) -> List[str]:
  """The module directories of an export (for exports without metadata)."""
  try:
    names = tf.io.gfile.listdir(export_dir)
  except tf.errors.NotFoundError:
    return []
  return sorted(n.rstrip('/') for n in names
                if not n.startswith('.') and
                tf.io.gfile.isdir(os.path.join(export_dir, n)))


def module_names(export_dir: str) -> List[str]:
  """The modules of a published export: from its metadata, else its tree."""
  info = commit.read_commit_info(export_dir) or {}
  return info.get('modules') or _module_directories(export_dir)


def lease(export_dir: str, args: argparse.Namespace) -> Any:
  """A lease on `export_dir` (None if gone), or a null context (--no-lease)."""
  if args.no_lease:
    return contextlib.nullcontext()
  return leases.acquire(export_dir,
                        holder=f'{_common.PROG} {args.subcommand}')
