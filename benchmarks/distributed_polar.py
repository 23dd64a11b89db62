"""What ``orthogonalize(shard_polar=...)`` saves on 8 (host) devices.

Compares, in one run and one process, the jitted ``orthogonalize`` update of
a stack of hidden matrices

* ``per_leaf``: the default, each leaf orthogonalised where it lives;
* ``shard_polar``: same-shape matrices stacked, the stack split over all 8
  devices (``optax_lite.PolarSharding(mesh)``), results gathered back;

for two parameter layouts:

* ``replicated`` (data parallelism: every device holds every matrix, so the
  default computes every polar factor 8 times);
* ``fsdp`` (each matrix sharded 4×2 over a 2-D mesh: the default runs every
  Newton–Schulz matmul as a distributed matmul with collectives).

Reports the wall time per update (median of repeats), the ratio, and the
per-device FLOPs of the compiled SPMD program from XLA's cost analysis
(device independent: it shows the work split even where host "devices"
share the same CPU cores, as they do here).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/distributed_polar.py [--quick]

Writes ``benchmarks/results/distributed_polar[_quick]_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_lite as ol
from _common import (RESULTS_DIR, device_slug, metadata, require_devices,
                     write_json)


def matrices(n_square, n_wide, d, key=0):
  ks = jax.random.split(jax.random.PRNGKey(key), n_square + n_wide)
  tree = {}
  for i in range(n_square):
    tree[f'sq{i}'] = jax.random.normal(ks[i], (d, d))
  for i in range(n_wide):
    tree[f'wide{i}'] = jax.random.normal(ks[n_square + i], (d, 4 * d))
  return tree


def flops(fn, *args):
  try:
    cost = fn.lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get('flops', float('nan')))
  except Exception:  # pragma: no cover - backend without cost analysis
    return float('nan')


def timed(fn, arg, repeats):
  jax.block_until_ready(fn(arg))  # compile + warm up
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(arg))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--out', default=None)
  args = ap.parse_args(argv)
  devices = require_devices(8)
  d, n_sq, n_wide, repeats = ((128, 8, 4, 3) if args.quick else
                              (256, 12, 6, 5))
  mats = matrices(n_sq, n_wide, d)
  mesh1 = Mesh(np.asarray(devices[:8]), ('data',))
  mesh2 = Mesh(np.asarray(devices[:8]).reshape(4, 2), ('data', 'model'))
  layouts = {
      'replicated': (mesh1, lambda x: NamedSharding(mesh1, P())),
      'fsdp': (mesh2, lambda x: NamedSharding(mesh2, P('data', 'model'))),
  }
  rows = []
  for layout, (mesh, spec) in layouts.items():
    g = jax.tree.map(lambda x, spec=spec: jax.device_put(x, spec(x)), mats)
    out_sh = jax.tree.map(lambda x: x.sharding, g)
    res = {}
    outs = {}
    for variant, sp in (('per_leaf', None), ('shard_polar', mesh)):
      tx = ol.orthogonalize(shard_polar=sp)
      fn = jax.jit(lambda u, tx=tx: tx.update(u, tx.init(u))[0],
                   out_shardings=out_sh)
      res[variant] = {'seconds': timed(fn, g, repeats),
                      'flops_per_device': flops(fn, g)}
      outs[variant] = fn(g)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(outs['per_leaf']), jax.tree.leaves(
            outs['shard_polar'])))
    row = {
        'layout': layout, 'mesh': dict(mesh.shape),
        'matrices': {f'{d}x{d}': n_sq, f'{d}x{4 * d}': n_wide},
        'per_leaf_s': res['per_leaf']['seconds'],
        'shard_polar_s': res['shard_polar']['seconds'],
        'speedup': res['per_leaf']['seconds'] / res['shard_polar']['seconds'],
        'per_leaf_flops_per_device': res['per_leaf']['flops_per_device'],
        'shard_polar_flops_per_device':
            res['shard_polar']['flops_per_device'],
        'flops_ratio': (res['per_leaf']['flops_per_device'] /
                        res['shard_polar']['flops_per_device']),
        'max_abs_diff': err,
    }
    rows.append(row)
    print(f'{layout:<11} per-leaf {row["per_leaf_s"] * 1e3:8.1f} ms   '
          f'shard_polar {row["shard_polar_s"] * 1e3:8.1f} ms   '
          f'speed-up {row["speedup"]:5.2f}x   flops/device ratio '
          f'{row["flops_ratio"]:5.2f}x   max|diff| {err:.1e}')
  stem = 'distributed_polar' + ('_quick' if args.quick else '')
  out = args.out or os.path.join(RESULTS_DIR, f'{stem}_{device_slug()}.json')
  write_json(out, {'meta': metadata(args), 'rows': rows,
                   'note': ('host devices share the machine\'s CPU cores, so '
                            'wall-time ratios measure removed redundant work; '
                            'flops_per_device is XLA\'s per-device count.')})


if __name__ == '__main__':
  main()
