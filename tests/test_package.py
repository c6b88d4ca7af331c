"""The package's shape: cheap to import, and layered."""

import ast
import pathlib
import subprocess
import sys

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
    'export': {'_tf_internals', 'paths'},
    'leases': {'commit', 'paths', 'strict_json', 'validate', 'writers'},
    'readers': {'commit', 'leases', 'paths', 'validate'},
    'fast_export': {'_tf_internals', 'bundle', 'commit', 'export', 'paths'},
    'housekeeping': {'commit', 'distribution', 'leases', 'paths', 'readers'},
    'exporter': {'commit', 'export', 'fast_export', 'housekeeping', 'paths',
                 'readers', 'validate'},
    'best': {'commit', 'housekeeping', 'leases', 'paths', 'readers',
             'strict_json', 'validate'},
    'evaluation': {'best', 'commit', 'leases', 'paths', 'readers',
                   'strict_json', 'validate'},
    'best_action': {'best', 'commit', 'paths', 'validate'},
    'manager': {'_tf_internals', 'commit', 'distribution', 'export',
                'fast_export', 'housekeeping', 'leases', 'paths', 'readers',
                'validate'},
    'orbit_actions': {'commit', 'export', 'housekeeping', 'paths', 'readers',
                      'validate'},
    'model_garden': {'manager', 'paths', 'readers', 'serving'},
    'serving': {'best', 'commit', 'leases', 'paths', 'readers', 'validate'},
    '__init__': {'best', 'best_action', 'evaluation', 'leases', 'manager',
                 'paths', 'readers', 'serving'},
    'cli': {'commit', 'exporter', 'leases', 'paths', 'readers', 'serving'},
}


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
  for source in PACKAGE.glob('*.py'):
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == 'ckpt_export':
        imported |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
          'ckpt_export.'):
        imported.add(node.module.split('.')[1])
    found[source.stem] = imported
  assert found == ALLOWED


def test_modules_parse_as_the_oldest_python_allowed():
  # pyproject.toml allows Python 3.9 (TensorFlow 2.18's oldest wheel); only
  # 3.11 runs here, so at least the grammar of 3.9 is checked.
  for source in PACKAGE.glob('*.py'):
    ast.parse(source.read_text(), str(source), feature_version=(3, 9))
