"""Runs examples/eval_sidecar.py beside examples/train_and_export.py."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from helpers import child_env
from helpers import finish

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / 'examples'


def _start(script: str, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(EXAMPLES / script), *args],
                          cwd=REPO_ROOT, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc: subprocess.Popen) -> str:
  return finish([proc], 600)[0][0]


def test_sidecar_evaluates_while_the_trainer_trains_then_resumes(tmp_path):
  model_dir = tmp_path / 'model'
  sidecar = _start('eval_sidecar.py', f'--model_dir={model_dir}',
                   '--until_step=6', '--timeout=300')
  _finish(_start('train_and_export.py', f'--model_dir={model_dir}',
                 '--train_steps=6', '--save_every=2', '--max_to_keep=2'))
  out = _finish(sidecar)
  evaluated = [int(s) for s in re.findall(r'^step +(\d+) +mse ', out, re.M)]
  assert evaluated == sorted(set(evaluated)) and evaluated[-1] == 6
  assert set(evaluated) <= {2, 4, 6}
  with open(model_dir / 'eval_exports' / 'metrics.json') as f:
    recorded = json.load(f)['metrics']
  assert sorted(map(int, recorded)) == evaluated
  best_step = min(evaluated, key=lambda s: recorded[str(s)]['mse'])
  with open(model_dir / 'best_export' / 'best.json') as f:
    info = json.load(f)
  assert info['step'] == best_step
  assert f'Best export: step {best_step} with mse' in out
  assert f'tensorboard --logdir {model_dir / "eval_exports"}' in out
  serve = tf.saved_model.load(os.path.join(info['path'], 'regressor')
                             ).signatures['serving_default']
  assert serve(features=tf.zeros([3, 8]))['prediction'].shape == (3, 1)
  # Started again: nothing left to evaluate, the same best.
  again = _finish(_start('eval_sidecar.py', f'--model_dir={model_dir}',
                         '--timeout=0'))
  assert not re.search(r'^step ', again, re.M)
  assert f'Evaluated 0 step(s) in this run, {len(evaluated)} in all.' in again
  assert f'Best export: step {best_step} with mse' in again


def test_sidecar_requires_a_model_dir():
  proc = _start('eval_sidecar.py')
  _, err = proc.communicate(timeout=600)
  assert proc.returncode != 0 and '--model_dir is required' in err
