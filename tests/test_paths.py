"""Pure naming and parsing of export paths."""

import pathlib

import pytest

from ckpt_export import paths


@pytest.mark.parametrize('path, step', [
    ('/m/ckpt-5_saved_modules', 5),
    ('/m/ckpt-5_saved_modules/', 5),
    ('/m/ckpt-5_saved_modules//', 5),
    ('ckpt-0_saved_modules', 0),
    ('gs://bucket/dir/ckpt-123_saved_modules', 123),
    ('gs://bucket/dir/ckpt-123_saved_modules/', 123),
    ('ram://x/ckpt-7_saved_modules', 7),
    (pathlib.PurePosixPath('/m/ckpt-9_saved_modules'), 9),
])
def test_parses_export_steps(path, step):
  assert paths.parse_export_step(path) == step
  assert paths.parse_export_step(path, 'ckpt') == step


@pytest.mark.parametrize('path', [
    '', '/', 'ckpt', 'ckpt-5', 'ckpt-_saved_modules', '-5_saved_modules',
    'ckpt-5_saved_modules_temp', '.ckpt-5_saved_modules.tmp-1-2-h-0123abcd',
    'ckpt-5_saved_modules.tmp-1-2-h-0123abcd',
    'ckpt-5_saved_modules/model_1',
    'ckpt-05_saved_modules', 'ckpt-5.0_saved_modules', 'ckpt-٣_saved_modules',
    'ckpt-5_saved_modules\n', 'ckpt-5 _saved_modules', '12', '\0',
])
def test_never_raises_and_rejects_non_exports(path):
  assert paths.parse_export_step(path) is None


@pytest.mark.parametrize('name', [
    'ckpt', 'model.ckpt', 'ckpt-v2', 'ckpt[1]', 'ck*pt?', 'ckpt_saved_modules',
    'my ckpt', 'ckpt-5', 'モデル', '(a|b)+', '.hidden',
])
def test_any_legal_checkpoint_name_round_trips(name):
  for step in (0, 1, 42, 10**12):
    base = paths.export_basename(name, step)
    assert paths.parse_export_step(base, name) == step
    assert paths.parse_export_step('gs://b/d/' + base + '/', name) == step
    assert paths.parse_checkpoint_step(f'/d/{name}-{step}', name) == step


def test_checkpoint_name_must_match_exactly():
  assert paths.parse_export_step('/d/ckpt-5_saved_modules', 'ckp') is None
  assert paths.parse_export_step('/d/xckpt-5_saved_modules', 'ckpt') is None
  assert paths.parse_export_step('/d/ckpt-v2-5_saved_modules', 'ckpt') is None
  assert paths.parse_export_step('/d/ckpt-v2-5_saved_modules', 'ckpt-v2') == 5
  # A negative step is a checkpoint named 'ckpt-', never step -5 of 'ckpt'.
  assert paths.parse_export_step('/d/ckpt--5_saved_modules', 'ckpt') is None
  assert paths.parse_export_step('/d/ckpt--5_saved_modules', 'ckpt-') == 5


def test_reference_spelling_of_directory_names():
  assert paths.SAVED_MODULES_PATH_SUFFIX == 'saved_modules'
  assert (paths.make_saved_modules_directory_name('/d/ckpt-3') ==
          '/d/ckpt-3_saved_modules')
  assert paths.export_path('gs://b/d/', 'ckpt', 3) == 'gs://b/d/ckpt-3_saved_modules'
  assert paths.export_path('gs://b/d', 'ckpt', 3) == 'gs://b/d/ckpt-3_saved_modules'


@pytest.mark.parametrize('bad', ['', '.', '..', 'a/b', '/a', 'a\\b', 'a\0b', None, 3])
def test_validate_component_names_the_bad_value(bad):
  with pytest.raises(ValueError, match='module name') as info:
    paths.validate_component('module name', bad)
  assert repr(bad) in str(info.value)


@pytest.mark.parametrize('path, local', [
    ('/m/ckpt-5_saved_modules', '/m/ckpt-5_saved_modules'),
    ('relative/dir', 'relative/dir'),
    (pathlib.PurePosixPath('/m'), '/m'),
    ('file:///m/ckpt-5_saved_modules', '/m/ckpt-5_saved_modules'),
    ('gs://bucket/m', None), ('s3://bucket/m', None), ('ram://m', None),
    ('hdfs://nn/m', None)])
def test_local_path_is_the_one_test_of_local_versus_remote(path, local):
  assert paths.local_path(path) == local
