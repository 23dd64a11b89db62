"""Two processes × 4 CPU devices under ``jax.distributed`` equal one device.

``tests/multiprocess_worker.py`` runs as two child processes that call
``jax.distributed.initialize`` on localhost (gloo CPU collectives) and
shard the parameters FSDP-style over all 8 devices, so that no process
addresses every device. For each optimizer, plain and with
``distribute=mesh``, the parameters after three jitted steps equal the
single-device steps of this process within 1e-5 of each leaf's largest
entry, and the orbax checkpoint of the first optimizer's parameters and
state that both processes wrote restores in this single process. The
children run under a hard timeout: a hang is a failure.

Every named optimizer runs both ways in the default suite. Plain steps on
FSDP-sharded parameters used to leave XLA's partitioner collectives inside
loops (the Newton–Schulz and subspace iterations) and refresh conditionals,
which XLA:CPU orders against the top-level collectives by a scheduling
edge only, so two processes could issue them to gloo in different orders
and deadlock (seen once with plain ``muon_lite``, once with plain
``soap``). With several processes on XLA:CPU the engine now gathers each
matrix before its kernel (``engine.gathers_plain_kernels``), so the
children assert that no collective of any compiled step sits in a loop or
a branch, and plain steps equal one device's arithmetic. See
docs/multi_device.md.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_lite as ol

import multiprocess_worker as worker
from optimizer_zoo import NAMED, make

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_children(names, out_dir, timeout_s):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(HERE), os.environ.get('PYTHONPATH', '')]))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'multiprocess_worker.py'),
       str(port), str(i), str(NUM_PROCESSES), str(out_dir), *names],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(NUM_PROCESSES)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout_s)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f'the {NUM_PROCESSES} processes did not finish within '
                f'{timeout_s} s (a hang)')
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]


def _one_device(name):
  params, grads = worker.host_arrays()
  tx = make(name)
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for g in grads:
    params, state = step(params, state, g)
  return [np.asarray(x) for x in jax.tree.leaves(params)], state


def _close(got, ref):
  assert len(got) == len(ref)
  for a, b in zip(got, ref):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    if not np.issubdtype(b.dtype, np.floating):  # counts, flags: exact
      np.testing.assert_array_equal(a, b)
      continue
    err = np.max(np.abs(a - b), initial=0.0) / max(
        np.max(np.abs(b), initial=0.0), 1e-30)
    assert err <= 1e-5, err


def _check(names, tmp_path, timeout_s):
  _run_children(names, tmp_path, timeout_s)
  for k, (name, variants) in enumerate(worker.parse_runs(names)):
    ref, ref_state = _one_device(name)
    for variant in variants:
      with np.load(tmp_path / f'{name}-{variant}.npz') as f:
        got = [f[f'arr_{i}'] for i in range(len(f.files))]
      _close(got, ref)
      with open(tmp_path / f'{name}-{variant}.json') as f:
        layout = json.load(f)
      # One compile for every step, the state back in its init shardings,
      # no collective inside control flow.
      assert layout == {'compiles': 1, 'moved_leaves': 0,
                        'nested_collectives': 0}, (name, variant, layout)
    if k == 0:
      _restores_on_one_device(tmp_path, ref, ref_state)
    if name == worker.PORTABLE_NAME and 'distribute' in variants:
      _portable_restores_on_one_device(tmp_path, name, ref_state)


def _restores_on_one_device(tmp_path, ref, ref_state):
  """The orbax checkpoint the 2 processes wrote, restored in this one."""
  params, _ = worker.host_arrays()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
      {'params': params, 'state': ref_state})
  ckptr = ocp.StandardCheckpointer()
  restored = ckptr.restore(tmp_path / worker.CHECKPOINT, abstract)
  ckptr.close()
  _close(jax.tree.leaves(restored['params']), ref)
  _close(jax.tree.leaves(restored['state']), jax.tree.leaves(ref_state))


def _portable_restores_on_one_device(tmp_path, name, ref_state):
  """The portable state the 2 processes wrote from owner-resident stacks
  (``distribute=`` over 8 devices), placed for one device without
  ``distribute``: the one-device state."""
  params, _ = worker.host_arrays()
  tx = make(name)
  like = ol.portable_state(tx, jax.eval_shape(tx.init, params), params)
  ckptr = ocp.StandardCheckpointer()
  restored = ckptr.restore(tmp_path / worker.PORTABLE, like)
  ckptr.close()
  state = ol.place_state(tx, restored, params)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  _close(jax.tree.leaves(state), jax.tree.leaves(ref_state))


# A hang fails the test through the children's timeout and the watchdog.
@pytest.mark.timeout(900)
def test_two_processes_equal_one_device(tmp_path):
  _check(NAMED, tmp_path, timeout_s=840)
