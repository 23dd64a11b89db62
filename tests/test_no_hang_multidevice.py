"""Every named optimizer with ``distribute=`` steps on 8 host devices.

Issue 23: on a 2-layer tree with 64-wide matrices, ``soap``, ``shampoo``,
``soap_lite`` and ``fismo`` with ``distribute=mesh`` aborted the process
(XLA:CPU's all-to-all rendezvous timed out with 4 of 8 devices arrived),
and ``fismo`` on a 6-layer tree hung. The cause and its fix are in
``docs/multi_device.md`` ("Why owners run LAPACK one matrix at a time").

Each optimizer runs in a child process (``tests/multidevice_worker.py``)
with a hard timeout, because XLA aborts the whole process after 40 s in a
rendezvous and a deadlock with no collective in flight never returns; here
either is a test failure. On every tree the parameters after each of three
steps on 8 devices (FSDP on axis 0 where divisible, ``ol.sharded_init``,
``jax.jit(tx.update)``) equal those on one device within 1e-5 of each
leaf's largest entry (Shampoo, FISMO-LITE: a few times that, their own
float32 round-off; see TOLERANCE).
"""

import json
import os
import subprocess
import sys

import pytest

from optimizer_zoo import NAMED

pytestmark = pytest.mark.multidevice

HERE = os.path.dirname(os.path.abspath(__file__))
# 'issue': issue 23's tree; 'odd': group sizes that are not multiples of 8
# and shapes with no axis divisible by 8; 'deep': the 6-layer tree on which
# fismo hung, at d=64 (same groups and per-device counts, smaller matrices).
TREES = {name: ['issue', 'odd'] for name in NAMED}
TREES['fismo'] = TREES['fismo_lite'] = ['issue', 'odd', 'deep']
CHILD_TIMEOUT_S = 420
# Where one device's float32 result is itself only that close to float64
# (measured on these trees with factors in float64): Shampoo's inverse
# fourth roots of one Gaussian 64x64 gradient's statistics, 9.9e-5 on the
# first update (8 devices vs one: 1.2e-5 .. 2.7e-5 on the parameters);
# FISMO-LITE on the 'odd' tree, 8.2e-6 on the parameters after two steps
# (8 vs one: 1.2e-5). Every other optimizer: 1e-5. Since Shampoo's
# round-off floor is 16 eps of the largest eigenvalue (was 1e-5), the
# eigenvalues just above it enter the inverse fourth root too, and the two
# summation orders differ by 1.2e-4 of the parameters on the 'issue' tree
# (6.8e-4 of the update; the same size as a batched vs a per-leaf eigh on
# one device, tests/test_flax.py).
TOLERANCE = {'shampoo': 3e-4, 'fismo_lite': 3e-5}


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize('name', NAMED)
def test_distribute_steps_and_equals_one_device(name):
  # 8 host devices, and this process's other XLA flags (OPTAX_LITE_FAST_
  # COMPILE's: the children's compiles were most of the multi-device run).
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ,
             XLA_FLAGS=' '.join(
                 ['--xla_force_host_platform_device_count=8', *flags]),
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(
                 [os.path.dirname(HERE), os.environ.get('PYTHONPATH', '')]))
  try:
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, 'multidevice_worker.py'), name,
         *TREES[name]], env=env, capture_output=True, text=True,
        timeout=CHILD_TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'{name}: no result within {CHILD_TIMEOUT_S} s (a hang); '
                f'output so far: {e.stdout!r}')
  results = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith('{')]
  assert proc.returncode == 0, (
      f'{name}: the child exited with {proc.returncode} after '
      f'{[r["tree"] for r in results]}:\n{proc.stderr[-3000:]}')
  assert [r['tree'] for r in results] == TREES[name]
  for r in results:
    assert len(r['rel']) == 3
    assert max(r['rel']) <= TOLERANCE.get(name, 1e-5), r
    assert r['update_max'] > 0, r   # the steps moved the parameters
