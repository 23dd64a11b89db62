"""The package's shape (issue 22): layers, imports, sizes.

* Layers: ``optax_lite.linalg`` imports nothing of ``transforms`` or
  ``optimizers``, ``transforms`` nothing of ``optimizers`` (the top-level
  ``optax_lite/__init__.py``, ``labels``, ``testing`` and ``_checks`` sit
  beside them: ``_checks`` imports no other optax_lite module).
* No ``import`` inside a function body of ``optax_lite/`` (a cycle worked
  around, or a hidden dependency).
* Function length: at most ``MAX_FUNCTION_LINES`` code lines (lines holding
  code, the docstring excluded, nested functions included), as optax keeps
  its longest around 110; module length at most ``MAX_MODULE_LINES``.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'optax_lite'
LAYERS = ('linalg', 'transforms', 'optimizers')
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 700


def _modules():
  return sorted(PACKAGE.rglob('*.py'))


def _layer(module_name: str) -> int | None:
  parts = module_name.split('.')
  if len(parts) > 1 and parts[0] == 'optax_lite' and parts[1] in LAYERS:
    return LAYERS.index(parts[1])
  return None


def _imports(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node, node.module
      for alias in node.names:  # ``from optax_lite import transforms``
        yield node, f'{node.module}.{alias.name}'


def _name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix('')
  return '.'.join(rel.parts)


@pytest.mark.parametrize('path', _modules(), ids=lambda p: _name(p))
def test_layer_rule(path):
  here = _layer(_name(path))
  tree = ast.parse(path.read_text())
  for node, target in _imports(tree):
    there = _layer(target)
    if here is not None and there is not None:
      assert there <= here, (
          f'{_name(path)}:{node.lineno} imports {target}: '
          f'{LAYERS[here]} may import only {LAYERS[:here + 1]}')
    if _name(path) == 'optax_lite._checks':
      assert not target.startswith('optax_lite'), (node.lineno, target)


@pytest.mark.parametrize('path', _modules(), ids=lambda p: _name(p))
def test_no_import_inside_a_function(path):
  tree = ast.parse(path.read_text())
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        assert not isinstance(node, (ast.Import, ast.ImportFrom)), (
            f'{_name(path)}:{node.lineno}: import inside {fn.name}()')


def _code_lines(fn) -> int:
  body = fn.body
  if (body and isinstance(body[0], ast.Expr)
      and isinstance(body[0].value, ast.Constant)):
    body = body[1:]
  lines = set()
  for stmt in body:
    for node in ast.walk(stmt):
      if hasattr(node, 'lineno'):
        lines.add(node.lineno)
  return len(lines)


def _long_functions():
  out = []
  for path in _modules():
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = _code_lines(fn)
        if n > MAX_FUNCTION_LINES:
          out.append(f'{_name(path)}.{fn.name}: {n}')
  return out


def test_function_length():
  assert not _long_functions()


def test_module_length():
  large = {_name(p) for p in _modules()
           if len(p.read_text().splitlines()) > MAX_MODULE_LINES}
  assert not large, large


def test_the_checks_see_a_violation(tmp_path):
  """The AST rules flag what they should (a test that can fail)."""
  src = ('def f():\n  import os\n' + ''.join(
      f'  x{i} = {i}\n' for i in range(MAX_FUNCTION_LINES + 1)))
  tree = ast.parse(src)
  fn = tree.body[0]
  assert _code_lines(fn) == MAX_FUNCTION_LINES + 2
  assert any(isinstance(n, ast.Import) for n in ast.walk(fn))
  assert _layer('optax_lite.optimizers.muon') > _layer(
      'optax_lite.linalg.polar')
