"""`ckpt-export watch`, run as installed, beside real training processes.

The fast tests watch a finished model directory with a tiny COMMAND that logs
what it was given. The slow ones run a trainer (`crash_child.py`) and the watch
as two processes at once, with `watch_command.py` as COMMAND: it loads each
export and checks that it serves its own step, after the trainer's garbage
collection has tried to delete it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from typing import List, Sequence

import pytest

import ckpt_export
from ckpt_export import leases
import crash_child
from helpers import child_command
from helpers import child_env
from helpers import CKPT_EXPORT
from helpers import finish
from helpers import make_manager
from helpers import run_cli
from helpers import save_step
from helpers import Scale
from helpers import steps_of
from helpers import wait_for

# Logs [argv after LOG and FAIL_AT, the three environment variables, and
# whether TF_CPP_MIN_LOG_LEVEL is set] as a JSON line; exits 3 at FAIL_AT.
_LOGGING_COMMAND = """
import json, os, sys
log, fail_at, *words = sys.argv[1:]
env = [os.environ[k] for k in
       ('CKPT_EXPORT_PATH', 'CKPT_EXPORT_STEP', 'CKPT_EXPORT_MODEL_DIR')]
with open(log, 'a') as f:
  f.write(json.dumps([words, *env, 'TF_CPP_MIN_LOG_LEVEL' in os.environ]))
  f.write('\\n')
sys.exit(3 if env[1] == fail_at else 0)
"""


@pytest.fixture
def finished_dir(tmp_path) -> str:
  """A model directory with the exports of steps 1, 2 and 3."""
  directory = str(tmp_path / 'model')
  scale = Scale()
  manager = make_manager(directory, scale, None)
  for step in (1, 2, 3):
    save_step(manager, scale, step)
  return directory


def _logging_command(log: str, fail_at: int = -1) -> List[str]:
  return [sys.executable, '-c', _LOGGING_COMMAND, log, str(fail_at)]


def _logged(log: str) -> list:
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [json.loads(line) for line in f]


def _state(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def test_watch_runs_the_command_for_each_export_then_resumes(finished_dir,
                                                             tmp_path):
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  command = _logging_command(log) + ['{path}', 'at-{step}', '{other}']
  result = run_cli('watch', finished_dir, '--state-file', state,
                   '--until-step', '2', '--', *command)
  assert result.returncode == 0, result.stderr
  export = lambda step: ckpt_export.list_savedmodels(finished_dir)[step - 1]
  assert _logged(log) == [
      [[export(step), f'at-{step}', '{other}'], export(step), str(step),
       finished_dir, False] for step in (1, 2)]
  assert _state(state)['last_step'] == 2

  # A new watch with the same state file goes on after step 2, and ends
  # after --timeout seconds without a new export.
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--', *command)
  assert result.returncode == 0, result.stderr
  assert [int(entry[2]) for entry in _logged(log)] == [1, 2, 3]
  assert _state(state)['last_step'] == 3


def test_a_failing_command_is_reported_and_the_watch_goes_on(finished_dir,
                                                             tmp_path):
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  command = _logging_command(log, fail_at=2)
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--', *command)
  assert result.returncode == 1
  assert (f'ckpt-export: step 2: {sys.executable} exited with code 3' in
          result.stderr.splitlines())
  assert [int(entry[2]) for entry in _logged(log)] == [1, 2, 3]
  assert _state(state)['last_step'] == 3
  assert _state(state)['failed'] == {'2': 3}


def test_stop_on_failure_stops_with_the_command_s_code(finished_dir,
                                                      tmp_path):
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--stop-on-failure', '--',
                   *_logging_command(log, fail_at=2))
  assert result.returncode == 3
  assert [int(entry[2]) for entry in _logged(log)] == [1, 2]
  # The failed step is not recorded as handled: a restart retries it.
  assert _state(state)['last_step'] == 1


def test_a_state_file_of_another_watch_is_refused(finished_dir, tmp_path):
  state = str(tmp_path / 'state.json')
  with open(state, 'w') as f:
    f.write('{"not": "a state"}')
  result = run_cli('watch', finished_dir, '--state-file', state, '--', 'true')
  assert result.returncode == 2
  assert result.stderr.startswith(
      f'ckpt-export: error: --state-file {state} is not a ckpt-export watch '
      'state file')
  assert len(result.stderr.splitlines()) == 1


def test_sigterm_stops_the_command_and_releases_the_export(finished_dir,
                                                          tmp_path):
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  sleeper = ('import os, sys, time; '
             'open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(600)')
  watch = subprocess.Popen(
      [CKPT_EXPORT, 'watch', finished_dir, '--state-file', state, '--',
       sys.executable, '-c', sleeper, log], env=child_env(tf_log_level=None),
      stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not _lines(log):
    assert watch.poll() is None, watch.communicate()[1]
    if time.monotonic() > deadline:
      watch.kill()
      pytest.fail('The watch started no command within 600 s; stderr:\n'
                  + watch.communicate()[1])
    time.sleep(0.1)
  command_pid = int(_lines(log)[0])
  first = ckpt_export.list_savedmodels(finished_dir)[0]
  assert leases.is_leased(first)
  watch.send_signal(signal.SIGTERM)
  assert watch.wait(timeout=600) == 128 + signal.SIGTERM
  with pytest.raises(ProcessLookupError):
    os.kill(command_pid, 0)
  assert not leases.is_leased(first)
  assert _state(state)['last_step'] == -1  # Step 1 was not finished.


def test_failed_steps_are_reported_at_every_run_and_retried(finished_dir,
                                                            tmp_path):
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--', *_logging_command(log, fail_at=2))
  assert result.returncode == 1
  # A rerun with nothing new used to say nothing and exit 0.
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--', *_logging_command(log))
  assert result.returncode == 1
  assert ('ckpt-export: failed in earlier runs: step(s) 2 (--retry-failed)'
          in result.stderr.splitlines())
  assert [int(entry[2]) for entry in _logged(log)] == [1, 2, 3]
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--retry-failed', '--', *_logging_command(log))
  assert result.returncode == 0, result.stderr
  assert [int(entry[2]) for entry in _logged(log)] == [1, 2, 3, 2]
  assert _state(state)['failed'] == {} and _state(state)['last_step'] == 3


# Appends "<step> <number of live leases on the export>" to LOG; exits 3.
_LEASE_COUNTING_COMMAND = """
import sys
from ckpt_export import leases
log, step, path = sys.argv[1:]
with open(log, 'a') as f:
  f.write(f'{step} {len(leases.holders(path))}\\n')
sys.exit(3)
"""


def test_retry_failed_leases_unless_no_lease(finished_dir, tmp_path):
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  command = [sys.executable, '-c', _LEASE_COUNTING_COMMAND, log, '{step}',
             '{path}']
  result = run_cli('watch', finished_dir, '--state-file', state, '--timeout',
                   '0', '--until-step', '1', '--', *command)
  assert result.returncode == 1, result.stderr
  for flags, leases_held in ((['--no-lease'], 0), ([], 1)):
    result = run_cli('watch', finished_dir, '--state-file', state,
                     '--retry-failed', '--until-step', '1', *flags, '--',
                     *command)
    assert result.returncode == 1, result.stderr
    with open(log) as f:
      assert f.read().splitlines()[-1] == f'1 {leases_held}', flags
  with open(log) as f:
    assert f.read().splitlines() == ['1 1', '1 0', '1 1']
  assert _state(state)['failed'] == {'1': 3}
  assert not leases.holders(ckpt_export.paths.export_path(finished_dir, 'ckpt',
                                                          1))


def _pid_gone(pid: int) -> bool:
  """Whether `pid` ended (a zombie not yet reaped by init counts)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except FileNotFoundError:
    return True


def test_a_killed_watch_takes_its_command_along(finished_dir, tmp_path):
  """kill -9 of the watch alone: its COMMAND dies; a restart kills the rest."""
  log, state = str(tmp_path / 'log'), str(tmp_path / 'state.json')
  command = ('import os, subprocess, sys, time; '
             'child = subprocess.Popen(["sleep", "600"]); '
             'open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}"); '
             'time.sleep(600)')
  watch_args = [CKPT_EXPORT, 'watch', finished_dir, '--state-file', state]
  watch = subprocess.Popen(
      [*watch_args, '--', sys.executable, '-c', command, log],
      env=child_env(tf_log_level=None),
      stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: _lines(log) or watch.poll() is not None, 'the command')
    command_pid, grandchild = map(int, _lines(log)[0].split())
    # A second watch on the same state file is refused while the first runs.
    second = run_cli('watch', finished_dir, '--state-file', state, '--',
                     'true')
    assert second.returncode == 2
    assert (f'is being written by ckpt-export watch --state-file {state} '
            f'(pid {watch.pid}') in second.stderr
    os.kill(watch.pid, signal.SIGKILL)  # The watch alone, not its group.
    watch.wait(timeout=60)
    # The command used to live on, orphaned, under a dead lease.
    wait_for(lambda: _pid_gone(command_pid), 'the command to die')
    assert not _pid_gone(grandchild)  # The command's own child lives on...
    result = run_cli('watch', finished_dir, '--state-file', state,
                     '--until-step', '1', '--', sys.executable, '-c', 'pass')
    assert result.returncode == 0, result.stderr
    assert f'killing process {grandchild}, left running on step 1' in (
        result.stderr)
    wait_for(lambda: _pid_gone(grandchild), 'the orphan to die')
    assert _state(state)['last_step'] == 1
  finally:
    watch.kill()
    watch.wait()
    for pid in map(int, (_lines(log) or ['0 0'])[0].split()):
      if pid and not _pid_gone(pid):
        os.kill(pid, signal.SIGKILL)


# Real processes: a trainer and a watch at once.


def _start_trainer(model_dir: str, total_steps: int, max_to_keep: int,
                   stderr, *flags: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, crash_child.__file__, '--model_dir', model_dir,
       '--total_steps', str(total_steps), '--save_every', '1',
       '--max_to_keep', str(max_to_keep), *flags],
      stdout=subprocess.DEVNULL, stderr=stderr,
      env=child_env(tf_log_level=None), text=True)


def _start_watch(model_dir: str, log: str, watch_flags: Sequence[str],
                 command_flags: Sequence[str], stderr) -> subprocess.Popen:
  """Starts `ckpt-export watch` running watch_command.py, in its own session."""
  return subprocess.Popen(
      [CKPT_EXPORT, 'watch', model_dir, '--seconds-to-sleep', '0.2',
       *watch_flags, '--',
       *child_command('watch_command.py', log, '{path}', '{step}',
                      *command_flags)],
      stdout=subprocess.DEVNULL, stderr=stderr,
      env=child_env(tf_log_level=None),
      start_new_session=True)


def _lines(path: str) -> List[str]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return f.read().splitlines()


@pytest.mark.slow
def test_watch_beside_a_trainer_sees_every_export_once_in_order(tmp_path):
  """max_to_keep=1: each save wants the export being evaluated deleted."""
  model_dir, log = str(tmp_path / 'model'), str(tmp_path / 'log')
  done = str(tmp_path / 'trainer_done')
  os.makedirs(model_dir)
  steps = 3
  with open(tmp_path / 'trainer.err', 'w') as t_err, open(
      tmp_path / 'watch.err', 'w') as w_err:
    watch = _start_watch(model_dir, log, ['--until-step', str(steps)],
                         ['--wait_for_gc', done], w_err)
    trainer = _start_trainer(model_dir, steps, 1, t_err, '--pace_file', log)
    finish([trainer], 900, [t_err.name])
    open(done, 'w').close()
    finish([watch], 900, [w_err.name])
  assert _lines(log) == [f'{kind} {step}' for step in range(1, steps + 1)
                         for kind in ('start', 'done')]
  # Every export the watch released was then deleted, as max_to_keep says.
  assert steps_of(ckpt_export.list_savedmodels(model_dir)) == [steps]


@pytest.mark.slow
def test_watch_latest_only_beside_a_trainer(tmp_path):
  model_dir, log = str(tmp_path / 'model'), str(tmp_path / 'log')
  done = str(tmp_path / 'trainer_done')
  os.makedirs(model_dir)
  steps = 12
  with open(tmp_path / 'trainer.err', 'w') as t_err, open(
      tmp_path / 'watch.err', 'w') as w_err:
    watch = _start_watch(model_dir, log,
                         ['--latest-only', '--until-step', str(steps)],
                         ['--wait_for_gc', done], w_err)
    trainer = _start_trainer(model_dir, steps, 1, t_err,
                             '--seconds_between_saves', '0.5')
    finish([trainer], 900, [t_err.name])
    open(done, 'w').close()
    finish([watch], 900, [w_err.name])
  lines = _lines(log)
  seen = [int(line.split()[1]) for line in lines[::2]]
  assert lines == [f'{kind} {step}' for step in seen
                   for kind in ('start', 'done')]
  assert seen == sorted(set(seen)) and set(seen) <= set(range(1, steps + 1))
  assert seen[-1] == steps


@pytest.mark.slow
def test_a_killed_watch_restarts_without_redoing_finished_steps(tmp_path):
  """SIGKILL (with its COMMAND) mid-step 2; the restart redoes only step 2."""
  model_dir, log = str(tmp_path / 'model'), str(tmp_path / 'log')
  hold, state = str(tmp_path / 'hold'), str(tmp_path / 'state.json')
  os.makedirs(model_dir)
  steps = 3
  watch_flags = ['--until-step', str(steps), '--state-file', state]
  command_flags = ['--hold_step', '2', '--hold_file', hold]
  with open(tmp_path / 'trainer.err', 'w') as t_err, open(
      tmp_path / 'watch.err', 'w') as w_err:
    watch = _start_watch(model_dir, log, watch_flags, command_flags, w_err)
    trainer = _start_trainer(model_dir, steps, 2, t_err, '--pace_file', log)
    deadline = time.monotonic() + 900
    while 'start 2' not in _lines(log):
      if watch.poll() is not None or trainer.poll() not in (None, 0):
        pytest.fail(f'watch {watch.poll()}, trainer {trainer.poll()} ended '
                    f'before step 2; log {_lines(log)}')
      if time.monotonic() > deadline:
        os.killpg(watch.pid, signal.SIGKILL)
        trainer.kill()
        pytest.fail(f'No step 2 within 900 s; log {_lines(log)}')
      time.sleep(0.1)
    os.killpg(watch.pid, signal.SIGKILL)
    watch.wait()
    assert _lines(log) == ['start 1', 'done 1', 'start 2']
    assert _state(state)['last_step'] == 1

    open(hold, 'w').close()
    watch = _start_watch(model_dir, log, watch_flags, command_flags, w_err)
    finish([trainer], 900, [t_err.name])
    finish([watch], 900, [w_err.name])
  assert _lines(log) == ['start 1', 'done 1', 'start 2',
                         'start 2', 'done 2', 'start 3', 'done 3']
  assert _state(state)['last_step'] == 3
