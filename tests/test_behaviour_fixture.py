"""Behaviour unchanged, proved: every named optimizer against its recording.

``tests/fixtures/behaviour_{one,distribute8}.npz`` hold what each optimizer
of ``optimizer_zoo.NAMED`` did over 12 steps on a small model-shaped tree
(``tests/behaviour_recording.py`` says what and how), on one device and with
``distribute=`` on 8 host devices, and the machine that recorded them
(``behaviour_recording.machine()``: CPU, jaxlib, SciPy). These tests run the
current code the same way and compare:

* ``test_bit_identical_one_device``: every step's update bytes and the final
  parameters' bytes are identical to the recording;
* ``test_within_rtol``: every step's update norms and projections within
  ``rtol`` of the update's norm, the final parameters within ``rtol`` of
  their largest magnitude (per leaf); the message says whether the bytes
  differ;
* ``test_state_within_rtol``: the final state, as a multiset of pieces that
  renamed fields and a different stacking of owner-resident state leave
  unchanged, and a per-dtype element fingerprint, within ``rtol``. A state
  that gains or loses pieces fails with the shapes and counts that differ;
* ``test_distribute8_within_rtol`` (multidevice): all of the above within
  ``rtol`` with ``distribute=``; bytes that differ are a warning.

On the machine that recorded them, ``rtol`` is 1e-6 and the bytes must be
identical. Another CPU gives other bytes (XLA compiles for it; jaxlib's
LAPACK is SciPy's OpenBLAS, whose kernels are chosen per CPU), so there the
bit test is skipped with both machines named and ``rtol`` is
:data:`FOREIGN_RTOL`: emulating an AVX2 machine here
(``XLA_FLAGS=--xla_cpu_max_isa=AVX2 OPENBLAS_CORETYPE=Haswell``) moved the
Muon and RMNP families and FISMO by at most 6.3e-6, Shampoo by 5.1e-5, and
SOAP and SOAP-LITE by 1.8e-3: their step is Adam in an ``eigh`` basis, whose
columns with close eigenvalues turn by ``ε·λ_max / gap``, far more than the
round-off of the gradient. ``machine()`` counts those two settings as
another machine, so that emulation runs these comparisons as another CPU
would (37 passed, the 12 bit tests skipped). A failure message lists the
largest differences first.

A failure means the behaviour changed. Re-record (``python
tests/behaviour_recording.py``, on the machine CI runs on) for a change of
behaviour that is intended and explained, or for a new CI machine, never to
make these tests pass.
"""

import warnings

import numpy as np
import pytest

import behaviour_recording as br
from optimizer_zoo import NAMED

SAME_MACHINE = br.recorded_machine('one') == br.machine()
# Another machine's round-off (module docstring): about 5x what was measured.
FOREIGN_RTOL = {'soap': 1e-2, 'soap_lite': 1e-2, 'shampoo': 3e-4}
FOREIGN_RTOL_DEFAULT = 5e-5


def rtol_for(name: str) -> float:
  return 1e-6 if SAME_MACHINE else FOREIGN_RTOL.get(name,
                                                    FOREIGN_RTOL_DEFAULT)


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
  where = ('' if SAME_MACHINE else
           f' (recorded on {br.recorded_machine("one")}; this is '
           f'{br.machine()})')
  return (f'{name}: {len(problems)} {what} differ from the recording by '
          f'more than {rtol_for(name):g}{identity}{where}:\n  {shown}{more}')


def test_bit_identical_one_device(one_device):
  name, recorded, current, paths = one_device
  _same_tree(paths)
  if not SAME_MACHINE:
    pytest.skip(f'bytes compare only on the machine that recorded them '
                f'({br.recorded_machine("one")}); this is {br.machine()}: '
                'test_within_rtol compares the values')
  bits = br.bit_differences(recorded, current)
  close = br.close_differences(recorded, current, paths, rtol_for(name))
  assert not bits, (
      f'{name} is not bit-identical to its recording: {"; ".join(bits)} '
      f'({"also" if close else "but"} {len(close)} differences beyond '
      f'{rtol_for(name):g}: see test_within_rtol)')


def test_within_rtol(one_device):
  name, recorded, current, paths = one_device
  _same_tree(paths)
  problems = br.close_differences(recorded, current, paths, rtol_for(name))
  assert not problems, _report(name, 'updates or parameters', problems,
                               br.bit_differences(recorded, current))


def test_state_within_rtol(one_device):
  name, recorded, current, _ = one_device
  problems = br.state_differences(recorded, current, rtol_for(name))
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
                              1e-6) == []
  stacked['slots']['m'][3, 0, 0] += 1e-3
  assert br.state_differences(summary, br.summarise_state(stacked), 1e-6)


@pytest.mark.multidevice
@pytest.mark.parametrize('name', NAMED)
def test_distribute8_within_rtol(name, recording_distribute8,
                                 record_property):
  """``distribute=`` on 8 host devices, FSDP placement, jitted update."""
  records, paths = recording_distribute8
  assert name in records, f'{name} is not in behaviour_distribute8.npz'
  _same_tree(paths)
  recorded, current = records[name], br.run(name, 'distribute8')
  bits = br.bit_differences(recorded, current)
  record_property('bit_identical', not bits)
  rtol = rtol_for(name)
  problems = br.close_differences(recorded, current, paths, rtol)
  assert not problems, _report(name, 'updates or parameters', problems, bits)
  problems = br.state_differences(recorded, current, rtol)
  assert not problems, _report(name, 'state pieces', problems, bits)
  if bits:
    warnings.warn(f'{name} with distribute=: within {rtol:g} of the '
                  f'recording but not bit-identical: {"; ".join(bits)}',
                  stacklevel=1)
