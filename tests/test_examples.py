"""Runs the examples as a user would, each in a subprocess.

examples/train_and_export.py (a plain training loop) and
examples/train_with_orbit.py (orbit's Controller) save the same steps with
these flags; each second run resumes the first one's model directory (the
orbit one with async checkpointing). examples/run_job.py, the README's main
job, runs the orbit trainer and the evaluator sidecar together.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Set

import numpy as np
import pytest
import tensorflow as tf

import ckpt_export
from helpers import child_env

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_FEATURES = 8  # The examples' input width.

# First run: saves at steps 2, 4, 6 and keeps the last two.
FIRST = {
    'train_and_export': dict(train_steps=6, save_every=2, max_to_keep=2),
    'train_with_orbit': dict(train_steps=6, steps_per_loop=2,
                             checkpoint_interval=2, max_to_keep=2,
                             eval_interval=2),
}
FIRST_STEPS = {4, 6}
# Second run: resumes at 6, saves at 8 and at the last step, 9.
SECOND = {
    'train_and_export': dict(FIRST['train_and_export'], train_steps=9),
    'train_with_orbit': dict(FIRST['train_with_orbit'], train_steps=9,
                             async_checkpointing=True),
}
SECOND_STEPS = {8, 9}
# How each example reports a save.
SAVED_LINE = {
    'train_and_export': r'^step +(\d+) +loss .* saved ',
    'train_with_orbit': r'^saved checkpoint to .*ckpt-(\d+)\.$',
}


def run_example(example: str, model_dir: pathlib.Path, **flags: object
               ) -> subprocess.CompletedProcess:
  """Runs an example to completion and checks it exits with status 0."""
  script = REPO_ROOT / 'examples' / f'{example}.py'
  cmd = [sys.executable, str(script), f'--model_dir={model_dir}']
  cmd += [f'--{name}={value}' for name, value in flags.items()]
  result = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (
      f'{cmd} exited with {result.returncode}\n--- stdout:\n{result.stdout}\n'
      f'--- stderr:\n{result.stderr[-5000:]}')
  return result


def saved_steps(model_dir: pathlib.Path) -> Dict[str, Set[int]]:
  """Returns the steps of the checkpoints and exports found in `model_dir`.

  Fails on any entry named like an export that is not exactly
  `ckpt-<step>_saved_modules` (e.g. a leftover work directory).
  """
  names = os.listdir(model_dir)
  strays = [n for n in names if 'saved_modules' in n and
            not re.fullmatch(r'ckpt-\d+_saved_modules', n)]
  assert not strays, f'Unexpected entries in {model_dir}: {strays}'

  def steps(pattern: str) -> Set[int]:
    return {int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names)
            if m}

  return {
      'index': steps(r'ckpt-(\d+)\.index'),
      'data': steps(r'ckpt-(\d+)\.data-\d+-of-\d+'),
      'exports': steps(r'ckpt-(\d+)_saved_modules'),
  }


def assert_layout(model_dir: pathlib.Path, expected_steps: Set[int]) -> None:
  """Checks `model_dir` holds exactly these checkpoints and their exports."""
  found = saved_steps(model_dir)
  assert found == {'index': expected_steps, 'data': expected_steps,
                   'exports': expected_steps}
  assert tf.train.latest_checkpoint(str(model_dir)) == str(
      model_dir / f'ckpt-{max(expected_steps)}')
  for step in expected_steps:
    export_dir = model_dir / f'ckpt-{step}_saved_modules'
    visible = [n for n in os.listdir(export_dir) if not n.startswith('.')]
    assert visible == ['regressor'], export_dir
    assert (export_dir / 'regressor' / 'saved_model.pb').is_file()


def resume_step(stdout: str) -> int:
  match = re.search(r'^Resumed from (\S+) at step (\d+)\.$', stdout, re.M)
  assert match, stdout
  return int(match.group(2))


def saved_steps_logged(example: str, stdout: str) -> List[int]:
  return [int(s) for s in re.findall(SAVED_LINE[example], stdout, re.M)]


@pytest.fixture(scope='module', params=sorted(FIRST))
def first_run(request, tmp_path_factory):
  """An example's name, model directory and output of one run from scratch."""
  example = request.param
  if example == 'train_with_orbit':
    pytest.importorskip('orbit')
  model_dir = tmp_path_factory.mktemp(example) / 'model'
  return example, model_dir, run_example(example, model_dir, **FIRST[example])


def test_first_run_keeps_the_latest_checkpoints_and_exports(first_run):
  example, model_dir, result = first_run
  assert 'No checkpoint found: starting from step 0.' in result.stdout
  assert saved_steps_logged(example, result.stdout) == [2, 4, 6]
  assert_layout(model_dir, FIRST_STEPS)
  assert 'predictions match the trained model' in result.stdout


def test_every_export_loads_and_serves(first_run):
  _, model_dir, result = first_run
  exports = ckpt_export.list_savedmodels(str(model_dir))
  assert [ckpt_export.parse_export_step(p) for p in exports] == sorted(
      FIRST_STEPS)
  assert ckpt_export.latest_savedmodel(str(model_dir)) == exports[-1]
  # The snippet the example prints points at the latest export.
  assert f'ckpt_export.latest_savedmodel({str(model_dir)!r})' in result.stdout
  batch = np.random.default_rng(0).normal(
      size=(5, NUM_FEATURES)).astype(np.float32)
  predictions = []
  for export in exports:
    loaded = tf.saved_model.load(os.path.join(export, 'regressor'))
    assert 'serving_default' in loaded.signatures
    outputs = loaded.signatures['serving_default'](features=tf.constant(batch))
    assert outputs['prediction'].shape == (5, 1)
    assert np.all(np.isfinite(outputs['prediction'].numpy()))
    predictions.append(outputs['prediction'].numpy())
  # Each export holds the weights of its own step.
  assert not np.array_equal(predictions[0], predictions[-1])


def test_second_run_resumes_from_the_last_checkpoint(first_run, tmp_path):
  example, first_dir, _ = first_run
  model_dir = tmp_path / 'model'
  shutil.copytree(first_dir, model_dir)
  result = run_example(example, model_dir, **SECOND[example])
  assert resume_step(result.stdout) == max(FIRST_STEPS)
  assert f'Resumed from {model_dir / "ckpt-6"} at step 6.' in result.stdout
  assert saved_steps_logged(example, result.stdout) == [8, 9]
  assert_layout(model_dir, SECOND_STEPS)
  assert 'predictions match the trained model' in result.stdout


def test_main_job_trains_and_evaluates_its_exports(tmp_path):
  pytest.importorskip('orbit')
  model_dir = tmp_path / 'job'
  out = run_example('run_job', model_dir, train_steps=40,
                    checkpoint_interval=10, max_to_keep=2).stdout
  summary = out[out.index('=' * 72):]

  def steps(label: str) -> List[int]:
    found = re.search(rf'^{label}.*: (.*)$', summary, re.M).group(1)
    return [int(s) for s in found.split(', ')]

  exported, evaluated = steps('Steps exported'), steps('Steps evaluated')
  kept = steps('Exports kept by the trainer')
  assert exported == [10, 20, 30, 40] and kept == [30, 40]
  # In order, each once, the last one included; an export the trainer
  # deleted before the sidecar got to it is skipped (and said so), never a
  # failure.
  assert evaluated == sorted(set(evaluated)) and evaluated[-1] == 40
  assert set(evaluated) <= set(exported)
  assert ('Not evaluated (' in summary or
          'Not seen by the sidecar' in summary) == (evaluated != exported)
  assert_layout(model_dir, set(kept))
  best = ckpt_export.best.read_best(str(model_dir))
  assert best['step'] in evaluated
  metrics = ckpt_export.evaluation.read_metrics(
      str(model_dir / 'eval_exports'))
  assert sorted(metrics) == evaluated
  # Every export is accounted for: evaluated, skipped with its reason, or (a
  # trainer faster than the sidecar's looks) deleted before any look saw it.
  unseen = set(exported) - set(evaluated) - set(metrics.skipped)
  assert set(metrics.skipped) <= set(exported) - set(evaluated)
  assert not unseen & set(kept)
  for step, info in metrics.skipped.items():
    assert re.search(rf'^Not evaluated \({re.escape(info["message"])}\): '
                     rf'.*\b{step}\b', summary, re.M)
  for step in unseen:
    assert re.search(rf'^Not seen by the sidecar .*\b{step}\b', summary,
                     re.M)
  assert best['metrics']['mse'] == min(m['mse'] for m in metrics.values())
  assert f'ckpt-export ls {model_dir}' in summary
  assert tf.saved_model.load(os.path.join(best['path'], 'regressor'))
  # The serving views: TF Serving's layout, each with its one version.
  serving_dir = model_dir / 'serving'
  assert f'Serving view (latest): regressor version {serving_dir}' in summary
  assert sorted(os.listdir(serving_dir / 'latest' / 'regressor')) == ['40']
  assert sorted(os.listdir(serving_dir / 'best' / 'regressor')) == [
      str(best['step'])]
  assert tf.saved_model.load(str(serving_dir / 'latest' / 'regressor' / '40'))
