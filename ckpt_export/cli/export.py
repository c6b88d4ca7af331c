"""`ckpt-export export`: exports each new checkpoint (the decoupled mode)."""

import argparse
import os
import sys

from ckpt_export import decoupled
from ckpt_export.cli import _common
from ckpt_export.cli import _model_dir


def run(args: argparse.Namespace) -> int:
  """Exports each new checkpoint of MODEL_DIR until --timeout."""
  _model_dir.list_model_dir(args.model_dir)
  sys.path.insert(0, os.getcwd())  # Finds the user's modules, as python does.
  build_fn = decoupled.load_build_fn(args.build_fn)
  steps = decoupled.run_exporter(
      args.model_dir, build_fn, checkpoint_name=args.checkpoint_name,
      timeout=args.timeout, seconds_to_sleep=args.seconds_to_sleep)
  print(f'{_common.PROG}: exported steps '
        f'{", ".join(map(str, steps)) or "none"}')
  return 0
