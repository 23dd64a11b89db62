"""One-shot accelerator suite: polar throughput, step times, a short LM race.

Run on one GPU (about 8 minutes on an H100/H200)::

  ./run bench gpu_suite            # = python benchmarks/gpu_suite.py
  ./run bench gpu_suite --dry-run  # same code paths, tiny sizes, CPU, <1 min

Parts (``--parts``, default all):

* ``polar`` – :func:`optax_lite.polar_factor` (Polar Express, 6 steps) at
  1024², 4096², 8192² and 4096×16384, float32 (the backend's default
  precision: TF32 on a recent NVIDIA GPU) and ``ns_dtype=bfloat16``, as
  achieved TFLOP/s (``6·(4s²l + 2s³)`` flops for an ``s × l`` matrix, ``s ≤
  l``) and as a fraction of a plain ``(s×l)·(l×s)`` product of the same dtype
  timed in the same run.
* ``step`` – the step time of every named optimizer (and ``muon`` with
  ``ns_dtype=bfloat16``) on the ``medium`` LM parameter tree
  (``benchmarks/models.py``), as ratios to ``optax.adamw`` and
  ``optax.contrib.muon``.
* ``lm`` – 300 steps of ``adamw``, ``muon``, ``muon_lite`` on the ``tiny`` and
  ``small`` LMs (fixed learning rates, cosine schedule): final validation
  loss, tokens/s.
* ``roots`` – inverse square roots ``(A + εI)^{-1/2}`` of SPD matrices by
  ``eigh`` and by the matmul-only coupled Newton iteration (30 iterations and
  5), with the Newton result's relative error against ``eigh`` (FISMO's roots,
  issue 13 §6).

Writes ``results/gpu_suite_<device>.json`` (``gpu_suite_quick_<device>.json``
for ``--dry-run``) with the device named in ``meta``; ``report.py`` renders it
(:func:`render`).
"""

from __future__ import annotations

import argparse
import functools
import os
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

PARTS = ('polar', 'step', 'lm', 'roots')
POLAR_STEPS = 6  # Polar Express default

FULL = dict(
    polar_sizes=[(1024, 1024), (4096, 4096), (8192, 8192), (4096, 16384)],
    step_model='medium',
    lm_models=['tiny', 'small'], lm_steps=300, lm_batch=32, lm_chunk=50,
    lm_warmup=30, lm_val_windows=256,
    root_sizes=[256, 1024, 4096],
    timing=dict(warmup=1, repeats=10, max_seconds=10.0, min_repeats=3),
    step_optimizers=None,  # all of _common.ALL_NAMES and STEP_VARIANTS
    lm_optimizers=('adamw', 'muon', 'muon_lite'),
)
DRY = dict(
    polar_sizes=[(32, 32), (32, 64)],
    step_model='nano',
    lm_models=['nano'], lm_steps=10, lm_batch=2, lm_chunk=5,
    lm_warmup=2, lm_val_windows=4,
    root_sizes=[16, 32],
    timing=dict(warmup=1, repeats=1, max_seconds=1.0, min_repeats=1),
    # The same code paths with fewer compilations (the CPU budget is 1 min).
    step_optimizers=('adamw', 'optax_muon', 'muon', 'muon[ns_dtype=bf16]'),
    lm_optimizers=('muon',),
)
# Fixed peak learning rates for the LM race (the best of the grid on the
# tiny model in benchmarks/results/old_corpus/lm_tiny1000_cpu.json).
LM_LR = {'adamw': 3e-3, 'muon': 1e-2, 'muon_lite': 3e-3}
STEP_VARIANTS = {
    'muon[ns_dtype=bf16]': ('muon', {'ns_dtype': jnp.bfloat16}),
    # FISMO's root methods side by side ("auto" picks one per platform).
    'fismo[eigh]': ('fismo', {'root_method': 'eigh'}),
    'fismo[newton_warm]': ('fismo', {'root_method': 'newton_warm'}),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dry-run', '--quick', dest='dry_run', action='store_true',
                 help='tiny sizes on any backend (the smoke test)')
  p.add_argument('--parts', default=None,
                 help=f'comma-separated subset of {",".join(PARTS)}')
  p.add_argument('--out', default=None, help='output directory')
  p.add_argument('--corpus', default=None,
                 help='LM corpus (models.CORPORA); default stdlib, or a '
                      'synthetic byte stream with --dry-run')
  args = p.parse_args(argv)
  parts = PARTS if args.parts is None else tuple(
      x for x in args.parts.split(',') if x)
  bad = [x for x in parts if x not in PARTS]
  if bad:
    p.error(f'--parts: unknown {bad}; choose from {PARTS}')
  args.part_list = parts
  return args


def _ms(res):
  return 1e3 * res['median_s']


# ---------------------------------------------------------------------------
# (a) polar throughput
# ---------------------------------------------------------------------------


def polar_flops(m: int, n: int, steps: int = POLAR_STEPS) -> float:
  s, l = min(m, n), max(m, n)
  return steps * (4.0 * s * s * l + 2.0 * s ** 3)


def polar_part(sizes, timing):
  rows = []
  for (m, n) in sizes:
    key = jax.random.key(m * 7 + n)
    x = jax.random.normal(key, (m, n), jnp.float32) / np.sqrt(max(m, n))
    s, l = min(m, n), max(m, n)
    wide = x if m <= n else x.T
    for label, ns, mm_dtype in (('float32', None, jnp.float32),
                                ('bfloat16', jnp.bfloat16, jnp.bfloat16)):
      polar = jax.jit(functools.partial(ol.polar_factor, ns_dtype=ns))
      t_polar = _common.time_fn(polar, x, **timing)
      a = wide.astype(mm_dtype)
      acc = None if mm_dtype == jnp.float32 else jnp.float32
      plain = jax.jit(lambda a, acc=acc: jnp.matmul(
          a, a.T, preferred_element_type=acc))
      t_mm = _common.time_fn(plain, a, **timing)
      tflops = polar_flops(m, n) / t_polar['median_s'] / 1e12
      mm_tflops = 2.0 * s * s * l / t_mm['median_s'] / 1e12
      out = polar(x)
      sv = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
      rows.append({'shape': [m, n], 'dtype': label,
                   'polar_ms': _ms(t_polar), 'matmul_ms': _ms(t_mm),
                   'polar_tflops': tflops, 'matmul_tflops': mm_tflops,
                   'fraction_of_matmul': tflops / mm_tflops,
                   'max_sv_error': float(np.max(np.abs(sv - 1.0)))})
      print(f'  polar {m}x{n} {label}: {_ms(t_polar):.2f} ms, '
            f'{tflops:.2f} TFLOP/s = {tflops / mm_tflops:.2f} of matmul')
  return rows


# ---------------------------------------------------------------------------
# (b) step time on an LM tree
# ---------------------------------------------------------------------------


def step_part(model_name, timing, names=None, lr=1e-3):
  params = nnx.state(models.make_model(model_name, 0), nnx.Param)
  grads = _common.rand_like(jax.random.key(1), params, 0.01)
  reg = _common.registry()
  jobs = list(reg.items()) + [
      (name, functools.partial(reg[base], **kw))
      for name, (base, kw) in STEP_VARIANTS.items()]
  if names is not None:
    jobs = [(n, f) for n, f in jobs if n in names]
  rows = {}
  for name, factory in jobs:
    try:
      rows[name] = _common.time_step(factory(lr), params, grads, timing)
    except Exception as e:  # record and keep going
      rows[name] = {'error': f'{type(e).__name__}: {e}'[:300]}
    r = rows[name]
    print(f'  step {model_name} {name}: ' +
          (f'{_ms(r):.2f} ms' if 'median_s' in r else r['error']))
  for base in ('adamw', 'optax_muon'):
    ref = rows.get(base, {}).get('median_s')
    for r in rows.values():
      if ref and 'median_s' in r:
        r[f'vs_{base}'] = r['median_s'] / ref
  return {'model': model_name, 'n_params': _common.tree_size(params),
          'optimizers': rows}


# ---------------------------------------------------------------------------
# (c) a short LM race
# ---------------------------------------------------------------------------


def _corpus(name, dry_run):
  if name is None and dry_run:
    rng = np.random.default_rng(0)
    text = rng.integers(32, 127, size=200_000).astype(np.uint8)
    return text[:180_000], text[180_000:], {'name': 'synthetic (dry run)'}
  corpus = models.load_corpus(name or 'stdlib')
  return corpus.train, corpus.val, corpus.info


def lm_run(model_name, opt_name, lr, train, val, cfg):
  mcfg = models.CONFIGS[model_name]
  graphdef, params, rest = nnx.split(models.make_model(model_name, 0),
                                     nnx.Param, ...)
  sched = optax.warmup_cosine_decay_schedule(
      0.0, lr, cfg['lm_warmup'], cfg['lm_steps'], end_value=0.1 * lr)
  kw = {}
  if opt_name.endswith('_lite'):
    kw = {'total_steps': cfg['lm_steps'], 'warmup_steps': cfg['lm_warmup']}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   _common.registry([opt_name])[opt_name](sched, **kw))

  def loss_of(p, tokens):
    return models.loss_fn(nnx.merge(graphdef, p, rest), tokens)

  @jax.jit
  def chunk(p, s, batches):
    def body(carry, tokens):
      p, s = carry
      loss, g = jax.value_and_grad(loss_of)(p, tokens)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, s), losses = jax.lax.scan(body, (p, s), batches)
    return p, s, losses

  windows = models.val_windows(val, cfg['lm_val_windows'], mcfg.seq_len)
  evaluate = jax.jit(lambda p: jax.lax.map(
      lambda w: loss_of(p, w[None]), windows).mean())
  state = tx.init(params)
  data = jnp.asarray(train)
  n_chunks = cfg['lm_steps'] // cfg['lm_chunk']
  t_train, losses = 0.0, []
  t0 = time.perf_counter()
  for i in range(n_chunks):
    batches = models.sample_batches(jax.random.fold_in(jax.random.key(7), i),
                                    data, cfg['lm_chunk'], cfg['lm_batch'],
                                    mcfg.seq_len)
    batches = jax.block_until_ready(batches)
    t1 = time.perf_counter()
    params, state, ls = chunk(params, state, batches)
    ls = jax.block_until_ready(ls)
    if i > 0:  # chunk 0 includes compilation
      t_train += time.perf_counter() - t1
    losses.extend(np.asarray(ls, np.float64).tolist())
  val_loss = float(evaluate(params))
  tokens = (n_chunks - 1) * cfg['lm_chunk'] * cfg['lm_batch'] * mcfg.seq_len
  return {'model': model_name, 'optimizer': opt_name, 'peak_lr': lr,
          'steps': cfg['lm_steps'], 'final_val_loss': val_loss,
          'final_train_loss': float(np.mean(losses[-cfg['lm_chunk']:])),
          'tokens_per_s': tokens / t_train if t_train > 0 else None,
          'wall_s': time.perf_counter() - t0}


def lm_part(cfg, corpus_name, dry_run):
  train, val, info = _corpus(corpus_name, dry_run)
  rows = []
  for model_name in cfg['lm_models']:
    for opt_name in cfg['lm_optimizers']:
      lr = LM_LR[opt_name]
      r = lm_run(model_name, opt_name, lr, train, val, cfg)
      rows.append(r)
      print(f'  lm {model_name} {opt_name}: val {r["final_val_loss"]:.4f}, '
            f'{r["tokens_per_s"] or 0:.0f} tok/s')
  return {'corpus': info, 'runs': rows}


# ---------------------------------------------------------------------------
# (d) inverse roots: eigh vs coupled Newton
# ---------------------------------------------------------------------------


def spd(n, cond, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  lam = np.logspace(0, -np.log10(cond), n)
  return jnp.asarray((q * lam) @ q.T, jnp.float32)


def roots_part(sizes, timing, cond=1e3, eps=1e-6):
  rows = []
  for n in sizes:
    a = spd(n, cond, seed=n)
    eigh = jax.jit(lambda a: ol.linalg.inverse_root(a, 2, method='eigh',
                                                    eps=eps))
    ref = eigh(a)
    row = {'n': n, 'cond': cond, 'eigh_ms': _ms(_common.time_fn(
        eigh, a, **timing))}
    for iters in (30, 5):
      newton = jax.jit(functools.partial(
          ol.linalg.inverse_root, p=2, method='newton', eps=eps, iters=iters))
      out = newton(a)
      row[f'newton{iters}_ms'] = _ms(_common.time_fn(newton, a, **timing))
      row[f'newton{iters}_rel_err'] = float(
          jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    # FISMO's newton_warm: 3 steps from the root before one EMA step
    # F <- 0.95 F + 0.05 S (S a trace-normalised rank-n/2 statistic).
    g = jnp.asarray(np.random.default_rng(n + 1).standard_normal(
        (n, max(1, n // 2))), jnp.float32)
    stat = g @ g.T
    prev = (a - 0.05 * stat * (jnp.trace(a) / jnp.trace(stat))) / 0.95
    prev = 0.5 * (prev + prev.T) + 0.1 * jnp.eye(n) * jnp.trace(a) / n
    new_a = 0.95 * prev + 0.05 * stat * (jnp.trace(prev) / jnp.trace(stat))
    start, ref_new = eigh(prev), eigh(new_a)
    warm = jax.jit(functools.partial(ol.linalg.roots.inverse_sqrt_warm,
                                     iters=3, eps=eps))
    out = warm(new_a, start)
    row['warm3_ms'] = _ms(_common.time_fn(warm, new_a, start, **timing))
    row['warm3_rel_err'] = float(jnp.linalg.norm(out - ref_new)
                                 / jnp.linalg.norm(ref_new))
    rows.append(row)
    print(f'  roots {n}: eigh {row["eigh_ms"]:.2f} ms, newton30 '
          f'{row["newton30_ms"]:.2f} ms (err {row["newton30_rel_err"]:.1e}), '
          f'warm3 {row["warm3_ms"]:.2f} ms (err {row["warm3_rel_err"]:.1e})')
  return rows


# ---------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  cfg = DRY if args.dry_run else FULL
  timing = cfg['timing']
  print(f'device {_common.device_kind()}; parts {args.part_list}'
        + (' (dry run)' if args.dry_run else ''))
  out = {'meta': _common.metadata(args), 'dry_run': args.dry_run,
         'device': _common.device_kind(), 'timing': timing}
  t0 = time.perf_counter()
  if 'polar' in args.part_list:
    out['polar'] = polar_part(cfg['polar_sizes'], timing)
  if 'step' in args.part_list:
    out['step'] = step_part(cfg['step_model'], timing,
                            cfg['step_optimizers'])
  if 'lm' in args.part_list:
    out['lm'] = lm_part(cfg, args.corpus, args.dry_run)
  if 'roots' in args.part_list:
    out['roots'] = roots_part(cfg['root_sizes'], timing)
  out['total_s'] = time.perf_counter() - t0
  path = _common.result_path('gpu_suite', args.out, quick=args.dry_run)
  _common.write_json(path, out)
  return out, path


# ---------------------------------------------------------------------------
# Rendering (called by report.py)
# ---------------------------------------------------------------------------


def _f(x, spec='.3g'):
  return '–' if x is None else format(x, spec)


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines)


def render(d) -> str:
  """Markdown tables of one results file (without the source line)."""
  parts = []
  if d.get('dry_run'):
    parts.append('**Dry run** (tiny sizes; the numbers only show that the '
                 'code paths run).')
  if d.get('polar'):
    rows = [[f'{r["shape"][0]}×{r["shape"][1]}', r['dtype'],
             _f(r['polar_ms']), _f(r['polar_tflops']),
             _f(r['matmul_tflops']), _f(r['fraction_of_matmul'], '.2f'),
             _f(r['max_sv_error'], '.2g')] for r in d['polar']]
    parts.append('Polar factor (Polar Express, 6 steps) against a plain '
                 'matmul of the same dtype:\n\n' + _table(
                     ['shape', 'dtype', 'polar (ms)', 'polar TFLOP/s',
                      'matmul TFLOP/s', 'fraction of matmul',
                      'max|σ−1|'], rows))
  if d.get('step'):
    st = d['step']
    rows = []
    for name, r in st['optimizers'].items():
      if 'error' in r:
        rows.append([name, r['error'][:60], '–', '–'])
      else:
        rows.append([name, _f(_ms(r)), _f(r.get('vs_adamw'), '.2f'),
                     _f(r.get('vs_optax_muon'), '.2f')])
    parts.append(f'Step time on the `{st["model"]}` LM tree '
                 f'({st["n_params"]:,} parameters):\n\n' + _table(
                     ['optimizer', 'step (ms)', '× adamw',
                      '× optax.contrib.muon'], rows))
  if d.get('lm'):
    rows = [[r['model'], r['optimizer'], _f(r['peak_lr']), str(r['steps']),
             _f(r['final_val_loss'], '.4f'), _f(r['tokens_per_s'], '.0f')]
            for r in d['lm']['runs']]
    parts.append(f'Short LM runs (corpus: {d["lm"]["corpus"].get("name")}):'
                 '\n\n' + _table(['model', 'optimizer', 'peak lr', 'steps',
                                  'val loss', 'tokens/s'], rows))
  if d.get('roots'):
    rows = [[str(r['n']), _f(r['eigh_ms']), _f(r['newton30_ms']),
             _f(r['newton30_rel_err'], '.1e'), _f(r['newton5_ms']),
             _f(r['newton5_rel_err'], '.1e'), _f(r.get('warm3_ms')),
             _f(r.get('warm3_rel_err'), '.1e')] for r in d['roots']]
    parts.append('Inverse square roots of SPD matrices (condition '
                 f'{d["roots"][0]["cond"]:g}), eigh vs coupled Newton '
                 '(cold, and warm-started as FISMO\'s `newton_warm`):\n\n'
                 + _table(['n', 'eigh (ms)', 'Newton 30 it (ms)',
                           'rel. err', 'Newton 5 it (ms)', 'rel. err',
                           'warm 3 it (ms)', 'rel. err'], rows))
  return '\n\n'.join(parts)


if __name__ == '__main__':
  main()
