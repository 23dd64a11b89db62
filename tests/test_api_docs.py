"""Project files: the API pages, __all__, license, dependencies, py.typed."""

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


_LISTED = re.compile(r'^   (\w+)$', re.M)


def _listed(text: str) -> list[str]:
  """The names of a page's autosummary tables."""
  return _LISTED.findall(text)


def test_api_pages_cover_every_public_name():
  pages = _make_api().render()
  assert set(_listed(pages['optax_lite.md'])) | {'LABELS'} == set(ol.__all__)
  assert '`optax_lite.LABELS`' in pages['optax_lite.md']  # a constant
  assert 'polar_svd' in _listed(pages['linalg.md'])
  for page in pages:
    if page != 'index.md':
      assert page[:-3] in pages['index.md'], page  # in the toctree


def test_api_pages_list_only_optax_lite_objects():
  """Not typing.Any, jax's Mesh or P, which the modules merely import."""
  api = _make_api()
  for page, module_name, _, _ in api.PAGES:
    text = api.render().get(f'{page}.md', '')
    module = importlib.import_module(module_name)
    for name in _listed(text):
      obj = getattr(module, name)
      assert obj.__module__.startswith('optax_lite'), (page, name)
  text = api.render()['distributed.md']
  for foreign in ('Any', 'Callable', 'NamedTuple', 'Sequence', 'Mesh',
                  'NamedSharding', 'P'):
    assert foreign not in _listed(text), foreign
    assert f'distributed.{foreign}`' not in text, foreign


def test_api_pages_document_each_object_once():
  names = []
  for text in _make_api().render().values():
    names += _listed(text)
  assert len(names) == len(set(names)), sorted(
      n for n in set(names) if names.count(n) > 1)


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


def test_dependencies_have_tested_minimums():
  """Every runtime and flax-extra requirement names a lower bound."""
  project = _pyproject()['project']
  for req in (project['dependencies'] +
              project['optional-dependencies']['flax']):
    assert '>=' in req, req
  floors = {_dist_name(r): r.split('>=')[1]
            for r in project['dependencies']}
  assert floors['jax'] == floors['jaxlib']  # released together


def test_package_is_typed():
  assert (ROOT / 'optax_lite' / 'py.typed').is_file()
  data = _pyproject()['tool']['setuptools']['package-data']
  assert 'py.typed' in data['optax_lite']
  assert 'sphinx' in {_dist_name(r) for r in
                      _pyproject()['project']['optional-dependencies']['docs']}
