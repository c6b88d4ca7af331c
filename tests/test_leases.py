"""Reader leases: a leased export outlives garbage collection until released."""

import math
import os
import random
import select
import signal
import subprocess
import threading
import time

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from helpers import child_command
from helpers import child_env
from helpers import entries
from helpers import make_manager
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import steps_of
from helpers import wait_for


def _manager(model_dir, module, max_to_keep=1):
  return make_manager(model_dir, module, max_to_keep)


def _export(model_dir, step):
  return paths.export_path(model_dir, 'ckpt', step)


def _lease_files(model_dir):
  directory = os.path.join(model_dir, leases.STATE_DIR, 'leases')
  return entries(directory) if tf.io.gfile.exists(directory) else []


def test_leased_export_survives_gc_and_goes_at_release(model_dir, scale):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  lease = leases.acquire(_export(model_dir, 1), holder='evaluator')
  assert lease.export_dir == _export(model_dir, 1)
  assert [h['holder'] for h in leases.holders(_export(model_dir, 1))] == [
      'evaluator']
  save_step(manager, scale, 2)
  save_step(manager, scale, 3)
  # Kept for the reader, though its checkpoint is gone; not the manager's.
  assert served_value(_export(model_dir, 1)) == 1
  assert steps_of(manager.savedmodels) == [3]
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [1, 3]
  lease.release()
  lease.release()  # Idempotent.
  assert entries(model_dir) == [
      '.ckpt_export', 'checkpoint', 'ckpt-3.data-*',
      'ckpt-3.index', 'ckpt-3_saved_modules']
  assert _lease_files(model_dir) == []
  assert served_value(_export(model_dir, 3)) == 3


def test_context_manager_holds_then_releases(model_dir, scale):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  with leases.leased(_export(model_dir, 1)) as lease:
    assert leases.is_leased(lease.export_dir)
    save_step(manager, scale, 2)
    assert served_value(lease.export_dir) == 1
  assert not leases.is_leased(_export(model_dir, 1))
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [2]


def test_a_doomed_export_takes_no_new_lease(model_dir, scale):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  export_dir = _export(model_dir, 1)
  with leases.leased(export_dir):
    save_step(manager, scale, 2)  # Deletion of step 1 deferred.
    manager.sync()
    assert leases.acquire(export_dir) is None
    with pytest.raises(FileNotFoundError, match='ckpt-1_saved_modules'):
      with leases.leased(export_dir):
        pass
  assert not tf.io.gfile.exists(export_dir)
  assert leases.acquire(export_dir) is None


def test_delete_export_unless_leased(model_dir, scale):
  manager = _manager(model_dir, scale, max_to_keep=None)
  for step in (1, 2):
    save_step(manager, scale, step)
  lease = leases.acquire(_export(model_dir, 1))
  assert not leases.delete_export_unless_leased(_export(model_dir, 1))
  assert leases.delete_export_unless_leased(_export(model_dir, 2))
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [1]
  lease.release()
  assert ckpt_export.list_savedmodels(model_dir) == []
  assert leases.delete_export_unless_leased(_export(model_dir, 1))


def test_gc_survives_a_release_deleting_the_export_under_it(
    model_dir, scale, monkeypatch):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  lease = leases.acquire(_export(model_dir, 1))
  save_step(manager, scale, 2)  # Deletion of the leased step 1 deferred.
  manager.sync()
  export_identity = commit.export_identity

  def release_meanwhile(export_dir):
    # The reader releases (and so deletes) step 1 just as the next garbage
    # collection has found it there and is about to request its deletion.
    monkeypatch.setattr(commit, 'export_identity', export_identity)
    result = export_identity(export_dir)
    lease.release()
    return result

  monkeypatch.setattr(commit, 'export_identity', release_meanwhile)
  save_step(manager, scale, 3)
  manager.sync()
  assert commit.export_identity is export_identity  # The race did happen.
  # Nothing left where step 1 was (on ram://, listdir omits such a leftover).
  assert not tf.io.gfile.exists(_export(model_dir, 1))
  assert entries(model_dir) == [
      '.ckpt_export', 'checkpoint', 'ckpt-3.data-*',
      'ckpt-3.index', 'ckpt-3_saved_modules']
  assert served_value(_export(model_dir, 3)) == 3


def test_a_live_reader_keeps_its_lease_past_its_duration(model_dir, scale):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  with leases.leased(_export(model_dir, 1), lease_seconds=3) as lease:
    first_expiry = lease.expires
    assert first_expiry <= time.time() + 3  # Bounds the wait below.
    while time.time() < first_expiry + 1:
      time.sleep(0.5)
    save_step(manager, scale, 2)  # The renewed lease still holds it.
    assert served_value(_export(model_dir, 1)) == 1
    assert len(_lease_files(model_dir)) == 1
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [2]


def test_deferred_deletion_spares_a_newer_export_of_the_step(model_dir, scale):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  lease = leases.acquire(_export(model_dir, 1))
  save_step(manager, scale, 2)  # Deletion of the leased step 1 deferred.
  # A job restarted from scratch saves step 1 again, replacing the export.
  scale.w.assign(tf.fill([4], 10.0))
  restarted = _manager(model_dir, scale, max_to_keep=2)
  restarted.save(checkpoint_number=1)
  lease.release()
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [1, 2]
  assert served_value(_export(model_dir, 1)) == 10


@pytest.mark.parametrize('bad', [0, -1, math.nan, math.inf, True, '5'])
def test_bad_lease_seconds(local_dir, bad):
  with pytest.raises(ValueError, match='lease_seconds.*' + repr(bad)[:3]):
    leases.acquire(_export(local_dir, 1), lease_seconds=bad)
  with pytest.raises(ValueError, match='lease_seconds'):
    ckpt_export.savedmodels_iterator(local_dir, lease_seconds=bad)


@pytest.mark.parametrize('bad', ['/m/ckpt-1', '/m/ckpt-01_saved_modules', 3])
def test_bad_export_path(bad):
  for call in (leases.acquire, leases.holders,
               leases.delete_export_unless_leased):
    with pytest.raises(ValueError, match=repr(bad)):
      call(bad)


# The iterator.


def _hold_in_order(model_dir, latest_only):
  return ckpt_export.savedmodels_iterator(
      model_dir, timeout=0, seconds_to_sleep=0.01, latest_only=latest_only)


def test_iterator_leases_each_export_until_the_next(model_dir, scale):
  manager = _manager(model_dir, scale, max_to_keep=None)
  for step in (1, 2):
    save_step(manager, scale, step)
  iterator = _hold_in_order(model_dir, latest_only=False)
  first = next(iterator)
  assert leases.is_leased(first)
  second = next(iterator)
  assert steps_of([first, second]) == [1, 2]
  assert not leases.is_leased(first) and leases.is_leased(second)
  iterator.close()
  assert not leases.is_leased(second)
  assert _lease_files(model_dir) == []


def test_iterator_without_lease(model_dir, scale):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  iterator = ckpt_export.savedmodels_iterator(model_dir, timeout=0,
                                              lease_seconds=None)
  assert not leases.is_leased(next(iterator))
  assert not tf.io.gfile.exists(os.path.join(model_dir, leases.STATE_DIR))


def test_iterator_skips_and_logs_an_export_being_deleted(model_dir, scale,
                                                         caplog):
  manager = _manager(model_dir, scale)
  save_step(manager, scale, 1)
  iterator = _hold_in_order(model_dir, latest_only=False)
  assert steps_of([next(iterator)]) == [1]
  # Another reader holds step 2 while the trainer deletes it: still on disk,
  # but doomed, so the iterator moves on to step 3.
  save_step(manager, scale, 2)
  manager.sync()
  other = leases.acquire(_export(model_dir, 2))
  save_step(manager, scale, 3)
  manager.sync()
  assert steps_of([next(iterator)]) == [3]
  assert 'Skipping the export of step 2' in caplog.text
  other.release()
  iterator.close()
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [3]


def test_latest_only_skips_older_exports_and_logs_them(model_dir, scale,
                                                      caplog):
  manager = _manager(model_dir, scale, max_to_keep=None)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  iterator = _hold_in_order(model_dir, latest_only=True)
  assert steps_of([next(iterator)]) == [3]
  assert 'steps [1, 2]' in caplog.text
  for step in (4, 5):
    save_step(manager, scale, step)
  assert steps_of(list(iterator)) == [5]


@pytest.mark.parametrize('latest_only', [False, True])
def test_iterator_with_a_trainer_deleting_never_yields_a_missing_export(
    model_dir, latest_only):
  trainer_module = Scale()
  manager = _manager(model_dir, trainer_module)
  save_step(manager, trainer_module, 1)
  last = 8
  saved, errors = [1], []

  def train():
    try:
      for step in range(2, last + 1):
        save_step(manager, trainer_module, step)
        saved.append(step)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  trainer = threading.Thread(target=train)
  trainer.start()
  seen = []
  for export_dir in ckpt_export.savedmodels_iterator(
      model_dir, timeout=0.1, seconds_to_sleep=0.01, latest_only=latest_only,
      timeout_fn=lambda: seen[-1:] == [last] or bool(errors)):
    step = paths.parse_export_step(export_dir)
    # A slow evaluation: the trainer saves (and collects) at least once more.
    wait_for(lambda: not (saved[-1] == step < last) or errors,
             f'a save after step {step}', seconds=600, interval=0.01)
    assert served_value(export_dir) == step
    seen.append(step)
  trainer.join()
  assert not errors
  assert seen == sorted(set(seen)) and seen[-1] == last
  # Every deferred deletion was carried out at release.
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [last]
  assert _lease_files(model_dir) == []


def test_many_readers_racing_the_trainers_gc(model_dir):
  """Iterators and brief leases on every export while the trainer deletes it.

  Every release may carry out a deletion the trainer's garbage collection is
  requesting at that moment: nothing may fail, every yielded export serves its
  step, and in the end only the last export and no lease is left.
  """
  trainer_module = Scale()
  manager = _manager(model_dir, trainer_module)
  save_step(manager, trainer_module, 1)
  last, done = 40, threading.Event()
  errors, seen = [], {}

  def run(name, target):
    def guarded():
      try:
        target(name)
      except Exception as e:  # pylint: disable=broad-except
        errors.append((name, e))
        done.set()
    return threading.Thread(target=guarded, name=name)

  def train(_):
    for step in range(2, last + 1):
      save_step(manager, trainer_module, step)
    done.set()

  def iterate(name):
    seen[name] = []
    for export_dir in ckpt_export.savedmodels_iterator(
        model_dir, timeout=0.05, seconds_to_sleep=0.005, latest_only=True,
        timeout_fn=lambda: seen[name][-1:] == [last] or bool(errors)):
      step = paths.parse_export_step(export_dir)
      assert served_value(export_dir) == step
      seen[name].append(step)

  def grab(name):
    rng = random.Random(name)
    while not done.is_set():
      for export_dir in ckpt_export.list_savedmodels(model_dir):
        lease = leases.acquire(export_dir, lease_seconds=60)
        if lease is not None:
          time.sleep(rng.uniform(0, 0.05))
          lease.release()

  threads = [run('trainer', train)] + [
      run(f'reader{i}', iterate) for i in range(2)] + [
          run(f'grabber{i}', grab) for i in range(4)]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + 600
  for thread in threads:
    thread.join(max(deadline - time.monotonic(), 0))
  if any(thread.is_alive() for thread in threads):
    done.set()  # Stops the grabbers.
    pytest.fail(f'Threads still running after 600 s: '
                f'{[t.name for t in threads if t.is_alive()]}')
  assert errors == []
  for steps in seen.values():
    assert steps == sorted(set(steps)) and steps[-1] == last
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [last]
  assert _lease_files(model_dir) == []
  assert entries(model_dir) == [
      '.ckpt_export', 'checkpoint', f'ckpt-{last}.data-*',
      f'ckpt-{last}.index', f'ckpt-{last}_saved_modules']


# Real reader processes.


def _start_reader(export_dir, lease_seconds):
  child = subprocess.Popen(
      child_command('lease_child.py', export_dir, str(lease_seconds)),
      stdout=subprocess.PIPE, text=True,
      env=child_env(tf_log_level='3'))
  if not select.select([child.stdout], [], [], 600)[0]:
    child.kill()
    pytest.fail('The reader printed nothing within 600 s')
  assert child.stdout.readline().strip() == 'HELD'
  return child


@pytest.mark.slow
def test_a_killed_reader_stops_pinning_its_export(local_dir, scale):
  manager = _manager(local_dir, scale)
  save_step(manager, scale, 1)
  child = _start_reader(_export(local_dir, 1), lease_seconds=3600)
  try:
    save_step(manager, scale, 2)
    assert [h['pid'] for h in leases.holders(_export(local_dir, 1))] == [
        child.pid]
    assert served_value(_export(local_dir, 1)) == 1
  finally:
    child.kill()
    child.wait()
  # Its pid is gone: the lease counts as expired at once.
  assert leases.holders(_export(local_dir, 1)) == []
  save_step(manager, scale, 3)
  assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [3]
  assert _lease_files(local_dir) == []


@pytest.mark.slow
def test_a_frozen_reader_stops_pinning_once_its_lease_expires(local_dir,
                                                              scale):
  manager = _manager(local_dir, scale)
  save_step(manager, scale, 1)
  export_dir = _export(local_dir, 1)
  child = _start_reader(export_dir, lease_seconds=2)
  try:
    save_step(manager, scale, 2)
    assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [1, 2]
    os.kill(child.pid, signal.SIGSTOP)
    # Alive but no longer renewing: pinned until the last expiry written.
    expiry = max(h['expires'] for h in leases.holders(export_dir))
    assert expiry <= time.time() + 2  # Bounds the wait below.
    while time.time() <= expiry:
      time.sleep(0.2)
    assert child.poll() is None
    assert leases.holders(export_dir) == []
    save_step(manager, scale, 3)
    assert steps_of(ckpt_export.list_savedmodels(local_dir)) == [3]
    assert not tf.io.gfile.exists(export_dir)
  finally:
    os.kill(child.pid, signal.SIGCONT)
    child.kill()
    child.wait()
