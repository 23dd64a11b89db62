"""Behaviour unchanged, proved: every named optimizer against its recording.

``tests/fixtures/behaviour_{one,distribute8}.npz`` hold what each optimizer
of ``optimizer_zoo.NAMED`` did over 12 steps on a small model-shaped tree
(``tests/behaviour_recording.py`` says what and how), on one device and with
``distribute=`` on 8 host devices. These tests run the current code the same
way and compare:

* ``test_bit_identical_one_device``: every step's update bytes and the final
  parameters' bytes are identical to the recording;
* ``test_within_1e_6``: every step's update norms and projections within
  1e-6 of the update's norm, the final parameters within 1e-6 of their
  largest magnitude (per leaf); the message says whether the bytes differ;
* ``test_state_within_1e_6``: the final state, as a multiset of pieces that
  renamed fields and a different stacking of owner-resident state leave
  unchanged, and a per-dtype element fingerprint, within 1e-6. A state that
  gains or loses pieces fails with the shapes and counts that differ;
* ``test_distribute8_within_1e_6`` (multidevice): all of the above within
  1e-6 with ``distribute=``; bytes that differ are a warning.

The recording holds this machine's bits: compiled for another CPU (XLA's
``--xla_cpu_max_isa=AVX2`` instead of this machine's AVX-512), 9 of the 12
optimizers are not bit-identical and the Muon-family and LITE updates move
by up to a few 1e-6 (6.3e-6 the largest measured), so ``test_within_1e_6``
sits at the float32 round-off of 12 Newton–Schulz-based steps. A failure
message lists the largest differences first.

A failure means the behaviour changed. Re-record (``python
tests/behaviour_recording.py``) only for a change of behaviour that is
intended and explained, never to make these tests pass.
"""

import warnings

import numpy as np
import pytest

import behaviour_recording as br
from optimizer_zoo import NAMED

RTOL = 1e-6
SHOWN = 12  # differences listed in a failure message


@pytest.fixture(scope='module')
def recording_one():
  return br.load('one')


@pytest.fixture(scope='module')
def recording_distribute8():
  return br.load('distribute8')


class _Run(tuple):
  """``(name, recorded, current, paths)``, shown by name in tracebacks."""

  def __repr__(self):
    return f'<run of {self[0]}>'


@pytest.fixture(scope='module', params=NAMED)
def one_device(request, recording_one):
  """One single-device run per optimizer, shared by its three tests."""
  name = request.param
  records, paths = recording_one
  assert name in records, (
      f'{name} is in NAMED but not in behaviour_one.npz: record it '
      '(tests/behaviour_recording.py) in the commit that adds it')
  return _Run((name, records[name], br.run(name, 'one'), paths))


def _same_tree(paths):
  current = br.leaf_paths(br.init_params())
  assert current == paths, (
      'the test tree changed since the recording: '
      f'{sorted(set(current) ^ set(paths))}')


def _report(name, what, problems, bits):
  shown = '\n  '.join(problems[:SHOWN])
  more = (f'\n  ... and {len(problems) - SHOWN} more'
          if len(problems) > SHOWN else '')
  identity = ('; not bit-identical: ' + '; '.join(bits) if bits
              else '; bytes identical')
  return (f'{name}: {len(problems)} {what} differ from the recording by '
          f'more than {RTOL:g}{identity}:\n  {shown}{more}')


def test_bit_identical_one_device(one_device):
  name, recorded, current, paths = one_device
  _same_tree(paths)
  bits = br.bit_differences(recorded, current)
  close = br.close_differences(recorded, current, paths, RTOL)
  assert not bits, (
      f'{name} is not bit-identical to its recording: {"; ".join(bits)} '
      f'({"also" if close else "but"} {len(close)} differences beyond '
      f'{RTOL:g}: see test_within_1e_6)')


def test_within_1e_6(one_device):
  name, recorded, current, paths = one_device
  _same_tree(paths)
  problems = br.close_differences(recorded, current, paths, RTOL)
  assert not problems, _report(name, 'updates or parameters', problems,
                               br.bit_differences(recorded, current))


def test_state_within_1e_6(one_device):
  name, recorded, current, _ = one_device
  problems = br.state_differences(recorded, current, RTOL)
  assert not problems, _report(name, 'state pieces', problems,
                               br.bit_differences(recorded, current))


def test_state_comparison_ignores_names_stacking_and_padding():
  """Pieces of a state compare equal however they are named and stacked,
  and a changed value is found."""
  rng = np.random.default_rng(0)
  a, b, v = (rng.standard_normal(s).astype(np.float32)
             for s in ((3, 3), (3, 3), (5,)))
  per_leaf = {'mu': {'x': a[None], 'y': b[None]}, 'lam': v[None],
              'count': np.int32(12), 'owned': np.zeros((), np.int32)}
  stacked = {'count': np.int32(12), 'slots': {
      'm': np.stack([np.zeros_like(a), b, np.zeros_like(a), a]),
      'lam': v}}
  summary = br.summarise_state(per_leaf)
  assert br.state_differences(summary, br.summarise_state(stacked),
                              RTOL) == []
  stacked['slots']['m'][3, 0, 0] += 1e-3
  assert br.state_differences(summary, br.summarise_state(stacked), RTOL)


@pytest.mark.multidevice
@pytest.mark.parametrize('name', NAMED)
def test_distribute8_within_1e_6(name, recording_distribute8,
                                 record_property):
  """``distribute=`` on 8 host devices, FSDP placement, jitted update."""
  records, paths = recording_distribute8
  assert name in records, f'{name} is not in behaviour_distribute8.npz'
  _same_tree(paths)
  recorded, current = records[name], br.run(name, 'distribute8')
  bits = br.bit_differences(recorded, current)
  record_property('bit_identical', not bits)
  problems = br.close_differences(recorded, current, paths, RTOL)
  assert not problems, _report(name, 'updates or parameters', problems, bits)
  problems = br.state_differences(recorded, current, RTOL)
  assert not problems, _report(name, 'state pieces', problems, bits)
  if bits:
    warnings.warn(f'{name} with distribute=: within {RTOL:g} of the '
                  f'recording but not bit-identical: {"; ".join(bits)}',
                  stacklevel=1)
