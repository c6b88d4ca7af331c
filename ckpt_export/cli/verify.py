"""`ckpt-export verify`: loads and checks every published export."""

import argparse
import os
import sys
from typing import List

import tensorflow as tf

from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import readers
from ckpt_export.cli import _common
from ckpt_export.cli import _model_dir


def _verify_module(module_dir: str) -> List[str]:
  """Loads one SavedModel; returns its status (ok or BROKEN) and a detail."""
  try:
    loaded = tf.saved_model.load(module_dir)
  except Exception as e:  # pylint: disable=broad-except
    return ['BROKEN', f'does not load: {_common.one_line(e)}']
  signatures = sorted(loaded.signatures.keys())
  if not signatures:
    return ['BROKEN', 'no serving signature']
  return ['ok', 'signatures: ' + ','.join(signatures)]


def _verify_export(export_dir: str) -> List[List[str]]:
  """Returns the table rows (module, status, detail) of one export."""
  modules = _model_dir.module_names(export_dir)
  if not modules:
    return [['-', 'BROKEN', 'no modules']]
  return [[module, *_verify_module(os.path.join(export_dir, module))]
          for module in modules]


def _leased_rows(step: int, export_dir: str,
                 args: argparse.Namespace) -> List[List[str]]:
  """The table rows of one export, verified under a lease (unless --no-lease).

  A lease that lapsed meanwhile (the export may have been deleted while it
  was read) adds a BROKEN row.
  """
  lease = _model_dir.lease(export_dir, args)
  if lease is None:
    return [[str(step), '-', 'gone', 'deleted before it could be read']]
  with lease:
    rows = [[str(step), *row] for row in _verify_export(export_dir)]
    if isinstance(lease, leases.Lease):
      try:
        lease.check()
      except leases.LeaseLapsedError as e:
        rows.append([str(step), '-', 'BROKEN', _common.one_line(e)])
  return rows


def run(args: argparse.Namespace) -> int:
  """Loads every published export; exits 1 if any is broken."""
  names = _model_dir.list_model_dir(args.model_dir)
  exports = [(step, path) for step, path in readers.export_candidates(
      args.model_dir, args.checkpoint_name, names)
             if commit.is_published(path)]
  if not exports:
    print(f'No published exports named {args.checkpoint_name!r} in '
          f'{args.model_dir}.')
    return 0
  rows = [row for step, path in exports
          for row in _leased_rows(step, path, args)]
  _common.print_table(['STEP', 'MODULE', 'STATUS', 'DETAIL'], rows)
  broken = sorted({int(row[0]) for row in rows if row[2] == 'BROKEN'})
  if broken:
    print(f'{_common.PROG}: broken exports at steps '
          f'{", ".join(map(str, broken))}', file=sys.stderr)
    return 1
  return 0
