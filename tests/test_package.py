"""The package's shape: cheap to import, and layered."""

import ast
import pathlib
import subprocess
import sys
import tomllib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ckpt_export'

# Each module may import only the ones listed (lower layers never import
# higher ones).
ALLOWED = {
    '_tf_internals': set(),
    'paths': set(),
    'validate': set(),
    'strict_json': {'validate'},
    'bundle': set(),
    'writers': {'paths'},
    'commit': {'paths', 'strict_json', 'validate', 'writers'},
    'distribution': {'commit', 'writers'},
    'savedmodel': {'_tf_internals', 'paths'},
    'leases': {'commit', 'paths', 'strict_json', 'validate', 'writers'},
    'readers': {'commit', 'leases', 'paths', 'validate'},
    'fast_export': {'_tf_internals', 'bundle', 'commit', 'paths', 'savedmodel'},
    'housekeeping': {'commit', 'distribution', 'leases', 'paths', 'readers'},
    'decoupled': {'commit', 'fast_export', 'housekeeping', 'paths', 'readers',
                  'savedmodel', 'validate'},
    'best': {'commit', 'housekeeping', 'leases', 'paths', 'readers',
             'strict_json', 'validate'},
    'evaluation': {'best', 'commit', 'leases', 'paths', 'readers',
                   'strict_json', 'validate'},
    'manager': {'_tf_internals', 'commit', 'distribution', 'fast_export',
                'housekeeping', 'leases', 'paths', 'readers', 'savedmodel',
                'validate'},
    'orbit_actions': {'best', 'commit', 'housekeeping', 'paths', 'readers',
                      'savedmodel', 'validate'},
    'model_garden': {'manager', 'paths', 'readers', 'serving'},
    'serving': {'best', 'commit', 'leases', 'paths', 'readers', 'validate'},
    '__init__': {'best', 'evaluation', 'leases', 'manager', 'orbit_actions',
                 'paths', 'readers', 'serving'},
    # The command line: the top layer, a package of one module per subcommand.
    'cli._common': {'paths'},
    'cli._parsers': {'cli._common', 'paths'},
    'cli': {'cli._common', 'cli._parsers'},
    'cli.__main__': {'cli'},
    'cli._model_dir': {'cli._common', 'commit', 'leases'},
    'cli._command': {'cli._common'},
    'cli._watch_state': {'cli._common', 'cli._model_dir', 'commit', 'leases',
                         'readers', 'strict_json', 'validate'},
    'cli.ls': {'cli._common', 'cli._model_dir', 'commit', 'leases', 'paths'},
    'cli.verify': {'cli._common', 'cli._model_dir', 'commit', 'leases',
                   'readers'},
    'cli.watch': {'cli._command', 'cli._common', 'cli._model_dir',
                  'cli._watch_state', 'commit', 'leases', 'paths', 'readers'},
    'cli.export': {'cli._common', 'cli._model_dir', 'decoupled'},
    'cli.serve': {'cli._common', 'cli._model_dir', 'serving'},
}


def _modules():
  """(module name relative to the package, source path) of every module."""
  for source in sorted(PACKAGE.rglob('*.py')):
    parts = source.relative_to(PACKAGE).with_suffix('').parts
    if parts[-1] == '__init__' and len(parts) > 1:
      parts = parts[:-1]
    yield '.'.join(parts), source


def test_import_loads_neither_orbit_nor_model_garden_nor_keras():
  code = ('import sys, ckpt_export; '
          'print(sorted(m for m in ("orbit", "official", "tf_keras") '
          'if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, cwd=PACKAGE.parent,
                       env={'TF_CPP_MIN_LOG_LEVEL': '3', 'PATH': ''})
  assert out.stdout.strip() == '[]'


def test_modules_import_only_lower_layers():
  found = {}
  for name, source in _modules():
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
      if not isinstance(node, ast.ImportFrom):
        continue
      assert not node.level, f'{source}: a relative import'
      if node.module == 'ckpt_export':
        imported |= {alias.name for alias in node.names}
      elif node.module == 'ckpt_export.cli':  # Its modules, or `cli` itself.
        imported |= {f'cli.{alias.name}'
                     if (PACKAGE / 'cli' / f'{alias.name}.py').exists()
                     else 'cli' for alias in node.names}
      elif (node.module or '').startswith('ckpt_export.'):
        imported.add(node.module.split('.', 1)[1])
    found[name] = imported
  assert found == ALLOWED


def test_modules_parse_as_the_oldest_python_allowed():
  # pyproject.toml allows Python 3.9 (TensorFlow 2.18's oldest wheel); only
  # 3.11 runs here, so at least the grammar of 3.9 is checked.
  for _, source in _modules():
    ast.parse(source.read_text(), str(source), feature_version=(3, 9))


def test_the_wheel_lists_every_subpackage():
  """setuptools' `packages` must name each package directory, or the built
  wheel (not an editable install) lacks it: `ckpt-export` failed to import
  `ckpt_export.cli` in CI's wheel legs when it did."""
  with open(PACKAGE.parent / 'pyproject.toml', 'rb') as f:
    listed = tomllib.load(f)['tool']['setuptools']['packages']
  found = ['.'.join(('ckpt_export',) + p.parent.relative_to(PACKAGE).parts)
           for p in PACKAGE.rglob('__init__.py')]
  assert sorted(listed) == sorted(found)
