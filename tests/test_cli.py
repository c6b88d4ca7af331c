"""`ckpt-export ls` and `verify`, and the command's errors, run as installed.

Every test runs the installed console script (`helpers.CKPT_EXPORT`) as a
child process, on a model directory written by the real manager, with
deliberately broken and partial exports beside the good ones.
"""

import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from helpers import make_manager
from helpers import run_cli
from helpers import save_step
from helpers import Scale
from helpers import unprivileged_prefix

MODULES = 'scale,other'
# A line of TensorFlow's C++ logging (`E ... cuInit` on machines without GPU
# drivers is at error level, which TF_CPP_MIN_LOG_LEVEL=2 still shows).
_TF_LOG_LINE = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ')


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory) -> str:
  """A model directory with every kind of step `ls` tells apart.

  Steps 2, 3: checkpoint and export (modules scale and other); 4: checkpoint
  only; 6: export only, its `scale` module corrupt; 7: an export without
  metadata (as the reference writes) whose module has no signature; 8: only a
  work directory (a crashed write). Also another checkpoint name's export
  (`other-5`) and an unrelated file.
  """
  directory = str(tmp_path_factory.mktemp('cli') / 'model')
  scale = Scale()
  manager = ckpt_export.SavedModelCheckpointManager(
      tf.train.Checkpoint(scale=scale), directory, max_to_keep=3,
      modules_to_export={'scale': scale, 'other': Scale()})
  for step in range(1, 5):
    save_step(manager, scale, step)
  commit.delete_export(_export(directory, 4))
  shutil.copytree(_export(directory, 3), _export(directory, 6))
  with open(os.path.join(_export(directory, 6), 'scale', 'saved_model.pb'),
            'wb') as f:
    f.write(b'not a SavedModel')
  tf.saved_model.save(tf.Module(), os.path.join(_export(directory, 7), 'plain'))
  # Named as commit.py names them: .<export>.tmp-<ms>-<pid>-<host>-<random>.
  work = os.path.join(
      directory, '.ckpt-8_saved_modules.tmp-1700000000000-1-otherhost-0123abcd')
  os.makedirs(os.path.join(work, 'scale'))
  with open(os.path.join(work, 'scale', 'saved_model.pb'), 'wb') as f:
    f.write(b'12345')
  shutil.copytree(_export(directory, 3),
                  paths.export_path(directory, 'other', 5))
  with open(os.path.join(directory, 'notes.txt'), 'w') as f:
    f.write('not a step')
  return directory


def _export(directory: str, step: int) -> str:
  return paths.export_path(directory, 'ckpt', step)


def _table(stdout: str) -> List[Dict[str, str]]:
  """Parses a table printed by the command: columns start where headers do."""
  header, *lines = stdout.splitlines()
  starts = [m.start() for m in re.finditer(r'\S+', header)]
  names = header.split()
  return [{name: line[start:end].strip() for name, start, end in
           zip(names, starts, starts[1:] + [None])} for line in lines]


def _stderr_lines(result: subprocess.CompletedProcess) -> List[str]:
  return [line for line in result.stderr.splitlines()
          if not _TF_LOG_LINE.match(line)]


def _size_on_disk(directory: str, step: int) -> int:
  total = 0
  for name in os.listdir(directory):
    if name.startswith((f'ckpt-{step}.', f'ckpt-{step}_saved_modules',
                        f'.ckpt-{step}_saved_modules')):
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        total += os.path.getsize(path)
      for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def test_help_lists_the_subcommands_without_importing_tensorflow():
  result = run_cli('--help')
  assert result.returncode == 0, result.stderr
  for subcommand in ('ls', 'verify', 'watch'):
    assert re.search(rf'^\s+{subcommand}\s', result.stdout, re.MULTILINE)
  code = ('import sys; import ckpt_export.cli; '
          'print("tensorflow" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True)
  assert out.stdout == 'False\n'


def test_ls_tells_every_kind_of_step_apart(model_dir):
  with leases.leased(_export(model_dir, 3), holder='evaluator'):
    result = run_cli('ls', model_dir)
  assert result.returncode == 0
  assert result.stderr == ''  # No TensorFlow start-up lines.
  rows = _table(result.stdout)
  held = f'1: evaluator@{os.uname().nodename}:{os.getpid()}'
  assert [(r['STEP'], r['CHECKPOINT'], r['EXPORT'], r['MODULES'], r['LEASES'])
          for r in rows] == [
              ('2', 'yes', 'published', MODULES, '-'),
              ('3', 'yes', 'published', MODULES, held),
              ('4', 'yes', 'none', '-', '-'),
              ('6', 'no', 'published', MODULES, '-'),
              ('7', 'no', 'published', 'plain', '-'),
              ('8', 'no', 'partial', '-', '-'),
          ]
  sizes = {int(r['STEP']): r['SIZE'] for r in rows}
  assert sizes[8] == '5 B'
  assert sizes[2] == f'{_size_on_disk(model_dir, 2) / 1024:.1f} KiB'
  assert all(re.fullmatch(r'[0-9]+[smhd]', r['AGE']) for r in rows)


def test_ls_and_verify_take_a_checkpoint_name(model_dir):
  rows = _table(run_cli('ls', '--checkpoint-name', 'other', model_dir).stdout)
  assert [(r['STEP'], r['EXPORT']) for r in rows] == [('5', 'published')]
  result = run_cli('verify', model_dir, '--checkpoint-name', 'other')
  assert result.returncode == 0, result.stderr
  assert [(r['STEP'], r['MODULE'], r['STATUS']) for r in _table(
      result.stdout)] == [('5', 'scale', 'ok'), ('5', 'other', 'ok')]


def test_verify_loads_every_export_and_fails_on_broken_ones(model_dir):
  result = run_cli('verify', model_dir)
  assert result.returncode == 1
  rows = _table(result.stdout)
  assert [(r['STEP'], r['MODULE'], r['STATUS']) for r in rows] == [
      ('2', 'scale', 'ok'), ('2', 'other', 'ok'),
      ('3', 'scale', 'ok'), ('3', 'other', 'ok'),
      ('6', 'scale', 'BROKEN'), ('6', 'other', 'ok'),
      ('7', 'plain', 'BROKEN'),
  ]
  details = {(r['STEP'], r['MODULE']): r['DETAIL'] for r in rows}
  assert details['2', 'scale'] == 'signatures: serving_default'
  assert details['6', 'scale'].startswith('does not load: ')
  assert details['7', 'plain'] == 'no serving signature'
  assert _stderr_lines(result) == ['ckpt-export: broken exports at steps 6, 7']


def test_verify_passes_on_good_exports_and_on_none(tmp_path):
  directory = str(tmp_path / 'model')
  os.makedirs(directory)
  result = run_cli('verify', directory)
  assert (result.returncode, result.stdout) == (
      0, f"No published exports named 'ckpt' in {directory}.\n")
  scale = Scale()
  manager = make_manager(directory, scale, None)
  for step in (1, 2):
    save_step(manager, scale, step)
  result = run_cli('verify', directory)
  assert result.returncode == 0, result.stderr
  assert [r['STATUS'] for r in _table(result.stdout)] == ['ok', 'ok']


def test_errors_on_the_model_directory_are_one_line(tmp_path):
  missing = str(tmp_path / 'missing')
  a_file = str(tmp_path / 'file')
  with open(a_file, 'w') as f:
    f.write('x')
  for args, message in [
      (['ls', missing], f'MODEL_DIR {missing} does not exist'),
      (['verify', missing], f'MODEL_DIR {missing} does not exist'),
      (['watch', missing, '--', 'true'], f'MODEL_DIR {missing} does not exist'),
      (['ls', a_file], f'MODEL_DIR {a_file} is not a directory'),
      (['watch', str(tmp_path)], "watch needs a COMMAND after '--'"),
      (['watch', str(tmp_path), '--'], "watch needs a COMMAND after '--'"),
      (['watch', str(tmp_path), '--', 'no-such-command-ckpt-export'],
       'COMMAND no-such-command-ckpt-export not found'),
  ]:
    result = run_cli(*args)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, '', f'ckpt-export: error: {message}\n'), args


def test_an_unreadable_model_directory_is_a_one_line_error(tmp_path):
  prefix = unprivileged_prefix()
  directory = tmp_path / 'model'
  directory.mkdir(mode=0)
  try:
    for subcommand in ('ls', 'verify'):
      result = run_cli(subcommand, str(directory), prefix=prefix)
      assert (result.returncode, result.stderr) == (
          2, f'ckpt-export: error: cannot read MODEL_DIR {directory}: '
          'Permission denied\n')
  finally:
    directory.chmod(0o700)


def test_bad_arguments_are_usage_errors_naming_the_value(tmp_path):
  directory = str(tmp_path)
  for args, bad in [
      (['ls'], 'MODEL_DIR'),
      (['ls', directory, '--', 'x'], '-- x'),
      (['nonsense', directory], "'nonsense'"),
      (['ls', '--checkpoint-name', 'a/b', directory], "'a/b'"),
      (['watch', directory, '--timeout', '-1', '--', 'true'], "'-1'"),
      (['watch', directory, '--seconds-to-sleep', '0', '--', 'true'], "'0'"),
      (['watch', directory, '--until-step', '1.5', '--', 'true'], "'1.5'"),
  ]:
    result = run_cli(*args)
    assert result.returncode == 2, args
    assert result.stderr.startswith('usage: ckpt-export'), args
    last = result.stderr.splitlines()[-1]
    assert last.startswith('ckpt-export') and ' error: ' in last, args
    assert bad in last, (args, last)
