"""The TF Serving view, checked against TF Serving's documented rules.

TF Serving loads, from a model's base path, the children whose names are
integers (versions): the highest one by default, or the versions its model
config lists. It cannot be installed here; the pollers below follow those
rules.
"""

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from ckpt_export import leases
from ckpt_export import serving
from helpers import child_command
from helpers import child_env
from helpers import entries
from helpers import make_manager
from helpers import run_cli
from helpers import Scale
from helpers import served_value



def configured_versions(serving_dir: str) -> dict:
  """The versions `models.config` lists, by model name."""
  with tf.io.gfile.GFile(os.path.join(serving_dir, serving.CONFIG_FILE)) as f:
    config = f.read()
  found = {}
  for block in re.findall(r'config \{(.*?)\n  \}', config, re.DOTALL):
    name = re.search(r'name: "([^"]+)"', block).group(1)
    base_path = re.search(r'base_path: "([^"]+)"', block).group(1)
    assert base_path == os.path.join(serving_dir, name)
    found[name] = [int(v) for v in re.findall(r'versions: (\d+)', block)]
  return found


def integer_children(module_dir: str) -> list:
  return sorted(int(n) for n in entries(module_dir) if n.isdigit())


def trainer(model_dir: str):
  """A manager exporting a Scale module, and the module."""
  module = Scale()
  return make_manager(model_dir, module, 5), module


def save_steps(manager, module, steps):
  for step in steps:
    module.w.assign(tf.fill([4], float(step)))
    manager.save(checkpoint_number=step)


@pytest.mark.parametrize('where', ['local', 'ram'])
def test_views_of_latest_and_best(tmp_path, where):
  root = (str(tmp_path) if where == 'local' else
          f'ram://serving_test/{tmp_path.name}')
  model_dir = os.path.join(root, 'model')
  manager, module = trainer(model_dir)
  latest = serving.ServingView(os.path.join(root, 'serving', 'latest'), 2)
  best_view = serving.ServingView(os.path.join(root, 'serving', 'best'), 2)
  for step in (1, 2, 3):
    save_steps(manager, module, [step])
    assert latest.publish_latest(model_dir) == {
        'scale': os.path.join(latest.directory, 'scale', str(step))}
  assert latest.publish_latest(model_dir) == {}  # Already there.
  assert integer_children(os.path.join(latest.directory, 'scale')) == [2, 3]
  assert serving.versions(latest.directory, 'scale') == [2, 3]
  assert configured_versions(latest.directory) == {'scale': [2, 3]}
  assert entries(latest.directory) == ['models.config', 'scale']
  for version in (2, 3):
    assert served_value(latest.directory, f'scale/{version}') == version

  from ckpt_export import best  # pylint: disable=g-import-not-at-top
  keeper = best.BestExport(model_dir, metric='loss', higher_is_better=False)
  assert best_view.publish_best(model_dir) == {}
  keeper.update(2, manager.savedmodels[1], {'loss': 0.5})
  best_view.publish_best(model_dir)
  keeper.update(3, manager.savedmodels[2], {'loss': 0.9})  # Not better.
  best_view.publish_best(model_dir)
  assert serving.versions(best_view.directory, 'scale') == [2]
  assert served_value(best_view.directory, 'scale/2') == 2
  if where == 'local':  # Hard links: no bytes copied.
    index = os.path.join('variables', 'variables.index')
    assert os.stat(os.path.join(latest.directory, 'scale', '3', index)
                  ).st_ino == os.stat(os.path.join(
                      model_dir, 'ckpt-3_saved_modules', 'scale', index)
                                     ).st_ino


def test_leased_version_kept_until_released(tmp_path):
  model_dir, serving_dir = str(tmp_path / 'model'), str(tmp_path / 'serving')
  manager, module = trainer(model_dir)
  view = serving.ServingView(serving_dir, max_versions=1)
  save_steps(manager, module, [1])
  view.publish_latest(model_dir)
  lease = serving.lease_version(serving_dir, 'scale', 1)
  assert lease is not None
  save_steps(manager, module, [2])
  view.publish_latest(model_dir)
  # Out of the config, but kept on disk for its reader.
  assert configured_versions(serving_dir) == {'scale': [2]}
  assert integer_children(os.path.join(serving_dir, 'scale')) == [1, 2]
  assert served_value(serving_dir, 'scale/1') == 1
  assert serving.lease_version(serving_dir, 'scale', 1) is None
  lease.release()
  assert integer_children(os.path.join(serving_dir, 'scale')) == [2]


def test_bad_arguments(tmp_path):
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=f'max_versions must be a positive '
                       f'integer, got {bad!r}'):
      serving.ServingView(str(tmp_path / 'serving'), bad)
  view = serving.ServingView(str(tmp_path / 'serving'))
  with pytest.raises(ValueError, match='is not an export path'):
    view.publish(str(tmp_path / 'model' / 'not_an_export'))
  assert not os.path.exists(tmp_path / 'serving')


def test_saved_model_cli_runs_a_version(tmp_path):
  model_dir, serving_dir = str(tmp_path / 'model'), str(tmp_path / 'serving')
  manager, module = trainer(model_dir)
  save_steps(manager, module, [7])
  serving.ServingView(serving_dir).publish_latest(model_dir)
  done = subprocess.run(
      [sys.executable, '-m', 'tensorflow.python.tools.saved_model_cli', 'run',
       '--dir', os.path.join(serving_dir, 'scale', '7'), '--tag_set', 'serve',
       '--signature_def', 'serving_default', '--input_exprs',
       'x=[[1.0,1.0,1.0,1.0]]'], capture_output=True, text=True, timeout=120,
      check=False, env=child_env())
  assert done.returncode == 0, done.stderr[-2000:]
  assert '[[7. 7. 7. 7.]]' in done.stdout, done.stdout


def _read_lines(stream, lines: queue.Queue) -> None:
  for line in stream:
    lines.put(line)
  lines.put(None)


@pytest.mark.slow
def test_poller_never_sees_a_partial_version_across_kills(tmp_path):
  """A feeding job SIGKILLed at random instants; pollers load each version."""
  model_dir, serving_dir = str(tmp_path / 'model'), str(tmp_path / 'serving')
  module_dir = os.path.join(serving_dir, 'scale')
  rng = random.Random(13)
  max_versions = 3
  loaded = {}  # version -> value served, each loaded under a lease.
  highest_loaded = []  # TF Serving's default policy: the highest version.
  deadline = time.monotonic() + 150

  def poll() -> None:
    if not os.path.isdir(module_dir):
      return
    children = integer_children(module_dir)
    for version in children:
      if version in loaded:
        continue
      lease = serving.lease_version(serving_dir, 'scale', version)
      if lease is None:  # Pruned before the poller got to it.
        continue
      with lease:
        loaded[version] = served_value(serving_dir, f'scale/{version}')
    if children and children[-1] in loaded:
      highest_loaded.append(children[-1])

  for run in range(7):
    child = subprocess.Popen(
        child_command('serving_child.py', model_dir, serving_dir,
                      str(max_versions)) +
        (['async'] if run % 2 else []), stdout=subprocess.PIPE, text=True,
        env=child_env(tf_log_level='3'))
    lines = queue.Queue()
    threading.Thread(target=_read_lines, args=(child.stdout, lines),
                     daemon=True).start()
    try:
      first = lines.get(timeout=max(1, deadline - time.monotonic()))
      assert first and first.startswith('SAVED'), (
          f'run {run}: the job printed {first!r} (exit {child.poll()})')
      kill_at = time.monotonic() + rng.uniform(0.05, 1.5)
      while time.monotonic() < kill_at:
        assert child.poll() is None, f'run {run}: exited {child.returncode}'
        poll()
        time.sleep(0.02)
    finally:
      child.send_signal(signal.SIGKILL)
      child.wait(timeout=30)
    poll()
    assert time.monotonic() < deadline, 'out of time'

  assert loaded and all(value == version for version, value in loaded.items())
  assert len(loaded) >= 7, loaded
  # A new view recovers what the kills left; the kept versions are complete.
  serving.ServingView(serving_dir, max_versions).publish_latest(model_dir)
  kept = integer_children(module_dir)
  assert len(kept) == max_versions
  assert configured_versions(serving_dir) == {'scale': kept}
  assert entries(module_dir) == sorted(
      [str(v) for v in kept] + ['.ckpt_export'])
  assert entries(serving_dir) == ['models.config', 'scale']
  for version in kept:
    assert served_value(serving_dir, f'scale/{version}') == version
  assert not leases.holders(os.path.join(module_dir, str(kept[-1])))
  print(f'\nversions loaded: {len(loaded)}; highest-version loads: '
        f'{len(highest_loaded)}; kept: {kept}')


def test_cli_serve(tmp_path):
  from ckpt_export import best  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / 'model')
  manager, module = trainer(model_dir)
  save_steps(manager, module, [1, 2, 3])
  best.BestExport(model_dir, metric='loss', higher_is_better=False).update(
      2, manager.savedmodels[1], {'loss': 0.1})
  latest, best_dir = str(tmp_path / 'latest'), str(tmp_path / 'best')

  def serve(*args):
    return run_cli('serve', model_dir, *args, timeout=120)

  done = serve('--latest-dir', latest, '--best-dir', best_dir,
               '--max-versions', '1')
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == [
      f'ckpt-export: published scale version {latest}/scale/3',
      f'ckpt-export: published scale version {best_dir}/scale/2']
  assert served_value(latest, 'scale/3') == 3
  assert served_value(best_dir, 'scale/2') == 2
  save_steps(manager, module, [4])
  done = serve('--latest-dir', latest, '--max-versions', '1', '--follow',
               '--timeout', '0', '--seconds-to-sleep', '0.1')
  assert done.returncode == 0, done.stderr
  assert integer_children(os.path.join(latest, 'scale')) == [4]
  for args, message in [
      ((), 'serve needs --latest-dir or --best-dir'),
      (('--latest-dir', latest, '--max-versions', '0'),
       "--max-versions must be a positive integer, got '0'")]:
    done = serve(*args)
    assert done.returncode == 2
    assert message in done.stderr
