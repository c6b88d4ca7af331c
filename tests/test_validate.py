"""The one set of checks of numbers, and the one reader of JSON metadata."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from ckpt_export import commit
from ckpt_export import strict_json
from ckpt_export import validate


@pytest.mark.parametrize('value, integer, finite', [
    (0, True, True), (7, True, True), (np.int64(3), True, True),
    (True, False, False), (False, False, False), (1.0, False, True),
    (np.float32(2.5), False, True), (math.nan, False, False),
    (math.inf, False, False), ('3', False, False), (None, False, False)])
def test_predicates_refuse_bools_and_non_finite_numbers(value, integer,
                                                        finite):
  assert validate.is_integer(value) is integer
  assert validate.is_finite(value) is finite
  assert validate.is_step(value) is integer


def test_steps_are_non_negative():
  assert validate.is_step(0) and not validate.is_step(-1)


@pytest.mark.parametrize('value, minimum, allow_none, message', [
    (-1, 0, False, 'count must be a non-negative integer, got -1.'),
    (0, 1, True, 'count must be a positive integer or None, got 0.'),
    (-2, -1, False, 'count must be an integer >= -1, got -2.'),
    (True, 0, False, 'count must be a non-negative integer, got True.'),
    (2.0, 0, False, 'count must be a non-negative integer, got 2.0.'),
    (None, 0, False, 'count must be a non-negative integer, got None.')])
def test_integer_names_the_argument_the_value_and_what_to_pass(
    value, minimum, allow_none, message):
  with pytest.raises(ValueError) as raised:
    validate.integer('count', value, minimum, allow_none)
  assert str(raised.value) == message


def test_integer_returns_a_python_int():
  assert validate.integer('count', None, allow_none=True) is None
  result = validate.integer('count', np.int64(4), 1)
  assert result == 4 and type(result) is int


@pytest.mark.parametrize('value', [0, -1, math.nan, math.inf, 11, True, '1'])
def test_seconds_refuses_what_is_out_of_bounds(value):
  with pytest.raises(ValueError) as raised:
    validate.seconds('wait', value, maximum=10, allow_minimum=False)
  assert str(raised.value) == (
      'wait must be a finite number of seconds, more than 0, at most 10, '
      f'got {value!r}.')


def test_seconds_accepts_its_bounds_and_none_when_allowed():
  assert validate.seconds('wait', 0) == 0.0
  assert validate.seconds('wait', 10, maximum=10) == 10.0
  assert validate.seconds('wait', None, allow_none=True) is None
  with pytest.raises(ValueError, match=r'at least 1 \(or None\), got 0.5'):
    validate.seconds('wait', 0.5, minimum=1, allow_none=True)


def test_json_metadata_round_trips_and_foreign_files_read_as_none(tmp_path):
  path = os.fspath(tmp_path / 'meta.json')
  assert strict_json.read_file(path) is None
  with pytest.raises(tf.errors.NotFoundError):
    strict_json.load_file(path)
  commit.write_json(path, {'step': 3, 'loss': math.nan}, sort_keys=True)
  assert (tmp_path / 'meta.json').read_text() == (
      '{"loss": "NaN", "step": 3}')
  assert strict_json.read_file(path) == {'step': 3, 'loss': 'NaN'}
  assert strict_json.read_file(path, lambda c: 'other' in c) is None
  assert sorted(os.listdir(tmp_path)) == ['meta.json']  # No temporary left.
  (tmp_path / 'meta.json').write_text('{"step": ')
  assert strict_json.read_file(path) is None
  with pytest.raises(ValueError):
    strict_json.load_file(path)
  os.remove(path)
  os.mkdir(path)  # Unreadable as a file.
  assert strict_json.read_file(path) is None


def test_write_new_json_never_replaces_or_writes_through_a_link(tmp_path):
  path = os.fspath(tmp_path / 'lease.json')
  commit.write_new_json(path, {'expires': 1.5})
  assert strict_json.read_file(path) == {'expires': 1.5}
  with pytest.raises(tf.errors.AlreadyExistsError):
    commit.write_new_json(path, {'expires': 2.5})
  target = tmp_path / 'target'
  os.symlink(target, tmp_path / 'link.json')
  with pytest.raises(tf.errors.AlreadyExistsError):
    commit.write_new_json(os.fspath(tmp_path / 'link.json'), {})
  assert not target.exists()
