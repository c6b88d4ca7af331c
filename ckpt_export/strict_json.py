"""Standard JSON for every file ckpt_export writes: no bare NaN or Infinity.

Python's `json` writes non-finite floats as `NaN`, `Infinity` and
`-Infinity`, which strict readers (`JSON.parse`, dashboards) reject. `dumps`
writes them as the strings "NaN", "Infinity" and "-Infinity" instead, and
`as_float` reads a number written so back.

Every JSON metadata file is read here (`read_file`, or `load_file` where a
file that is not JSON is an error to report), and written by
`commit.write_json` (replacing a file whole) or `commit.write_new_json` (a
file under a fresh name).
"""

import json
import math
from typing import Any, Callable, Optional

import tensorflow as tf

from ckpt_export import validate

_NON_FINITE = {'NaN': math.nan, 'Infinity': math.inf, '-Infinity': -math.inf}


def encode(value: Any) -> Any:
  """`value` with each non-finite float (in dicts and lists) as a string."""
  if isinstance(value, float) and not math.isfinite(value):
    return 'NaN' if math.isnan(value) else (
        'Infinity' if value > 0 else '-Infinity')
  if isinstance(value, dict):
    return {key: encode(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [encode(item) for item in value]
  return value


def dumps(value: Any, **kwargs: Any) -> str:
  """`json.dumps` of `encode(value)`, refusing anything not standard JSON."""
  return json.dumps(encode(value), allow_nan=False, **kwargs)


def load_file(path: str) -> Any:
  """Returns the content of the JSON file at `path`.

  Raises:
    tf.errors.NotFoundError: If there is no file at `path`.
    ValueError: If the file is not JSON (or not UTF-8).
    tf.errors.OpError: If it cannot be read.
  """
  with tf.io.gfile.GFile(path) as f:
    return json.loads(f.read())


def read_file(path: str,
              valid: Optional[Callable[[Any], bool]] = None) -> Any:
  """Returns the content of the JSON file at `path`, or None.

  None if the file is absent, unreadable, not JSON, or (given `valid`) of
  another shape: metadata that is not as ckpt_export writes it is foreign.

  Args:
    path: The file.
    valid: Whether a content has the expected shape.
  """
  try:
    content = load_file(path)
  except (tf.errors.OpError, ValueError):
    return None
  return content if valid is None or valid(content) else None


def as_float(value: Any) -> Optional[float]:
  """A number as `dumps` wrote it (non-finite ones as strings), or None."""
  if isinstance(value, str):
    return _NON_FINITE.get(value)
  return float(value) if validate.is_number(value) else None
