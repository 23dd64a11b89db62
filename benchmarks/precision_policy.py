"""Measures the per-kernel precision policy of ``optax_lite.linalg.matmul``.

For every kernel of :data:`optax_lite.linalg.matmul.POLICY` it runs a
representative computation on the CPU under
:func:`optax_lite.testing.emulate_matmul_precision` (``"bfloat16"``: a TPU's
one-pass default; ``"tensorfloat32"``: a GPU's default) and reports its
relative Frobenius error against the same computation in float32 when that
kernel alone runs at the accelerator default (every other kernel in full
float32), i.e. the error the kernel itself contributes. A second table gives
each named optimizer's update error (20 steps on a 16×24 leaf) under the
policy and with every kernel at the accelerator default (SOAP, Shampoo and
SOAP-LITE built with ``precision=None`` so that the policy, not their
explicit default, applies).

  python benchmarks/precision_policy.py [--out DIR]

The policy table in docs/precision.md and in ``optax_lite/linalg/matmul.py``
quotes these numbers (``results/precision_policy_cpu.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import optax_lite as ol  # noqa: E402
from optax_lite.linalg import matmul as mm_lib  # noqa: E402
from optax_lite.linalg import polar as polar_lib  # noqa: E402
from optax_lite.linalg import roots as roots_lib  # noqa: E402
from optax_lite.linalg import subspace  # noqa: E402
from optax_lite.testing import emulate_matmul_precision  # noqa: E402
import _common  # noqa: E402

EMULATIONS = ('bfloat16', 'tensorfloat32')
HIGHEST = jax.lax.Precision.HIGHEST
OPTIMIZERS = ('muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite',
              'soap_lite', 'rmnp_lite', 'fismo_lite')


def matrix(m, n, spectrum, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  k = min(m, n)
  return jnp.asarray((u[:, :k] * np.asarray(spectrum)) @ v[:, :k].T,
                     jnp.float32)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@contextlib.contextmanager
def policy(overrides):
  saved = dict(mm_lib.POLICY)
  mm_lib.POLICY.update(overrides)
  try:
    yield
  finally:
    mm_lib.POLICY.clear()
    mm_lib.POLICY.update(saved)


def run(fn, emulation):
  """``fn`` freshly jitted (the policy is read at trace time)."""
  f = jax.jit(lambda: fn())  # a new function: jit's cache cannot hit
  if emulation is None:
    return jax.tree.map(np.asarray, f())
  with emulate_matmul_precision(emulation):
    return jax.tree.map(np.asarray, f())


# --- one representative computation per kernel ------------------------------

_X = matrix(128, 256, np.logspace(0, -2, 128), seed=1)  # condition 1e2
_GAP = matrix(64, 128, np.concatenate([np.linspace(10, 8, 8),
                                       np.linspace(1, 0.05, 56)]), seed=2)
_GAUSS = jax.random.normal(jax.random.PRNGKey(3), (96, 192))
_SV = np.linalg.svd(np.asarray(_GAUSS, np.float64), compute_uv=False)
_TAU = float(0.5 * (_SV[9] + _SV[10]))  # 10 directions above τ
_SPD = (lambda q: jnp.asarray((q * np.logspace(0, -3, 128)) @ q.T,
                              jnp.float32))(
    np.linalg.qr(np.random.default_rng(4).standard_normal((128, 128)))[0])


def _projector(m, tau):
  o = polar_lib.polar_by_method(m)
  p = subspace.small_side_projector(m, o, jnp.float32(tau))
  return p, jnp.sum(jnp.square(p))


def _updates(name, n_steps=4, shape=(64, 128), cond=None):
  """``name``'s update after ``n_steps`` Gaussian gradients (``cond``: with
  singular values log-spaced over ``[1/cond, 1]`` instead)."""
  params = {'layer': {'kernel': jnp.zeros(shape, jnp.float32)}}
  k = min(shape)
  spectrum = None if cond is None else np.logspace(0, -np.log10(cond), k)
  grads = [{'layer': {'kernel': jax.random.normal(jax.random.PRNGKey(10 + i),
                                                  shape)
                      if cond is None else matrix(*shape, spectrum, 10 + i)}}
           for i in range(n_steps)]
  kw = {}
  if 'soap' in name or 'shampoo' in name:
    kw = {'precondition_frequency': 2, 'precision': None}
  if name.endswith('_lite'):
    kw['total_steps'] = 100
  tx = getattr(ol, name)(1e-2, **kw)

  def fn():
    s = tx.init(params)
    u = None
    for g in grads:
      u, s = tx.update(g, s, params)
    return u['layer']['kernel']

  return fn


def _band(x):
  s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  return float(np.max(np.abs(s - 1.0)))


CASES = {
    'polar': ('Polar Express of a 128×256 matrix, condition 1e2',
              lambda: polar_lib.polar_by_method(_X)),
    'lite_filter': ('sharp projector P, 96×192 Gaussian, τ between σ₁₀ '
                    'and σ₁₁', lambda: _projector(_GAUSS, _TAU)[0]),
    'lite_project': ('muon_lite update after 4 steps, 64×128',
                     _updates('muon_lite')),
    'whiten': ('fismo update after 4 steps, 64×128, gradients of '
               'condition 1e3', _updates('fismo', cond=1e3)),
    'inverse_root': ('(A + 1e-6 I)^{-1/2}, 128², condition 1e3, Newton',
                     lambda: roots_lib.inverse_root(_SPD, 2, method='newton',
                                                    eps=1e-6)),
    # 20 steps on 16×24: full-rank statistics (with fewer gradients than
    # rows the null-space basis is arbitrary and any rounding rotates it).
    'kron': ('soap update after 20 steps, 16×24',
             _updates('soap', 20, (16, 24))),
    'eigenbasis': ('soap update after 20 steps, 16×24',
                   _updates('soap', 20, (16, 24))),
}


def only(kernel):
  """``kernel`` at the accelerator default, every other one in float32."""
  return policy({k: (None if k == kernel else HIGHEST)
                 for k in mm_lib.POLICY})


def kernel_table():
  rows = {}
  for kernel, (what, fn) in CASES.items():
    ref = run(fn, None)
    row = {'what': what, 'policy': str(mm_lib.POLICY[kernel])}
    with only(kernel):
      for emu in EMULATIONS:
        row[emu] = rel(run(fn, emu), ref)
    rows[kernel] = row
    print(f'{kernel:13s} ' + ' '.join(
        f'{k}={v:.2e}' for k, v in row.items() if k in EMULATIONS))
  # The filter's decisions: ‖P‖_F² (its rank) with the filter's products
  # (and the polar factor it starts from) at the accelerator default.
  extra = {'gapped_rank_float32': float(run(lambda: _projector(_GAP, 3.0),
                                            None)[1]),
           'gauss_rank_float32': float(run(lambda: _projector(_GAUSS, _TAU),
                                           None)[1])}
  with policy({k: None for k in mm_lib.POLICY}):
    for emu in EMULATIONS:
      extra[f'gapped_rank_{emu}'] = float(run(
          lambda: _projector(_GAP, 3.0), emu)[1])
      extra[f'gauss_rank_{emu}'] = float(run(
          lambda: _projector(_GAUSS, _TAU), emu)[1])
  band = {'float32': _band(run(CASES['polar'][1], None))}
  for emu in EMULATIONS:
    band[emu] = _band(run(CASES['polar'][1], emu))
  band['ns_bfloat16'] = _band(run(lambda: polar_lib.polar_by_method(
      _X, ns_dtype=jnp.bfloat16), None))
  return rows, extra, band


def optimizer_table():
  rows = {}
  everything_default = {k: None for k in mm_lib.POLICY}
  for name in OPTIMIZERS:
    fn = _updates(name, 20, (16, 24))
    ref = run(fn, None)
    row = {}
    for emu in EMULATIONS:
      row[f'policy_{emu}'] = rel(run(fn, emu), ref)
      with policy(everything_default):
        row[f'default_{emu}'] = rel(run(fn, emu), ref)
    rows[name] = row
    print(f'{name:11s} ' + ' '.join(f'{k}={v:.2e}' for k, v in row.items()))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', default=None)
  args = p.parse_args(argv)
  kernels, extra, band = kernel_table()
  print('filter ranks', extra)
  print('polar band max|σ-1| (condition 1e2)', band)
  optimizers = optimizer_table()
  out = {'meta': _common.metadata(args), 'kernels': kernels,
         'filter_ranks': extra, 'polar_band': band,
         'optimizers': optimizers}
  _common.write_json(_common.result_path('precision_policy', args.out), out)
  return out


if __name__ == '__main__':
  main()
