"""ckpt_export: checkpoints with SavedModel exports that are safe to read.

A drop-in replacement for Model Garden's
`official.core.savedmodel_checkpoint_manager`, plus module-level readers that
need no trainer.
"""

from ckpt_export.best import BestExport
from ckpt_export.best_action import BestExportAction
from ckpt_export.evaluation import evaluate_exports
from ckpt_export.leases import acquire as acquire_lease
from ckpt_export.leases import DEFAULT_LEASE_SECONDS
from ckpt_export.leases import Lease
from ckpt_export.leases import leased
from ckpt_export.manager import SavedModelCheckpointManager
from ckpt_export.paths import make_saved_modules_directory_name
from ckpt_export.paths import parse_export_step
from ckpt_export.paths import SAVED_MODULES_PATH_SUFFIX
from ckpt_export.readers import latest_savedmodel
from ckpt_export.readers import list_savedmodels
from ckpt_export.readers import savedmodels_iterator
from ckpt_export.readers import wait_for_new_savedmodel

__version__ = '0.1.0'

__all__ = [
    'BestExport',
    'BestExportAction',
    'DEFAULT_LEASE_SECONDS',
    'Lease',
    'SAVED_MODULES_PATH_SUFFIX',
    'SavedModelCheckpointManager',
    'acquire_lease',
    'evaluate_exports',
    'latest_savedmodel',
    'leased',
    'list_savedmodels',
    'make_saved_modules_directory_name',
    'parse_export_step',
    'savedmodels_iterator',
    'wait_for_new_savedmodel',
]
