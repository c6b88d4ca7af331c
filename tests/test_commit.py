"""The commit protocol, on local disk and on TF's ram:// file system."""

import json
import os
from typing import Tuple

import pytest
import tensorflow as tf

from helpers import entries
from helpers import MODEL_GARDEN_REFERENCE
from helpers import served_value
from ckpt_export import commit
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import savedmodel
from ckpt_export import writers

MODULES_KEY = 'scale'


def _publish(model_dir: str, step: int, module) -> str:
  final = paths.export_path(model_dir, 'ckpt', step)
  with commit.staged_export(final, {'step': step}) as tmp:
    savedmodel.write_modules({MODULES_KEY: module}, tmp)
  return final


def _dead_token() -> str:
  """A work-dir token of a process on this host that no longer exists."""
  return f'{int(__import__("time").time() * 1000)}-999999999-{writers.HOST}-0123abcd'


def _half_published(model_dir: str, scale) -> Tuple[str, str]:
  """A copy-then-delete publish, killed after it marked the export incomplete.

  Returns:
    The export's path and its writer's (dead) work directory.
  """
  final = paths.export_path(model_dir, 'ckpt', 1)
  tmp = writers.work_dir(final, 'tmp', _dead_token())
  savedmodel.write_modules({MODULES_KEY: scale}, tmp)
  tf.io.gfile.makedirs(final)
  marker = os.path.join(final, commit.INCOMPLETE_MARKER)
  with tf.io.gfile.GFile(marker, 'w') as f:
    f.write(paths.basename(tmp))
  return final, tmp


def test_publish_writes_a_complete_export_and_nothing_else(model_dir, scale):
  scale.w.assign(tf.fill([4], 3.0))
  final = _publish(model_dir, 3, scale)
  assert entries(model_dir) == ['ckpt-3_saved_modules']
  assert commit.is_published(final) and commit.has_commit_marker(final)
  assert served_value(final) == 3.0
  assert sorted(entries(final)) == sorted([MODULES_KEY, paths.COMMIT_MARKER])
  assert commit.read_commit_info(final)['step'] == 3


def test_a_failing_export_publishes_nothing_and_leaves_nothing(model_dir, scale):
  final = paths.export_path(model_dir, 'ckpt', 1)
  with pytest.raises(RuntimeError, match='boom'):
    with commit.staged_export(final, {'step': 1}) as tmp:
      savedmodel.write_modules({MODULES_KEY: scale}, tmp)
      raise RuntimeError('boom')
  assert entries(model_dir) == []
  assert readers.list_savedmodels(model_dir) == []


def test_work_directory_is_invisible_to_every_reader(model_dir, scale):
  final = paths.export_path(model_dir, 'ckpt', 4)
  with commit.staged_export(final, {'step': 4}) as tmp:
    savedmodel.write_modules({MODULES_KEY: scale}, tmp)
    name = paths.basename(tmp)
    assert entries(model_dir) == [name]
    # ckpt_export's readers.
    assert readers.list_savedmodels(model_dir) == []
    assert paths.parse_export_step(tmp) is None
    # The reference's reader: its glob, suffix filter and step parser.
    ref = pytest.importorskip(MODEL_GARDEN_REFERENCE)
    globbed = tf.io.gfile.glob(os.path.join(model_dir, 'ckpt-*_saved_modules'))
    assert [g for g in globbed if g.endswith('saved_modules')] == []
    assert ref.SavedModelCheckpointManager.get_savedmodel_number_from_path(
        None, tmp) is None
    # A TF-Serving-style poller takes only integer directory names.
    assert not name.isdigit()
  assert readers.list_savedmodels(model_dir) == [final]


def test_republishing_a_step_replaces_it_with_the_new_values(model_dir, scale):
  scale.w.assign(tf.fill([4], 1.0))
  final = _publish(model_dir, 7, scale)
  scale.w.assign(tf.fill([4], 2.0))
  assert _publish(model_dir, 7, scale) == final
  assert served_value(final) == 2.0
  assert entries(model_dir) == ['ckpt-7_saved_modules']


def test_remove_export_leaves_nothing(model_dir, scale):
  final = _publish(model_dir, 2, scale)
  other = _publish(model_dir, 3, scale)
  commit.delete_export(final)
  assert entries(model_dir) == ['ckpt-3_saved_modules']
  assert readers.list_savedmodels(model_dir) == [other]


def test_recover_removes_dead_writers_leftovers_only(model_dir, scale):
  final = _publish(model_dir, 1, scale)
  dead = writers.work_dir(final, 'tmp', _dead_token())
  tf.io.gfile.makedirs(os.path.join(dead, MODULES_KEY))
  other_name = writers.work_dir(final.replace('/ckpt-1', '/other-1'), 'tmp',
                                _dead_token())
  tf.io.gfile.makedirs(other_name)
  # A live writer in this process: its work directory must survive recovery.
  with commit.staged_export(paths.export_path(model_dir, 'ckpt', 2),
                            {'step': 2}) as live:
    names = commit.recover(model_dir, 'ckpt', entries(model_dir))
    assert tf.io.gfile.exists(live)
  assert not tf.io.gfile.exists(dead)
  assert paths.basename(dead) not in names
  # Another checkpoint name's entries are not this manager's business.
  assert tf.io.gfile.exists(other_name)
  assert served_value(final) == 0.0


def test_recover_keeps_leftovers_of_live_processes(local_dir, scale):
  final = paths.export_path(local_dir, 'ckpt', 1)
  tf.io.gfile.makedirs(local_dir)
  alive_here = writers.work_dir(
      final, 'tmp', _dead_token().replace('999999999', str(os.getppid())))
  other_host = writers.work_dir(
      final, 'tmp', _dead_token().replace(writers.HOST, 'otherhost'))
  for d in (alive_here, other_host):
    tf.io.gfile.makedirs(d)
  commit.recover(local_dir, 'ckpt', entries(local_dir))
  assert tf.io.gfile.exists(alive_here) and tf.io.gfile.exists(other_host)


def test_recover_removes_leftovers_older_than_stale_seconds(local_dir):
  final = paths.export_path(local_dir, 'ckpt', 1)
  old_ms = int((__import__('time').time() - writers.STALE_SECONDS - 60) * 1000)
  stale = writers.work_dir(final, 'tmp', f'{old_ms}-1-otherhost-0123abcd')
  tf.io.gfile.makedirs(stale)
  commit.recover(local_dir, 'ckpt', entries(local_dir))
  assert entries(local_dir) == []


def test_recover_restores_an_export_whose_replacement_crashed(local_dir, scale):
  scale.w.assign(tf.fill([4], 5.0))
  final = _publish(local_dir, 5, scale)
  # A crash between renaming the old export aside and publishing the new one.
  aside = writers.work_dir(final, 'old', _dead_token())
  tf.io.gfile.rename(final, aside)
  assert readers.list_savedmodels(local_dir) == []
  commit.recover(local_dir, 'ckpt', entries(local_dir))
  assert entries(local_dir) == ['ckpt-5_saved_modules']
  assert served_value(final) == 5.0


def test_two_processes_recovering_at_once_both_succeed(model_dir, scale):
  """A trainer and a decoupled exporter list the directory, then recover."""
  final = _publish(model_dir, 5, scale)
  leftover = writers.work_dir(final, 'tmp', _dead_token())
  tf.io.gfile.makedirs(os.path.join(leftover, MODULES_KEY))
  listed = entries(model_dir)
  first = commit.recover(model_dir, 'ckpt', listed)
  second = commit.recover(model_dir, 'ckpt', listed)  # Its listing is stale.
  assert first == second == {'ckpt-5_saved_modules'}
  assert not tf.io.gfile.exists(leftover)
  assert readers.list_savedmodels(model_dir) == [final]


def test_two_processes_restoring_a_replaced_export_both_succeed(local_dir,
                                                                scale):
  scale.w.assign(tf.fill([4], 5.0))
  final = _publish(local_dir, 5, scale)
  # A crash between renaming the old export aside and publishing the new one.
  tf.io.gfile.rename(final, writers.work_dir(final, 'old', _dead_token()))
  listed = entries(local_dir)
  first = commit.recover(local_dir, 'ckpt', listed)
  second = commit.recover(local_dir, 'ckpt', listed)  # Its listing is stale.
  assert first == second == {'ckpt-5_saved_modules'}
  assert entries(local_dir) == ['ckpt-5_saved_modules']
  assert served_value(final) == 5.0


def test_two_processes_removing_a_half_published_export_both_succeed(scale):
  model_dir = 'ram://ckpt_export_test/two_recoverers'
  final, tmp = _half_published(model_dir, scale)
  listed = entries(model_dir)
  assert commit.recover(model_dir, 'ckpt', listed) == set()
  commit.recover(model_dir, 'ckpt', listed)  # Its listing is stale.
  assert not tf.io.gfile.exists(final) and not tf.io.gfile.exists(tmp)


def test_object_store_export_needs_its_commit_marker(scale):
  model_dir = 'ram://ckpt_export_test/marker'
  final = _publish(model_dir, 1, scale)
  assert readers.list_savedmodels(model_dir) == [final]
  marker = os.path.join(final, paths.COMMIT_MARKER)
  info = tf.io.gfile.GFile(marker).read()
  tf.io.gfile.remove(marker)
  assert readers.list_savedmodels(model_dir) == []
  with tf.io.gfile.GFile(marker, 'w') as f:
    f.write(info)
  assert json.loads(info)['step'] == 1
  tf.io.gfile.rmtree(model_dir)


def test_object_store_half_published_export_is_removed(scale):
  """A copy-then-delete publish killed midway is cleaned up, never read."""
  model_dir = 'ram://ckpt_export_test/half'
  final, tmp = _half_published(model_dir, scale)
  tf.io.gfile.rename(os.path.join(tmp, MODULES_KEY, 'saved_model.pb'),
                     os.path.join(final, 'saved_model.pb'))
  assert readers.list_savedmodels(model_dir) == []
  commit.recover(model_dir, 'ckpt', entries(model_dir))
  assert entries(model_dir) == []


def test_object_store_keeps_the_incomplete_marker_first_to_last(
    scale, monkeypatch):
  """Publishing and deleting change nothing under an export but its markers
  while it has no incomplete marker: a kill leaves no directory without it
  (on gs://, `makedirs` writes an object of its own)."""
  final = paths.export_path('ram://ckpt_export_test/order', 'ckpt', 1)
  marker = os.path.join(final, commit.INCOMPLETE_MARKER)
  unmarked = []
  for name in ('makedirs', 'rename', 'remove', 'rmtree'):
    function = getattr(tf.io.gfile, name)

    def spy(path, *args, function=function, **kwargs):
      target = args[0] if function is tf.io.gfile.rename else path
      if (target.startswith(final) and target != marker and
          not tf.io.gfile.exists(marker)):
        unmarked.append((function.__name__, target))
      return function(path, *args, **kwargs)

    monkeypatch.setattr(tf.io.gfile, name, spy)
  _publish('ram://ckpt_export_test/order', 1, scale)
  commit.delete_export(final)
  monkeypatch.undo()
  assert unmarked == []
  assert not tf.io.gfile.exists(final)


def test_object_store_export_dir_without_files_is_recovered_and_replaced(
    scale):
  """What a writer killed between `makedirs` and its incomplete marker left
  before the marker came first: recovery removes it, and an export of its
  step replaces it (it used to be taken for a user's directory)."""
  model_dir = 'ram://ckpt_export_test/empty'
  first, second = (paths.export_path(model_dir, 'ckpt', s) for s in (1, 2))
  for export_dir in (first, second):
    tf.io.gfile.makedirs(os.path.join(export_dir, MODULES_KEY, 'variables'))
  user_file = paths.export_path(model_dir, 'ckpt', 3)  # Not a directory.
  with tf.io.gfile.GFile(user_file, 'w') as f:
    f.write('mine')
  assert readers.list_savedmodels(model_dir) == []
  assert commit.is_replaceable(first) and not commit.is_replaceable(user_file)
  scale.w.assign(tf.fill([4], 1.0))
  _publish(model_dir, 1, scale)
  assert readers.list_savedmodels(model_dir) == [first]
  assert served_value(first) == 1.0
  commit.recover(model_dir, 'ckpt', entries(model_dir))
  assert entries(model_dir) == ['ckpt-1_saved_modules', 'ckpt-3_saved_modules']
  tf.io.gfile.rmtree(model_dir)


def test_object_store_leaves_unmarked_directories_alone():
  """A directory without ckpt_export's markers (a user's) is never deleted."""
  model_dir = 'ram://ckpt_export_test/users'
  user_dir = paths.export_path(model_dir, 'ckpt', 1)
  tf.io.gfile.makedirs(user_dir)
  with tf.io.gfile.GFile(os.path.join(user_dir, 'notes.txt'), 'w') as f:
    f.write('mine')
  commit.recover(model_dir, 'ckpt', entries(model_dir))
  assert tf.io.gfile.exists(os.path.join(user_dir, 'notes.txt'))
  assert readers.list_savedmodels(model_dir) == []
  tf.io.gfile.rmtree(model_dir)


@pytest.mark.parametrize('path, atomic', [
    ('/tmp/x', True), ('relative/dir', True), ('file:///tmp/x', True),
    ('gs://bucket/x', False), ('s3://bucket/x', False), ('ram://x', False),
    ('hdfs://nn/x', False)])
def test_which_file_systems_rename_atomically(path, atomic):
  assert commit.has_atomic_rename(path) is atomic
  assert type(commit.publisher_for(path)) is (
      commit.AtomicRenamePublisher if atomic else commit.CommitMarkerPublisher)
