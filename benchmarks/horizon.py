"""LITE's horizon claim: does its step saving over the base grow with budget?

The LITE paper (Zhu et al. 2026, §6 and Fig. 1 left) trains Muon and
Muon-LITE at 40×, 100× and 200× tokens per parameter and reports "an
approximate 2× speedup over Muon" at 100×: Muon-LITE reaches Muon's final
loss in about half the steps, and the gain persists at longer horizons.

This script measures the same quantity at CPU (or small GPU) scale on the
byte-level LLaMA of ``models.py`` and the standard-library corpus
(``models.load_corpus``; no data repeats within these budgets):

* optimizers: the pairs (``muon``, ``muon_lite``) and (``soap``,
  ``soap_lite``), and ``adamw`` as the baseline;
* token budgets ``multipliers × base_steps`` (default 1×, 4×, 16×) with a
  fixed warm-up (as the paper's fixed 1000 steps);
* per budget and optimizer, the peak LR tuned on the cosine schedule (first
  seed) over a grid that ``lm.tune`` extends until the best value is
  interior; the first budget starts from ``grid``, each later one from three
  values around the previous budget's best;
* cosine and warmup-stable-decay schedules (paper C.2; ``tune_schedules``
  says which ones get their own LR sweep, the others reuse the cosine LR);
* every seed at the best LR; LITE optimizers get their reference χ/β₂ ramps
  for the run length (``lm.lite_run_length``).

Reported per budget: final validation loss (mean and spread over seeds),
the speedup of each LITE variant over its base, tokens/s, and the
train–validation gap. **Speedup** (per seed, same schedule): if the LITE run
reaches the base's final validation loss at step ``s`` (linear
interpolation between evaluations), ``budget / s`` (≥ 1, the paper's
number); otherwise ``s' / budget`` where ``s'`` is the step at which the base
reaches LITE's final loss (< 1: LITE is slower).

Results are written after every (budget, optimizer) that finishes, with
``"complete": false`` until the end, so a stopped run keeps what it did;
``--resume FILE`` reuses the finished entries of an earlier file that ran the
same settings (the full CPU mode resumes from the quick file: its first
three budgets are the quick mode's).

  python benchmarks/horizon.py --quick   # nano, 32/128/512 steps: <= 10 min
                                         # on 2 idle CPU cores
  python benchmarks/horizon.py --resume \
      benchmarks/results/horizon_quick_cpu.json
                                         # full CPU: + 2048 and 4096 steps, ~2 h
  python benchmarks/horizon.py --assemble --resume A.json B.json
                                         # gather finished parts, run nothing
  python benchmarks/horizon.py --gpu     # tiny model up to >= 20 tokens/param
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _common  # noqa: E402
import lm  # noqa: E402
import models  # noqa: E402

PAIRS = (('muon', 'muon_lite'), ('soap', 'soap_lite'))
# Order of work: each pair together, so a stopped run has whole pairs.
OPTIMIZERS = ('muon', 'muon_lite', 'soap', 'soap_lite', 'adamw')
PAPER_CLAIM = {'tokens_per_param': 100.0, 'speedup': 2.0,
               'text': 'LITE paper §6 / Fig. 1 (left): Muon-LITE ≈2× fewer '
                       'steps than Muon at 100× tokens per parameter '
                       '(0.13–1.3B models)'}

_COMMON = dict(seq_len=64, batch=8, val_windows=128, seeds=[0, 1],
               schedules=['cos', 'wsd'], tune_schedules=['cos'],
               ratio=3.0, max_extend=3, evals=12, corpus='stdlib')
PRESETS = {
    # 2 idle CPU cores: <= 10 minutes.
    'quick': dict(_COMMON, model='nano', base_steps=32, warmup=8,
                  multipliers=[1, 4, 16], grid=[3e-3, 1e-2, 3e-2]),
    # 2 idle CPU cores, ~2 hours: the quick budgets (resumable) and two more.
    'full': dict(_COMMON, model='nano', base_steps=32, warmup=8,
                 multipliers=[1, 4, 16, 64, 128], grid=[3e-3, 1e-2, 3e-2]),
    # One accelerator: base steps chosen so that the largest budget gives
    # >= 20 tokens per parameter (``tokens_per_param``); 17 MB for the tiny
    # model, so the corpus includes the test packages (~30 MB, no repeat).
    'gpu': dict(_COMMON, model='tiny', seq_len=128, batch=32, val_windows=256,
                warmup=64, multipliers=[1, 4, 16], grid=[1e-3, 3e-3, 1e-2],
                tune_schedules=['cos', 'wsd'], tokens_per_param=20.0,
                base_steps=None, corpus='stdlib_tests'),
}
# Settings that must match for --resume to reuse a finished entry.
_RESUME_KEYS = ('model', 'seq_len', 'batch', 'val_windows', 'seeds',
                'schedules', 'tune_schedules', 'ratio', 'max_extend', 'evals',
                'corpus', 'base_steps', 'warmup', 'grid', 'chunk')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  mode = p.add_mutually_exclusive_group()
  mode.add_argument('--quick', action='store_true')
  mode.add_argument('--gpu', action='store_true')
  p.add_argument('--model', default=None, help=f'one of {list(models.CONFIGS)}')
  p.add_argument('--base-steps', type=int, default=None)
  p.add_argument('--multipliers', type=int, nargs='*', default=None)
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--seq-len', type=int, default=None)
  p.add_argument('--warmup', type=int, default=None)
  p.add_argument('--grid', type=float, nargs='*', default=None,
                 help='first budget\'s starting LR grid')
  p.add_argument('--max-extend', type=int, default=None)
  p.add_argument('--seeds', type=int, nargs='*', default=None)
  p.add_argument('--schedules', nargs='*', default=None)
  p.add_argument('--tune-schedules', nargs='*', default=None,
                 help='schedules with their own LR sweep (others reuse cos)')
  p.add_argument('--optimizers', nargs='*', default=None,
                 help=f'subset of {list(OPTIMIZERS)}')
  p.add_argument('--corpus', default=None, choices=models.CORPORA,
                 help="default stdlib; stdlib_tests for the GPU preset's "
                 'largest budgets')
  p.add_argument('--evals', type=int, default=None,
                 help='validation points per run (>= budget/chunk apart)')
  p.add_argument('--resume', nargs='*', default=None, metavar='FILE',
                 help='reuse the finished entries of these results files')
  p.add_argument('--assemble', action='store_true',
                 help='only gather the --resume entries into one file (and '
                 'plot); run nothing; unfinished budgets stay partial')
  p.add_argument('--note', default=None,
                 help='recorded with the results (e.g. machine load)')
  p.add_argument('--out', default=None, help='results folder')
  p.add_argument('--no-plot', action='store_true')
  return p.parse_args(argv)


def resolve_settings(args, n_params_of=None):
  """The preset of the mode with the flags applied; derived sizes added."""
  mode = 'quick' if args.quick else 'gpu' if args.gpu else 'full'
  s = dict(PRESETS[mode], mode=mode)
  for k in ('model', 'base_steps', 'multipliers', 'batch', 'seq_len',
            'warmup', 'grid', 'max_extend', 'seeds', 'schedules',
            'tune_schedules', 'evals', 'corpus'):
    if getattr(args, k) is not None:
      s[k] = getattr(args, k)
  s['optimizers'] = list(args.optimizers or OPTIMIZERS)
  unknown = [n for n in s['optimizers'] if n not in OPTIMIZERS]
  if unknown:
    raise ValueError(f'--optimizers: unknown {unknown}; one of '
                     f'{list(OPTIMIZERS)}')
  bad = [k for k in s['tune_schedules'] if k not in s['schedules']]
  if 'cos' not in s['schedules'] or bad:
    raise ValueError('--schedules must include cos and every '
                     f'--tune-schedules entry (got {s["schedules"]}, '
                     f'{s["tune_schedules"]})')
  if not s['multipliers'] or min(s['multipliers']) < 1:
    raise ValueError(f'--multipliers: positive integers, got '
                     f'{s["multipliers"]}')
  tokens_per_step = s['batch'] * s['seq_len']
  if s.get('base_steps') is None:  # from the tokens-per-parameter target
    n_params = n_params_of(s['model'])
    steps = s['tokens_per_param'] * n_params / tokens_per_step
    s['base_steps'] = int(math.ceil(steps / max(s['multipliers']) / 8)) * 8
  # One compiled chunk length for every budget: an eighth of the base run.
  s['chunk'] = max(1, s['base_steps'] // 8)
  s['base_steps'] = (s['base_steps'] // s['chunk']) * s['chunk']
  s['tokens_per_step'] = tokens_per_step
  return s


def eval_every(s, steps):
  """About ``evals`` validation points per run, on chunk boundaries."""
  chunks = steps // s['chunk']
  return s['chunk'] * max(1, chunks // s['evals'])


def crossing(run, target):
  """First step at which ``run``'s val loss is <= ``target``, interpolated.

  Linear interpolation between the two evaluations around the crossing;
  None if the run never gets there.
  """
  steps, vals = run['val_steps'], run['val_loss']
  for i, (st, v) in enumerate(zip(steps, vals)):
    if v is None or not math.isfinite(v):
      return None
    if v <= target:
      if i == 0:
        return float(st)
      s0, v0 = steps[i - 1], vals[i - 1]
      return float(s0 + (st - s0) * (v0 - target) / (v0 - v))
  return None


def speedup(lite, base):
  """The LITE run's step saving over the base run (see module docstring)."""
  budget = base['steps']
  if lite['diverged'] or base['diverged']:
    return None
  at = crossing(lite, base['final_val_loss'])
  if at is not None and at > 0:
    return budget / at
  back = crossing(base, lite['final_val_loss'])
  return back / budget if back is not None else None


def _thin(run):
  """A run without its per-step train losses (kept: the last tenth's mean)."""
  out = {k: v for k, v in run.items() if k != 'train_loss'}
  tl = run.get('train_loss') or []
  tail = tl[-max(1, len(tl) // 10):]
  out['train_loss_end'] = float(np.mean(tail)) if tail else None
  return out


def run_optimizer(name, factory, s, steps, start_grid, data, trainers):
  """Tune and run one optimizer at one budget; returns its entry."""
  cfg, corpus, val_w, train_w = data
  every = eval_every(s, steps)

  def trainer(schedule):
    kw = lm.lite_run_length(name, steps, s['warmup'], schedule)
    key = (name, schedule, steps if kw else None)
    if key not in trainers:  # base optimizers: one compile for every budget
      fac = functools.partial(factory, **kw) if kw else factory
      trainers[key] = lm.Trainer(
          cfg, fac, schedule=schedule, steps=steps, warmup=s['warmup'],
          batch=s['batch'], chunk=s['chunk'], seed=s['seeds'][0],
          train=corpus.train, val_windows=val_w, train_windows=train_w)
    return trainers[key]

  entry = {'schedules': {}}
  best_cos = None
  for schedule in s['schedules']:
    tr = trainer(schedule)

    def run_at(lr, seed=s['seeds'][0], tr=tr, schedule=schedule):
      r = tr.run(lr, desc=f'{name} {steps} {schedule} lr={lr:g} s{seed}',
                 seed=seed, steps=steps, eval_every=every)
      r.update(schedule=schedule)
      print(f'  {steps:5d} {name:10s} {schedule} lr={lr:<8.3g} seed {seed} '
            f'val {r["final_val_loss"]:.4f} gap {r["train_val_gap"] or 0:+.3f}'
            f' ({r["tokens_per_s"] or 0:.0f} tok/s)', flush=True)
      return _thin(r)

    if schedule in s['tune_schedules']:
      sweep, best, interior = lm.tune(run_at, start_grid, s['max_extend'])
    else:
      best = run_at(best_cos['peak_lr'])
      sweep, interior = [], entry['schedules']['cos']['best_lr_interior']
    runs = [best] + [run_at(best['peak_lr'], seed=seed)
                     for seed in s['seeds'][1:]]
    entry['schedules'][schedule] = {
        'best_lr': best['peak_lr'], 'best_lr_interior': interior,
        'lr_tuned_here': schedule in s['tune_schedules'],
        'sweep': [{k: r[k] for k in ('peak_lr', 'final_val_loss',
                                     'train_val_gap', 'diverged')}
                  for r in sweep],
        'runs': runs}
    if schedule == 'cos':
      best_cos = best
  return entry


def next_grid(best_lr, ratio):
  return [best_lr / ratio, best_lr, best_lr * ratio]


def summarize(budgets, s):
  """One row per (budget, schedule, optimizer); LITE rows carry speedups."""
  rows = []
  for b in budgets:
    for name, entry in b['optimizers'].items():
      for schedule, e in entry['schedules'].items():
        runs = e['runs']
        finals = [r['final_val_loss'] for r in runs]
        gaps = [r['train_val_gap'] for r in runs
                if r.get('train_val_gap') is not None]
        row = {'multiplier': b['multiplier'], 'steps': b['steps'],
               'tokens_per_param': b['tokens_per_param'],
               'optimizer': name, 'schedule': schedule,
               'best_lr': e['best_lr'],
               'best_lr_interior': e['best_lr_interior'],
               'seeds': len(runs),
               'final_val_loss': float(np.mean(finals)),
               'final_val_spread': float(np.max(finals) - np.min(finals)),
               'train_val_gap': float(np.mean(gaps)) if gaps else None,
               'tokens_per_s': float(np.mean([r['tokens_per_s'] or 0
                                              for r in runs]))}
        base = lm.base_of(name)
        base_e = b['optimizers'].get(base, {}).get('schedules', {}).get(
            schedule)
        if base_e:
          by_seed = {r['seed']: r for r in base_e['runs']}
          sp = [speedup(r, by_seed[r['seed']]) for r in runs
                if r['seed'] in by_seed]
          row['base'] = base
          row['speedups'] = sp
          ok = [v for v in sp if v is not None]
          row['speedup_mean'] = float(np.mean(ok)) if ok else None
          row['speedup_min'] = float(np.min(ok)) if ok else None
          row['speedup_max'] = float(np.max(ok)) if ok else None
          row['base_final_val_loss'] = float(np.mean(
              [r['final_val_loss'] for r in base_e['runs']]))
        rows.append(row)
  return rows


def _load_resume(paths, s):
  """Finished {(multiplier, name): entry} of ``paths`` with matching settings.

  An entry is reused when its file ran the same settings (``_RESUME_KEYS``)
  and the same number of steps for that multiplier.
  """
  done = {}
  for path in paths or ():
    with open(path) as f:
      old = json.load(f)
    o = old.get('settings', {})
    diff = [k for k in _RESUME_KEYS if o.get(k) != s.get(k)]
    if diff:
      print(f'[note] --resume {path}: settings differ in {diff}; not reused')
      continue
    n = 0
    for b in old.get('budgets', []):
      for name, entry in b['optimizers'].items():
        done.setdefault((b['multiplier'], name), entry)
        n += 1
    print(f'[note] --resume: {n} finished entries from {path}')
  return done


def main(argv=None):
  args = parse_args(argv)
  s = resolve_settings(args, lambda m: models.count_params(
      models.make_model(m, 0)))
  cfg = dataclasses.replace(models.CONFIGS[s['model']], seq_len=s['seq_len'])
  n_params = models.count_params(models.make_model(cfg, 0))
  corpus = models.load_corpus(s['corpus'])
  val_w = models.val_windows(corpus.val, s['val_windows'], cfg.seq_len)
  train_w = models.val_windows(corpus.train, s['val_windows'], cfg.seq_len)
  data = (cfg, corpus, val_w, train_w)
  reg = _common.registry(s['optimizers'])
  done = _load_resume(args.resume, s)
  path = _common.result_path('horizon', args.out, quick=args.quick)
  budgets_steps = [m * s['base_steps'] for m in s['multipliers']]
  print(f'device {_common.device_kind()}; model {s["model"]} '
        f'({n_params:,} params); budgets {budgets_steps} steps x '
        f'{s["tokens_per_step"]} tokens; corpus {corpus.info["train_bytes"]:,}'
        ' train bytes')
  out = {'meta': _common.metadata(args), 'settings': s, 'n_params': n_params,
         'model_config': cfg.__dict__, 'corpus': corpus.info,
         'paper_claim': PAPER_CLAIM, 'note': args.note, 'complete': False,
         'budgets': [],
         'summary': []}
  t_start = time.perf_counter()
  grids = {name: list(s['grid']) for name in reg}
  trainers = {}
  for mult, steps in zip(s['multipliers'], budgets_steps):
    tokens = steps * s['tokens_per_step']
    b = {'multiplier': mult, 'steps': steps, 'tokens': tokens,
         'tokens_per_param': tokens / n_params,
         'epochs_of_train_split': tokens / corpus.info['train_bytes'],
         'optimizers': {}}
    out['budgets'].append(b)
    # One bar per budget over the optimizers (each run has its own bar).
    for name, factory in _common.progress(list(reg.items()),
                                          desc=f'{steps} steps'):
      entry = done.get((mult, name))
      if entry is None and args.assemble:
        continue
      if entry is None:
        entry = run_optimizer(name, factory, s, steps, grids[name], data,
                              trainers)
      b['optimizers'][name] = entry
      grids[name] = next_grid(entry['schedules']['cos']['best_lr'],
                              s['ratio'])
      out['summary'] = summarize(out['budgets'], s)
      out['elapsed_s'] = time.perf_counter() - t_start
      _common.write_json(path, out)  # partial results survive a stop
  out['complete'] = all(len(b['optimizers']) == len(reg)
                        for b in out['budgets'])
  out['budgets'] = [b for b in out['budgets'] if b['optimizers']]
  out['summary'] = summarize(out['budgets'], s)
  _common.write_json(path, out)
  if not args.no_plot:
    plot(out, path[:-5] + '.png')
  print_summary(out['summary'])
  return out


def print_summary(rows):
  for r in rows:
    sp = ''
    if r.get('base'):
      sp = ('speedup ' + ', '.join('–' if v is None else f'{v:.2f}'
                                   for v in r['speedups']))
    print(f'{r["steps"]:5d} {r["schedule"]:3s} {r["optimizer"]:10s} '
          f'lr {r["best_lr"]:.2g}{"" if r["best_lr_interior"] else "*"} '
          f'val {r["final_val_loss"]:.4f}±{r["final_val_spread"] / 2:.4f} '
          f'gap {r["train_val_gap"] or 0:+.3f} {sp}')


def plot(out, path):
  plt = _common.setup_matplotlib()
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  styles = {'cos': '-', 'wsd': '--'}
  for lite_name in ('muon_lite', 'soap_lite'):
    for schedule in out['settings']['schedules']:
      rows = [r for r in out['summary'] if r['optimizer'] == lite_name and
              r['schedule'] == schedule and r.get('speedup_mean')]
      if not rows:
        continue
      x = [r['tokens_per_param'] for r in rows]
      y = [r['speedup_mean'] for r in rows]
      err = [[r['speedup_mean'] - r['speedup_min'] for r in rows],
             [r['speedup_max'] - r['speedup_mean'] for r in rows]]
      ax.errorbar(x, y, yerr=err, fmt='o' + styles.get(schedule, '-'),
                  capsize=3, label=f'{lite_name} / {lite_name[:-5]}, '
                  f'{schedule} (min–max over seeds)')
  c = out['paper_claim']
  ax.plot([c['tokens_per_param']], [c['speedup']], '*', ms=14, color='k',
          label='paper: ≈2× at 100 tokens/param (Fig. 1)')
  ax.axhline(1.0, color='grey', lw=0.8)
  ax.set_xscale('log')
  ax.set(xlabel='training tokens per parameter',
         ylabel='speedup (base steps ÷ LITE steps to base final loss)',
         title=f'LITE speedup vs horizon — {out["settings"]["model"]} '
         f'({out["n_params"] / 1e6:.2f}M), {out["meta"]["device_kind"]}'
         + ('' if out.get('complete') else ' (partial)'))
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  _common.save_figure(fig, path)


if __name__ == '__main__':
  main()
