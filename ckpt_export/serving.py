"""A servable view of the exports, laid out for TensorFlow Serving.

TF Serving watches a model's base path and loads its children whose names are
integers (versions): the highest one, or the versions its config names. A
`ServingView` publishes the modules of exports there:

    <serving_dir>/<module>/<version>/            a SavedModel; version = step
    <serving_dir>/models.config                  ModelServerConfig (text proto)
    <serving_dir>/<module>/.ckpt_export/leases/  readers' leases on versions

fed with the latest export of a model directory (`publish_latest`), the best
one (`publish_best`, from `BestExport`'s `best.json`), or any export
(`publish`); one view per feed (e.g. `serving/latest` and `serving/best`).

A version appears complete or not at all. It is written with the commit
protocol of exports (`commit.staged_export`): into `.<version>.tmp-<token>`, a
name TF Serving skips, then renamed where a directory rename is atomic (local
disk). On local disk its files are hard links to the export's (no bytes
copied; an export's files are never written again, and deleting the export
leaves the links), copies where linking fails (another file system). On
object stores, where a rename copies object by object, the integer directory
is visible while it fills, so TF Serving must serve the versions named in
`models.config`, which is rewritten in one object write only after a version
is complete and before one is deleted: run it with
`--model_config_file=<serving_dir>/models.config
--model_config_file_poll_wait_seconds=<seconds>`. That config works on local
disk too; there, `--model_base_path=<serving_dir>/<module>` (serving the
highest version) is also safe.

A version, once published, is never rewritten (TF Serving would not reload
it). Each module keeps its newest `max_versions` versions; older ones are
deleted, except those a reader leases (`lease_version`, `leases.py`), which
are deleted when released. What a killed publisher leaves is removed by the
next view on the same directory.
"""

import os
import re
import shutil
from typing import Dict, List, Optional

from absl import logging
import tensorflow as tf

from ckpt_export import best
from ckpt_export import commit
from ckpt_export import leases
from ckpt_export import paths
from ckpt_export import readers
from ckpt_export import validate

CONFIG_FILE = 'models.config'
DEFAULT_MAX_VERSIONS = 2

_VERSION_RE = re.compile(r'[0-9]+')


def _link_or_copy_tree(source: str, target: str) -> None:
  """Fills `target` with `source`'s files: hard links on local disk."""
  local = all(paths.local_path(p) == p for p in (source, target))  # No URLs.
  for directory, _, files in tf.io.gfile.walk(source):
    relative = os.path.relpath(directory.rstrip('/'), source)
    into = target if relative == '.' else os.path.join(target, relative)
    tf.io.gfile.makedirs(into)
    for name in files:
      src, dst = os.path.join(directory, name), os.path.join(into, name)
      if local:
        try:
          os.link(src, dst)
          continue
        except OSError:  # Another file system, or links not allowed.
          shutil.copyfile(src, dst)
          continue
      tf.io.gfile.copy(src, dst)


def lease_version(serving_dir: str, module: str, version: int,
                  lease_seconds: float = leases.DEFAULT_LEASE_SECONDS
                 ) -> Optional[leases.Lease]:
  """Leases a published version, so that no view deletes it until released.

  Args:
    serving_dir: The view's directory.
    module: The module (TF Serving's model name).
    version: The version.
    lease_seconds: As `leases.acquire`'s.

  Returns:
    The lease (release it, or use it as a context manager), or None if the
    version is not published or being deleted.
  """
  return leases.acquire(os.path.join(serving_dir, module, str(version)),
                        lease_seconds)


def versions(serving_dir: str, module: str) -> List[int]:
  """The published versions of a module, lowest first."""
  module_dir = os.path.join(serving_dir, module)
  return sorted(int(name) for name in readers.list_directory(module_dir)
                if _VERSION_RE.fullmatch(name) and
                commit.is_published(os.path.join(module_dir, name)))


class ServingView:
  """Publishes exports as `<serving_dir>/<module>/<version>/` for TF Serving.

  One process feeds a view at a time; any number read it.
  """

  def __init__(self, serving_dir: str,
               max_versions: int = DEFAULT_MAX_VERSIONS):
    """Opens (and recovers) a view.

    Args:
      serving_dir: The view's directory (local path or URL).
      max_versions: How many versions of each module to keep (positive).

    Raises:
      ValueError: For a bad `max_versions` or directory.
    """
    self._max_versions = validate.integer('max_versions', max_versions, 1)
    self._dir = paths.validate_location(serving_dir, 'module name',
                                        'serving')
    for module in self.modules():
      self._recover(os.path.join(serving_dir, module))

  @property
  def directory(self) -> str:
    return self._dir

  def modules(self) -> List[str]:
    """The modules the view serves (its subdirectories), by name."""
    return sorted(name for name in readers.list_directory(self._dir)
                  if not name.startswith('.') and
                  tf.io.gfile.isdir(os.path.join(self._dir, name)))

  def publish(self, export_dir: str, version: Optional[int] = None
             ) -> Dict[str, str]:
    """Publishes each module of an export as a version, then prunes.

    The caller makes sure the export is not deleted meanwhile (a lease, or
    its own manager); `publish_latest` and `publish_best` lease it.

    Args:
      export_dir: A published export (`<dir>/<name>-<step>_saved_modules`).
      version: The version number; by default the export's step.

    Returns:
      The version directories published now, by module (none for modules
      that had this version already).

    Raises:
      ValueError: For a path that is not an export, or a bad version.
    """
    step = paths.parse_export_step(export_dir)
    if step is None:
      raise ValueError(f'{export_dir!r} is not an export path '
                       '(<dir>/<name>-<step>_saved_modules).')
    version = step if version is None else version
    version = validate.integer('version', version)
    published = {}
    for module in sorted(readers.list_directory(export_dir)):
      source = os.path.join(export_dir, module)
      if not tf.io.gfile.exists(os.path.join(source, 'saved_model.pb')):
        continue
      target = os.path.join(self._dir, module, str(version))
      if tf.io.gfile.exists(target):
        continue
      tf.io.gfile.makedirs(os.path.dirname(target))
      with commit.staged_export(target, {'version': version,
                                         'export': export_dir}) as tmp:
        _link_or_copy_tree(source, tmp)
      logging.info('Published %s as serving version %s.', source, target)
      published[module] = target
    self._prune()
    return published

  def publish_latest(self, model_dir: str, checkpoint_name: str = 'ckpt'
                    ) -> Dict[str, str]:
    """Publishes the latest export of a model directory (leased meanwhile).

    Returns:
      As `publish`; {} if there is no export, or the latest one is being
      deleted.
    """
    tried = set()
    while True:
      path = readers.latest_savedmodel(model_dir, checkpoint_name)
      if path is None or path in tried:
        return {}
      tried.add(path)
      lease = leases.acquire(path, holder='serving view')
      if lease is not None:  # Else deleted meanwhile, maybe for a newer one.
        with lease:
          return self.publish(path)

  def publish_best(self, model_dir: str, directory_name: str = 'best_export'
                  ) -> Dict[str, str]:
    """Publishes the best export that `BestExport` keeps (leased meanwhile).

    Returns:
      As `publish`; {} if there is no best export (or it is being replaced
      by a better one, to be published by the next call).
    """
    info = best.read_best(model_dir, directory_name)
    lease = info and leases.acquire(info['path'], holder='serving view')
    if lease is None:
      return {}
    with lease:
      return self.publish(info['path'], info['step'])

  def _prune(self) -> None:
    """Keeps the newest versions: config first, then deletions."""
    kept = {}
    doomed = []
    for module in self.modules():
      module_versions = versions(self._dir, module)
      kept[module] = module_versions[-self._max_versions:]
      doomed += [os.path.join(self._dir, module, str(v))
                 for v in module_versions[:-self._max_versions]]
    self._write_config(kept)
    for path in doomed:
      logging.info('Removing serving version %s.', path)
      leases.delete_export_unless_leased(path)
    for module in kept:
      leases.sweep(os.path.join(self._dir, module))

  def _write_config(self, kept: Dict[str, List[int]]) -> None:
    """Writes `models.config`: each module's base path and kept versions."""
    lines = ['model_config_list {']
    for module, module_versions in sorted(kept.items()):
      base_path = os.path.join(self._dir, module)
      if paths.local_path(base_path) == base_path:  # Not a URL.
        base_path = os.path.abspath(base_path)
      listed = ' '.join(f'versions: {v}' for v in module_versions)
      lines += ['  config {', f'    name: "{module}"',
                f'    base_path: "{base_path}"',
                '    model_platform: "tensorflow"',
                f'    model_version_policy {{ specific {{ {listed} }} }}',
                '  }']
    lines.append('}')
    content = '\n'.join(lines) + '\n'
    config = os.path.join(self._dir, CONFIG_FILE)
    commit.remove_stale_files(self._dir, CONFIG_FILE,
                              readers.list_directory(self._dir))
    try:
      with tf.io.gfile.GFile(config) as f:
        if f.read() == content:
          return
    except tf.errors.NotFoundError:
      pass
    commit.write_file_atomically(config, content)

  def _recover(self, module_dir: str) -> None:
    """Removes what killed publishers and deleters left in a module dir."""
    commit.recover_targets(
        module_dir, readers.list_directory(module_dir),
        lambda name: _VERSION_RE.fullmatch(name) is not None)
