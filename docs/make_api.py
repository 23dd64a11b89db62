"""Writes the API pages (autosummary directives) from optax_lite's names.

Called by ``docs/conf.py`` at the start of every Sphinx build, so the pages
follow the code: a new public name appears without a regeneration step.
The pages go to ``docs/api/`` (not committed; see ``.gitignore``). Each page
lists only optax_lite's own objects: a name a module merely imports
(``typing.Any``, jax's ``Mesh``) is left out.

    python docs/make_api.py     # write docs/api/ (the build does this)
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import re
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_ADDRESS = re.compile(r' at 0x[0-9a-fA-F]+')
OUT = pathlib.Path(__file__).resolve().parent / 'api'

# (page, module, title, what it holds). The top level first, then what each
# module has beyond the top level.
PAGES = (
    ('optax_lite', 'optax_lite', '`optax_lite` (`import optax_lite as ol`)',
     'The names of `optax_lite.__all__`, grouped by the layer that defines '
     'them.'),
    ('optimizers', 'optax_lite.optimizers', '`optax_lite.optimizers`',
     'Named optimizers: chains of transforms, AdamW for the non-matrix '
     'leaves (beyond the top level).'),
    ('transforms', 'optax_lite.transforms', '`optax_lite.transforms`',
     'GradientTransformations and their states, beyond those at the top '
     'level.'),
    ('linalg', 'optax_lite.linalg', '`optax_lite.linalg`',
     'Pure matrix functions (no optax), beyond those at the top level.'),
    ('distributed', 'optax_lite.linalg.distributed',
     '`optax_lite.linalg.distributed`',
     'Multi-device helpers, beyond those at the top level.'),
    ('engine', 'optax_lite.linalg.engine', '`optax_lite.linalg.engine`',
     'The matrix engine: where a per-matrix kernel runs (one device, '
     'stacked, owner-computes, owner-resident).'),
    ('resident', 'optax_lite.linalg.resident',
     '`optax_lite.linalg.resident`',
     'Owner-resident state and its layout (static metadata), what '
     '`portable_state` / `place_state` move between placements.'),
    ('matmul', 'optax_lite.linalg.matmul', '`optax_lite.linalg.matmul`',
     'The one entry point of every matrix product and its precision policy.'),
    ('labels', 'optax_lite.labels', '`optax_lite.labels`',
     'Which leaves are matrices, and how an N-D leaf is one.'),
    ('testing', 'optax_lite.testing', '`optax_lite.testing`',
     'Test utilities.'),
)
# Groups of the top-level page: the layer a name is defined in.
LAYERS = (('optax_lite.labels', 'Labels'),
          ('optax_lite.optimizers', 'Named optimizers'),
          ('optax_lite.transforms', 'Transforms'),
          ('optax_lite.linalg', 'Matrix functions (linalg)'))


def own(module, name: str) -> bool:
  """Whether ``module.name`` is optax_lite's, not a name it imports."""
  obj = getattr(module, name)
  if inspect.ismodule(obj):
    return False
  home = getattr(obj, '__module__', None)
  if inspect.isclass(obj) or inspect.isfunction(obj) or callable(obj):
    return bool(home) and home.startswith('optax_lite')
  # A constant: documented where it is defined (not a re-export).
  return module.__name__ != 'optax_lite' and name.isupper()


def public(module) -> list[str]:
  """The public names ``module`` defines or re-exports from optax_lite."""
  names = getattr(module, '__all__', None)
  if names is None:
    names = [n for n in vars(module) if not n.startswith('_')]
  return sorted(n for n in names if not n.startswith('_') and
                n != 'annotations' and own(module, n))


def page_names() -> dict[str, list[str]]:
  """Page -> the names it documents (each name on one page only)."""
  top = importlib.import_module('optax_lite')
  seen = {id(getattr(top, n)) for n in top.__all__}
  out = {'optax_lite': sorted(top.__all__)}
  for page, mod_name, _, _ in PAGES[1:]:
    module = importlib.import_module(mod_name)
    names = []
    for n in public(module):
      obj = getattr(module, n)
      if id(obj) not in seen:
        seen.add(id(obj))
        names.append(n)
    out[page] = names
  return out


def _layer(obj) -> str:
  home = getattr(obj, '__module__', '') or ''
  for prefix, title in LAYERS:
    if home.startswith(prefix):
      return title
  return 'Other'


def _constant(obj) -> bool:
  return not (inspect.isclass(obj) or callable(obj))


def _autosummary(module: str, names: list[str]) -> list[str]:
  """Functions and classes: a summary table, a page each."""
  mod = importlib.import_module(module)
  objs = [n for n in names if not _constant(getattr(mod, n))]
  consts = [n for n in names if _constant(getattr(mod, n))]
  lines = []
  if objs:
    lines += (['```{eval-rst}', f'.. currentmodule:: {module}', '',
               '.. autosummary::', '   :toctree: generated', '']
              + [f'   {n}' for n in objs] + ['```', ''])
  if consts:
    # A constant's docstring would be its type's (dict, tuple): show the
    # value instead.
    lines += ['Constants:', '']
    for n in consts:
      value = _ADDRESS.sub('', repr(getattr(mod, n)))
      lines += [f'`{module}.{n}`', f': `{value}`', '']
  return lines


def render() -> dict[str, str]:
  """File name -> text of every API page (index included)."""
  top = importlib.import_module('optax_lite')
  names = page_names()
  files = {}
  for page, mod_name, title, blurb in PAGES:
    if not names[page]:
      continue
    lines = [f'# {title}', '', blurb, '']
    if page == 'optax_lite':
      titles = [t for _, t in LAYERS] + ['Other']
      for t in titles:
        group = [n for n in names[page] if _layer(getattr(top, n)) == t]
        if group:
          lines += [f'## {t}', ''] + _autosummary(mod_name, group)
    else:
      lines += _autosummary(mod_name, names[page])
    files[f'{page}.md'] = '\n'.join(lines)
  toc = '\n'.join(p[:-3] for p in files)
  files['index.md'] = (
      '# API reference\n\nGenerated from the docstrings (the math and the '
      'references are there). `import optax_lite as ol`: the top-level '
      'page lists every name of `ol.__all__`; the module pages add what '
      'each module has beyond it.\n\n'
      f'```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n')
  return files


def write(out: pathlib.Path = OUT) -> list[pathlib.Path]:
  """Writes the pages, leaving unchanged files alone (keeps builds fast)."""
  out.mkdir(parents=True, exist_ok=True)
  pages = render()
  # autosummary's stubs of names no longer listed would be orphans.
  listed = set()
  for text in pages.values():
    module = None
    for line in text.splitlines():
      if line.startswith('.. currentmodule:: '):
        module = line.split()[-1]
      elif line.startswith('   ') and module and line.strip().isidentifier():
        listed.add(f'{module}.{line.strip()}.rst')
  for stub in (out / 'generated').glob('*.rst'):
    if stub.name not in listed:
      stub.unlink()
  written = []
  for name, text in pages.items():
    path = out / name
    if not path.exists() or path.read_text() != text:
      path.write_text(text)
    written.append(path)
  return written


if __name__ == '__main__':
  sys.path.insert(0, str(OUT.parent.parent))
  for p in write():
    print(f'wrote {p}')
