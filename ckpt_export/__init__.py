"""ckpt_export: checkpoints with SavedModel exports that are safe to read.

A drop-in replacement for Model Garden's
`official.core.savedmodel_checkpoint_manager`, plus module-level readers that
need no trainer.

The public names below are imported on first use (PEP 562), so that importing
a submodule that does not need TensorFlow, such as the `ckpt-export` command
line, does not import it: the command must configure TensorFlow's logging
before TensorFlow is loaded, and answer `--help` quickly.
"""

import importlib
import typing
from typing import Any, List

if typing.TYPE_CHECKING:
  from ckpt_export.best import BestExport
  from ckpt_export.orbit_actions import BestExportAction
  from ckpt_export.evaluation import evaluate_exports
  from ckpt_export.leases import acquire as acquire_lease
  from ckpt_export.leases import DEFAULT_LEASE_SECONDS
  from ckpt_export.leases import Lease
  from ckpt_export.leases import leased
  from ckpt_export.leases import WriterBusyError
  from ckpt_export.manager import SavedModelCheckpointManager
  from ckpt_export.paths import make_saved_modules_directory_name
  from ckpt_export.paths import parse_export_step
  from ckpt_export.paths import SAVED_MODULES_PATH_SUFFIX
  from ckpt_export.readers import latest_savedmodel
  from ckpt_export.readers import list_savedmodels
  from ckpt_export.readers import savedmodels_iterator
  from ckpt_export.readers import wait_for_new_savedmodel
  from ckpt_export.serving import ServingView

__version__ = '0.1.0'

# Public name -> (the submodule that defines it, its name there).
_PUBLIC = {
    'BestExport': ('best', 'BestExport'),
    'BestExportAction': ('orbit_actions', 'BestExportAction'),
    'DEFAULT_LEASE_SECONDS': ('leases', 'DEFAULT_LEASE_SECONDS'),
    'Lease': ('leases', 'Lease'),
    'SAVED_MODULES_PATH_SUFFIX': ('paths', 'SAVED_MODULES_PATH_SUFFIX'),
    'SavedModelCheckpointManager': ('manager', 'SavedModelCheckpointManager'),
    'ServingView': ('serving', 'ServingView'),
    'acquire_lease': ('leases', 'acquire'),
    'evaluate_exports': ('evaluation', 'evaluate_exports'),
    'latest_savedmodel': ('readers', 'latest_savedmodel'),
    'leased': ('leases', 'leased'),
    'list_savedmodels': ('readers', 'list_savedmodels'),
    'make_saved_modules_directory_name': (
        'paths', 'make_saved_modules_directory_name'),
    'parse_export_step': ('paths', 'parse_export_step'),
    'savedmodels_iterator': ('readers', 'savedmodels_iterator'),
    'wait_for_new_savedmodel': ('readers', 'wait_for_new_savedmodel'),
    'WriterBusyError': ('leases', 'WriterBusyError'),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  """Imports a public name, or a submodule (`ckpt_export.readers`), on use."""
  if name in _PUBLIC:
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(f'{__name__}.{module}'), attribute)
  else:
    try:
      value = importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'{__name__}.{name}':
        raise
      raise AttributeError(
          f'module {__name__!r} has no attribute {name!r}') from None
  globals()[name] = value
  return value


def __dir__() -> List[str]:
  return sorted(set(globals()) | set(_PUBLIC))
