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
  # As ``python examples/<name>.py`` does: the examples import their shared
  # ``teacher_student.py`` from beside them.
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
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


def test_nnx_qk_clip_example_clips_the_logits(capsys):
  """Muon + QK-clip in NNX: the clipped run's later max logits stay below
  the unclipped run's (threshold 3 is under the initial max logit, 4.2)."""
  res = _load('nnx_qk_clip').main(['--steps', '6', '--threshold', '3'])
  assert 'muon+qk_clip' in capsys.readouterr().out
  (loss_m, peak_m), (loss_c, peak_c) = res['muon'], res['muon+qk_clip']
  assert peak_m[0] == peak_c[0] > 3  # the same first forward pass
  assert max(peak_c[1:]) < max(peak_m[1:])
  assert loss_c[-1] < loss_c[0] and loss_m[-1] < loss_m[0]
