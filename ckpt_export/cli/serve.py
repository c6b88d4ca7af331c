"""`ckpt-export serve`: publishes exports as versions TF Serving can watch."""

import argparse
import time
from typing import Callable, Dict, List, Tuple

from ckpt_export import serving
from ckpt_export.cli import _common
from ckpt_export.cli import _model_dir

# A serving view, and how to publish the export it is fed with into it.
_Feed = Tuple[serving.ServingView,
              Callable[[serving.ServingView], Dict[str, str]]]


def _feeds(args: argparse.Namespace) -> List[_Feed]:
  """The views asked for: --latest-dir and/or --best-dir."""
  return [(serving.ServingView(directory, args.max_versions), publish)
          for directory, publish in (
              (args.latest_dir, lambda view: view.publish_latest(
                  args.model_dir, args.checkpoint_name)),
              (args.best_dir, lambda view: view.publish_best(args.model_dir)))
          if directory]


def run(args: argparse.Namespace) -> int:
  """Publishes MODEL_DIR's latest and/or best export (again with --follow)."""
  _model_dir.list_model_dir(args.model_dir)
  feeds = _feeds(args)
  last_new = time.monotonic()
  with _common.sigterm_raises():
    while True:
      for view, publish in feeds:
        for module, version_dir in sorted(publish(view).items()):
          print(f'{_common.PROG}: published {module} version {version_dir}',
                flush=True)
          last_new = time.monotonic()
      if not args.follow or (args.timeout is not None and
                             time.monotonic() - last_new > args.timeout):
        return 0
      time.sleep(args.seconds_to_sleep)
