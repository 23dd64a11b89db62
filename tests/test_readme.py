"""Every ```python block of README.md and of the docs pages runs as is.

The docs pages are the Markdown sources of the Sphinx site under ``docs/``
(``docs/**/*.md``), not what the build generates (``docs/_build``, the API
pages ``docs/api``, the notebook copies ``docs/notebooks``).

Each block is executed on its own, in a fresh namespace, so a block must be a
complete program (imports included). Directives, an HTML comment on the line
just before the opening fence:

* ``<!-- test: multidevice -->``: run it in the 8-device process of
  ``./run test`` (marker ``multidevice``) instead of the single-device one;
* ``<!-- test: skip: REASON -->``: not run (a block that needs a cluster,
  e.g. ``jax.distributed.initialize()``); the reason is required.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_GENERATED = ('_build', 'api', 'notebooks')
FILES = [ROOT / 'README.md'] + sorted(
    p for p in (ROOT / 'docs').rglob('*.md')
    if p.relative_to(ROOT / 'docs').parts[0] not in _GENERATED)
_FENCE = re.compile(r'^```python\s*$')
_DIRECTIVE = re.compile(r'^<!--\s*test:\s*(multidevice|skip:\s*(.+?))\s*-->$')


def python_blocks(path: pathlib.Path):
  """``(first_line, code, directive, reason)`` of each ```python block."""
  lines = path.read_text().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    if _FENCE.match(lines[i]):
      start = i + 1
      j = start
      while j < len(lines) and lines[j].strip() != '```':
        j += 1
      if j == len(lines):
        raise ValueError(f'{path.name}:{i + 1}: unclosed ```python block')
      prev = lines[i - 1].strip() if i > 0 else ''
      m = _DIRECTIVE.match(prev)
      directive = reason = None
      if m:
        directive = 'skip' if m.group(2) else 'multidevice'
        reason = m.group(2)
      blocks.append((start + 1, '\n'.join(lines[start:j]) + '\n', directive,
                     reason))
      i = j
    i += 1
  return blocks


def _cases():
  cases = []
  for path in FILES:
    for line, code, directive, reason in python_blocks(path):
      rel = path.relative_to(ROOT)
      marks = []
      if directive == 'multidevice':
        marks.append(pytest.mark.multidevice)
      if directive == 'skip':
        marks.append(pytest.mark.skip(reason=f'{rel}:{line}: {reason}'))
      cases.append(pytest.param(str(rel), line, code, marks=marks,
                                id=f'{rel}:{line}'))
  return cases


def test_readme_has_python_blocks():
  """The extraction finds the README's examples (guards the regexes)."""
  blocks = python_blocks(ROOT / 'README.md')
  assert len(blocks) >= 3
  assert all(d is None for _, _, d, _ in blocks), 'README blocks all run'
  codes = [code for _, code, _, _ in blocks]
  # The three frameworks: NNX (quickstart), Linen, plain optax.chain.
  assert any('nnx.Optimizer(' in c and 'ol.muon(' in c for c in codes)
  assert any('train_state.TrainState' in c for c in codes)
  assert any('optax.chain(' in c and 'ol.muon_lite(' in c for c in codes)


def test_readme_is_short_and_links_the_docs():
  text = (ROOT / 'README.md').read_text()
  assert len(text.splitlines()) <= 400
  assert 'Which optimizer should I use?' in text
  assert 'git+https://' in text
  for page in re.findall(r'\]\((docs/[^)#]+)', text):
    assert (ROOT / page).is_file(), page


def test_docs_pages_are_collected():
  """The how-to recipes (and every other page's blocks) are executed."""
  names = {p.relative_to(ROOT).as_posix() for p in FILES}
  assert {'docs/howto.md', 'docs/multi_device.md'} <= names
  assert not any(n.startswith(('docs/_build', 'docs/api/')) for n in names)
  howto = [code for _, code, d, _ in python_blocks(ROOT / 'docs' / 'howto.md')
           if d is None]
  for recipe in ('ocp.StandardCheckpointer', 'optax.MultiSteps',
                 'inject_hyperparams', 'clip_by_global_norm', 'nnx.scan'):
    assert any(recipe in code for code in howto), recipe


def test_directives_are_parsed(tmp_path):
  doc = tmp_path / 'x.md'
  doc.write_text('<!-- test: skip: needs a pod -->\n```python\nboom\n```\n'
                 'text\n```python\nx = 1\n```\n'
                 '<!-- test: multidevice -->\n```python\ny = 2\n```\n')
  got = [(d, r, c) for _, c, d, r in python_blocks(doc)]
  assert got == [('skip', 'needs a pod', 'boom\n'), (None, None, 'x = 1\n'),
                 ('multidevice', None, 'y = 2\n')]


@pytest.mark.parametrize('rel,line,code', _cases())
def test_block_runs(rel, line, code, request):
  if request.node.get_closest_marker('multidevice'):
    import jax
    # As in test_multidevice.py: fewer devices is a failure, not a skip.
    assert jax.device_count() >= 8, (
        f'{rel}:{line} needs 8 devices: run it as ./run test does, with '
        'XLA_FLAGS=--xla_force_host_platform_device_count=8 -m multidevice')
  namespace = {'__name__': '__main__'}
  exec(compile(code, f'{rel}:{line}', 'exec'), namespace)  # noqa: S102
