"""One of the processes of ``tests/test_multiprocess.py``.

Started as ``python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES
OUT_DIR NAME...``: 4 CPU devices per process, ``jax.distributed.initialize``
on ``localhost:PORT`` (CPU collectives: gloo), one mesh over every device of
every process, parameters FSDP-sharded on axis 0 over it. For each named
optimizer, plain and with ``distribute=mesh`` (``NAME@plain`` or
``NAME@distribute``: that one only), it takes ``STEPS`` jitted
steps and process 0 writes the gathered parameters to
``OUT_DIR/NAME-VARIANT.npz`` (leaves in ``jax.tree.leaves`` order) and
the step's compile count and moved state leaves to ``NAME-VARIANT.json``. The
first run's parameters and state are also saved with orbax by both
processes to ``OUT_DIR/checkpoint``, and ``soap@distribute``'s state (owner-
resident stacks) in its portable form to ``OUT_DIR/portable``.
"""

import json
import os
import sys
import time

LOCAL_DEVICES = 4
if __name__ == '__main__':  # before JAX starts; the test imports the trees
  # LOCAL_DEVICES host devices; the parent's other XLA flags stay (the
  # suite's fast compile: the one-device reference compiles the same way).
  os.environ['XLA_FLAGS'] = ' '.join(
      [f for f in os.environ.get('XLA_FLAGS', '').split()
       if not f.startswith('--xla_force_host_platform_device_count')]
      + [f'--xla_force_host_platform_device_count={LOCAL_DEVICES}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optax_lite as ol  # noqa: E402
from multidevice_worker import collectives_in_control_flow  # noqa: E402
from optimizer_zoo import make  # noqa: E402

STEPS = 3
CHECKPOINT = 'checkpoint'  # the first optimizer's plain params and state
# The owner-resident state of this optimizer with distribute=, saved in its
# portable form (ol.portable_state), restored on one device by the test.
PORTABLE_NAME, PORTABLE = 'soap', 'portable'


def tree_shapes() -> dict:
  """A 2-block model: FSDP-divisible matrices, a vector, an odd matrix."""
  shapes = {'embed': {'embedding': (32, 16)}, 'norm': {'scale': (16,)},
            'head': {'kernel': (16, 9)}}
  for i in range(2):
    shapes[f'block{i}'] = {'q': {'kernel': (16, 16)},
                           'up': {'kernel': (16, 40)},
                           'down': {'kernel': (40, 16)}}
  return shapes


def _conditioned(rng, shape, scale):
  """A random array whose matrix (leading axes × last) has its singular
  values spread over [0.5, 1.5]·scale·√max(m, n), like a Gaussian's bulk.

  A square Gaussian matrix has a singular value near zero now and then,
  and the first step of Shampoo and SOAP is close to its polar factor,
  which is ill-conditioned there: any two float32 summation orders (one
  device, or XLA's partitioned products over 8) then differ by far more
  than 1e-5 (3e-4 of the distance travelled on a 16 × 16 leaf, measured),
  whatever the placement. These gradients test the placement, not that
  conditioning.
  """
  if len(shape) < 2:
    return (rng.standard_normal(shape) * scale).astype(np.float32)
  m, n = int(np.prod(shape[:-1])), shape[-1]
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  s = rng.uniform(0.5, 1.5, k) * scale * np.sqrt(max(m, n))
  return ((u * s) @ v.T).reshape(shape).astype(np.float32)


def host_arrays(seed=0):
  """``(params, [grads per step])`` as NumPy trees, the same everywhere."""
  rng = np.random.default_rng(seed)
  make_tree = lambda scale: jax.tree.map(
      lambda s: _conditioned(rng, s, scale), tree_shapes(),
      is_leaf=lambda x: isinstance(x, tuple))
  return make_tree(0.1), [make_tree(1.0) for _ in range(STEPS)]


def parse_runs(names):
  """``[(name, variants)]`` from ``NAME`` (plain and distribute) or
  ``NAME@VARIANT`` arguments."""
  runs = []
  for arg in names:
    name, _, only = arg.partition('@')
    runs.append((name, (only,) if only else ('plain', 'distribute')))
  return runs


def main(argv):
  port, pid, nproc, out_dir = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
  names = argv[4:]
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                             num_processes=nproc, process_id=pid)
  d = jax.device_count()
  assert d == nproc * LOCAL_DEVICES, jax.devices()
  mesh = Mesh(np.asarray(jax.devices()), ('fsdp',))

  def put(tree):
    def one(x):
      spec = P('fsdp') if x.ndim >= 2 and x.shape[0] % d == 0 else P()
      return jax.make_array_from_callback(
          x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])
    return jax.tree.map(one, tree)

  params0, grads = host_arrays()
  first = True
  for name, variants in parse_runs(names):
    for variant in variants:
      t0 = time.time()
      tx = (make(name) if variant == 'plain' else
            make(name, distribute=mesh))
      params = put(params0)
      state = ol.sharded_init(tx.init, params)

      @jax.jit
      def step(p, s, g, tx=tx):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      init_shardings = [getattr(x, 'sharding', None)
                        for x in jax.tree.leaves(state)]
      for g in grads:
        params, state = step(params, state, put(g))
      # Issue 27: the state is a fixed point of the update (one compile,
      # every leaf back with the sharding it started with).
      moved = sum(getattr(x, 'sharding', None) != s0 for x, s0 in
                  zip(jax.tree.leaves(state), init_shardings))
      # Every collective at the top level (none in a loop or a branch),
      # plain and distribute= alike: XLA:CPU issues those in one order.
      nested = collectives_in_control_flow(
          step.lower(params, state, put(grads[0])).compile().as_text())
      layout = {'compiles': step._cache_size(), 'moved_leaves': int(moved),
                'nested_collectives': nested}
      full = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
              for x in jax.tree.leaves(params)]
      if pid == 0:
        np.savez(os.path.join(out_dir, f'{name}-{variant}.npz'), *full)
        with open(os.path.join(out_dir, f'{name}-{variant}.json'), 'w') as f:
          json.dump(layout, f)
      if first:
        # Every process writes its shards; the test restores on 1 device.
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(out_dir, CHECKPOINT),
                   {'params': params, 'state': state})
        ckptr.wait_until_finished()
        ckptr.close()
        first = False
      if (name, variant) == (PORTABLE_NAME, 'distribute'):
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(out_dir, PORTABLE),
                   ol.portable_state(tx, state, params))
        ckptr.wait_until_finished()
        ckptr.close()
      print(f'{pid} {name} {variant} {time.time() - t0:.1f}s', flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(sys.argv[1:])
