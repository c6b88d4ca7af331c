"""Readers: listing, waiting and iterating, without a trainer."""

import os
import threading
import time

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import commit
from ckpt_export import savedmodel
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers
from helpers import FakeClock
from helpers import Scale
from helpers import served_value
from helpers import steps_of


def _publish(model_dir: str, step: int, checkpoint_name: str = 'ckpt') -> str:
  module = Scale()
  module.w.assign(tf.fill([4], float(step)))
  final = paths.export_path(model_dir, checkpoint_name, step)
  with commit.staged_export(final, {'step': step}) as tmp:
    savedmodel.write_modules({'scale': module}, tmp)
  return final



def test_readers_of_a_missing_directory_find_nothing(tmp_path):
  missing = str(tmp_path / 'not_yet')
  assert ckpt_export.list_savedmodels(missing) == []
  assert ckpt_export.latest_savedmodel(missing) is None
  assert ckpt_export.wait_for_new_savedmodel(missing, timeout=0) is None


def test_list_and_latest_go_by_step_and_by_checkpoint_name(model_dir):
  for step in (9, 100, 10):
    _publish(model_dir, step)
  _publish(model_dir, 500, checkpoint_name='other')
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [9, 10, 100]
  assert steps_of([ckpt_export.latest_savedmodel(model_dir)]) == [100]
  assert steps_of(ckpt_export.list_savedmodels(model_dir, 'other')) == [500]


def test_wait_looks_before_sleeping(model_dir):
  export_dir = _publish(model_dir, 1)
  for timeout in (0, 0.5):
    start = time.monotonic()
    assert ckpt_export.wait_for_new_savedmodel(
        model_dir, timeout=timeout, seconds_to_sleep=30) == export_dir
    assert time.monotonic() - start < 30  # It did not sleep first.


def test_reference_misses_an_existing_export_when_timeout_is_short(local_dir,
                                                                  reference):
  """The reference returns None without looking; ckpt_export finds it."""
  _publish(local_dir, 1)
  ref = reference.SavedModelCheckpointManager(
      tf.train.Checkpoint(), local_dir, 1, modules_to_export={'scale': Scale()})
  assert ref.wait_for_new_savedmodel(timeout=0.5) is None
  ours = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(), local_dir, 1, modules_to_export={'scale': Scale()})
  assert steps_of([ours.wait_for_new_savedmodel(timeout=0.5)]) == [1]


def test_wait_returns_the_next_step_in_step_order(model_dir):
  for step in (30, 4, 200):
    _publish(model_dir, step)
  found = ckpt_export.wait_for_new_savedmodel(model_dir, timeout=0)
  assert steps_of([found]) == [4]
  found = ckpt_export.wait_for_new_savedmodel(model_dir, found, timeout=0)
  assert steps_of([found]) == [30]
  found = ckpt_export.wait_for_new_savedmodel(model_dir, found, timeout=0)
  assert steps_of([found]) == [200]
  assert ckpt_export.wait_for_new_savedmodel(model_dir, found, timeout=0) is None


def test_wait_picks_up_an_export_published_while_it_waits(local_dir):
  _publish(local_dir, 1)
  first = ckpt_export.latest_savedmodel(local_dir)
  publisher = threading.Timer(0.3, _publish, (local_dir, 2))
  publisher.start()
  found = ckpt_export.wait_for_new_savedmodel(local_dir, first,
                                              seconds_to_sleep=0.05, timeout=60)
  publisher.join()
  assert steps_of([found]) == [2]
  assert served_value(found) == 2.0


@pytest.mark.parametrize('iterate', [False, True])
def test_wait_looks_last_just_before_the_deadline(model_dir, monkeypatch,
                                                  iterate):
  # On a fake clock: looks at 0 and 0.6 s, then again by the 1.5 s deadline;
  # the export of step 1 appears at 1 s, after the second look.
  clock = FakeClock([(1.0, lambda: _publish(model_dir, 1))])
  monkeypatch.setattr(readers, 'time', clock)
  if iterate:
    found = list(ckpt_export.savedmodels_iterator(
        model_dir, timeout=1.5, seconds_to_sleep=0.6, lease_seconds=None))
  else:
    found = [ckpt_export.wait_for_new_savedmodel(
        model_dir, timeout=1.5, seconds_to_sleep=0.6)]
  assert found == [paths.export_path(model_dir, 'ckpt', 1)]
  if not iterate:
    assert clock.now <= 1.5  # Never slept past the deadline.
    # Nothing newer: None, after waiting no longer than the timeout.
    assert ckpt_export.wait_for_new_savedmodel(
        model_dir, found[0], timeout=1.5, seconds_to_sleep=0.6) is None
    assert 2.1 <= clock.now <= 3.0


def test_unpublished_work_directories_are_never_returned(local_dir):
  final = paths.export_path(local_dir, 'ckpt', 3)
  with commit.staged_export(final, {'step': 3}) as tmp:
    savedmodel.write_modules({'scale': Scale()}, tmp)
    assert ckpt_export.list_savedmodels(local_dir) == []
    assert ckpt_export.wait_for_new_savedmodel(local_dir, timeout=0) is None
  assert ckpt_export.list_savedmodels(local_dir) == [final]


@pytest.mark.parametrize('kwargs, match', [
    ({'timeout': -1}, 'timeout'), ({'seconds_to_sleep': -0.5}, 'seconds_to_sleep'),
    ({'seconds_to_sleep': None}, 'seconds_to_sleep'), ({'timeout': 'soon'}, 'soon'),
    ({'last_savedmodel': '/m/ckpt-3'}, "'/m/ckpt-3' is not the path of an export"),
])
def test_wait_rejects_bad_arguments(local_dir, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ckpt_export.wait_for_new_savedmodel(local_dir, **kwargs)


def test_iterator_yields_every_export_once_in_step_order(model_dir):
  for step in (5, 1, 3):
    _publish(model_dir, step)
  start = time.monotonic()
  found = list(ckpt_export.savedmodels_iterator(
      model_dir, timeout=0.2, seconds_to_sleep=0.05))
  assert steps_of(found) == [1, 3, 5]
  assert time.monotonic() - start < 10  # The short sleep was honoured.


def test_iterator_sees_exports_that_arrive_later(local_dir):
  _publish(local_dir, 1)
  seen = []
  for export_dir in ckpt_export.savedmodels_iterator(
      local_dir, timeout=5, seconds_to_sleep=0.05):
    seen.append(paths.parse_export_step(export_dir))
    if len(seen) < 3:
      _publish(local_dir, len(seen) + 1)
    else:
      break
  assert seen == [1, 2, 3]


def test_iterator_asks_timeout_fn_whether_to_go_on(local_dir):
  calls = []

  def timeout_fn():
    calls.append(1)
    if len(calls) == 2:
      _publish(local_dir, 7)
    return len(calls) >= 3

  found = list(ckpt_export.savedmodels_iterator(
      local_dir, timeout=0.1, timeout_fn=timeout_fn, seconds_to_sleep=0.02))
  assert steps_of(found) == [7]
  assert len(calls) == 3


def test_manager_iterator_takes_seconds_to_sleep(local_dir):
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(), local_dir, 2, modules_to_export={'scale': Scale()})
  manager.save()
  manager.save()
  found = list(manager.savedmodels_iterator(timeout=0.2, seconds_to_sleep=0.05))
  assert found == manager.savedmodels
  assert steps_of(found) == [1, 2]


def test_latest_only_yields_the_newest_unseen_export(model_dir):
  for step in (5, 1, 3):
    _publish(model_dir, step)
  seen = []
  for export_dir in ckpt_export.savedmodels_iterator(
      model_dir, timeout=0.2, seconds_to_sleep=0.05, latest_only=True):
    seen.append(paths.parse_export_step(export_dir))
    if len(seen) == 1:
      for step in (4, 6, 8):  # 4 is older than what was seen: never yielded.
        _publish(model_dir, step)
  assert seen == [5, 8]


def test_iterator_arguments_are_checked_at_the_call(local_dir):
  with pytest.raises(ValueError, match="latest_only.*'yes'"):
    ckpt_export.savedmodels_iterator(local_dir, latest_only='yes')
  with pytest.raises(ValueError, match='min_interval_secs.*-1'):
    ckpt_export.savedmodels_iterator(local_dir, min_interval_secs=-1)
  for bad in (-2, 1.5, True, '3'):
    with pytest.raises(ValueError, match=f'after_step.*{bad!r}'):
      ckpt_export.savedmodels_iterator(local_dir, after_step=bad)


@pytest.mark.parametrize('latest_only', [False, True])
def test_iterator_after_step_never_reaches_earlier_exports(
    model_dir, latest_only, monkeypatch):
  """A restarted reader: nothing before its last step is leased or waited on."""
  for step in (1, 2, 3, 4):
    _publish(model_dir, step)
  acquired = []
  acquire = leases.acquire

  def recording(export_dir, *args, **kwargs):
    acquired.append(paths.parse_export_step(export_dir))
    return acquire(export_dir, *args, **kwargs)

  monkeypatch.setattr(leases, 'acquire', recording)
  found = list(ckpt_export.savedmodels_iterator(
      model_dir, timeout=0, after_step=2, latest_only=latest_only))
  assert steps_of(found) == ([4] if latest_only else [3, 4])
  assert acquired == steps_of(found)


def test_object_store_polls_check_no_export_at_or_before_the_last_step(
    monkeypatch):
  model_dir = 'ram://ckpt_export_test/poll_checks'
  for step in (1, 2, 3):
    _publish(model_dir, step)
  checked = []
  is_published = commit.is_published

  def recording(export_dir):
    checked.append(paths.parse_export_step(export_dir))
    return is_published(export_dir)

  monkeypatch.setattr(commit, 'is_published', recording)
  assert ckpt_export.wait_for_new_savedmodel(
      model_dir, paths.export_path(model_dir, 'ckpt', 3), timeout=0) is None
  assert checked == []
  assert steps_of([ckpt_export.latest_savedmodel(model_dir)]) == [3]
  assert checked == [3]
  tf.io.gfile.rmtree(model_dir)


def test_manager_iterator_takes_mode_and_lease(local_dir):
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(), local_dir, 3, modules_to_export={'scale': Scale()})
  for _ in range(3):
    manager.save()
  iterator = manager.savedmodels_iterator(timeout=0, latest_only=True,
                                          lease_seconds=None)
  assert steps_of(list(iterator)) == [3]
  assert '.ckpt_export' not in tf.io.gfile.listdir(local_dir)


@pytest.mark.parametrize('iterate', [False, True])
def test_waiting_looks_once_more_at_the_deadline(local_dir, tmp_path, iterate):
  # Looks at 0, 0.6 and 1.2 s, then at the 1.5 s deadline: an export that
  # appears at 1.3 s is found, not missed because a full sleep would end late.
  staged = _publish(str(tmp_path / 'elsewhere'), 1)
  os.makedirs(local_dir, exist_ok=True)
  final = paths.export_path(local_dir, 'ckpt', 1)
  publisher = threading.Timer(1.3, os.rename, (staged, final))
  publisher.start()
  start = time.monotonic()
  try:
    if iterate:
      found = list(ckpt_export.savedmodels_iterator(
          local_dir, timeout=1.5, seconds_to_sleep=0.6, lease_seconds=None))
    else:
      found = [ckpt_export.wait_for_new_savedmodel(
          local_dir, timeout=1.5, seconds_to_sleep=0.6)]
  finally:
    publisher.join()
  assert found == [final]
  assert time.monotonic() - start < 10
