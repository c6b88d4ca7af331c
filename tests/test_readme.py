"""README.md's examples run as written, and its commands parse.

Conventions (a snippet is documentation first, so the test adapts to it):

- Every ```python block runs, in README order, in this process, in a fresh
  temporary working directory, with a deadline (`SNIPPET_SECONDS`).
- A snippet imports every module it uses. Any other name it uses without
  defining it (`model`, `model_dir`, `trainer`, ...) is a *given*: the fixture
  of this file with that name supplies it, small: `model` is a 4-wide
  `helpers.Scale`, `model_dir` holds the checkpoints and exports of steps
  `STEPS` of `model` (module `classifier`) and a best export of the last one
  (metric `accuracy`), `trainer` is an orbit trainer that only counts steps
  (so `train_steps=10000` takes no time). A snippet that trains a Model Garden
  task gets an empty `model_dir` instead: it writes its own. A name that no
  fixture supplies fails the test (define it in the snippet, or add a
  fixture); nothing is skipped silently. Snippets that need orbit or Model
  Garden skip where those are not installed, as the other tests that need
  them do.
- `...` is a statement standing for the user's code: it runs, doing nothing.
- Waits run on a fake clock (`ckpt_export.readers`' `time`, as in
  test_readers.py), so a snippet's `timeout=600` takes no real time.
- ```sh blocks: every `ckpt-export` command must parse: its subcommand and
  each option it passes appear in `ckpt-export SUBCOMMAND --help`. The first
  two commands (install and main job; the test suite) must be what `.ci/run`
  runs. Commands of other programs (the user's `train.py`, Model Garden's
  runner, `tensorflow_model_server`) are not run here; test_examples.py and
  test_model_garden_example.py run the examples.
"""

import ast
import builtins
import os
import re
import shlex
import subprocess
from typing import List, NamedTuple, Set

import pytest
import tensorflow as tf

import ckpt_export
from ckpt_export import readers
from helpers import child_env
from helpers import CKPT_EXPORT
from helpers import FakeClock
from helpers import make_manager
from helpers import mock_params
from helpers import N_FEATURES
from helpers import REPO
from helpers import save_step
from helpers import Scale

README = os.path.join(REPO, 'README.md')
SNIPPET_SECONDS = 600
STEPS = (100, 200)  # The steps `model_dir` holds exports of.


class Snippet(NamedTuple):
  line: int  # Of its first line of code in README.md.
  source: str
  free: Set[str]  # The names it uses without defining them.


def _blocks(language: str) -> List[Snippet]:
  """README.md's ```<language> blocks."""
  with open(README) as f:
    text = f.read()
  blocks = []
  for match in re.finditer(rf'^```{language}\n(.*?)^```$', text, re.M | re.S):
    line = text.count('\n', 0, match.start(1)) + 1
    blocks.append(Snippet(line, match.group(1), set()))
  return blocks


def _free_names(source: str) -> Set[str]:
  """The names `source` uses but neither binds nor imports (nor builtins)."""
  bound, used = set(dir(builtins)), set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Name):
      (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound.update((a.asname or a.name).split('.')[0] for a in node.names)
  return used - bound


PYTHON = [s._replace(free=_free_names(s.source)) for s in _blocks('python')]


def test_the_readme_has_python_snippets():
  assert len(PYTHON) >= 8, [s.line for s in PYTHON]


@pytest.fixture(autouse=True)
def _in_a_temporary_directory_on_a_fake_clock(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(readers, 'time', FakeClock())


@pytest.mark.timeout(SNIPPET_SECONDS)
@pytest.mark.parametrize('snippet', PYTHON, ids=lambda s: f'line{s.line}')
def test_python_snippet_runs_as_written(request, snippet):
  given = {}
  for name in sorted(snippet.free):
    try:
      given[name] = request.getfixturevalue(name)
    except pytest.FixtureLookupError:
      pytest.fail(f'README.md line {snippet.line}: the snippet uses {name!r}, '
                  'which it does not define and no fixture of '
                  'test_readme.py supplies')
  code = compile(snippet.source, f'README.md:{snippet.line}', 'exec')
  exec(code, {'__name__': '__readme__', **given})  # pylint: disable=exec-used


# The givens.


@pytest.fixture
def model() -> Scale:
  return Scale()


@pytest.fixture
def optimizer():
  # tf_keras's, as orbit and Model Garden jobs use: TensorFlow's async
  # checkpointing fails on a Keras 3 optimizer's variables (a tf.Variable made
  # inside its tf.function, at the second save; TF 2.20, Keras 3.15).
  tf_keras = pytest.importorskip('tf_keras')
  return tf_keras.optimizers.SGD(0.1)


@pytest.fixture
def global_step() -> tf.Variable:
  return tf.Variable(0, dtype=tf.int64)


@pytest.fixture
def step() -> int:
  return STEPS[-1] + 1


@pytest.fixture
def model_dir(request, tmp_path, model, optimizer) -> str:
  """Exports of STEPS (and the best, of the last) or, for Model Garden, new."""
  directory = str(tmp_path / 'model')
  if 'task' in request.node.callspec.params['snippet'].free:
    return directory
  manager = make_manager(
      directory, model, 3, module_name='classifier',
      checkpoint=tf.train.Checkpoint(model=model, optimizer=optimizer))
  for number in STEPS:
    save_step(manager, model, number)
  with ckpt_export.BestExport(directory, 'accuracy') as best:
    best.update(STEPS[-1], manager.latest_savedmodel, {'accuracy': 0.5})
  return directory


@pytest.fixture
def trainer(global_step):
  """An orbit trainer that only counts steps."""
  orbit = pytest.importorskip('orbit')

  class CountingTrainer(orbit.AbstractTrainer):

    def __init__(self):
      self.global_step = global_step

    def train(self, num_steps):
      self.global_step.assign_add(tf.cast(num_steps, tf.int64))
      return {'loss': 0.0}

  return CountingTrainer()


@pytest.fixture
def evaluator(model):
  """An orbit evaluator returning the `accuracy` of `model` (its weight)."""
  orbit = pytest.importorskip('orbit')

  class Evaluator(orbit.AbstractEvaluator):

    def evaluate(self, num_steps):
      del num_steps  # One look is enough.
      return {'accuracy': float(model.w[0]) / 1000}

  return Evaluator()


@pytest.fixture
def manager(model_dir, model, optimizer, global_step):
  """An orbit job's manager: saves (and exports) every 100 steps."""
  return make_manager(
      model_dir, model, 3, module_name='classifier',
      checkpoint=tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     global_step=global_step),
      step_counter=global_step, checkpoint_interval=100)


@pytest.fixture
def best(model_dir):
  """The orbit action's best export (a sidecar's is `best_export`)."""
  with ckpt_export.BestExport(model_dir, 'accuracy',
                              directory_name='orbit_best_export') as best:
    yield best


@pytest.fixture
def evaluate():
  """The user's evaluation of a loaded `model`: metrics from what it serves."""

  def evaluate_classifier(classifier) -> dict:
    out = classifier.signatures['serving_default'](tf.ones([1, N_FEATURES]))
    served = float(list(out.values())[0][0, 0])
    return {'accuracy': served / 1000, 'loss': 1 - served / 1000}

  return evaluate_classifier


@pytest.fixture
def train_steps() -> int:
  return STEPS[-1] + 200


@pytest.fixture
def eval_interval() -> int:
  return 100


@pytest.fixture
def eval_steps() -> int:
  return 1


@pytest.fixture
def params():
  """A small Model Garden experiment: the mock task, 4 steps."""
  pytest.importorskip('official', reason='needs Model Garden')
  return mock_params(train_steps=4)


@pytest.fixture
def task(params, model_dir):
  from official.core import task_factory  # pylint: disable=g-import-not-at-top
  return task_factory.get_task(params.task, logging_dir=model_dir)


@pytest.fixture
def strategy():
  return tf.distribute.get_strategy()


# Commands.


def _commands() -> List[List[str]]:
  """The commands of README.md's ```sh blocks, each as its words."""
  commands = []
  for block in _blocks('sh'):
    for line in block.source.replace('\\\n', ' ').splitlines():
      words = shlex.split(line, comments=True)
      if words:
        commands.append(words)
  return commands


def test_the_first_two_commands_are_what_ci_runs():
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci = f.read()
  install, tests = (block.source.strip() for block in _blocks('sh')[:2])
  *setup, run_job = install.split(' && ')
  assert run_job == '.venv/bin/python examples/run_job.py'  # test_examples.py
  for command in setup + [tests]:
    assert command in ci, command


def _ckpt_export_commands() -> List[List[str]]:
  return [words[1:] for words in _commands() if words[0] == 'ckpt-export']


def test_the_readme_shows_each_subcommand():
  shown = {words[0] for words in _ckpt_export_commands()}
  assert shown == {'ls', 'verify', 'watch', 'serve'}, shown


@pytest.fixture(scope='module')
def subcommand_help():
  """`ckpt-export SUBCOMMAND --help`'s output, by subcommand."""
  helps = {}

  def get(subcommand: str) -> str:
    if subcommand not in helps:
      result = subprocess.run([CKPT_EXPORT, subcommand, '--help'],
                              capture_output=True, text=True, timeout=300,
                              env=child_env(), check=False)
      assert result.returncode == 0, (subcommand, result.stderr[-2000:])
      helps[subcommand] = result.stdout
    return helps[subcommand]

  return get


@pytest.mark.parametrize('words', _ckpt_export_commands(),
                         ids=lambda words: ' '.join(words[:2]))
def test_ckpt_export_command_parses(words, subcommand_help):
  subcommand, *args = words
  options = []
  for arg in args:
    if arg == '--':  # Then the COMMAND watch runs.
      break
    if arg.startswith('-'):
      options.append(arg.split('=')[0])
  usage = subcommand_help(subcommand)
  for option in options:
    assert re.search(rf'(?<![\w-]){re.escape(option)}(?![\w-])', usage), (
        f'ckpt-export {subcommand} has no option {option}')
