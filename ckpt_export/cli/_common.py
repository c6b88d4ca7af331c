"""What every part of the command shares; imports no TensorFlow.

The errors a subcommand raises (and `main` turns into exit codes), the quick
check of a local MODEL_DIR, the table output and SIGTERM handling.
"""

import contextlib
import os
import re
import signal
from typing import Any, Iterator, Sequence

from ckpt_export import paths

PROG = 'ckpt-export'


class UsageError(Exception):
  """Bad arguments or an unusable MODEL_DIR: a one-line error, exit code 2."""


class Terminated(Exception):
  """Raised by the SIGTERM handler so that cleanup (leases, child) runs."""


def is_local(path: str) -> bool:
  """Whether `path` is a plain local path (not a URL, file:// included)."""
  return paths.local_path(path) == path


def one_line(text: Any) -> str:
  """The first non-empty line of `text`, stripped."""
  lines = [line.strip() for line in str(text).strip().splitlines()]
  return next((line for line in lines if line), '')


def check_model_dir(model_dir: str) -> None:
  """Raises UsageError if local MODEL_DIR is missing or not a directory.

  Done without TensorFlow, so that these errors are quick; a URL is checked
  when it is listed (`_model_dir.list_model_dir`).
  """
  if is_local(model_dir) and not os.path.isdir(model_dir):
    if os.path.exists(model_dir):
      raise UsageError(f'MODEL_DIR {model_dir} is not a directory')
    raise UsageError(f'MODEL_DIR {model_dir} does not exist')


def _printable(text: str) -> str:
  """`text` with control characters escaped, so a table stays one line a row."""
  return re.sub('[\x00-\x1f\x7f]', lambda m: repr(m.group())[1:-1], text)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  """Prints left-aligned columns separated by two spaces."""
  rows = [[_printable(cell) for cell in row] for row in rows]
  widths = [max(len(row[i]) for row in [header, *rows])
            for i in range(len(header))]
  for row in [header, *rows]:
    print('  '.join(cell.ljust(width)
                    for cell, width in zip(row, widths)).rstrip())


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
  """Turns SIGTERM into Terminated, so a COMMAND is killed and leases go."""
  def handler(signum: int, frame: Any) -> None:
    del signum, frame
    raise Terminated()
  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
