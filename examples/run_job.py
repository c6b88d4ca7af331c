r"""The main job: a trainer and an evaluator sidecar, side by side.

Starts two processes on one model directory (a fresh temporary one unless
`--model_dir` is given):

* the trainer, `train_with_orbit.py`: an orbit Controller that checkpoints
  and exports every `--checkpoint_interval` steps, keeping `--max_to_keep`;
* the sidecar, `eval_sidecar.py`: evaluates each export as it appears (under a
  reader lease, so the trainer's garbage collection never deletes it
  mid-evaluation), writes TensorBoard summaries and keeps the best export.

The trainer starts once the sidecar is ready. Their output is interleaved,
prefixed with the process's name. Once both have finished it prints a summary:
the steps exported and evaluated, the best step and its metric, and where to
look. It exits non-zero if either process failed or the last export went
unevaluated. Every step exported is either evaluated or, as the sidecar's
record says, skipped with its reason: a sidecar slower than the trainer may
find an export already deleted by the trainer's `max_to_keep` before it got
to it, or give up on one whose evaluation failed. The export it is evaluating
is never deleted under it. Then it publishes the last export and the best one
as TensorFlow Serving versions (`ckpt_export.ServingView`) under
`--serving_dir` (default `<model_dir>/serving`): `latest/<module>/<step>/` and
`best/<module>/<step>/`, each with a `models.config`.

Usage:

  python examples/run_job.py
  python examples/run_job.py --model_dir=/tmp/job --train_steps=400  # resumes
"""

import os
import re
import subprocess
import sys
import tempfile
import threading
from typing import IO, List, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF loads.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from ckpt_export import best as best_lib
from ckpt_export import evaluation
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import serving

_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'The model directory; default: a fresh temporary one.')
_TRAIN_STEPS = flags.DEFINE_integer(
    'train_steps', 200, 'Train until the global step reaches this.',
    lower_bound=1)
_CHECKPOINT_INTERVAL = flags.DEFINE_integer(
    'checkpoint_interval', 40, 'Steps between checkpoints (with exports).',
    lower_bound=1)
_MAX_TO_KEEP = flags.DEFINE_integer(
    'max_to_keep', 5, 'Checkpoints (with their exports) the trainer keeps.',
    lower_bound=1)
_TIMEOUT = flags.DEFINE_float(
    'timeout', 300.0, 'The sidecar gives up after this many seconds without '
    'a new export.', lower_bound=0.0)

_SERVING_DIR = flags.DEFINE_string(
    'serving_dir', None, 'Where to publish the latest and best exports for '
    'TF Serving; default: <model_dir>/serving.')

_HERE = os.path.dirname(os.path.abspath(__file__))


def _start(script: str, *args: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, os.path.join(_HERE, script), *args],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def _relay(name: str, stream: IO[str], lines: List[str],
           ready: Optional[threading.Event] = None) -> None:
  """Copies a child's output lines to ours, prefixed with its name.

  Args:
    name: The prefix.
    stream: The child's output.
    lines: Gets every line.
    ready: Set at the first line (the sidecar prints one once it is ready), or
      when the stream ends.
  """
  for line in stream:
    lines.append(line)
    print(f'[{name}] {line.rstrip()}', flush=True)
    if ready is not None:
      ready.set()
  if ready is not None:
    ready.set()


def _steps(step_list: List[int]) -> str:
  return ', '.join(str(s) for s in step_list) or 'none'


def main(argv: List[str]) -> None:
  """Runs the trainer and the sidecar, then prints the job's summary."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  model_dir = _MODEL_DIR.value or tempfile.mkdtemp(prefix='ckpt_export_job_')
  os.makedirs(model_dir, exist_ok=True)
  print(f'Model directory: {model_dir}\n', flush=True)
  sidecar = _start('eval_sidecar.py', f'--model_dir={model_dir}',
                   f'--until_step={_TRAIN_STEPS.value}',
                   f'--timeout={_TIMEOUT.value}')
  sidecar_lines, trainer_lines, sidecar_ready = [], [], threading.Event()
  relays = [threading.Thread(target=_relay, args=(
      'sidecar', sidecar.stdout, sidecar_lines, sidecar_ready))]
  relays[0].start()
  sidecar_ready.wait()
  trainer = _start('train_with_orbit.py', f'--model_dir={model_dir}',
                   f'--train_steps={_TRAIN_STEPS.value}',
                   f'--checkpoint_interval={_CHECKPOINT_INTERVAL.value}',
                   f'--max_to_keep={_MAX_TO_KEEP.value}')
  relays.append(threading.Thread(target=_relay, args=(
      'trainer', trainer.stdout, trainer_lines)))
  relays[1].start()
  codes = {'trainer': trainer.wait(), 'sidecar': sidecar.wait()}
  for relay in relays:
    relay.join()
  # orbit.Controller logs each save as "saved checkpoint to <path>.".
  exported = sorted({int(m.group(1)) for m in map(re.compile(
      r'saved checkpoint to .*-(\d+)\.$').search, trainer_lines) if m})

  record = evaluation.read_metrics(
      evaluation.default_summary_dir(model_dir))
  evaluated = sorted(record)
  kept = [paths.parse_export_step(p)
          for p in readers.list_savedmodels(model_dir)]
  best = best_lib.read_best(model_dir)
  print('\n' + '=' * 72)
  print(f'Model directory: {model_dir}')
  print(f'Steps exported: {_steps(exported)}')
  print(f'Steps evaluated: {_steps(evaluated)}')
  reasons = {}
  for step, info in sorted(record.skipped.items()):
    reasons.setdefault(info['message'], []).append(step)
  for message, steps in reasons.items():
    print(f'Not evaluated ({message}): {_steps(steps)}')
  # The sidecar lists the directory about once a second: an export the
  # trainer published and deleted between two of its looks was never seen.
  unseen = sorted(set(exported) - set(evaluated) - set(record.skipped))
  if unseen:
    print('Not seen by the sidecar (published and deleted between two of its '
          f'looks): {_steps(unseen)}')
  print(f'Exports kept by the trainer (max_to_keep={_MAX_TO_KEEP.value}): '
        f'{_steps(kept)}')
  if best is not None:
    metric = best['metric']
    print(f'Best export: step {best["step"]}, {metric} '
          f'{best["metrics"][metric]:.4f}, at {best["path"]}')
  serving_dir = _SERVING_DIR.value or os.path.join(model_dir, 'serving')
  for feed in ('latest', 'best'):
    view = serving.ServingView(os.path.join(serving_dir, feed))
    published = (view.publish_latest(model_dir) if feed == 'latest' else
                 view.publish_best(model_dir))
    for module, version_dir in sorted(published.items()):
      print(f'Serving view ({feed}): {module} version {version_dir}')
  print('TF Serving:   tensorflow_model_server --model_config_file='
        f'{os.path.join(serving_dir, "latest", serving.CONFIG_FILE)}')
  print(f'TensorBoard:  tensorboard --logdir {model_dir}')
  print(f'List steps:   ckpt-export ls {model_dir}')
  print(f'Check all:    ckpt-export verify {model_dir}')
  failed = [f'{name} exited with code {code}'
            for name, code in codes.items() if code]
  if not exported or exported[-1] not in evaluated:
    failed.append('the last export was not evaluated')
  if failed or best is None:
    sys.exit('ERROR: ' + ('; '.join(failed) or 'no best export'))


if __name__ == '__main__':
  app.run(main)
