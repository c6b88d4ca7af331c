"""What else lives in a model directory cannot hurt the job (issue 9).

Symbolic links (to a victim tree outside the model directory, or to live
exports), entries the trainer may not delete, metadata of the wrong shape,
reserved names, leftovers of the reference implementation: each test plants
one and checks that `save()` still works, nothing outside is touched, and
readers and the CLI answer with one-line errors.
"""

import json
import logging as std_logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

from absl import logging
import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import paths
from ckpt_export import writers
from helpers import make_manager
from helpers import REPO
from helpers import save_step
from helpers import Scale
from helpers import served_value
from helpers import snapshot
from helpers import unprivileged_prefix

CLI = os.path.join(os.path.dirname(sys.executable), 'ckpt-export')


def _manager(model_dir, module, max_to_keep=2, name='ckpt'):
  return make_manager(model_dir, module, max_to_keep, checkpoint_name=name)


def _victim(tmp_path) -> str:
  """A tree outside the model directory that nothing may change."""
  victim = tmp_path / 'victim'
  (victim / 'sub').mkdir(parents=True)
  (victim / 'precious.txt').write_text('precious')
  (victim / 'sub' / 'saved_model.pb').write_text('not yours')
  (victim / paths.COMMIT_MARKER).write_text(json.dumps(
      {'created': 1.0, 'step': 1, 'modules': ['sub']}))
  return str(victim)


def _dead_token() -> str:
  return f'{int(time.time() * 1000)}-999999-{writers.HOST}-deadbeef'


def _cli(*args, prefix=()):
  return subprocess.run([*prefix, CLI, *args], capture_output=True, text=True,
                        timeout=300, check=False)


def _one_line_error(result) -> str:
  lines = [l for l in result.stderr.splitlines()
           if 'ckpt-export' in l or 'Traceback' in l]
  assert 'Traceback' not in result.stderr, result.stderr
  return lines[-1] if lines else ''


@pytest.mark.parametrize('name', ['ckpt-7_temp', 'ckpt-1_temp',
                                  '.ckpt-1_saved_modules.tmp-{token}',
                                  '.ckpt-1_saved_modules.del-{token}',
                                  'ckpt-1_saved_modules', 'ckpt-9_saved_modules',
                                  'ckpt-1_saved_modules_temp', '.ckpt_export'])
def test_a_symlink_is_never_deleted_through(tmp_path, name):
  model_dir = str(tmp_path / 'model')
  victim = _victim(tmp_path)
  before = snapshot(victim)
  module = Scale()
  manager = _manager(model_dir, module)
  save_step(manager, module, 1)
  link = os.path.join(model_dir, name.format(token=_dead_token()))
  if os.path.lexists(link):
    shutil.rmtree(link)
  os.symlink(victim, link)
  for step in (2, 3, 4):
    save_step(manager, module, step)
  manager.sync()
  assert snapshot(victim) == before
  assert os.path.islink(link)  # A foreign link stays.
  restored = _manager(model_dir, Scale())
  assert restored.restore_or_initialize().endswith('ckpt-4')
  assert [paths.parse_export_step(p) for p in restored.savedmodels] == [3, 4]
  for step in (3, 4):
    assert served_value(paths.export_path(model_dir, 'ckpt', step)) == step


def test_an_alias_of_a_live_export_does_not_empty_it(tmp_path):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  manager = _manager(model_dir, module, max_to_keep=3)
  for step in (1, 2):
    save_step(manager, module, step)
  os.symlink(paths.export_path(model_dir, 'ckpt', 2),
             paths.export_path(model_dir, 'ckpt', 0))
  for step in (3, 4, 5):
    save_step(manager, module, step)
  assert served_value(paths.export_path(model_dir, 'ckpt', 5)) == 5
  assert ckpt_export.list_savedmodels(model_dir) == [
      paths.export_path(model_dir, 'ckpt', s) for s in (3, 4, 5)]
  # A link at the next export's own name is refused, naming it.
  os.symlink(paths.export_path(model_dir, 'ckpt', 5),
             paths.export_path(model_dir, 'ckpt', 6))
  with pytest.raises(ValueError, match='ckpt-6_saved_modules'):
    save_step(manager, module, 6)
  assert served_value(paths.export_path(model_dir, 'ckpt', 5)) == 5


def test_a_link_inside_an_export_is_removed_as_a_link(tmp_path):
  model_dir = str(tmp_path / 'model')
  victim = _victim(tmp_path)
  before = snapshot(victim)
  module = Scale()
  manager = _manager(model_dir, module, max_to_keep=1)
  save_step(manager, module, 1)
  export_dir = paths.export_path(model_dir, 'ckpt', 1)
  os.symlink(victim, os.path.join(export_dir, 'scale', 'assets_link'))
  os.symlink(os.path.join(victim, 'precious.txt'),
             os.path.join(export_dir, paths.DELETE_REQUEST))
  save_step(manager, module, 2)
  manager.sync()
  assert not os.path.exists(export_dir)
  assert snapshot(victim) == before


def _lease_dir(model_dir):
  return os.path.join(model_dir, paths.STATE_DIR, 'leases')


def test_housekeeping_failures_never_fail_a_save(tmp_path, caplog):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  manager = _manager(model_dir, module, max_to_keep=1)
  save_step(manager, module, 1)
  os.makedirs(_lease_dir(model_dir))
  # A directory where an expired lease file should be, holding a file.
  blocker = os.path.join(_lease_dir(model_dir),
                         f'ckpt-1_saved_modules.lease-{_dead_token()}.json')
  os.makedirs(blocker)
  open(os.path.join(blocker, 'x'), 'w').close()
  # Commit markers of the wrong shape, in exports of other steps.
  for step, marker in ((7, [1]), (8, {'modules': [1], 'created': 1.0}),
                       (9, {'created': float('inf')})):
    export_dir = paths.export_path(model_dir, 'ckpt', step)
    os.makedirs(os.path.join(export_dir, 'scale'))
    with open(os.path.join(export_dir, paths.COMMIT_MARKER), 'w') as f:
      f.write(json.dumps(marker))
  logging.get_absl_handler()  # absl logs reach caplog through std logging.
  with caplog.at_level(std_logging.WARNING):
    for step in (2, 3):
      save_step(manager, module, step)
  assert os.path.isdir(blocker)
  warnings = [r.getMessage() for r in caplog.records if blocker in
              r.getMessage()]
  assert len(warnings) == 1, warnings  # Once per path.
  for step in (7, 8, 9):  # Foreign: never deleted as ours.
    assert os.path.isdir(paths.export_path(model_dir, 'ckpt', step))
  assert served_value(paths.export_path(model_dir, 'ckpt', 3)) == 3
  for subcommand in ('ls', 'verify'):
    result = _cli(subcommand, model_dir)
    assert 'Traceback' not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr


def test_unbounded_or_foreign_leases_are_not_honoured(tmp_path):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  manager = _manager(model_dir, module, max_to_keep=1)
  save_step(manager, module, 1)
  os.makedirs(_lease_dir(model_dir))
  name = paths.export_basename('ckpt', 1)
  for expires in (float('inf'), time.time() + 10 * 365 * 86400):
    token = f'{int(time.time() * 1000)}-{os.getpid()}-{writers.HOST}-' \
            f'{os.urandom(4).hex()}'
    with open(os.path.join(_lease_dir(model_dir),
                           f'{name}.lease-{token}.json'), 'w') as f:
      f.write(json.dumps({'export': name, 'token': token, 'expires': expires,
                          'lease_seconds': 300.0}))
  save_step(manager, module, 2)
  manager.sync()
  assert not os.path.exists(paths.export_path(model_dir, 'ckpt', 1))


def test_a_zombie_reader_counts_as_gone(tmp_path):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  manager = _manager(model_dir, module, max_to_keep=1)
  save_step(manager, module, 1)
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:  # Exited, not reaped: a zombie.
    with open(f'/proc/{child.pid}/stat', 'rb') as f:
      if f.read().rpartition(b')')[2].split()[0] == b'Z':
        break
    time.sleep(0.05)
  else:
    pytest.fail('the child did not exit')
  try:
    os.makedirs(_lease_dir(model_dir))
    name = paths.export_basename('ckpt', 1)
    token = f'{int(time.time() * 1000)}-{child.pid}-{writers.HOST}-00000000'
    with open(os.path.join(_lease_dir(model_dir),
                           f'{name}.lease-{token}.json'), 'w') as f:
      f.write(json.dumps({'export': name, 'token': token,
                          'expires': time.time() + 300,
                          'lease_seconds': 300.0}))
    assert not ckpt_export.leases.is_leased(
        paths.export_path(model_dir, 'ckpt', 1))
    save_step(manager, module, 2)
    manager.sync()
    assert not os.path.exists(paths.export_path(model_dir, 'ckpt', 1))
  finally:
    child.wait(timeout=60)


@pytest.mark.parametrize('name', [paths.DELETE_REQUEST, paths.COMMIT_MARKER,
                                  paths.INCOMPLETE_MARKER, paths.STATE_DIR,
                                  '.ckpt_export_anything', 'a\nb', 'tab\there',
                                  'bell\x07', 'del\x7f'])
def test_reserved_names_and_control_characters_are_refused(tmp_path, name):
  module = Scale()
  with pytest.raises(ValueError, match='module name'):
    ckpt_export.SavedModelCheckpointManager(
        tf.train.Checkpoint(scale=module), str(tmp_path), 1,
        modules_to_export={name: module})
  with pytest.raises(ValueError, match='checkpoint_name'):
    _manager(str(tmp_path), module, name=name)
  with pytest.raises(ValueError, match=re.escape(repr(name))):
    paths.validate_component('module name', name)


def test_readers_take_pathlike(tmp_path):
  model_dir = tmp_path / 'model'
  module = Scale()
  manager = _manager(model_dir, module)
  save_step(manager, module, 1)
  expected = [paths.export_path(str(model_dir), 'ckpt', 1)]
  assert ckpt_export.list_savedmodels(model_dir) == expected
  assert ckpt_export.latest_savedmodel(model_dir) == expected[0]
  assert ckpt_export.wait_for_new_savedmodel(model_dir, timeout=0) == (
      expected[0])
  assert list(ckpt_export.savedmodels_iterator(model_dir, timeout=0)) == (
      expected)
  assert ckpt_export.wait_for_new_savedmodel(
      model_dir, pathlib.Path(expected[0]), timeout=0) is None


@pytest.mark.parametrize('value', [float('inf'), 0, 1e-9, float('nan')])
def test_bad_seconds_to_sleep_is_a_clear_error(tmp_path, value):
  for call in (ckpt_export.wait_for_new_savedmodel,
               ckpt_export.savedmodels_iterator):
    with pytest.raises(ValueError, match='seconds_to_sleep'):
      call(str(tmp_path), seconds_to_sleep=value)


def test_reference_leftovers_converge(tmp_path, reference):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  ref = reference.SavedModelCheckpointManager(
      tf.train.Checkpoint(scale=module), model_dir, max_to_keep=2,
      modules_to_export={'scale': module})
  for step in (1, 2):
    save_step(ref, module, step)
  # The reference saving step 2 again leaves its _temp directory behind.
  with pytest.raises(tf.errors.AlreadyExistsError):
    save_step(ref, module, 2)
  temp = paths.export_path(model_dir, 'ckpt', 2) + '_temp'
  assert os.path.isdir(temp)
  not_an_export = paths.export_path(model_dir, 'ckpt', 0)
  os.makedirs(os.path.join(not_an_export, 'notes'))
  not_a_temp = paths.export_path(model_dir, 'ckpt', 5) + '_temp'
  os.makedirs(not_a_temp)
  manager = _manager(model_dir, module, max_to_keep=2)
  manager.restore_or_initialize()
  for step in (3, 4):
    save_step(manager, module, step)
  manager.sync()
  names = sorted(os.listdir(model_dir))
  assert [n for n in names if 'saved_modules' in n] == [
      'ckpt-0_saved_modules', 'ckpt-3_saved_modules', 'ckpt-4_saved_modules',
      'ckpt-5_saved_modules_temp']
  assert ckpt_export.list_savedmodels(model_dir) == [
      paths.export_path(model_dir, 'ckpt', s) for s in (0, 3, 4)]


def test_watch_state_of_the_wrong_shape_is_a_one_line_error(tmp_path):
  model_dir = tmp_path / 'model'
  model_dir.mkdir()
  state = tmp_path / 'state.json'
  for last_step in (-5, True, 'x', 1.5):
    state.write_text(json.dumps({
        'version': 1, 'model_dir': str(model_dir), 'checkpoint_name': 'ckpt',
        'last_step': last_step, 'failed': {}}))
    result = _cli('watch', str(model_dir), '--state-file', str(state),
                  '--timeout', '0', '--', 'true')
    assert result.returncode == 2, result.stderr
    assert _one_line_error(result) == (
        f'ckpt-export: error: --state-file {state} is not a ckpt-export watch '
        f'state file (last_step {last_step!r} is not a step); fix or remove '
        'it'), result.stderr


def test_watch_of_an_executable_without_shebang(tmp_path):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  save_step(_manager(model_dir, module), module, 1)
  script = tmp_path / 'script'
  script.write_text('echo hi\n')
  script.chmod(0o755)
  result = _cli('watch', model_dir, '-v', '--timeout', '0', '--',
                str(script))
  assert result.returncode == 2, result.stderr
  assert _one_line_error(result) == (
      f'ckpt-export: error: cannot run COMMAND {script}: Exec format error '
      '(a script needs a #! line)')


@pytest.mark.slow
def test_a_read_only_model_directory(tmp_path):
  """verify needs --no-lease; the default iterator reads without leases."""
  prefix = unprivileged_prefix()
  model_dir = tmp_path / 'model'
  module = Scale()
  save_step(_manager(str(model_dir), module), module, 1)
  model_dir.chmod(0o555)
  try:
    result = _cli('verify', str(model_dir), prefix=prefix)
    assert result.returncode == 2, result.stderr
    assert 'Cannot lease' in _one_line_error(result)
    assert '--no-lease' in _one_line_error(result)
    result = _cli('verify', '--no-lease', str(model_dir), prefix=prefix)
    assert result.returncode == 0, result.stderr
    code = ('import sys, ckpt_export\n'
            'print(list(ckpt_export.savedmodels_iterator(sys.argv[1], '
            'timeout=0)))\n'
            'try:\n'
            '  list(ckpt_export.savedmodels_iterator(sys.argv[1], timeout=0,'
            ' lease_seconds=300))\n'
            'except Exception as e:\n'
            '  print(type(e).__name__)\n')
    out = subprocess.run([*prefix, sys.executable, '-c', code, str(model_dir)],
                         capture_output=True, text=True, timeout=300,
                         cwd=REPO, check=True)
    assert out.stdout.splitlines() == [
        str([paths.export_path(str(model_dir), 'ckpt', 1)]),
        'PermissionDeniedError'], out.stderr
    assert 'without leases' in out.stderr
  finally:
    model_dir.chmod(0o755)


@pytest.mark.slow
def test_a_reader_stopped_past_its_lease_is_told(tmp_path):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  manager = _manager(model_dir, module, max_to_keep=1)
  save_step(manager, module, 1)
  code = ('import sys, ckpt_export\n'
          'it = ckpt_export.savedmodels_iterator(sys.argv[1], timeout=0,'
          ' lease_seconds=1)\n'
          'print(next(it), flush=True)\n'
          'sys.stdin.readline()\n'
          'try:\n'
          '  next(it)\n'
          'except ckpt_export.leases.LeaseLapsedError as e:\n'
          '  print(e)\n')
  child = subprocess.Popen([sys.executable, '-c', code, model_dir],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, cwd=REPO)
  try:
    assert child.stdout.readline().strip() == paths.export_path(
        model_dir, 'ckpt', 1)
    child.send_signal(19)  # SIGSTOP, past the lease.
    time.sleep(2.5)
    save_step(manager, module, 2)
    manager.sync()
    assert not os.path.exists(paths.export_path(model_dir, 'ckpt', 1))
    child.send_signal(18)  # SIGCONT
    out, _ = child.communicate('\n', timeout=120)
  finally:
    child.kill()
  assert 'lease on the export of step 1' in out, out
  assert 'lease_seconds=1' in out and 'not renewed for' in out, out
  leased = os.path.join(model_dir, paths.STATE_DIR, 'leases')
  assert not [n for n in os.listdir(leased) if 'ckpt-1_' in n]


def test_ls_keeps_one_line_per_step_whatever_the_names(tmp_path):
  model_dir = str(tmp_path / 'model')
  module = Scale()
  save_step(_manager(model_dir, module), module, 1)
  foreign = paths.export_path(model_dir, 'ckpt', 2)
  os.makedirs(os.path.join(foreign, 'two\nlines\x1b[31m'))
  result = _cli('ls', '-v', model_dir)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [line.split()[0] for line in lines] == ['STEP', '1', '2'], lines
  assert 'two\\nlines\\x1b[31m' in lines[2]
  result = _cli('watch', model_dir, '--seconds-to-sleep', '1e-9', '--', 'true')
  assert result.returncode == 2
  assert 'seconds_to_sleep' in _one_line_error(result)
