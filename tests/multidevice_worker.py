"""Steps one named optimizer with ``distribute=`` in a process of its own.

XLA:CPU aborts the whole process when a collective's rendezvous times out
(``Termination timeout ... only 4 of them arrived``), and a deadlock with no
collective in flight never returns. ``tests/test_no_hang_multidevice.py``
therefore runs this script as a child with a hard timeout, so that either
becomes a test failure instead of killing or blocking pytest::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python tests/multidevice_worker.py soap issue odd deep
      python tests/multidevice_worker.py --plain-stacked soap issue

For each tree it prints one JSON line: the largest relative difference, per
step, between the updates on 8 devices (FSDP on axis 0 where divisible by 8,
``distribute=mesh``, ``ol.sharded_init`` as the docs show) and on one device.
"""

import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optax_lite as ol  # noqa: E402
from optimizer_zoo import make  # noqa: E402

D = 8


def _layer(d, ffn, gate):
  mlp = {'up': {'kernel': (d, ffn)}, 'down': {'kernel': (ffn, d)}}
  if gate:
    mlp['gate'] = {'kernel': (d, ffn)}
  return {'attn': {n: {'kernel': (d, d)} for n in 'qkvo'}, 'mlp': mlp}


def tree_shapes(tree: str) -> dict:
  """Leaf shapes of the named test tree."""
  if tree == 'issue':  # issue 23's 2-layer tree: 64-wide matrices aborted
    shapes = {'embed': {'embedding': (96, 64)}, 'norm': {'scale': (64,)}}
    for i in range(2):
      shapes[f'layers_{i}'] = _layer(64, 176, gate=False)
    return shapes
  if tree == 'odd':
    # Counts per shape not multiples of 8, odd shapes. (No square Gaussian
    # gradients: their smallest energies sit near SOAP's null_threshold,
    # where round-off decides whether a coordinate is frozen.)
    shapes = {'norm': {'scale': (9,)}, 'tall': {'kernel': (40, 24)},
              'head': {'kernel': (5, 12)}}
    for i in range(3):
      shapes[f'wide_{i}'] = {'kernel': (24, 40)}
    for i in range(5):
      shapes[f'mid_{i}'] = {'kernel': (16, 24)}
    for i in range(2):
      shapes[f'odd_{i}'] = {'kernel': (7, 9)}
    return shapes
  if tree == 'deep':  # the 6-layer d=256 FISMO tree that hung, at d=64
    shapes = {'norm': {'scale': (64,)}}
    for i in range(6):
      shapes[f'layers_{i}'] = _layer(64, 176, gate=True)
    return shapes
  raise ValueError(f'tree: unknown {tree!r}')


def _arrays(shapes, rng, scale):
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32),
      shapes, is_leaf=lambda x: isinstance(x, tuple))


def _worst(tree8, tree1) -> float:
  """Max over leaves of ``max|a − b| / max|b|`` (inf if not finite)."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(tree8), jax.tree.leaves(tree1)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
      return float('inf')
    worst = max(worst, float(np.max(np.abs(a - b)))
                / max(float(np.max(np.abs(b))), 1e-30))
  return worst


_COLLECTIVES = ('all-reduce', 'all-gather', 'all-to-all',
                'collective-permute', 'reduce-scatter')


def fsdp_mesh(n: int) -> Mesh:
  """The first ``n`` devices as a one-axis ``('fsdp',)`` mesh."""
  return Mesh(np.array(jax.devices()[:n]), ('fsdp',))


def put_fsdp(tree, mesh):
  """``tree`` on ``mesh``, FSDP on axis 0 where it divides (else
  replicated); on the first device when ``mesh`` is None."""
  if mesh is None:
    return jax.device_put(tree, jax.devices()[0])
  n = mesh.devices.size
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
      mesh, P('fsdp') if x.ndim >= 2 and x.shape[0] % n == 0 else P())),
      tree)


def collectives_in_control_flow(hlo: str) -> int:
  """How many collectives of a compiled program sit in a while body or a
  conditional branch (``hlo``: ``compiled.as_text()``).

  XLA:CPU orders a program's collectives by a *scheduling* edge only: a
  while or conditional thunk holding collectives counts as started once
  it is scheduled, so the top-level collective after it can be issued
  before the ones inside. With several processes (gloo) each process may
  then issue them in another order, and the processes deadlock (seen with
  plain FSDP SOAP and Muon-LITE: docs/multi_device.md). A step with none
  inside control flow has no such race.
  """
  comps, bodies, cur = {}, set(), None
  for line in hlo.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head:
      cur = comps.setdefault(head.group(1), [])
      continue
    if cur is None:
      continue
    cur.append(line)
    bodies.update(re.findall(r'body=%?([\w.\-]+)', line))
    bodies.update(re.findall(r'(?:true|false)_computation=%?([\w.\-]+)',
                             line))
    for group in re.findall(r'branch_computations=\{([^}]*)\}', line):
      bodies.update(x.strip().lstrip('%') for x in group.split(','))
  return sum(1 for c in bodies for line in comps.get(c, ())
             for k in _COLLECTIVES if re.search(rf' {k}(-start)?\(', line))


def _inputs(tree: str, steps: int):
  """The tree's parameters, ``steps`` gradients, the 8-device mesh and
  ``put`` (FSDP on axis 0 where divisible by 8, else replicated)."""
  rng = np.random.default_rng(3)
  shapes = tree_shapes(tree)
  p0 = _arrays(shapes, rng, 0.05)
  grads = [_arrays(shapes, rng, 1.0) for _ in range(steps)]
  mesh = Mesh(np.asarray(jax.devices()[:D]), ('fsdp',))
  put = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
      mesh, P('fsdp') if x.ndim >= 2 and x.shape[0] % D == 0 else P())), t)
  return p0, grads, mesh, put


def compare(name: str, tree: str, steps: int = 3,
            plain_stacked: bool = False) -> dict:
  """Per step: the parameters' and the updates' :func:`_worst` difference
  between 8 devices and one (leaf by leaf, the default). On 8 devices
  ``distribute=``, or with ``plain_stacked`` plain GSPMD (no
  ``distribute``) with ``stack_by_shape=True`` and no budget (each shape's
  matrices stacked in one call)."""
  p0, grads, mesh, put = _inputs(tree, steps)

  tx1 = make(name)
  p1, s1 = p0, tx1.init(p0)
  p8 = put(p0)
  if plain_stacked:
    tx8 = make(name, stack_by_shape=True, memory_budget=None)
    s8 = tx8.init(p8)
  else:
    tx8 = make(name, distribute=mesh)
    s8 = ol.sharded_init(tx8.init, p8)
  step1 = jax.jit(tx1.update)
  step8 = jax.jit(tx8.update).lower(put(grads[0]), s8, p8).compile()
  rel, rel_update = [], []
  for g in grads:
    u1, s1 = step1(g, s1, p1)
    u8, s8 = step8(put(g), s8, p8)
    p1 = optax.apply_updates(p1, u1)
    p8 = optax.apply_updates(p8, u8)
    rel.append(_worst(p8, p1))
    rel_update.append(_worst(u8, u1))
  return {'name': name, 'tree': tree, 'rel': rel, 'rel_update': rel_update,
          'nested_collectives': collectives_in_control_flow(step8.as_text()),
          'update_max': float(max(np.max(np.abs(np.asarray(u)))
                                  for u in jax.tree.leaves(u1)))}


def run_in_child(args, timeout_s):
  """Runs this worker with ``args`` in a child process on 8 host devices:
  ``(return code, JSON results, stderr)``. Raises ``TimeoutError`` (with
  the output so far) when it does not finish within ``timeout_s``: a hang,
  or an XLA abort that never returns."""
  here = os.path.dirname(os.path.abspath(__file__))
  # D host devices, and this process's other XLA flags (the suite's fast
  # compile, tests/conftest.py: the children compile like the parent).
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ,
             XLA_FLAGS=' '.join(
                 [f'--xla_force_host_platform_device_count={D}', *flags]),
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(
                 [os.path.dirname(here), os.environ.get('PYTHONPATH', '')]))
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                          env=env, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired as e:
    raise TimeoutError(f'no result within {timeout_s} s (a hang); output '
                       f'so far: {e.stdout!r}') from e
  results = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith('{')]
  return proc.returncode, results, proc.stderr


def main(argv):
  plain_stacked = bool(argv) and argv[0] == '--plain-stacked'
  if plain_stacked:
    argv = argv[1:]
  name, trees = argv[0], argv[1:]
  if len(jax.devices()) < D:
    raise SystemExit(f'needs {D} devices: set XLA_FLAGS='
                     f'--xla_force_host_platform_device_count={D}')
  for tree in trees:
    t0 = time.time()
    out = compare(name, tree, plain_stacked=plain_stacked)
    out['seconds'] = round(time.time() - t0, 1)
    print(json.dumps(out), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
