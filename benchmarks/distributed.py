"""Owner-computes (``distribute=``) vs plain GSPMD, read from compiled programs.

For each named optimizer, on 8 host devices, on three layouts of the LM
parameter trees of ``benchmarks/models.py``:

* ``fsdp``: every matrix split over 8 devices on its fan-in (first) axis;
* ``replicated``: data parallelism, every device holds everything;
* ``fsdp_tp``: a 4×2 mesh, fan-in over ``fsdp`` (4), fan-out over ``tp`` (2);

it compiles one jitted step (``tx.update`` + ``optax.apply_updates``, state
sharded like the parameters by ``optax_lite.sharded_init``, no
``out_shardings``: as a user jits it) twice: ``plain``
(the optimizer as is; XLA's SPMD partitioner decides) and ``distribute``
(``distribute=PolarSharding(mesh, layout=...)`` with ``layout="replicated"``
on the replicated layout, ``"sharded"`` otherwise, where the optimizer
accepts it), and reports

* collective bytes per device per step, from the compiled HLO: every
  all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute,
  counted with the trip counts of the while loops around it (result bytes;
  a reduce-scatter counts its input), and the number of such ops executed;
* per-device FLOPs from XLA's ``cost_analysis()`` against the single-device
  step's FLOPs / 8;
* the max abs difference of the updated parameters to the single-device
  step (float32);
* the per-step state re-layout: the state leaves the step returns with
  another sharding than they came in with (``state_relayout_leaves``: each
  one makes the next step compile again) and the collective bytes per
  device of moving them back (``state_relayout_bytes``); both must be 0.

``--compile`` also times ``jax.jit(tx.update)`` compilation for a 6- and a
24-layer version of the small tree (one device, ``distribute`` on the FSDP
layout, and one device with the layers stacked as ``nnx.scan`` stores them).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/distributed.py [--quick] [--compile] \\
      [--optimizers muon,rmnp] [--models small,medium]

Writes ``benchmarks/results/distributed[_quick]_<device>.json``. Host
devices share the CPU, so no wall time is reported: what is measured is
what the compiled program would move and compute on a real pod.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_lite as ol
import models
from _common import (RESULTS_DIR, device_slug, metadata, require_devices,
                     write_json)

NAMES = ('muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite',
         'soap_lite', 'rmnp_lite', 'fismo_lite')
LR = 1e-2
# Small settings so that every refresh branch is in the compiled step.
SMALL = {'precondition_frequency': 1, 'update_frequency': 1,
         'refresh_every': 1, 'frequency': 1}

_DTYPE_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4,
                's64': 8, 'u64': 8, 's8': 1, 'u8': 1, 'pred': 1, 's16': 2,
                'u16': 2}
_COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_SHAPE = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s('
                 + '|'.join(_COLLECTIVES) + r')(-start)?\(')


def _bytes(type_str: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(type_str):
    if dt not in _DTYPE_BYTES:
      continue
    n = 1
    for d in dims.split(','):
      if d:
        n *= int(d)
    total += n * _DTYPE_BYTES[dt]
  return total


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    m = re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if m and not line.startswith(' '):
      name = m.group(2)
      comps[name] = []
      if m.group(1):
        entry = name
      continue
    if line.startswith('}'):
      name = None
      continue
    if name is not None:
      comps[name].append(line)
  return comps, entry


def collectives(text: str) -> dict:
  """Collective ops executed per step and their bytes, from compiled HLO.

  Ops inside a while body count ``known_trip_count`` times (nested loops
  multiply); conditional branches count once each (an upper bound).
  """
  comps, entry = _computations(text)
  count = 0
  nbytes = 0
  by_op: dict[str, int] = {}

  def visit(name, mult, depth=0):
    nonlocal count, nbytes
    if name not in comps or depth > 50:
      return
    for line in comps[name]:
      m = _OP.match(line)
      if m:
        b = _bytes(m.group(1))
        if m.group(2) == 'reduce-scatter':
          g = re.search(r'replica_groups=\{\{([\d,]+)\}', line)
          b *= len(g.group(1).split(',')) if g else 1
        count += mult
        nbytes += mult * b
        by_op[m.group(2)] = by_op.get(m.group(2), 0) + mult
      wb = re.search(r'\bbody=%?([\w.\-]+)', line)
      if wb and ' while(' in line:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        visit(wb.group(1), mult * (int(trip.group(1)) if trip else 1),
              depth + 1)
        continue
      for key in ('to_apply', 'calls', 'true_computation',
                  'false_computation'):
        c = re.search(rf'\b{key}=%?([\w.\-]+)', line)
        if c and c.group(1) in comps:
          visit(c.group(1), mult, depth + 1)
      br = re.search(r'branch_computations=\{([^}]*)\}', line)
      if br:
        for c in br.group(1).split(','):
          visit(c.strip().lstrip('%'), mult, depth + 1)

  visit(entry, 1)
  return {'count': count, 'bytes': nbytes, 'by_op': by_op}


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def params_tree(name: str, depth: int | None = None):
  cfg = models.CONFIGS[name]
  if depth is not None:
    cfg = dataclasses.replace(cfg, depth=depth)
  state = nnx.state(models.make_model(cfg, 0), nnx.Param)
  return state.to_pure_dict()


def grads_like(params, key=1, scale=0.01):
  leaves, treedef = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.PRNGKey(key), len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(ks, leaves)])


def layouts(devices):
  m8 = Mesh(np.asarray(devices[:8]), ('fsdp',))
  m42 = Mesh(np.asarray(devices[:8]).reshape(4, 2), ('fsdp', 'tp'))

  def fsdp(x):
    spec = [None] * x.ndim
    if x.ndim >= 2 and x.shape[0] % 8 == 0:
      spec[0] = 'fsdp'
    return NamedSharding(m8, P(*spec))

  def replicated(x):
    return NamedSharding(m8, P())

  def fsdp_tp(x):
    spec = [None] * x.ndim
    if x.ndim >= 2 and x.shape[0] % 4 == 0:
      spec[0] = 'fsdp'
    if x.ndim >= 2 and x.shape[-1] % 2 == 0:
      spec[-1] = 'tp'
    return NamedSharding(m42, P(*spec))

  return {'fsdp': (m8, fsdp), 'replicated': (m8, replicated),
          'fsdp_tp': (m42, fsdp_tp)}


def accepts(fn, key):
  return key in inspect.signature(fn).parameters


def make(name, **kw):
  fn = getattr(ol, name)
  sig = inspect.signature(fn).parameters
  settings = {k: v for k, v in SMALL.items() if k in sig}
  settings.update(kw)
  return fn(LR, **settings)


def step_fn(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


def single_device(tx, params, grads):
  dev = jax.devices()[0]
  p = jax.device_put(params, dev)
  g = jax.device_put(grads, dev)
  s = jax.jit(tx.init)(p)
  fn = jax.jit(step_fn(tx))
  compiled = fn.lower(p, s, g).compile()
  out = compiled(p, s, g)[0]
  return {'flops': flops(compiled)}, out


def state_relayout(state, out_shardings) -> dict:
  """What it takes to put a step's output state back in its input layout.

  ``state``: the input state (committed arrays); ``out_shardings``: the
  shardings a compiled step gives the new state. Returns the number of
  leaves whose sharding differs (each one a new jit cache key: the next
  step compiles again) and the collective bytes per device of moving them
  back (a jitted identity with the input shardings, read from its HLO).
  """
  if jax.tree.structure(state) != jax.tree.structure(out_shardings):
    # Another tree: every step compiles again; no leaf-wise re-layout.
    return {'state_relayout_leaves': len(jax.tree.leaves(state)),
            'state_relayout_bytes': None, 'state_tree_changed': True}
  leaves, nbytes = 0, 0
  for x, out in zip(jax.tree.leaves(state), jax.tree.leaves(out_shardings)):
    if out == x.sharding:
      continue
    leaves += 1
    if out.is_equivalent_to(x.sharding, x.ndim):
      continue  # the same placement under another name: no bytes
    back = jax.jit(lambda y: y, out_shardings=x.sharding).lower(
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=out)).compile()
    nbytes += collectives(back.as_text())['bytes']
  return {'state_relayout_leaves': leaves, 'state_relayout_bytes': nbytes}


def sharded(tx, params, grads, mesh, spec, run=True):
  """One step as a user jits it (no ``out_shardings``; the state from
  ``sharded_init``): its collectives, flops and state re-layout."""
  shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, spec(x)), t)
  p, g = shard(params), shard(grads)
  s = ol.sharded_init(tx.init, p)
  compiled = jax.jit(step_fn(tx)).lower(p, s, g).compile()
  relayout = state_relayout(s, compiled.output_shardings[1])
  out = compiled(p, s, g)[0] if run else None
  col = collectives(compiled.as_text())
  return {'flops': flops(compiled), 'collective_bytes': col['bytes'],
          'collective_count': col['count'], 'collectives_by_op':
              col['by_op'], **relayout}, out


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) -
                                 np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_bytes(t):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))


def run_layouts(names, model_names, devices, log, only=None, run=True):
  rows = []
  lay = {k: v for k, v in layouts(devices).items()
         if only is None or k in only}
  for model in model_names:
    params = params_tree(model)
    grads = grads_like(params)
    pbytes = tree_bytes(params)
    for name in names:
      tx = make(name)
      ref_cost, ref_out = single_device(tx, params, grads)
      can = accepts(getattr(ol, name), 'distribute')
      for layout, (mesh, spec) in lay.items():
        row = {'model': model, 'optimizer': name, 'layout': layout,
               'mesh': dict(mesh.shape), 'param_bytes': pbytes,
               'single_device_flops': ref_cost['flops']}
        for variant in ('plain', 'distribute'):
          if variant == 'distribute' and not can:
            row[variant] = None
            continue
          t = tx if variant == 'plain' else make(
              name, distribute=ol.PolarSharding(
                  mesh, layout='replicated' if layout == 'replicated'
                  else 'sharded'))
          t0 = time.perf_counter()
          try:
            cost, out = sharded(t, params, grads, mesh, spec, run=run)
          except Exception as e:  # record, keep going
            row[variant] = {'error': f'{type(e).__name__}: {e}'[:300]}
            log(f'[error] {model} {name} {layout} {variant}: '
                f'{row[variant]["error"]}')
            continue
          cost['max_abs_diff'] = (None if out is None else
                                  max_diff(out, ref_out))
          cost['bytes_over_params'] = cost['collective_bytes'] / pbytes
          cost['flops_over_ideal'] = cost['flops'] / (ref_cost['flops'] / 8)
          cost['seconds_to_compile_and_run'] = time.perf_counter() - t0
          row[variant] = cost
          log(f'{model:<7} {name:<11} {layout:<10} {variant:<10} '
              f'bytes/params {cost["bytes_over_params"]:7.2f}  '
              f'collectives {cost["collective_count"]:5d}  '
              f'relayout {cost["state_relayout_leaves"]:3d} leaves '
              f'{cost["state_relayout_bytes"]} B  '
              f'flops/ideal {cost["flops_over_ideal"]:6.2f}  '
              + ('max|diff| not run' if out is None else
                 f'max|diff| {cost["max_abs_diff"]:.1e}'))
        rows.append(row)
  return rows


def scanned_tree(params):
  """``params`` with its per-layer blocks stacked as ``nnx.scan`` stores
  them: ``blocks/<i>/attn/q/kernel`` -> ``blocks/attn/q/kernel`` of shape
  ``(depth, …)``."""
  blocks = params['blocks']
  layers = [blocks[k] for k in sorted(blocks, key=int)]
  return dict(params, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


SCANNED = '^blocks/'  # the stacked= regex of scanned_tree's leaves


def shard_scanned(tree, mesh, stacked=SCANNED):
  """``tree`` FSDP-sharded over ``mesh``'s ``fsdp`` axis on the fan-in axis:
  the first axis, or the second for leaves whose path matches ``stacked``
  (behind their layer axis); matrices only, where it divides."""
  n = mesh.shape['fsdp']

  def put(path, x):
    k = 1 if re.search(stacked, ol.labels.path_str(path)) else 0
    parts = [None] * x.ndim
    if x.ndim - k >= 2 and x.shape[k] % n == 0:
      parts[k] = 'fsdp'
    return jax.device_put(x, NamedSharding(mesh, P(*parts)))
  return jax.tree_util.tree_map_with_path(put, tree)


def make_scanned(name, **kw):
  return make(name, labels=lambda p: ol.label_params(p, stacked=SCANNED),
              dims=lambda p: ol.flax_matrix_dims(p, stacked=SCANNED), **kw)


def compile_seconds(tx, params, shard=None):
  if shard is not None:
    params = shard(params)
    s = ol.sharded_init(tx.init, params)
  else:
    s = jax.jit(tx.init)(params)
  # CPU seconds of this process, not wall time: on a shared machine the
  # wall time of a (mostly single-threaded) compile depends on the load.
  t0 = time.process_time()
  jax.jit(tx.update).lower(params, s, params).compile()
  return time.process_time() - t0


BASELINES = {'optax.adamw': lambda: optax.adamw(LR),
             'optax.contrib.muon': lambda: optax.contrib.muon(LR)}


def run_compile(names, devices, log, depths=(6, 24)):
  """CPU seconds to compile ``jax.jit(tx.update)`` at each depth.

  Variants: ``one_device`` and ``distribute`` (FSDP over 8 devices) on the
  per-layer tree; ``scanned`` (one device) on the same model with its
  layers stacked (``scanned_tree``) and ``stacked=`` labels and dims;
  ``distribute_scanned``: that tree FSDP-sharded on the fan-in axis.
  """
  rows = []
  mesh, spec = layouts(devices)['fsdp']
  shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, spec(x)), t)
  trees = {d: params_tree('small', d) for d in depths}
  scanned = {d: scanned_tree(t) for d, t in trees.items()}

  def line(name, variant, secs):
    log(f'compile {name:<18} {variant:<10} ' + ' '.join(
        f'{d} layers {s:6.1f}s' for d, s in zip(depths, secs)) +
        f'  ratio {secs[-1] / secs[0]:.2f}')

  # The floor: optax's own per-leaf transforms, compiled side by side.
  for name, make_base in BASELINES.items():
    row = {'optimizer': name, 'depths': list(depths), 'baseline': True,
           'distribute': None}
    for variant, tr in (('one_device', trees), ('scanned', scanned)):
      secs = [compile_seconds(make_base(), tr[d]) for d in depths]
      row[variant] = {'seconds': secs, 'ratio': secs[-1] / secs[0]}
      line(name, variant, secs)
    rows.append(row)
  for name in names:
    row = {'optimizer': name, 'depths': list(depths)}
    for variant in ('one_device', 'distribute', 'scanned',
                    'distribute_scanned'):
      if variant.startswith('distribute') and not accepts(
          getattr(ol, name), 'distribute'):
        row[variant] = None
        continue
      secs = []
      for d in depths:
        if variant == 'one_device':
          secs.append(compile_seconds(make(name), trees[d]))
        elif variant == 'distribute':
          secs.append(compile_seconds(make(name, distribute=mesh), trees[d],
                                      shard))
        elif variant == 'scanned':
          secs.append(compile_seconds(make_scanned(name), scanned[d]))
        else:
          secs.append(compile_seconds(
              make_scanned(name, distribute=mesh), scanned[d],
              lambda t: shard_scanned(t, mesh)))
      row[variant] = {'seconds': secs, 'ratio': secs[-1] / secs[0]}
      line(name, variant, secs)
    rows.append(row)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='small tree only')
  ap.add_argument('--compile', action='store_true',
                  help='also time compilation at 6 vs 24 layers (CPU '
                  'seconds of this process)')
  ap.add_argument('--compile-only', action='store_true')
  ap.add_argument('--optimizers', default=None,
                  help='comma-separated; default: all named optimizers')
  ap.add_argument('--models', default=None)
  ap.add_argument('--layouts', default=None,
                  help='comma-separated subset of fsdp,replicated,fsdp_tp')
  ap.add_argument('--no-run', action='store_true',
                  help='compile only: bytes and FLOPs, no difference to one '
                  'device (XLA:CPU host devices can deadlock running the '
                  'Kronecker optimizers on 256-wide matrices; see '
                  'docs/multi_device.md)')
  ap.add_argument('--out', default=None)
  args = ap.parse_args(argv)
  devices = require_devices(8)
  names = ([n for n in args.optimizers.split(',') if n] if args.optimizers
           else list(NAMES))
  unknown = [n for n in names if not hasattr(ol, n)]
  if unknown:
    raise SystemExit(f'--optimizers: unknown {unknown}')
  model_names = (args.models.split(',') if args.models else
                 (['small'] if args.quick else ['small', 'medium']))
  log = lambda s: print(s, flush=True)
  data = {'meta': metadata(args),
          'note': ('host devices share the CPU: bytes and flops are read '
                   'from the compiled 8-device program, not timed.'),
          'targets': {'bytes_over_params': 2.0, 'flops_over_ideal': 1.2,
                      'max_abs_diff': 1e-5, 'compile_ratio': 1.5,
                      'state_relayout_leaves': 0,
                      'state_relayout_bytes': 0}}
  if not args.compile_only:
    only = args.layouts.split(',') if args.layouts else None
    data['rows'] = run_layouts(names, model_names, devices, log, only,
                               run=not args.no_run)
  if args.compile or args.compile_only:
    data['compile'] = run_compile(names, devices, log)
  stem = 'distributed' + ('_quick' if args.quick else '')
  out = args.out or os.path.join(RESULTS_DIR, f'{stem}_{device_slug()}.json')
  write_json(out, data)


if __name__ == '__main__':
  main()
