"""Project files: the API reference is fresh, __all__, license, dependencies."""

import ast
import importlib.util
import inspect
import pathlib
import re

import pytest

import optax_lite as ol

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _make_api():
  spec = importlib.util.spec_from_file_location('make_api',
                                                ROOT / 'docs' / 'make_api.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_reference_is_not_stale():
  text = _make_api().render()
  current = (ROOT / 'docs' / 'api.md').read_text()
  assert current == text, (
      'docs/api.md is stale (a docstring or signature changed): run '
      '`python docs/make_api.py` and commit docs/api.md.')


def test_api_reference_covers_every_public_name():
  text = (ROOT / 'docs' / 'api.md').read_text()
  for name in ol.__all__:
    assert f'### `ol.{name}`' in text, name
  assert '### `optax_lite.linalg.polar_svd`' in text


def test_all_lists_exactly_the_public_top_level_names():
  assert len(set(ol.__all__)) == len(ol.__all__), 'duplicates in __all__'
  for name in ol.__all__:
    assert hasattr(ol, name), name
  public = {n for n, v in vars(ol).items()
            if not n.startswith('_') and not inspect.ismodule(v)}
  assert public == set(ol.__all__)
  namespace = {}
  exec('from optax_lite import *', namespace)  # noqa: S102
  assert set(ol.__all__) <= set(namespace)


def _pyproject():
  tomllib = pytest.importorskip('tomllib')  # Python >= 3.11
  return tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_license_is_an_spdx_string_with_its_file():
  project = _pyproject()['project']
  assert project['license'] == 'Apache-2.0'  # not the deprecated table
  assert project['license-files'] == ['LICENSE']
  text = (ROOT / 'LICENSE').read_text()
  assert 'Apache License' in text and 'Version 2.0, January 2004' in text
  assert 'END OF TERMS AND CONDITIONS' in text
  requires = _pyproject()['build-system']['requires']
  assert any(re.fullmatch(r'setuptools>=(\d+).*', r) and
             int(re.fullmatch(r'setuptools>=(\d+).*', r).group(1)) >= 77
             for r in requires), requires


def _imported_top_modules(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name.split('.')[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split('.')[0])
  return names


def _dist_name(requirement: str) -> str:
  return re.split(r'[<>=!~\[; ]', requirement, maxsplit=1)[0].lower()


def test_runtime_dependencies_are_what_the_library_imports():
  imported = set()
  for path in (ROOT / 'optax_lite').rglob('*.py'):
    imported |= _imported_top_modules(path)
  assert 'flax' not in imported and 'chex' not in imported
  third_party = imported - {'optax_lite', '__future__'} - set(
      __import__('sys').stdlib_module_names)
  deps = {_dist_name(r) for r in _pyproject()['project']['dependencies']}
  assert third_party <= deps, third_party - deps
  assert deps - {'jaxlib'} == third_party  # jaxlib: the backend jax runs on
  extras = _pyproject()['project']['optional-dependencies']
  dev = {_dist_name(r) for r in extras['dev']}
  assert {'flax', 'chex'} <= dev  # ./run test installs .[dev]
  assert 'flax' in {_dist_name(r) for r in extras['flax']}
