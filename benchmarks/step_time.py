"""Cost of one optimizer step: time, state memory, polar-factor efficiency.

Measured side by side in one run (so ratios are meaningful even on a noisy,
shared machine; absolute times are only worth quoting from a GPU):

1. Jitted step time (``tx.update`` + ``optax.apply_updates``, consecutive
   steps with the state carried, median and mean of repeats after warm-up)
   of every optimizer in the registry (optax.adamw, optax.contrib.muon, all
   of optax_lite's) on single leaves 256², 1024², 1024×4096 (and 4096² in
   full mode) and on the LM of ``models.py`` at two sizes; ratios to
   optax.adamw and to optax.contrib.muon of the same run; optimizer-state
   bytes per parameter. The *mean* includes the amortised refresh steps of
   SOAP/Shampoo-like methods, the *median* does not.
2. ``ol.orthogonalize`` against ``optax.contrib.scale_by_muon`` at equal
   steps (5 steps of Jordan's quintic, and 6 Polar Express steps fed to
   optax as a coefficient table), and against the iteration's matmul floor:
   the bare products X·Xᵀ, A·A, B·X per step on the wide orientation, in a
   ``lax.scan``, jitted the same way. Gram Newton–Schulz against Polar
   Express: ``orthogonalize('gram_polar_express', 6)`` (which runs the Gram
   form only where it saves flops, ``l > 1.5·s``) and
   ``linalg.newton_schulz_gram`` forced on every shape, against
   ``orthogonalize('polar_express', 6)`` and ``linalg.newton_schulz``,
   called in turn (interleaved) so the ratios hold on a loaded machine.
3. Orthogonality: max |σᵢ − 1| of ``ol.polar_factor`` (polar_express 6,
   gram_polar_express 6, jordan 5) and of optax's 5-step presets
   ('standard', 'dion') on matrices of condition number 10³.
4. RMNP: ``rmnp`` vs ``muon`` steps and ``row_normalize`` vs ``orthogonalize``
   at 1024×4096, and rmnp against one elementwise pass over the same bytes
   (an SGD-momentum step: reads p, g, m, writes p, m) and a single scale.
5. Optax_lite transforms (``orthogonalize``, ``row_normalize``,
   ``fisher_whiten``, ``kron_precondition``, ``lite_flat_boost``) on single
   leaves, where they can be built with their defaults.
6. Where a Kronecker preconditioner's time goes on each leaf: eigh, one QR
   power refresh, the eigenbasis rotations, inverse 4th roots by eigh and
   by coupled Newton (ratios to the rotations); in quick mode only on
   leaves with both sides ≤ 1024.

Writes ``benchmarks/results/step_time[_quick]_<device>.json`` and a log-log
plot of time against matrix size. ``--polar-only`` times block 2 alone (and
block 3) and writes ``polar_step_time[_quick]_<device>.json`` (a stem that
``report.py``'s step_time section does not pick up).

  python benchmarks/step_time.py --quick
  python benchmarks/step_time.py
  python benchmarks/step_time.py --quick --polar-only --sizes 512x512,512x2048

``--set NAME.KEY=VALUE`` passes a keyword to one optimizer (as in
``lm.py``; recorded as ``overrides``). ``NAME+LABEL.KEY=VALUE`` times a
copy of ``NAME`` with that keyword under the name ``NAME+LABEL`` *beside*
``NAME`` itself, so the two are measured side by side in one run, e.g.
Muon-LITE with its sharp filter refreshed every 5 steps against every step
(the median then times the steps between refreshes, the mean includes
them)::

  python benchmarks/step_time.py --quick --optimizers muon_lite \
      --set muon_lite+every5.filter_every=5
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import optax_lite as ol  # noqa: E402

import _common  # noqa: E402
import models  # noqa: E402
from lm import parse_override  # noqa: E402

LR = 1e-3
# optax.contrib.scale_by_muon used standalone needs explicit dimension numbers.
WDN = {'w': optax.contrib.MuonDimensionNumbers(0, 1)}


def time_optimizer(tx, params, grads, timing):
  """Median/mean step time of ``tx`` with the state carried across calls."""
  res = _common.time_step(tx, params, grads, timing)
  res['state_bytes_per_param'] = _common.state_bytes_per_param(tx, params)
  return res


def time_transform(tx, grads, timing):
  """Time of ``tx.update`` alone (grads stand in for params), state carried."""

  @jax.jit
  def step(s, g):
    u, s = tx.update(g, s, g)
    return s, g, u

  def call(s, g):
    s, g, u = step(s, g)
    jax.block_until_ready(u)
    return s, g

  return _common.time_fn(call, tx.init(grads), grads, carry=True, **timing)


def matmul_floor_fn(steps: int):
  """Bare products of the polar iteration (wide orientation), jitted."""

  @jax.jit
  def floor(x):
    if x.shape[-2] > x.shape[-1]:
      x = x.T

    def body(x, _):
      a = x @ x.T
      b = a @ a
      return b @ x, None

    x, _ = jax.lax.scan(body, x, None, length=steps)
    return x

  return floor


def orthonormal(key, m, n):
  """An m×n matrix with all singular values 1 (keeps the floor finite)."""
  g = jax.random.normal(key, (max(m, n), min(m, n)), jnp.float32)
  q, _ = jnp.linalg.qr(g)
  return q if m >= n else q.T


def cond_matrix(rng, m, n, cond):
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = np.logspace(0, -np.log10(cond), k)
  return jnp.asarray((u * s) @ v.T, jnp.float32)


def optax_ns_presets():
  """optax's 5-step NS coefficient presets ('standard', 'dion')."""
  try:
    from optax.contrib import _muon as optax_muon_mod
    presets = dict(optax_muon_mod._NS_COEFFS_PRESET_DICT)  # noqa: SLF001
  except (ImportError, AttributeError):  # fall back to optax 0.2.8's values
    presets = {
        'standard': (3.4445, -4.7750, 2.0315),
        'dion': [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                 (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
                 (2.8366, -3.0525, 1.2012)]}
  return {k: np.asarray(v, np.float32) for k, v in presets.items()}


def optax_polar(x, coeffs, steps=5):
  """optax.contrib.scale_by_muon with β = 0, no Nesterov: its NS output."""
  tx = optax.contrib.scale_by_muon(ns_coeffs=jnp.asarray(coeffs),
                                   ns_steps=steps, beta=0.0, nesterov=False,
                                   weight_dimension_numbers=WDN)
  u, _ = tx.update({'w': x}, tx.init({'w': x}))
  return u['w']


def orthogonality(sizes, cond, seed):
  rng = np.random.default_rng(seed)
  out = []
  presets = optax_ns_presets()
  for m, n in sizes:
    x = cond_matrix(rng, m, n, cond)
    cands = {
        'ol.polar_express(6)': ol.polar_factor(x, 'polar_express', 6),
        'ol.gram_polar_express(6)': ol.polar_factor(
            x, 'gram_polar_express', 6),
        'ol.jordan(5)': ol.polar_factor(x, 'jordan', 5),
    }
    for name, c in presets.items():
      cands[f'optax.{name}(5)'] = jax.jit(optax_polar)(x, c)
    row = {'shape': [m, n], 'cond': cond}
    for name, y in cands.items():
      s = np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)
      row[name] = float(np.max(np.abs(s - 1.0)))
    out.append(row)
  return out


def parse_args(argv=None):
  p = _common.arg_parser(__doc__)
  p.add_argument('--sizes', default=None,
                 help='comma list like 256x256,1024x1024 (overrides mode); '
                 "'' for whole models only")
  p.add_argument('--models', nargs='*', default=None)
  p.add_argument('--optimizers', nargs='*', default=None)
  p.add_argument('--repeats', type=int, default=None)
  p.add_argument('--max-seconds', type=float, default=None,
                 help='stop repeating a measurement after this long')
  p.add_argument('--ortho-sizes', default=None,
                 help='comma list of shapes for the max|σ−1| check')
  p.add_argument('--out', default=None)
  p.add_argument('--set', nargs='*', default=[], metavar='NAME.KEY=VALUE',
                 help='optimizer keyword override, e.g. '
                 'muon_lite.filter_every=5; NAME+LABEL.KEY=VALUE times a '
                 'copy of NAME with it beside NAME (recorded in the JSON)')
  p.add_argument('--no-plot', action='store_true')
  p.add_argument('--polar-only', action='store_true',
                 help='time the polar-factor block alone (no optimizers, '
                 'models or other transforms); writes polar_step_time*')
  return p.parse_args(argv)


def _shapes(text):
  """'256x256,1024x4096' -> [(256, 256), (1024, 4096)]; '' -> []."""
  return [tuple(int(v) for v in s.split('x')) for s in text.split(',') if s]


def plan(args):
  """What to time: leaf sizes, model names, timing knobs, overrides."""
  if args.sizes is not None:  # '' = no single leaves (whole models only)
    sizes = _shapes(args.sizes)
  elif args.quick:
    sizes = [(256, 256), (1024, 1024), (1024, 4096)]
  else:
    sizes = [(256, 256), (1024, 1024), (1024, 4096), (4096, 4096)]
  model_names = args.models if args.models is not None else (
      ['nano', 'tiny'] if args.quick else ['small', 'medium'])
  if args.polar_only:
    model_names = []
  timing = dict(warmup=1, repeats=args.repeats or (5 if args.quick else 20),
                max_seconds=args.max_seconds or (4.0 if args.quick else 60.0),
                min_repeats=2 if args.quick else 5)
  # Quick mode: FISMO's per-step eigh of 4096² factors alone would exceed the
  # 10-minute budget on CPU, so its roots are refreshed every 10 steps there
  # (the median then measures the steps between refreshes, the mean includes
  # them). Recorded in the JSON as ``overrides``.
  overrides = ({'fismo': {'root_every': 10}, 'fismo_lite': {'root_every': 10}}
               if args.quick else {})
  for item in args.set:
    name, key, value = parse_override(item)
    overrides[name] = {**overrides.get(name, {}), key: value}
  if args.ortho_sizes:
    ortho = _shapes(args.ortho_sizes)
  else:
    ortho = ([(256, 256), (256, 1024)] if args.quick else
             [(256, 256), (256, 1024), (1024, 1024)])
  return sizes, model_names, timing, overrides, ortho


def with_overrides(reg, overrides):
  """Registry factories with their overrides bound.

  ``NAME+LABEL`` adds a copy of ``NAME``'s factory (as overridden so far)
  with its keywords, timed beside ``NAME``. An unknown ``NAME`` raises
  ``ValueError`` and a keyword the optimizer does not take ``TypeError``,
  before anything is timed.
  """
  reg = dict(reg)
  for name, kw in overrides.items():
    base = name.partition('+')[0]
    if base not in _common.ALL_NAMES:
      raise ValueError(f'--set: unknown optimizer {base!r}; known: '
                       f'{list(_common.ALL_NAMES)}')
    if base in reg:
      reg[base](LR, **kw)  # raises TypeError on an unknown keyword
      reg[name] = functools.partial(reg[base], **kw)
      print(f'[note] {name} runs with {kw}')
  return reg


def time_group(kind, what, reg, timing, quick, bar, polar_only=False):
  """Every optimizer (and, for a leaf, the transform blocks) on one group.

  ``kind`` is 'leaf' (``what`` = (m, n)) or 'model' (``what`` = a name of
  ``models.CONFIGS``). ``polar_only``: the polar block of a leaf alone.
  """
  key = jax.random.key(0)
  if kind == 'leaf':
    m, n = what
    params = {'w': jax.random.normal(key, (m, n), jnp.float32) / np.sqrt(m)}
    label = f'{m}x{n}'
  else:
    params = nnx.state(models.make_model(what, 0), nnx.Param)
    label = what
  grads = _common.rand_like(jax.random.fold_in(key, 1), params, 0.01)
  if polar_only:
    bar.update(len(reg) + 1)
    return {'name': label, 'n_params': _common.tree_size(params),
            'shape': [m, n], 'optimizers': {},
            'polar': polar_block(params['w'], grads['w'], timing)}
  rows = {}
  for name, factory in reg.items():
    bar.set_postfix_str(f'{label} {name}')
    try:
      rows[name] = time_optimizer(factory(LR), params, grads, timing)
    except Exception as e:  # keep going; record the failure
      rows[name] = {'error': f'{type(e).__name__}: {e}'[:300]}
      print(f'[error] {name} on {label}: {rows[name]["error"]}')
    bar.update(1)
  _add_ratios(rows)
  entry = {'name': label, 'n_params': _common.tree_size(params),
           'optimizers': rows}
  if kind == 'leaf':
    entry['shape'] = [m, n]
    entry['polar'] = polar_block(params['w'], grads['w'], timing)
    if 'rmnp' in reg:
      entry['rmnp'] = rmnp_block(params, grads, rows, timing)
    entry['transforms'] = transforms_block(grads, timing)
    if not quick or max(m, n) <= 1024:
      # Quick mode: a 4096-side eigh and 30 Newton iterations would take
      # minutes of the 10-minute CPU budget.
      entry['kron'] = kron_block(grads['w'], timing)
  bar.update(1)
  return entry


def main(argv=None):
  args = parse_args(argv)
  sizes, model_names, timing, overrides, ortho = plan(args)
  reg = with_overrides(_common.registry(args.optimizers), overrides)
  print(f'device {_common.device_kind()}; sizes {sizes}; models {model_names}')

  tasks = [('leaf', s) for s in sizes] + [('model', m) for m in model_names]
  bar = _common.progress(total=len(tasks) * (len(reg) + 1), desc='step_time')
  groups = [time_group(kind, what, reg, timing, args.quick, bar,
                       args.polar_only)
            for kind, what in tasks]
  bar.close()
  results = {'leaves': [g for g, (k, _) in zip(groups, tasks) if k == 'leaf'],
             'models': [g for g, (k, _) in zip(groups, tasks)
                        if k == 'model'],
             'orthogonality': orthogonality(ortho, 1e3, 0)}

  out = {'meta': _common.metadata(args), 'timing': timing, 'lr': LR,
         'overrides': overrides, 'headline': headline(results), **results}
  stem = 'polar_step_time' if args.polar_only else 'step_time'
  path = _common.result_path(stem, args.out, quick=args.quick)
  _common.write_json(path, out)
  # The plot is time against leaf size, over the optimizers.
  if not args.no_plot and out['leaves'] and not args.polar_only:
    plot(out, path[:-5] + '.png')
  for k, v in out['headline'].items():
    print(f'{k}: {v}')
  return out


def _add_ratios(rows):
  for ref, key in (('adamw', 'ratio_to_adamw'),
                   ('optax_muon', 'ratio_to_optax_muon'),
                   ('muon', 'ratio_to_muon')):
    r = rows.get(ref, {})
    if 'median_s' not in r:
      continue
    for row in rows.values():
      if 'median_s' in row:
        row[key] = row['median_s'] / r['median_s']
        row[key + '_mean'] = row['mean_s'] / r['mean_s']


def polar_block(w, g, timing):
  """orthogonalize vs optax scale_by_muon (equal steps) vs matmul floor."""
  pe6 = np.asarray(ol.linalg.coefficients('polar_express', 6), np.float32)
  txs = {
      'ol.orthogonalize(jordan,5)': ol.orthogonalize('jordan', 5),
      'ol.orthogonalize(polar_express,6)': ol.orthogonalize('polar_express',
                                                            6),
      'ol.momentum+orthogonalize(jordan,5)': optax.chain(
          ol.momentum(0.95, nesterov=True), ol.orthogonalize('jordan', 5)),
      'optax.scale_by_muon(jordan,5)': optax.contrib.scale_by_muon(
          ns_steps=5, weight_dimension_numbers=WDN),
      'optax.scale_by_muon(polar_express,6)': optax.contrib.scale_by_muon(
          ns_coeffs=jnp.asarray(pe6), ns_steps=6,
          weight_dimension_numbers=WDN),
  }
  res = {}
  for name, tx in txs.items():
    res[name] = time_transform(tx, {'w': g}, timing)
  x = orthonormal(jax.random.key(3), *w.shape)
  for steps in (5, 6):
    res[f'matmul_floor({steps})'] = _common.time_fn(matmul_floor_fn(steps), x,
                                                    **timing)
  res['gram_vs_polar_express'] = gram_block(g, timing)
  med = {k: v['median_s'] for k, v in res.items() if 'median_s' in v}
  res['ratios'] = {
      'orthogonalize_jordan5 / optax_scale_by_muon_jordan5':
          med['ol.orthogonalize(jordan,5)'] /
          med['optax.scale_by_muon(jordan,5)'],
      'momentum+orthogonalize_jordan5 / optax_scale_by_muon_jordan5':
          med['ol.momentum+orthogonalize(jordan,5)'] /
          med['optax.scale_by_muon(jordan,5)'],
      'orthogonalize_pe6 / optax_scale_by_muon_pe6':
          med['ol.orthogonalize(polar_express,6)'] /
          med['optax.scale_by_muon(polar_express,6)'],
      'orthogonalize_jordan5 / matmul_floor5':
          med['ol.orthogonalize(jordan,5)'] / med['matmul_floor(5)'],
      'orthogonalize_pe6 / matmul_floor6':
          med['ol.orthogonalize(polar_express,6)'] / med['matmul_floor(6)'],
      'optax_scale_by_muon_jordan5 / matmul_floor5':
          med['optax.scale_by_muon(jordan,5)'] / med['matmul_floor(5)'],
  }
  return res


def interleaved(fns, x, rounds):
  """Min and median time of each ``fn(x)``, called in turn ``rounds`` times.

  Alternating the candidates call by call exposes them to the same load,
  so their ratio holds on a shared machine where timing one after the
  other does not.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(x))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[k].append(time.perf_counter() - t0)
  return {k: {'min_s': min(t), 'median_s': statistics.median(t),
              'repeats': rounds} for k, t in times.items()}


def gram_block(g, timing):
  """Gram Newton–Schulz vs Polar Express (6 steps each), interleaved.

  ``orthogonalize`` with each method (gram_polar_express runs the Gram form
  only where :func:`ol.linalg.polar.uses_gram`), and the bare kernels
  ``newton_schulz_gram`` (forced, any shape) and ``newton_schulz``; ratios
  of minima (and of medians) to the Polar Express counterpart, beside the
  flop ratio of the cost model.
  """
  table = ol.linalg.coefficients('polar_express', 6)
  txs = {m: ol.orthogonalize(m, 6) for m in ('polar_express',
                                             'gram_polar_express')}
  fns = {f'orthogonalize({m})': jax.jit(
      lambda x, tx=tx: tx.update({'w': x}, optax.EmptyState())[0]['w'])
         for m, tx in txs.items()}
  fns['newton_schulz(pe6)'] = jax.jit(
      lambda x: ol.linalg.newton_schulz(x, table, norm_factor=1.01))
  fns['newton_schulz_gram(pe6, forced)'] = jax.jit(
      lambda x: ol.linalg.newton_schulz_gram(x, table, norm_factor=1.01))
  res = interleaved(fns, g, max(timing['repeats'], 5) * 2)
  m, n = g.shape
  res['flops'] = {'polar_express6': ol.linalg.polar.flops(m, n, 6),
                  'gram_forced6': ol.linalg.polar.gram_flops(m, n, 6),
                  'uses_gram': ol.linalg.polar.uses_gram(m, n, 6)}
  ratios = {}
  for stat in ('min_s', 'median_s'):
    def r(a, b, stat=stat):
      return res[a][stat] / res[b][stat]
    ratios[f'orthogonalize gram/pe ({stat[:-2]})'] = r(
        'orthogonalize(gram_polar_express)', 'orthogonalize(polar_express)')
    ratios[f'newton_schulz_gram forced/newton_schulz ({stat[:-2]})'] = r(
        'newton_schulz_gram(pe6, forced)', 'newton_schulz(pe6)')
  ratios['flops gram forced/pe'] = (res['flops']['gram_forced6'] /
                                    res['flops']['polar_express6'])
  res['ratios'] = ratios
  return res


def rmnp_block(params, grads, rows, timing):
  """rmnp vs muon / orthogonalize, and vs elementwise passes."""
  res = {}
  g = grads['w']

  @jax.jit
  def sgdm(p, m, g):  # one pass over the bytes an rmnp step must touch
    m = 0.95 * m + g
    return p - LR * m, m, g

  @jax.jit
  def scale(g):
    return g * 0.5

  res['elementwise_sgdm_step'] = _common.time_fn(
      sgdm, params['w'], jnp.zeros_like(g), g, carry=True, **timing)
  res['elementwise_scale'] = _common.time_fn(scale, g, **timing)
  res['ol.row_normalize'] = time_transform(ol.row_normalize(), grads, timing)
  res['ol.orthogonalize(polar_express,6)'] = time_transform(
      ol.orthogonalize(), grads, timing)
  med = {k: v.get('median_s') for k, v in res.items()}
  for k in ('rmnp', 'muon'):
    if 'median_s' in rows.get(k, {}):
      med[k] = rows[k]['median_s']
  r = {}
  if med.get('rmnp') and med.get('muon'):
    r['muon_step / rmnp_step'] = med['muon'] / med['rmnp']
  if med.get('rmnp'):
    r['rmnp_step / elementwise_sgdm_step'] = (med['rmnp'] /
                                              med['elementwise_sgdm_step'])
    r['rmnp_step / elementwise_scale'] = med['rmnp'] / med['elementwise_scale']
  if med.get('ol.row_normalize'):
    r['orthogonalize / row_normalize'] = (
        med['ol.orthogonalize(polar_express,6)'] / med['ol.row_normalize'])
    r['row_normalize / elementwise_scale'] = (med['ol.row_normalize'] /
                                              med['elementwise_scale'])
  res['ratios'] = r
  return res


def kron_block(g, timing):
  """Where a Kronecker preconditioner's time goes, on one (m, n) leaf.

  The factors are ``L = G Gᵀ + εI`` (m×m) and ``R = GᵀG + εI`` (n×n); each
  entry times both sides: SOAP's eigh (init), one QR power refresh, the
  rotations into and out of the eigenbasis (4 products per step), and
  Shampoo's inverse 4th roots by eigh and by 30 coupled Newton iterations.
  """
  m, n = g.shape
  lf = g @ g.T + 1e-3 * jnp.eye(m)
  rf = g.T @ g + 1e-3 * jnp.eye(n)
  ql, _ = ol.linalg.eigenbasis_init(lf)
  qr, _ = ol.linalg.eigenbasis_init(rf)
  # Everything a function reads is an argument: a closed-over array would be
  # a compile-time constant, and XLA would fold the work away.
  fns = {
      'eigh': lambda a, b, g, ql, qr: (jnp.linalg.eigh(a), jnp.linalg.eigh(b)),
      'qr_refresh': lambda a, b, g, ql, qr: (
          ol.linalg.eigenbasis_refresh(a, ql)[0],
          ol.linalg.eigenbasis_refresh(b, qr)[0]),
      # SOAP: G into the eigenbasis, Adam there, the update back out.
      'rotations': lambda a, b, g, ql, qr: ql @ ((ql.T @ g @ qr) * 0.5) @ qr.T,
      'inverse_root_eigh': lambda a, b, g, ql, qr: (
          ol.linalg.inverse_root(a, 4, method='eigh'),
          ol.linalg.inverse_root(b, 4, method='eigh')),
      'inverse_root_newton30': lambda a, b, g, ql, qr: (
          ol.linalg.inverse_root(a, 4, method='newton', iters=30),
          ol.linalg.inverse_root(b, 4, method='newton', iters=30)),
  }
  res = {k: _common.time_fn(jax.jit(f), lf, rf, g, ql, qr, **timing)
         for k, f in fns.items()}
  med = {k: v['median_s'] for k, v in res.items()}
  res['ratios'] = {f'{k} / rotations': med[k] / med['rotations']
                   for k in med if k != 'rotations'}
  return res


def transforms_block(grads, timing):
  res = {}
  for name in _common.OL_TRANSFORMS:
    try:
      tx = getattr(ol, name)()
      res[name] = time_transform(tx, grads, timing)
    except Exception as e:  # needs arguments / unsupported standalone
      res[name] = {'error': f'{type(e).__name__}: {e}'[:200]}
  return res


def headline(results):
  """The numbers the docs quote."""
  h = {}
  for leaf in results['leaves']:
    n = leaf['name']
    pr = leaf['polar']['ratios']
    h[f'{n}: orthogonalize(jordan5)/optax.scale_by_muon(jordan5)'] = pr[
        'orthogonalize_jordan5 / optax_scale_by_muon_jordan5']
    h[f'{n}: orthogonalize(pe6)/matmul floor(6)'] = pr[
        'orthogonalize_pe6 / matmul_floor6']
    for k, v in leaf['polar']['gram_vs_polar_express']['ratios'].items():
      h[f'{n}: {k}'] = v
    rows = leaf['optimizers']
    for name in ('muon_lite', 'fismo', 'soap', 'shampoo'):
      if 'ratio_to_muon' in rows.get(name, {}):
        h[f'{n}: {name}/muon step (median)'] = rows[name]['ratio_to_muon']
    for k, v in leaf.get('rmnp', {}).get('ratios', {}).items():
      h[f'{n}: {k}'] = v
  for row in results.get('orthogonality', []):
    h[f'max|s-1| cond1e3 {row["shape"][0]}x{row["shape"][1]}'] = {
        k: v for k, v in row.items() if k not in ('shape', 'cond')}
  return h


def plot(out, path):
  plt = _common.setup_matplotlib()
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  leaves = out['leaves']
  sizes = np.array([l['n_params'] for l in leaves], np.float64)
  names = list(leaves[0]['optimizers']) if leaves else []
  for name in names:
    t = [l['optimizers'][name].get('median_s', np.nan) for l in leaves]
    ls = '--' if name in ('adamw', 'optax_muon') else '-'
    axes[0].loglog(sizes, t, ls + 'o', label=name, ms=4)
  axes[0].set(xlabel='parameters in the leaf (m·n)',
              ylabel='step time, median (s)',
              title=f'optimizer step vs size ({out["meta"]["device_kind"]})')
  for key in ('ol.orthogonalize(polar_express,6)',
              'optax.scale_by_muon(jordan,5)', 'matmul_floor(6)'):
    t = [l['polar'][key]['median_s'] for l in leaves]
    axes[1].loglog(sizes, t, 'o-', label=key, ms=4)
  t = [l.get('rmnp', {}).get('ol.row_normalize', {}).get('median_s', np.nan)
       for l in leaves]
  axes[1].loglog(sizes, t, 's-', label='ol.row_normalize', ms=4)
  t = [l.get('rmnp', {}).get('elementwise_scale', {}).get('median_s', np.nan)
       for l in leaves]
  axes[1].loglog(sizes, t, 'x:', label='elementwise pass', ms=4)
  axes[1].set(xlabel='parameters in the leaf (m·n)', ylabel='time (s)',
              title='polar factor vs matmul floor vs O(mn) passes')
  for ax in axes:
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  _common.save_figure(fig, path)


if __name__ == '__main__':
  main()
