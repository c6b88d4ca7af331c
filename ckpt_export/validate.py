"""Checks of numbers given as arguments or read from metadata files.

A bool is an `int` in Python, and a NaN compares false with everything, so
"an integer" and "a finite number" are each checked here once. The predicates
(`is_integer`, `is_number`, `is_finite`, `is_step`) judge metadata read from
disk, where a bad value means a foreign file; the checkers (`integer`,
`seconds`) judge arguments, and raise a ValueError naming the argument, the
value given and what to pass.
"""

import math
import numbers
from typing import Any, Optional


def is_integer(value: Any) -> bool:
  """Whether `value` is an integer (Python's or NumPy's), and not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  """Whether `value` is a real number (Python's or NumPy's), and not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
  """Whether `value` is a finite real number, and not a bool."""
  return is_number(value) and math.isfinite(value)


def is_step(value: Any) -> bool:
  """Whether `value` is a step number: a non-negative integer."""
  return is_integer(value) and bool(value >= 0)


def integer(name: str, value: Any, minimum: int = 0,
            allow_none: bool = False) -> Optional[int]:
  """Returns the integer argument `value` as an int, or raises.

  Args:
    name: The argument's name, for the error message.
    value: The value given.
    minimum: The smallest value allowed.
    allow_none: Whether None is allowed (and returned).

  Raises:
    ValueError: Naming `name`, `value` and the values allowed.
  """
  if value is None and allow_none:
    return None
  if not is_integer(value) or value < minimum:
    kind = {0: 'a non-negative integer', 1: 'a positive integer'}.get(
        minimum, f'an integer >= {minimum}')
    raise ValueError(f'{name} must be {kind}{" or None" if allow_none else ""}'
                     f', got {value!r}.')
  return int(value)


def seconds(name: str, value: Any, minimum: float = 0.0,
            maximum: float = math.inf, allow_none: bool = False,
            allow_minimum: bool = True) -> Optional[float]:
  """Returns the duration argument `value` as a float, or raises.

  Args:
    name: The argument's name, for the error message.
    value: The value given: a finite number of seconds.
    minimum: The smallest value allowed.
    maximum: The largest value allowed.
    allow_none: Whether None is allowed (and returned).
    allow_minimum: Whether `minimum` itself is allowed.

  Raises:
    ValueError: Naming `name`, `value` and the values allowed.
  """
  if value is None and allow_none:
    return None
  if (not is_finite(value) or value > maximum or value < minimum or
      (value == minimum and not allow_minimum)):
    bounds = [f'more than {minimum:g}' if not allow_minimum else
              f'at least {minimum:g}']
    if maximum < math.inf:
      bounds.append(f'at most {maximum:g}')
    raise ValueError(f'{name} must be a finite number of seconds, '
                     f'{", ".join(bounds)}{" (or None)" if allow_none else ""}'
                     f', got {value!r}.')
  return float(value)
