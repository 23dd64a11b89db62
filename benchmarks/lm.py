"""Language-model race: quality per step and per second on a byte-level LLaMA.

For every optimizer in the registry (optax.adamw, optax.contrib.muon and all
of optax_lite's named optimizers) this script trains the LLaMA-style decoder
of ``models.py`` on the running interpreter's standard library sources
(``models.load_corpus``: ~12 MB, held-out split by file, so a CPU run never
repeats its data; byte counts and SHA-256 recorded as ``corpus`` in the
JSON) with a fixed token budget:

1. a peak-LR sweep with the cosine schedule (first seed), extended beyond an
   edge of the grid until the best value is interior (``--max-extend``),
2. the best LR again with the warmup-stable-decay (WSD) schedule,
3. the best LR with further seeds, both schedules.

Every run records the train–validation gap: final loss on fixed validation
windows minus final loss on as many fixed training windows (memorisation
shows as a large positive gap). LITE optimizers get their reference χ/β₂
ramps for the run length and schedule (``total_steps``, ``warmup_steps``,
``schedule``).

``--model/--steps/--batch/--seq-len/--warmup/--grid/--seeds/--schedules``
override the mode's settings, and ``--set fismo.root_every=10`` passes a
keyword to one optimizer; all of them are recorded in the JSON.

``--quick`` (tiny model, 0.86M parameters, 120 steps of 8x64 bytes, LR grid
{3e-3, 1e-2}, not extended, one seed) runs WSD only for adamw, muon and
muon_lite to stay under 10 minutes on 2 CPU cores, and runs fismo and
fismo_lite with
``root_every=10`` (inverse roots refreshed every 10 steps; recorded as
``settings.overrides`` and per optimizer as ``overrides`` in the JSON).

Schedules follow the LITE paper C.2: ``cos`` = linear warm-up to ``lr_max``
then cosine decay to ``0.1·lr_max``; ``wsd`` = warm-up, stable at ``lr_max``
up to 80 % of the steps, linear decay to 0 over the last 20 %. Gradients are
clipped to global norm 1 (as in the paper). Weight decay 0.1 everywhere.

Reported per run: train loss per step, validation loss every ``eval_every``
steps, seconds of training (compile excluded), tokens/s, final validation
loss; per optimizer: steps and seconds to reach Muon's (ol.muon, best LR,
cosine) final validation loss, and for each ``X_lite`` the step at which it
reaches ``X``'s final validation loss (seed 0, best LRs, same schedule).

  python benchmarks/lm.py --quick        # < 10 min on 2 CPU cores
  python benchmarks/lm.py                # full: bigger model, grid, 2 seeds

The all-optimizer race of docs/benchmarks.md (tiny model, 1000 steps,
2 seeds; about 1.5 h on 2 idle CPU cores):

  python benchmarks/lm.py --model tiny --steps 1000 --batch 8 --seq-len 64 \
      --warmup 100 --grid 1e-3 3e-3 1e-2 --seeds 0 1 --schedules cos \
      --set fismo.root_every=10 fismo_lite.root_every=10
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common  # noqa: E402
import models  # noqa: E402

REFERENCE = 'muon'  # the optimizer whose final loss defines "target"


def make_schedule(kind: str, peak_lr, total_steps, warmup: int):
  """LITE paper C.2 schedules as jnp functions of the step count.

  ``peak_lr`` and ``total_steps`` may be traced values (one compiled train
  step then serves every learning rate and run length); ``warmup`` is static.
  """
  total = jnp.asarray(total_steps, jnp.float32)
  warm = float(max(warmup, 1))
  if kind not in ('cos', 'wsd', 'const'):
    raise ValueError(f'schedule: unknown kind {kind!r}')

  def sched(count):
    t = jnp.asarray(count, jnp.float32)
    ramp = jnp.minimum((t + 1.0) / warm, 1.0)
    if kind == 'cos':
      frac = jnp.clip((t - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
      decay = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    elif kind == 'wsd':
      start = 0.8 * total
      decay = jnp.clip(1.0 - (t - start) / jnp.maximum(total - start, 1.0),
                       0.0, 1.0)
    else:
      decay = 1.0
    return peak_lr * ramp * decay

  return sched


def lite_run_length(name: str, steps: int, warmup: int, schedule: str):
  """Keywords that give a LITE optimizer its reference χ/β₂ ramps.

  The ramps of ``ol.*_lite`` need the run length and the schedule kind
  (``optax_lite.optimizers.lite``); other optimizers get ``{}``. A run
  shorter than its warmup (a smoke run) ramps from its last step, since
  the optimizers refuse ``warmup_steps >= total_steps``.
  """
  if not name.endswith('_lite') or schedule not in ('cos', 'wsd'):
    return {}
  return dict(total_steps=int(steps),
              warmup_steps=min(int(warmup), int(steps) - 1),
              schedule='cosine' if schedule == 'cos' else 'wsd')


class Trainer:
  """Compiled train chunks (lax.scan over steps) and evaluation.

  One compiled chunk serves every peak learning rate, seed and run length
  (``run(peak_lr, seed=, steps=)``); ``steps`` is the default run length and
  must be a multiple of ``chunk``. ``train_windows`` (fixed windows of the
  training stream, as many as the validation ones) give the final train
  loss that the train–validation gap compares with.
  """

  def __init__(self, cfg, factory, *, schedule: str, steps: int, warmup: int,
               batch: int, chunk: int, seed: int, train, val_windows,
               train_windows=None):
    self.cfg, self.steps, self.batch, self.chunk = cfg, steps, batch, chunk
    self.seed = seed
    model = models.make_model(cfg, seed)
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.train = jnp.asarray(train)
    self.val = val_windows
    self.train_w = train_windows
    graphdef, rest = self.graphdef, self.rest

    def build_tx(peak_lr, total):
      return optax.chain(optax.clip_by_global_norm(1.0),
                         factory(make_schedule(schedule, peak_lr, total,
                                               warmup)))

    def loss_of(params, tokens):
      return models.loss_fn(nnx.merge(graphdef, params, rest), tokens)

    def chunk_fn(params, opt_state, batches, peak_lr, total):
      tx = build_tx(peak_lr, total)

      def body(carry, tokens):
        p, s = carry
        loss, g = jax.value_and_grad(loss_of)(p, tokens)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                                 batches)
      return params, opt_state, losses

    def eval_fn(params, windows):
      return jax.lax.map(lambda w: loss_of(params, w[None]), windows,
                         batch_size=16).mean()

    self.init_state = lambda params: build_tx(1.0, steps).init(params)
    self.opt_state = self.init_state(self.params)
    batches = self._batches(0)
    t0 = time.perf_counter()
    self.chunk_fn = jax.jit(chunk_fn).lower(
        self.params, self.opt_state, batches, jnp.float32(1.0),
        jnp.float32(steps)).compile()
    self.eval_fn = jax.jit(eval_fn).lower(self.params, self.val).compile()
    self.compile_s = time.perf_counter() - t0

  def _batches(self, i, seed=None):
    seed = self.seed if seed is None else seed
    key = jax.random.fold_in(jax.random.key(1000 + seed), i)
    return models.sample_batches(key, self.train, self.chunk, self.batch,
                                 self.cfg.seq_len)

  def _init(self, seed):
    if seed == self.seed:
      return self.params, self.opt_state
    params = nnx.split(models.make_model(self.cfg, seed), nnx.Param, ...)[1]
    return params, self.init_state(params)

  def run(self, peak_lr: float, desc: str = '', *, seed: int | None = None,
          steps: int | None = None, eval_every: int | None = None) -> dict:
    """Train from the seed's initialisation; evaluate every ``eval_every``.

    ``eval_every`` (default: every chunk) must be a multiple of ``chunk``.
    """
    seed = self.seed if seed is None else seed
    steps = self.steps if steps is None else steps
    eval_every = eval_every or self.chunk
    if steps % self.chunk or eval_every % self.chunk:
      raise ValueError(f'steps ({steps}) and eval_every ({eval_every}) must '
                       f'be multiples of chunk ({self.chunk})')
    params, opt_state = self._init(seed)
    n_chunks = steps // self.chunk
    train_loss, val_steps, val_loss, val_time = [], [], [], []
    elapsed = 0.0
    v0 = float(self.eval_fn(params, self.val))
    val_steps.append(0), val_loss.append(v0), val_time.append(0.0)
    total = jnp.float32(steps)
    for i in _common.progress(range(n_chunks), desc=desc):
      batches = jax.block_until_ready(self._batches(i, seed))
      t0 = time.perf_counter()
      params, opt_state, losses = self.chunk_fn(params, opt_state, batches,
                                                jnp.float32(peak_lr), total)
      losses = jax.block_until_ready(losses)
      elapsed += time.perf_counter() - t0
      losses = np.asarray(losses, np.float64)
      train_loss.extend(losses.tolist())
      done = (i + 1) * self.chunk
      if done % eval_every and done != steps and np.isfinite(losses).all():
        continue
      v = float(self.eval_fn(params, self.val))
      val_steps.append(done)
      val_loss.append(v if math.isfinite(v) else float('nan'))
      val_time.append(elapsed)
      if not math.isfinite(v):
        break
    steps_done = val_steps[-1]
    tokens = steps_done * self.batch * self.cfg.seq_len
    final_val = val_loss[-1]
    train_eval = None
    if self.train_w is not None and math.isfinite(final_val):
      train_eval = float(self.eval_fn(params, self.train_w))
    return {
        'peak_lr': peak_lr, 'seed': seed, 'steps': steps_done,
        'final_val_loss': final_val, 'train_loss': train_loss,
        'val_steps': val_steps, 'val_loss': val_loss, 'val_time_s': val_time,
        'train_seconds': elapsed, 'compile_seconds': self.compile_s,
        'tokens': tokens,
        'tokens_per_s': tokens / elapsed if elapsed > 0 else None,
        'final_train_eval_loss': train_eval,
        # val − train on fixed windows: near 0 without memorisation.
        'train_val_gap': (final_val - train_eval
                          if train_eval is not None else None),
        'diverged': not math.isfinite(final_val),
    }


def _score(run):
  v = run['final_val_loss']
  return v if (v is not None and math.isfinite(v)) else float('inf')


def tune(run_at, grid, max_extend: int = 4):
  """Sweep ``grid``, then extend it until the best learning rate is interior.

  While the best (lowest final validation loss) value sits at an edge of
  the swept set, one more value is tried beyond that edge, a step of the
  grid's own ratio at that edge (×3 for a one-value grid), at most
  ``max_extend`` times. Returns ``(runs sorted by LR, best run, interior)``;
  ``interior`` is False when the extensions ran out at an edge.
  """
  if not grid:
    raise ValueError('grid: needs at least one learning rate')
  runs = {float(lr): run_at(float(lr)) for lr in sorted(grid)}
  for _ in range(max_extend + 1):
    lrs = sorted(runs)
    best = min(lrs, key=lambda lr: _score(runs[lr]))
    if len(lrs) >= 3 and lrs[0] < best < lrs[-1]:
      break
    if best == lrs[0]:
      new = lrs[0] / (lrs[1] / lrs[0] if len(lrs) > 1 else 3.0)
    else:
      new = lrs[-1] * (lrs[-1] / lrs[-2] if len(lrs) > 1 else 3.0)
    if _ == max_extend:
      break
    runs[float(new)] = run_at(float(new))
  lrs = sorted(runs)
  best = min(lrs, key=lambda lr: _score(runs[lr]))
  return ([runs[lr] for lr in lrs], runs[best],
          bool(len(lrs) >= 3 and lrs[0] < best < lrs[-1]))


def reach(run, target):
  """(steps, seconds) at which ``run``'s val loss first is ≤ ``target``."""
  for s, v, t in zip(run['val_steps'], run['val_loss'], run['val_time_s']):
    if v is not None and math.isfinite(v) and v <= target:
      return s, t
  return None, None


def settings(args):
  if args.quick:
    return dict(model='tiny', seq_len=64, steps=120, warmup=12, batch=8,
                chunk=12, grid=[3e-3, 1e-2], seeds=[0], val_windows=32,
                wsd_for=['adamw', 'muon', 'muon_lite'],
                # FISMO's three eigh per matrix and step stall on CPU:
                # refresh its inverse roots every 10 steps (Shampoo/SOAP
                # style amortisation; factors still updated every step).
                overrides={'fismo': {'root_every': 10},
                           'fismo_lite': {'root_every': 10}},
                corpus='stdlib', max_extend=0)
  return dict(model='small', seq_len=128, steps=1500, warmup=150, batch=16,
              chunk=50, grid=[1e-3, 3e-3, 1e-2, 3e-2], seeds=[0, 1],
              val_windows=128, wsd_for=None, overrides={}, corpus='stdlib',
              max_extend=4)


def parse_override(item: str):
  """'fismo.root_every=10' -> ('fismo', 'root_every', 10)."""
  target, sep, raw = item.partition('=')
  name, dot, key = target.partition('.')
  if not (sep and dot and name and key):
    raise ValueError(f'--set: expected NAME.KEY=VALUE, got {item!r}')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # a bare string such as a method name
  return name, key, value


def parse_args(argv=None):
  p = _common.arg_parser(__doc__)
  p.add_argument('--optimizers', nargs='*', default=None,
                 help='subset of registry names (default: all)')
  p.add_argument('--model', default=None, help=f'one of {list(models.CONFIGS)}')
  p.add_argument('--steps', type=int, default=None)
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--seq-len', type=int, default=None)
  p.add_argument('--warmup', type=int, default=None)
  p.add_argument('--set', nargs='*', default=[], metavar='NAME.KEY=VALUE',
                 help='optimizer keyword override, e.g. fismo.root_every=10 '
                 '(recorded in the JSON)')
  p.add_argument('--grid', type=float, nargs='*', default=None)
  p.add_argument('--seeds', type=int, nargs='*', default=None)
  p.add_argument('--schedules', nargs='*', default=None,
                 help='default: cos wsd')
  p.add_argument('--corpus', default=None, choices=models.CORPORA,
                 help='default: stdlib (pydoc only for tiny demonstrations)')
  p.add_argument('--max-extend', type=int, default=None,
                 help='LR values added beyond an edge of the grid until the '
                 'best is interior (default: 4; quick: 0)')
  p.add_argument('--out', default=None, help='results folder')
  p.add_argument('--resume', action='store_true',
                 help='keep the optimizers already finished in the results '
                 'file (written after each optimizer) and run the rest')
  p.add_argument('--no-plot', action='store_true')
  return p.parse_args(argv)


def resolve_settings(args):
  """The mode's settings with the command-line flags and overrides applied."""
  s = settings(args)
  s['schedules'] = (args.schedules if args.schedules is not None
                    else ['cos', 'wsd'])
  for k in ('model', 'steps', 'batch', 'grid', 'seeds', 'seq_len', 'warmup',
            'corpus', 'max_extend'):
    if getattr(args, k) is not None:
      s[k] = getattr(args, k)
  s['overrides'] = {k: dict(v) for k, v in s['overrides'].items()}
  for item in args.set:
    name, key, value = parse_override(item)
    s['overrides'].setdefault(name, {})[key] = value
  s['chunk'] = min(s['chunk'], s['steps'])
  s['steps'] = (s['steps'] // s['chunk']) * s['chunk']
  return s


def with_overrides(reg, overrides):
  """Registry factories with their overrides bound.

  Each override is checked here, before any training: an unknown optimizer
  name raises ``ValueError`` and a keyword the optimizer does not take raises
  ``TypeError`` (so the results file never records an override that was not
  applied).
  """
  reg = dict(reg)
  for name, kw in overrides.items():
    if name not in _common.ALL_NAMES:
      raise ValueError(f'--set: unknown optimizer {name!r}; known: '
                       f'{list(_common.ALL_NAMES)}')
    if name in reg:
      reg[name](1e-3, **kw)  # raises TypeError on an unknown keyword
      reg[name] = functools.partial(reg[name], **kw)
      print(f'[note] {name} runs with ' +
            ', '.join(f'{k}={v}' for k, v in kw.items()))
  return reg


def race_one(name, factory, s, trainer):
  """Peak LR tuned on the cosine schedule (first seed; the grid is extended
  until the best value is interior), then that LR on every schedule/seed.

  A LITE optimizer gets its reference ramps for the run length and schedule
  (:func:`lite_run_length`). One compiled trainer per schedule serves the
  whole sweep and every seed.
  """
  entry = {'sweep': [], 'runs': [], 'overrides': s['overrides'].get(name, {})}
  seed0 = s['seeds'][0]

  def schedule_trainer(schedule):
    kw = lite_run_length(name, s['steps'], s['warmup'], schedule)
    return trainer(functools.partial(factory, **kw) if kw else factory,
                   schedule, seed0)

  tr = schedule_trainer('cos')

  def run_at(lr):
    run = tr.run(lr, desc=f'{name} cos lr={lr:g}')
    run.update(schedule='cos')
    print(f'  {name:11s} cos lr={lr:<7g} val {run["final_val_loss"]:.4f} '
          f'({run["tokens_per_s"] or 0:.0f} tok/s)')
    return run

  entry['sweep'], best, entry['best_lr_interior'] = tune(
      run_at, s['grid'], s['max_extend'])
  entry['best_lr'] = best['peak_lr']
  entry['runs'].append(best)
  for schedule in s['schedules']:
    if (schedule != 'cos' and s['wsd_for'] is not None and
        name not in s['wsd_for']):
      continue
    tr_s = tr if schedule == 'cos' else schedule_trainer(schedule)
    for seed in s['seeds']:
      if schedule == 'cos' and seed == seed0:
        continue  # the sweep's best run
      run = tr_s.run(best['peak_lr'], desc=f'{name} {schedule} seed={seed}',
                     seed=seed)
      run.update(schedule=schedule)
      entry['runs'].append(run)
      print(f'  {name:11s} {schedule} lr={best["peak_lr"]:<7g} seed {seed} '
            f'val {run["final_val_loss"]:.4f}')
  return entry


def main(argv=None):
  args = parse_args(argv)
  s = resolve_settings(args)
  cfg = dataclasses.replace(models.CONFIGS[s['model']], seq_len=s['seq_len'])
  reg = with_overrides(_common.registry(args.optimizers), s['overrides'])
  corpus = models.load_corpus(s['corpus'])
  val_w = models.val_windows(corpus.val, s['val_windows'], cfg.seq_len)
  train_w = models.val_windows(corpus.train, s['val_windows'], cfg.seq_len)
  n_params = models.count_params(models.make_model(cfg, 0))
  print(f'device {_common.device_kind()}; model {s["model"]} '
        f'({n_params / 1e6:.2f}M params); {s["steps"]} steps x '
        f'{s["batch"]}x{cfg.seq_len} tokens; LR grid {s["grid"]}; corpus '
        f'{s["corpus"]} ({corpus.info["train_bytes"]:,} train bytes)')

  def trainer(factory, schedule, seed):
    return Trainer(cfg, factory, schedule=schedule, steps=s['steps'],
                   warmup=s['warmup'], batch=s['batch'], chunk=s['chunk'],
                   seed=seed, train=corpus.train, val_windows=val_w,
                   train_windows=train_w)

  path = _common.result_path('lm', args.out, quick=args.quick)
  results = resumed_results(path, s) if args.resume else {}

  def record():
    out = {'meta': _common.metadata(args), 'settings': s,
           'n_params': n_params, 'corpus': corpus.info,
           'model_config': cfg.__dict__, 'reference': REFERENCE,
           'summary': summarize(results, s), 'results': results}
    if set(results) != set(reg):
      out['partial'] = sorted(set(reg) - set(results))
    _common.write_json(path, out)
    return out

  # A bar over the optimizers; every training run has its own inner bar.
  for name, factory in _common.progress(list(reg.items()), desc='lm race'):
    if name in results:
      print(f'[resume] {name}: kept from {path}')
      continue
    try:
      results[name] = race_one(name, factory, s, trainer)
    except Exception as e:  # report and go on: one broken optimizer
      print(f'[error] {name}: {type(e).__name__}: {e}')
      results[name] = {'sweep': [], 'runs': [],
                       'error': f'{type(e).__name__}: {e}'}
    out = record()  # a stopped run keeps every optimizer it finished
  out = record()
  summary = out['summary']
  if not args.no_plot:
    plot(out, path[:-5] + '.png')
  print_summary(summary)
  return out


def resumed_results(path, s):
  """The finished optimizers of an earlier run with the same settings."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  if old.get('settings') != json.loads(json.dumps(s)):
    raise ValueError(f'--resume: {path} was written with other settings; '
                     'remove it or use another --out.')
  return {k: v for k, v in old['results'].items() if 'error' not in v}


def summarize(results, s):
  """Per optimizer and schedule: mean/spread of final val loss, reach."""
  ref = results.get(REFERENCE) or results.get('optax_muon')
  target = None
  if ref and ref.get('runs'):
    target = ref['runs'][0]['final_val_loss']
  rows = []
  for name, entry in results.items():
    for schedule in ('cos', 'wsd'):
      runs = [r for r in entry.get('runs', []) if r['schedule'] == schedule]
      if not runs:
        continue
      finals = [r['final_val_loss'] for r in runs]
      row = {'optimizer': name, 'schedule': schedule,
             'best_lr': entry.get('best_lr'), 'seeds': len(runs),
             'final_val_loss': float(np.mean(finals)),
             'final_val_spread': float(np.max(finals) - np.min(finals))
             if len(finals) > 1 else None,
             'tokens_per_s': float(np.mean([r['tokens_per_s'] or 0
                                            for r in runs])),
             'train_val_gap': _mean_gap(runs),
             'best_lr_interior': entry.get('best_lr_interior'),
             'target_loss': target,
             'overrides': entry.get('overrides') or None}
      if target is not None:
        st, sec = reach(runs[0], target)
        row['steps_to_target'] = st
        row['seconds_to_target'] = sec
      base_runs = [r for r in results.get(base_of(name), {}).get('runs', [])
                   if r['schedule'] == schedule]
      if base_runs:  # the LITE paper's claim: fewer steps than its base
        base = base_runs[0]
        st, sec = reach(runs[0], base['final_val_loss'])
        row['base'] = base_of(name)
        row['steps_to_base_final'] = st
        row['base_steps'] = base['steps']
        row['step_saving'] = base['steps'] / st if st else None
      rows.append(row)
  return rows


def _mean_gap(runs):
  """Mean final (val − train) loss on fixed windows; None if not measured."""
  gaps = [r.get('train_val_gap') for r in runs]
  gaps = [g for g in gaps if g is not None and math.isfinite(g)]
  return float(np.mean(gaps)) if gaps else None


def base_of(name: str):
  """'soap_lite' -> 'soap'; None for optimizers that are not LITE."""
  return name[:-len('_lite')] if name.endswith('_lite') else None


def print_summary(rows):
  print(f'{"optimizer":12s} {"sched":5s} {"lr":>7s} {"val":>7s} '
        f'{"tok/s":>8s} {"steps→muon":>10s} {"s→muon":>8s}')
  for r in rows:
    st = r.get('steps_to_target')
    sec = r.get('seconds_to_target')
    print(f'{r["optimizer"]:12s} {r["schedule"]:5s} {r["best_lr"]:7.0e} '
          f'{r["final_val_loss"]:7.4f} {r["tokens_per_s"]:8.0f} '
          f'{st if st is not None else "-":>10} '
          f'{f"{sec:.1f}" if sec is not None else "-":>8}')


def plot(out, path):
  plt = _common.setup_matplotlib()
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  for name, entry in out['results'].items():
    runs = [r for r in entry.get('runs', []) if r['schedule'] == 'cos']
    if not runs:
      continue
    r = runs[0]
    tl = np.asarray(r['train_loss'], np.float64)
    k = max(1, len(tl) // 40)
    sm = np.convolve(tl, np.ones(k) / k, mode='valid')
    ls = '--' if name in ('adamw', 'optax_muon') else '-'
    axes[0].plot(np.arange(len(sm)) + k, sm, ls, label=name)
    axes[1].plot(r['val_steps'], r['val_loss'], ls, label=name)
    axes[2].plot(r['val_time_s'], r['val_loss'], ls, label=name)
  axes[0].set(xlabel='step', ylabel='train loss (smoothed, nats/byte)',
              title='train loss, cos, best LR')
  axes[1].set(xlabel='step', ylabel='val loss', title='val loss per step')
  axes[2].set(xlabel='training seconds', ylabel='val loss',
              title=f'val loss per second ({out["meta"]["device_kind"]})')
  for ax in axes:
    vals = [v for e in out['results'].values() for r in e.get('runs', [])
            for v in r['val_loss'][1:] if v is not None and math.isfinite(v)]
    if vals:
      ax.set_ylim(min(vals) - 0.05, min(max(vals), min(vals) + 1.5))
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(f'byte-level LLaMA {out["settings"]["model"]} '
               f'({out["n_params"] / 1e6:.2f}M), {out["settings"]["steps"]} '
               'steps')
  _common.save_figure(fig, path)


if __name__ == '__main__':
  main()
