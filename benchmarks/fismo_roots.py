"""FISMO's inverse square roots: ``eigh`` against warm-started Newton.

FISMO (``ol.fismo``) needs ``P^{-1/2}`` and ``Q^{-1/2}`` of its Kronecker
factors every step. ``root_method="eigh"`` (the default) computes three per
step by eigendecomposition; ``"newton_warm"`` refines the previous step's
roots by a few matmul-only symmetrised Newton–Schulz steps and computes two
(the stored ``Q_{t-1}^{-1/2}`` is reused). This script measures, on this
machine:

1. for one ``d × d`` factor after one EMA step (``F ← 0.95 F + 0.05 L̂``,
   ``L̂`` a trace-normalised rank-``d/2`` statistic with FISMO's default
   trace damping): the jitted time of ``inverse_root(F, 2)`` by ``eigh``,
   by the cold coupled Newton iteration (30 steps) and by
   ``inverse_sqrt_warm`` from the previous root (3 and 6 steps), with each
   result's relative Frobenius error against a float64 ``eigh`` root;
2. one jitted ``fisher_whiten`` step (FISMO's inner transform) on an
   ``m × n`` leaf with ``root_method`` ``"eigh"`` and ``"newton_warm"``.

Ratios (``eigh`` time / other time) are the quotable numbers; absolute
times on a shared CPU are not. Writes ``results/fismo_roots_<device>.json``.

Usage: ``python benchmarks/fismo_roots.py [--sizes 64 256 768]
[--leaf 256x768] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import optax_lite as ol  # noqa: E402
from optax_lite.linalg import roots  # noqa: E402


def _isqrt64(a):
  w, v = np.linalg.eigh(np.asarray(a, np.float64))
  return (v * w ** -0.5) @ v.T


def _factor_pair(d: int, seed: int = 0):
  """A trace-normalised factor before and after one EMA step."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d))
  prev = a @ a.T / d
  prev = prev + np.trace(prev) / d * np.eye(d)  # trace damping ν = 1
  prev *= d / np.trace(prev)
  g = rng.normal(size=(d, max(d // 2, 1)))
  stat = g @ g.T
  stat = stat + np.trace(stat) / d * np.eye(d)
  new = 0.95 * prev + 0.05 * d * stat / np.trace(stat)
  return prev, new


def _rel(x, ref) -> float:
  return float(np.linalg.norm(np.asarray(x, np.float64) - ref)
               / np.linalg.norm(ref))


def bench_roots(d: int, repeats: int) -> dict:
  prev, new = _factor_pair(d)
  ref = _isqrt64(new)
  f = jnp.asarray(new, jnp.float32)
  start = jnp.asarray(_isqrt64(prev), jnp.float32)
  fns = {
      'eigh': jax.jit(lambda a, z: roots.inverse_root(a, 2)),
      'newton_cold_30': jax.jit(
          lambda a, z: roots.inverse_root(a, 2, method='newton', iters=30)),
      'warm_3': jax.jit(lambda a, z: roots.inverse_sqrt_warm(a, z, iters=3)),
      'warm_6': jax.jit(lambda a, z: roots.inverse_sqrt_warm(a, z, iters=6)),
  }
  out = {'d': d, 'start_rel_error': _rel(start, ref)}
  for name, fn in fns.items():
    t = _common.time_fn(fn, f, start, repeats=repeats, max_seconds=20.0)
    out[name] = {'rel_error': _rel(fn(f, start), ref), **t}
  for name in fns:
    if name != 'eigh':
      out[name]['eigh_over_this'] = (out['eigh']['median_s']
                                     / out[name]['median_s'])
  return out


def bench_step(m: int, n: int, repeats: int) -> dict:
  rng = np.random.default_rng(1)
  params = {'w': jnp.zeros((m, n))}
  grads = [{'w': jnp.asarray(rng.normal(size=(m, n)), jnp.float32)}
           for _ in range(4)]
  out = {'leaf': [m, n]}
  for method in ('eigh', 'newton_warm'):
    tx = ol.fismo(0.02, root_method=method, weight_decay=0.0,
                  labels=lambda p: jax.tree.map(lambda _: 'matrix', p))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads[:3]:  # the state a few steps in (warm starts in place)
      _, state = update(g, state, params)

    def step(state, update=update):
      _, state = update(grads[3], state, params)
      return (state,)

    t = _common.time_fn(step, state, repeats=repeats, carry=True,
                        max_seconds=30.0)
    out[method] = t
  out['eigh_over_newton_warm'] = (out['eigh']['median_s']
                                  / out['newton_warm']['median_s'])
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--sizes', type=int, nargs='*', default=[64, 256, 768])
  ap.add_argument('--leaf', default='256x768',
                  help="m x n of the fisher_whiten step ('' to skip)")
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--out', default=None)
  args = ap.parse_args(argv)
  data = {'meta': _common.metadata(args), 'roots': [], 'step': None}
  for d in args.sizes:
    r = bench_roots(d, args.repeats)
    data['roots'].append(r)
    print(f"d={d}: eigh/warm_3 {r['warm_3']['eigh_over_this']:.2f}, "
          f"eigh/warm_6 {r['warm_6']['eigh_over_this']:.2f}, "
          f"eigh/newton_cold_30 {r['newton_cold_30']['eigh_over_this']:.2f}; "
          f"rel error eigh {r['eigh']['rel_error']:.1e}, warm_3 "
          f"{r['warm_3']['rel_error']:.1e}, warm_6 "
          f"{r['warm_6']['rel_error']:.1e}", flush=True)
  if args.leaf:
    m, n = (int(x) for x in args.leaf.split('x'))
    s = bench_step(m, n, args.repeats)
    data['step'] = s
    print(f"fismo step {m}x{n}: eigh/newton_warm "
          f"{s['eigh_over_newton_warm']:.2f}", flush=True)
  _common.write_json(_common.result_path('fismo_roots', args.out), data)
  return data


if __name__ == '__main__':
  main()
