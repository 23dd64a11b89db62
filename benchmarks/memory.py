"""Optimizer temporaries and state per parameter byte, from XLA's buffers.

For every named optimizer of optax_lite and ``optax.adamw`` /
``optax.contrib.muon``, on abstract LLaMA-shaped trees (nothing is
allocated: parameters are ``jax.ShapeDtypeStruct``s and the state comes from
``jax.eval_shape(tx.init, params)``), compiles one update
``jax.jit(tx.update).lower(grads, state, params).compile()`` and reads

* ``temp``: ``memory_analysis().temp_size_in_bytes``, XLA's buffer
  assignment for the update's temporaries;
* ``state``: the bytes of the optimizer state;

each divided by the parameter bytes. ``one_device``: one CPU device.
``distribute8``: 8 host devices, FSDP parameters (first axis split when
divisible by 8), ``distribute=`` the mesh; the compiled figures are per
device, divided by the per-device parameter bytes (total / 8). Each
optax_lite optimizer runs at its default ``memory_budget``, at
``memory_budget=None`` (one kernel call per shape, the behaviour before the
budget) and at ``memory_budget=0`` (one matrix at a time).

Writes ``benchmarks/results/memory_cpu.json``; ``benchmarks/report.py``
turns it into the memory table of ``docs/benchmarks.md``.

  python benchmarks/memory.py              # three sizes, up to ~1B params
  python benchmarks/memory.py --quick      # two small trees
  python benchmarks/memory.py --models M --modes one_device
  python benchmarks/memory.py --scheduler memory   # XLA:CPU memory scheduler

Rows of earlier runs with other settings (models, modes, scheduler) stay in
the results file; a run replaces the rows it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host_devices  # noqa: F401,E402  (8 CPU devices before JAX starts)

# XLA:CPU's default scheduler optimises for concurrency and runs independent
# per-leaf work side by side; ``--scheduler memory`` measures under its
# memory-minimising scheduler instead (an XLA flag, read when JAX starts).
SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def _scheduler(argv) -> str:
  """``--scheduler`` from the command line (read before JAX starts)."""
  for k, a in enumerate(argv):
    if a.startswith('--scheduler='):
      return a.split('=', 1)[1]
    if a == '--scheduler' and k + 1 < len(argv):
      return argv[k + 1]
  return 'concurrency'


SCHEDULER = _scheduler(sys.argv)
if SCHEDULER == 'memory':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                             + SCHEDULER_FLAG)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import optax_lite as ol  # noqa: E402
from _common import (OL_OPTIMIZERS, metadata, progress, registry,  # noqa: E402
                     result_path, write_json)

# (d_model, depth, d_ff, vocab): LLaMA-shaped (q, k, v, o, gate, up, down,
# two norms per layer; untied embedding and head).
MODELS = {
    'S': (512, 8, 1408, 8192),       # ~33M
    'M': (1024, 8, 2816, 8192),      # ~120M (issue 24's tree)
    'L': (2048, 16, 5632, 32000),    # ~0.94B
}
QUICK_MODELS = {
    'xs': (128, 4, 352, 1024),
    'S': MODELS['S'],
}
BUDGETS = {'default': {}, 'none': {'memory_budget': None},
           'smallest': {'memory_budget': 0}}
MODES = ('one_device', 'distribute8')


def llama_tree(d, depth, d_ff, vocab, dtype=jnp.float32):
  """Abstract LLaMA-shaped parameters (paths that ``label_params`` reads)."""
  f = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
  tree = {'embed': {'embedding': f(vocab, d)}, 'final_norm': {'scale': f(d)},
          'head': {'kernel': f(d, vocab)}}
  for i in range(depth):
    tree[f'layer_{i}'] = {
        'attn_norm': {'scale': f(d)}, 'mlp_norm': {'scale': f(d)},
        'attn': {n: {'kernel': f(d, d)} for n in ('q', 'k', 'v', 'o')},
        'mlp': {'gate': {'kernel': f(d, d_ff)}, 'up': {'kernel': f(d, d_ff)},
                'down': {'kernel': f(d_ff, d)}}}
  return tree


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def fsdp(params, mesh):
  """The abstract parameters with FSDP shardings (first axis over 8)."""
  def put(x):
    parts = [None] * len(x.shape)
    if len(x.shape) >= 2 and x.shape[0] % mesh.size == 0:
      parts[0] = 'fsdp'
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, P(*parts)))
  return jax.tree.map(put, params)


def measure(tx, params, mesh=None) -> dict:
  """Temp and state bytes of one compiled update (per device with mesh)."""
  state = jax.eval_shape(tx.init, params)
  state_b = tree_bytes(state)
  if mesh is not None:
    shardings = ol.state_shardings(state, params, mesh)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=sh), state, shardings)
  t0 = time.process_time()
  compiled = jax.jit(tx.update).lower(params, state, params).compile()
  secs = time.process_time() - t0
  mem = compiled.memory_analysis()
  return {'temp_bytes': int(mem.temp_size_in_bytes), 'state_bytes': state_b,
          'compile_cpu_s': secs}


def plan(args):
  names = ['adamw', 'optax_muon'] + list(OL_OPTIMIZERS)
  if args.optimizers:
    names = args.optimizers.split(',')
  models = QUICK_MODELS if args.quick else MODELS
  if args.models:
    models = {m: {**MODELS, **QUICK_MODELS}[m]
              for m in args.models.split(',')}
  modes = args.modes.split(',') if args.modes else MODES
  jobs = []
  for mode in modes:
    for model in models:
      for name in names:
        if mode == 'distribute8' and name in ('adamw', 'optax_muon'):
          budgets = ['default']  # no distribute= (plain SPMD)
        else:
          budgets = (['default'] if name in ('adamw', 'optax_muon')
                     else list(BUDGETS))
        if args.budgets:
          budgets = [b for b in budgets if b in args.budgets.split(',')
                     or name in ('adamw', 'optax_muon')]
        jobs += [(mode, model, name, b) for b in budgets]
  return models, jobs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='two small trees (xs, S) instead of S, M, L')
  ap.add_argument('--models', default='', help='comma list of ' +
                  ', '.join({**MODELS, **QUICK_MODELS}))
  ap.add_argument('--modes', default='', help='comma list of ' +
                  ', '.join(MODES))
  ap.add_argument('--optimizers', default='')
  ap.add_argument('--budgets', default='',
                  help='comma list of default, none, smallest (all)')
  ap.add_argument('--out', default=None, help='results directory')
  ap.add_argument('--scheduler', default='concurrency',
                  choices=('concurrency', 'memory'),
                  help='XLA:CPU scheduler: the default (concurrency) or the '
                  'memory-minimising one (%s)' % SCHEDULER_FLAG)
  args = ap.parse_args(argv)
  models, jobs = plan(args)
  reg = registry(sorted({j[2] for j in jobs}))
  mesh = None
  if any(j[0] == 'distribute8' for j in jobs):
    devices = jax.devices()
    if len(devices) < 8:
      raise SystemExit('distribute8 needs 8 devices (XLA_FLAGS=--xla_force_'
                       'host_platform_device_count=8)')
    mesh = Mesh(np.asarray(devices[:8]), ('fsdp',))
  trees = {m: llama_tree(*cfg) for m, cfg in models.items()}
  path = result_path('memory', args.out, quick=args.quick)
  old = {}
  if os.path.exists(path):  # runs with other settings keep their rows
    with open(path) as f:
      old = json.load(f)
  old_rows = old.get('rows', [])
  key = lambda r: (r['mode'], r['model'], r['optimizer'], r['budget'],  # noqa: E731
                   r.get('scheduler', 'concurrency'))
  new_keys = {(mode, model, name, b, args.scheduler)
              for mode, model, name, b in jobs}
  out = {'meta': metadata(args), 'models': dict(old.get('models', {})),
         'rows': [r for r in old_rows if key(r) not in new_keys]}
  for m, cfg in models.items():
    out['models'][m] = {
        'd_model': cfg[0], 'depth': cfg[1], 'd_ff': cfg[2], 'vocab': cfg[3],
        'n_params': sum(math.prod(x.shape)
                        for x in jax.tree.leaves(trees[m])),
        'param_bytes': tree_bytes(trees[m])}
  for mode, model, name, budget in progress(jobs, desc='memory'):
    params = trees[model]
    kw = dict(BUDGETS[budget])
    devices = 1
    if mode == 'distribute8':
      params, devices = fsdp(params, mesh), 8
      if name not in ('adamw', 'optax_muon'):
        kw['distribute'] = mesh
    tx = reg[name](1e-3, **kw)
    res = measure(tx, params, mesh if mode == 'distribute8' else None)
    pb = out['models'][model]['param_bytes']
    row = {'optimizer': name, 'model': model, 'mode': mode,
           'budget': budget, 'scheduler': args.scheduler, **res,
           'temp_per_param': res['temp_bytes'] / (pb / devices),
           'state_per_param': res['state_bytes'] / pb}
    out['rows'].append(row)
    print(f'{mode:12s} {model:3s} {name:12s} {budget:9s} temp '
          f'{row["temp_per_param"]:6.2f}x  state {row["state_per_param"]:5.2f}x'
          f'  ({res["compile_cpu_s"]:.0f}s)', flush=True)
    write_json(path, out)  # after every row: a partial run keeps its rows
  return out


if __name__ == '__main__':
  main()
