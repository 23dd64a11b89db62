"""The examples run (a few steps each), so they cannot rot unnoticed.

``./run demo`` is checked by default; the two training examples, whose
patterns the README's NNX and Linen blocks also run, are ``slow``.
"""

import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(f'example_{name}',
                                                EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Linen modules are dataclasses
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # the README's NNX and Linen blocks run by default
@pytest.mark.parametrize('name', ['nnx_train', 'linen_train'])
def test_train_example_runs(name, capsys):
  _load(name).main(['--optimizers', 'muon', '--steps', '3', '--batch', '16'])
  assert 'muon' in capsys.readouterr().out


def test_demo_runs_and_writes_the_plot(tmp_path, capsys):
  _load('demo').main(['--steps', '3', '--eval-every', '1', '--batch', '16',
                      '--out', str(tmp_path)])
  out = capsys.readouterr().out
  assert 'peak lr' in out
  png = tmp_path / 'demo_loss.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
