"""Sphinx configuration of optax_lite's documentation (as optax's and flax's).

    ./run docs        # sphinx -W -b html docs docs/_build/html

Markdown pages through MyST, the notebooks through myst-nb without executing
them (``./run test`` executes them with nbmake), API pages generated from
the docstrings by ``docs/make_api.py`` at the start of every build.
"""

import os
import pathlib
import shutil
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import make_api  # noqa: E402

import optax_lite  # noqa: E402

make_api.write()


def _copy_notebooks():
  """notebooks/*.ipynb -> docs/notebooks/ (the source dir must hold them)."""
  out = DOCS / 'notebooks'
  out.mkdir(exist_ok=True)
  for nb in sorted((ROOT / 'notebooks').glob('*.ipynb')):
    target = out / nb.name
    if not target.exists() or target.read_bytes() != nb.read_bytes():
      shutil.copyfile(nb, target)


_copy_notebooks()

project = 'optax_lite'
author = 'optax_lite authors'
copyright = '2026, optax_lite authors'  # noqa: A001
release = optax_lite.__version__
version = release

extensions = [
    'myst_nb',  # MyST Markdown and notebooks (loads myst_parser)
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',  # Google-style Args:/Returns: docstrings
    'sphinx.ext.mathjax',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', 'README.md', 'notebooks/*.py',
                    '**/.ipynb_checkpoints']
master_doc = 'index'

# Notebooks are rendered as they are stored; nbmake runs them in the tests.
nb_execution_mode = 'off'
# dollarmath: $$ equations; deflist: the API pages' constants.
myst_enable_extensions = ['dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3

autosummary_generate = True
autodoc_default_options = {'members': False}
autodoc_typehints = 'signature'
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# 'a, b: text' stays one entry (the docstrings group arguments that share a
# description) instead of repeating the text under each name.
napoleon_use_param = False
add_module_names = False

html_theme = 'sphinx_book_theme'
html_title = f'optax_lite {release}'
# A collapsed sidebar (the current page's branch open) as optax's site has:
# the full tree of ~150 API pages rendered into every page took a third of
# the build (20 s -> 13.5 s).
html_theme_options = {'show_toc_level': 2, 'collapse_navbar': True}
html_static_path = []


def _join_wrapped_arg_names(app, what, name, obj, options, lines):
  """``a, b,\\n  c: text`` in an Args section -> ``a, b, c: text``.

  The docstrings group arguments that share a description, and a long group
  wraps; napoleon needs one entry's names on one line.
  """
  del app, what, name, obj, options
  in_args, i = False, 0
  while i < len(lines):
    line = lines[i]
    if line.strip() in ('Args:', 'Arguments:', 'Parameters:'):
      in_args = True
    elif line and not line.startswith(' '):
      in_args = False
    elif (in_args and line.startswith('  ') and not line.startswith('   ')
          and line.rstrip().endswith(',') and ':' not in line
          and i + 1 < len(lines)):
      lines[i] = line.rstrip() + ' ' + lines.pop(i + 1).strip()
      continue
    i += 1


def setup(app):
  # Before napoleon (priority 500) turns the sections into field lists.
  app.connect('autodoc-process-docstring', _join_wrapped_arg_names,
              priority=400)
