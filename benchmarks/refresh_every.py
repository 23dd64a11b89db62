"""Refreshing every k steps: final validation loss against k, in the LM race.

FISMO's inverse roots (``root_every``) and Muon-LITE's spectral filter
(``filter_every``) change slowly from step to step; refreshing them every
``k`` steps makes a step cheaper. This script trains the race's model
(``lm.py``'s ``Trainer``: byte-level LLaMA on the standard-library corpus,
cosine schedule, gradients clipped to norm 1) at a fixed peak learning rate
per optimizer (by default the best, interior, LR of the all-optimizer race
in ``results/lm_tiny1000_stdlib_cpu.json``) for every ``k`` and seed, and
reports per ``k`` the mean final validation loss, its spread over the seeds
and whether it stays within the seed spread of ``k = 1`` (the papers'
algorithm): ``|mean_k − mean_1| ≤ max(spread_1, spread_k)``, spread = max −
min over the seeds.

Every finished run is written to the JSON at once, and ``--resume`` keeps
the finished runs of an earlier call with the same settings, so the sweep
can be run in pieces (e.g. one optimizer per call).

  python benchmarks/refresh_every.py                     # both, k 1 2 5 10
  python benchmarks/refresh_every.py --optimizers muon_lite --every 1 5
  python benchmarks/refresh_every.py --quick             # 24 steps, smoke

The default settings are the race's: ``--model tiny --steps 1000 --batch 8
--seq-len 64 --warmup 100 --seeds 0 1``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _common  # noqa: E402
import lm  # noqa: E402
import models  # noqa: E402

# The keyword that sets k, per optimizer.
EVERY_KEYWORD = {'fismo': 'root_every', 'fismo_lite': 'root_every',
                 'muon_lite': 'filter_every', 'normuon_lite': 'filter_every'}
RACE_FILE = os.path.join(_common.RESULTS_DIR, 'lm_tiny1000_stdlib_cpu.json')
VAL_WINDOWS = 128  # as the race
SAME_AS_RACE = ('model', 'steps', 'batch', 'seq_len', 'warmup', 'chunk',
                'corpus')


def parse_args(argv=None):
  p = _common.arg_parser(__doc__)
  p.add_argument('--optimizers', nargs='*', default=['fismo', 'muon_lite'],
                 choices=sorted(EVERY_KEYWORD))
  p.add_argument('--every', type=int, nargs='*', default=[1, 2, 5, 10])
  p.add_argument('--seeds', type=int, nargs='*', default=[0, 1])
  p.add_argument('--model', default='tiny')
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--warmup', type=int, default=100)
  p.add_argument('--lr', nargs='*', default=[], metavar='NAME=LR',
                 help='peak LR per optimizer (default: the race\'s best)')
  p.add_argument('--out', default=None, help='results folder')
  p.add_argument('--resume', action='store_true')
  p.add_argument('--from-race', action='store_true',
                 help='take the runs the race already made (same model, '
                      'steps, LR and k) instead of training them again')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.every, args.seeds = 24, 4, [1, 5], [0]
  bad = [k for k in args.every if k < 1]
  if bad:
    raise ValueError(f'--every: each k must be >= 1, got {bad}')
  return args


def peak_lrs(args):
  """The LR of each optimizer: ``--lr NAME=LR``, else the race's best."""
  given = {}
  for item in args.lr:
    name, _, value = item.partition('=')
    if name not in EVERY_KEYWORD or not value:
      raise ValueError(f'--lr: expected NAME=LR with NAME in '
                       f'{sorted(EVERY_KEYWORD)}, got {item!r}')
    given[name] = float(value)
  race = {}
  if os.path.exists(RACE_FILE):
    with open(RACE_FILE) as f:
      race = {k: v['best_lr'] for k, v in json.load(f)['results'].items()
              if 'best_lr' in v}
  out = {}
  for name in args.optimizers:
    if name not in given and name not in race:
      raise ValueError(f'--lr: no LR for {name!r} (not in {RACE_FILE})')
    out[name] = given.get(name, race.get(name))
  return out


def race_runs(settings, have):
  """The race's runs that this sweep would repeat, marked as taken.

  Used only when the race was made with the same model, run length, batch,
  warm-up, chunk and corpus; a run is taken for an optimizer, seed and LR
  equal to this sweep's and for the k the race ran (its override, else 1).
  """
  with open(RACE_FILE) as f:
    race = json.load(f)
  rs = race['settings']
  if any(rs.get(k) != settings[k] for k in SAME_AS_RACE) or (
      rs.get('val_windows') != settings['val_windows']):
    raise ValueError('--from-race: the race in '
                     f'{RACE_FILE} was run with other settings')
  out = []
  for name, lr in settings['peak_lr'].items():
    entry = race['results'].get(name, {})
    k = int((entry.get('overrides') or {}).get(EVERY_KEYWORD[name], 1))
    for run in entry.get('runs', []):
      if (run['schedule'] != 'cos' or run['peak_lr'] != lr or any(
          r['optimizer'] == name and r['every'] == k and
          r['seed'] == run['seed'] for r in have + out)):
        continue
      run = {key: v for key, v in run.items() if key != 'train_loss'}
      run.update(optimizer=name, every=k, keyword=EVERY_KEYWORD[name],
                 source=os.path.basename(RACE_FILE))
      out.append(run)
  return out


def summarize(runs):
  """Per optimizer and k: mean, spread, and the k = 1 comparison."""
  rows = []
  for name in sorted({r['optimizer'] for r in runs}):
    by_k = {}
    for r in runs:
      if r['optimizer'] == name:
        by_k.setdefault(r['every'], []).append(r)
    base = by_k.get(1)
    base_mean = (float(np.mean([r['final_val_loss'] for r in base]))
                 if base else None)
    base_spread = (float(np.ptp([r['final_val_loss'] for r in base]))
                   if base and len(base) > 1 else None)
    for k in sorted(by_k):
      finals = [r['final_val_loss'] for r in by_k[k]]
      mean = float(np.mean(finals))
      spread = float(np.ptp(finals)) if len(finals) > 1 else None
      row = {'optimizer': name, 'every': k, 'seeds': len(finals),
             'peak_lr': by_k[k][0]['peak_lr'],
             'final_val_loss': mean, 'final_val_spread': spread,
             'tokens_per_s': float(np.mean([r['tokens_per_s'] or 0
                                            for r in by_k[k]]))}
      if base_mean is not None:
        row['minus_k1'] = mean - base_mean
        if base_spread is not None and spread is not None:
          row['within_seed_spread'] = bool(
              abs(mean - base_mean) <= max(base_spread, spread))
      rows.append(row)
  return rows


def main(argv=None):
  args = parse_args(argv)
  lrs = peak_lrs(args)
  cfg = dataclasses.replace(models.CONFIGS[args.model], seq_len=args.seq_len)
  corpus = models.load_corpus('stdlib')
  val_w = models.val_windows(corpus.val, VAL_WINDOWS, cfg.seq_len)
  train_w = models.val_windows(corpus.train, VAL_WINDOWS, cfg.seq_len)
  chunk = min(50, args.steps)
  steps = (args.steps // chunk) * chunk
  settings = {'model': args.model, 'steps': steps, 'batch': args.batch,
              'seq_len': args.seq_len, 'warmup': args.warmup,
              'chunk': chunk, 'schedule': 'cos', 'peak_lr': lrs,
              'corpus': 'stdlib', 'val_windows': VAL_WINDOWS}
  path = _common.result_path('refresh_every', args.out, quick=args.quick)
  runs = []
  if args.resume and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get('settings') != json.loads(json.dumps(settings)):
      raise ValueError(f'--resume: {path} was written with other settings; '
                       'remove it or use another --out.')
    runs = old['runs']
  if args.from_race:
    runs += race_runs(settings, runs)
  reg = _common.registry(args.optimizers)

  def record():
    _common.write_json(path, {'meta': _common.metadata(args),
                              'settings': settings,
                              'summary': summarize(runs), 'runs': runs})

  for name in args.optimizers:
    for k in args.every:
      todo = [s for s in args.seeds if not any(
          r['optimizer'] == name and r['every'] == k and r['seed'] == s
          for r in runs)]
      if not todo:
        continue
      kw = {EVERY_KEYWORD[name]: k}
      kw.update(lm.lite_run_length(name, steps, args.warmup, 'cos'))
      trainer = lm.Trainer(
          cfg, lambda lr, kw=kw, name=name: reg[name](lr, **kw),
          schedule='cos', steps=steps, warmup=args.warmup, batch=args.batch,
          chunk=chunk, seed=todo[0], train=corpus.train, val_windows=val_w,
          train_windows=train_w)
      for seed in todo:
        run = trainer.run(lrs[name], desc=f'{name} k={k} seed={seed}',
                          seed=seed)
        run.update(optimizer=name, every=k, keyword=EVERY_KEYWORD[name])
        del run['train_loss']  # the curve is in val_loss; keep files small
        runs.append(run)
        print(f'{name:12s} k={k:<3d} seed {seed} lr {lrs[name]:g}: val '
              f'{run["final_val_loss"]:.4f} ({run["tokens_per_s"]:.0f} tok/s)')
        record()
  record()
  for r in summarize(runs):
    print(r)


if __name__ == '__main__':
  main()
