"""Soak: a trainer SIGKILLed at random, over and over, while a reader follows.

At least `MIN_SAVES` saves of `crash_child.py` with random kills and restarts
(see `soak.py`), while an evaluator-like reader iterates the exports with
`savedmodels_iterator` and loads each: it is never given an export that fails
to load while still published, nor one serving another step's values; it
sees the last export; and the directory ends exactly as the last run leaves
it, with no leftovers of the killed runs.
"""

import os
import random

import pytest

from ckpt_export import paths
from conftest import entries
import soak

SEED = int(os.environ.get('SOAK_SEED', '20251121'))
MIN_SAVES = 50
MAX_TO_KEEP = 3
SAVES_PER_RUN = (5, 15)
MAX_DELAY_SECONDS = 0.5  # About one save's time.


@pytest.mark.slow
def test_trainer_killed_at_random_while_a_reader_follows(tmp_path):
  model_dir = str(tmp_path / 'model')
  reader = soak.ExportReader(model_dir)
  reader.start()
  try:
    saves, kills, final_step = soak.run_trainer_with_kills(
        model_dir, str(tmp_path), MIN_SAVES, MAX_TO_KEEP, random.Random(SEED),
        SAVES_PER_RUN, MAX_DELAY_SECONDS)
  finally:
    reader.stop()

  assert saves >= MIN_SAVES and kills >= 2, (saves, kills)
  assert not reader.errors, reader.errors
  read = sorted(reader.served + reader.gone)
  assert read == sorted(set(read)), 'an export was given twice'
  assert reader.served[-1] == final_step
  kept = range(final_step - MAX_TO_KEEP + 1, final_step + 1)
  assert entries(model_dir) == sorted(
      ['checkpoint'] + [f'ckpt-{s}{suffix}' for s in kept for suffix in (
          '.data-00000-of-00001', '.index', '_saved_modules')])
  for step in kept:
    assert soak.serves_its_step(paths.export_path(model_dir, 'ckpt', step)) == (
        step)
