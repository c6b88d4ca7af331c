"""Soak: a trainer SIGKILLed at random, over and over, while a sidecar reads.

`crash_child.py` trains to step `FINAL_STEP`, saving every step, killed at
random instants and restarted from its last checkpoint, every other run with
async checkpointing (see `soak.py`). Meanwhile the sidecar, the installed
`ckpt-export watch` in its own process, loads each export it is given and
checks that it serves its own step. The test prints a summary line and
asserts: no partial or wrong export loaded, no sidecar failure, no export lost
beyond what `max_to_keep` deletes, and the directory left exactly as the last
run leaves it, without leftovers of the killed runs or leases of the sidecar.
"""

import os
import random

import pytest

from ckpt_export import leases
from ckpt_export import paths
from helpers import entries
import crash_child
import soak

SEED = int(os.environ.get('SOAK_SEED', '20251121'))
MIN_SAVES = 50
# One save per step, and a kill loses at most one save's return (one whose
# checkpoint was written; an async run's lost saves are made again).
FINAL_STEP = 60
MAX_TO_KEEP = 3
SAVES_PER_RUN = (5, 15)
MAX_DELAY_SECONDS = 0.5  # About one save's time.


def _serves_its_step(model_dir: str, step: int) -> bool:
  export_dir = paths.export_path(model_dir, 'ckpt', step)
  try:
    return crash_child.served_step(export_dir) == step
  except (AssertionError, OSError, ValueError):
    return False


@pytest.mark.slow
def test_trainer_killed_at_random_while_a_sidecar_watches(tmp_path):
  model_dir = str(tmp_path / 'model')
  os.makedirs(model_dir)
  sidecar = soak.Sidecar(model_dir, str(tmp_path), FINAL_STEP)
  try:
    runs = soak.run_trainer_with_kills(
        model_dir, str(tmp_path), FINAL_STEP, MAX_TO_KEEP, random.Random(SEED),
        SAVES_PER_RUN, MAX_DELAY_SECONDS)
    sidecar_code = sidecar.wait()
  finally:
    sidecar.kill()

  logged = sidecar.logged()
  handled = [step for kind, step in logged if kind == 'start']
  # A COMMAND that started without logging `done` failed: it logged `bad`
  # (wrong values) or raised (an export that did not load).
  partial_or_wrong = [step for kind, step in logged if kind == 'bad'] + [
      step for step in handled if ('done', step) not in logged]
  failures = [line for line in sidecar.stderr().splitlines()
              if line.startswith('ckpt-export: ')]
  kept = range(FINAL_STEP - MAX_TO_KEEP + 1, FINAL_STEP + 1)
  lost = [step for step in kept if step in runs.durable_steps and
          not _serves_its_step(model_dir, step)]
  lease_dir = os.path.join(model_dir, leases.STATE_DIR, 'leases')
  leftover_leases = entries(lease_dir) if os.path.isdir(lease_dir) else []
  summary = (
      f'soak (seed {SEED}): {runs.saves} saves, {runs.kills} kills, '
      f'{runs.async_runs} async runs; sidecar handled {len(handled)} exports '
      f'{handled}; partial/wrong exports loaded: {len(partial_or_wrong)}; '
      f'sidecar failures: {len(failures)} (exit code {sidecar_code}); exports '
      f'lost beyond retention: {len(lost)}; leftover leases: '
      f'{len(leftover_leases)}')
  print('\n' + summary)

  assert runs.saves >= MIN_SAVES and runs.kills >= 2, summary
  assert runs.async_runs >= 1, summary
  assert sidecar_code == 0 and not failures, f'{summary}\n{failures}'
  assert not partial_or_wrong, f'{summary}\n{logged}'
  # Each export handled once, in step order, up to the last one.
  assert logged == [(kind, step) for step in handled
                    for kind in ('start', 'done')], logged
  assert handled == sorted(set(handled)) and handled[-1] == FINAL_STEP, summary
  assert not lost, summary
  # Exactly what the last run leaves: no work directory of a killed run, no
  # export but the kept ones, and no lease once the sidecar has exited.
  assert entries(model_dir) == sorted(
      ['checkpoint', leases.STATE_DIR] + [
          f'ckpt-{s}{suffix}' for s in kept for suffix in (
              '.data-*', '.index', '_saved_modules')]), summary
  assert not leftover_leases, f'{summary}\n{leftover_leases}'
  for step in kept:
    assert _serves_its_step(model_dir, step), step
