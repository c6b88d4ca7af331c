"""Standard JSON for every file ckpt_export writes: no bare NaN or Infinity.

Python's `json` writes non-finite floats as `NaN`, `Infinity` and
`-Infinity`, which strict readers (`JSON.parse`, dashboards) reject. `dumps`
writes them as the strings "NaN", "Infinity" and "-Infinity" instead, and
`as_float` reads a number written so back.
"""

import json
import math
import numbers
from typing import Any, Optional

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


def as_float(value: Any) -> Optional[float]:
  """A number as `dumps` wrote it (non-finite ones as strings), or None."""
  if isinstance(value, str):
    return _NON_FINITE.get(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return None
  return float(value)
