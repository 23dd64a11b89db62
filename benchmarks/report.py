"""Regenerates the benchmark tables of the docs from ``benchmarks/results/``.

Only the text between ``<!-- BEGIN GENERATED:<name> -->`` and
``<!-- END GENERATED:<name> -->`` in ``docs/benchmarks.md`` is replaced
(names: ``NAMES``). If a marker pair is missing it is appended at the end of
the page under a ``## Generated tables`` heading. Nothing is typed by hand:
every number comes from a results file, and every table names the file it
came from (links relative to the page). The same text is also written to
``benchmarks/results/SUMMARY.md`` (links relative to the repository root).
The README's "Which optimizer should I use?" table (marker ``choice``) is
built here too, from the LM race, the refresh race, the model step times
and the state bytes (:func:`choice_table`).

  python benchmarks/report.py [--doc docs/benchmarks.md] [--results DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm  # noqa: E402  (its summarize() is the one source of the LM table)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAMES = ('step_time', 'lm', 'refresh_every', 'horizon', 'synthetic',
         'state_bytes', 'memory', 'distributed', 'distributed_polar',
         'gpu_suite')


def _fmt(x, spec='.3g'):
  if x is None:
    return '–'
  if isinstance(x, str):
    return x
  if isinstance(x, float) and not math.isfinite(x):
    return '–'
  return format(x, spec)


def _rel(path):
  return os.path.relpath(path, ROOT).replace(os.sep, '/')


def _files(results, stem):
  files = sorted(glob.glob(os.path.join(results, f'{stem}_*.json')) +
                 glob.glob(os.path.join(results, f'{stem}.json')))
  # 'distributed_*' must not pick up 'distributed_polar_*' (a longer stem).
  longer = [n for n in NAMES if n != stem and n.startswith(stem + '_')]
  files = [f for f in files if not any(
      os.path.basename(f).startswith(n + '_') or
      os.path.basename(f) == n + '.json' for n in longer)]
  # Full runs first, then quick; GPU results before CPU.
  return sorted(files, key=lambda f: ('_quick_' in f, '_cpu' in f, f))


# Flags that choose a mode, a place or a label, not a setting.
_MODE_FLAGS = ('quick', 'gpu', 'out', 'no_plot', 'note', 'resume',
               'assemble', 'compile', 'compile_only')


def _shell_word(arg: str) -> str:
  """A command-line word as it would be typed: script paths relative."""
  if arg.endswith('.py'):
    return os.path.relpath(arg, ROOT)
  return shlex.quote(arg)


def _head(path, data):
  meta = data.get('meta', {})
  # Every setting flag of the scripts defaults to None (or off): a run that
  # set any flag other than the mode and output ones ran custom settings.
  custom = any(v not in (None, False, []) for k, v in
               (meta.get('args') or {}).items() if k not in _MODE_FLAGS)
  mode = ('quick' if '_quick_' in os.path.basename(path) else
          'custom settings (see command)' if custom else 'full')
  return (f'*Source: [`{_rel(path)}`]({_rel(path)}) — device '
          f'**{meta.get("device_kind", "?")}**, {mode} mode, '
          f'{meta.get("utc", "")}, jax {meta.get("jax", "?")}, '
          f'optax {meta.get("optax", "?")}. Command: '
          f'`python {" ".join(_shell_word(a) for a in meta.get("argv", []))}`*')


def _table(header, rows):
  out = ['| ' + ' | '.join(header) + ' |',
         '|' + '|'.join('---' for _ in header) + '|']
  out += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(out)


# ---------------------------------------------------------------------------


def step_time_section(path, d):
  parts = [_head(path, d)]
  leaves = d.get('leaves', [])
  mods = d.get('models', [])
  groups = leaves + mods
  if groups:
    names = list(groups[0]['optimizers'])
    header = ['optimizer'] + [f'{g["name"]} ×adamw / ×optax_muon'
                              for g in groups] + ['state B/param (leaf)']
    rows = []
    for n in names:
      row = [f'`{n}`']
      for g in groups:
        r = g['optimizers'].get(n, {})
        if 'error' in r:
          row.append('error')
        else:
          row.append(f'{_fmt(r.get("ratio_to_adamw"), ".2f")} / '
                     f'{_fmt(r.get("ratio_to_optax_muon"), ".2f")}')
      sb = groups[0]['optimizers'].get(n, {}).get('state_bytes_per_param')
      row.append(_fmt(sb, '.1f'))
      rows.append(row)
    rows.append(['optax.adamw median step (s)'] + [
        _fmt(g['optimizers'].get('adamw', {}).get('median_s'), '.2e')
        for g in groups] + [''])
    parts.append('Step time (median of consecutive jitted steps after '
                 'warm-up) as a ratio to `optax.adamw` / to '
                 '`optax.contrib.muon` in the same run; leaves are '
                 'single `m×n` float32 matrices, models are the byte-level '
                 'LLaMA of `benchmarks/models.py` (' + ', '.join(
                     f'{m["name"]}: {m["n_params"] / 1e6:.2f}M params'
                     for m in mods) + ').')
    parts.append(_table(header, rows))
    # Mean (includes amortised refreshes) vs muon.
    header = ['optimizer'] + [f'{g["name"]} ×muon median / mean'
                              for g in groups]
    rows = []
    for n in names:
      row = [f'`{n}`']
      for g in groups:
        r = g['optimizers'].get(n, {})
        row.append(f'{_fmt(r.get("ratio_to_muon"), ".2f")} / '
                   f'{_fmt(r.get("ratio_to_muon_mean"), ".2f")}')
      rows.append(row)
    parts.append('Ratio to `ol.muon` (median, and mean — the mean includes '
                 'the amortised preconditioner refreshes):')
    parts.append(_table(header, rows))
  if leaves:
    keys = list(leaves[0]['polar']['ratios'])
    parts.append('Polar factor: `ol.orthogonalize` vs '
                 '`optax.contrib.scale_by_muon` at equal steps, and vs the '
                 'matmul floor (the bare X·Xᵀ, A·A, B·X of each step, '
                 'jitted the same way):')
    parts.append(_table(['ratio'] + [l['name'] for l in leaves], [
        [k] + [_fmt(l['polar']['ratios'].get(k), '.2f') for l in leaves]
        for k in keys]))
    for block, text in (
        ('rmnp', 'RMNP (row normalisation, O(mn)) against Muon and against '
                 'elementwise passes over the same bytes:'),
        ('kron', 'Where a Kronecker preconditioner\'s time goes (both '
                 'sides, factors of the leaf\'s gradient): eigh, one QR '
                 'power refresh, inverse 4th roots, each as a ratio to the '
                 'eigenbasis rotations that SOAP pays every step:')):
      table = _ratio_table(leaves, block)
      if table:
        parts += [text, table]
  orth = d.get('orthogonality', [])
  if orth:
    keys = [k for k in orth[0] if k not in ('shape', 'cond')]
    parts.append('Orthogonality on condition-number-10³ matrices: '
                 'max |σᵢ − 1| of the output (smaller is closer to U Vᵀ):')
    parts.append(_table(['shape'] + keys, [
        [f'{r["shape"][0]}×{r["shape"][1]}'] + [_fmt(r[k], '.3f')
                                                  for k in keys]
        for r in orth]))
  png = path[:-5] + '.png'
  if os.path.exists(png):
    parts.append(f'![step time vs size]({_rel(png)})')
  return '\n\n'.join(parts)


def _ratio_table(leaves, block):
  """Rows: the ratios of ``leaf[block]`` (union over leaves); cols: leaves."""
  keys = []
  for l in leaves:
    keys += [k for k in l.get(block, {}).get('ratios', {}) if k not in keys]
  if not keys:
    return None
  return _table(['ratio'] + [l['name'] for l in leaves], [
      [k] + [_fmt(l.get(block, {}).get('ratios', {}).get(k), '.2f')
             for l in leaves] for k in keys])


def _progress_table(results, total_steps, fractions=(0.25, 0.5, 0.75, 1.0)):
  """Mean val loss over the cosine runs at fractions of ``total_steps``.

  A run that stopped early (diverged) has no value at the later marks, and
  the optimizer's cell there is '–'.
  """
  marks = [int(round(f * total_steps)) for f in fractions]
  rows = []
  for name, e in results.items():
    curves = [dict(zip(r['val_steps'], r['val_loss']))
              for r in e.get('runs', []) if r['schedule'] == 'cos']
    if not curves:
      continue
    cells = []
    for m in marks:
      vals = [c[m] for c in curves if m in c]
      cells.append(_fmt(sum(vals) / len(vals), '.3f')
                   if len(vals) == len(curves) else '–')
    rows.append([f'`{name}`'] + cells)
  if not rows:
    return None
  return _table(['optimizer'] + [f'step {m}' for m in marks], rows)


def lm_section(path, d):
  parts = [_head(path, d)]
  s = d.get('settings', {})
  parts.append(
      f'Model `{s.get("model")}` ({d.get("n_params", 0) / 1e6:.2f}M params, '
      f'seq {s.get("seq_len")}), {s.get("steps")} steps × {s.get("batch")} '
      f'sequences, peak-LR grid {s.get("grid")} (cosine, seed '
      f'{s.get("seeds", [0])[0]}), seeds {s.get("seeds")}. Target = final '
      f'val loss of `{d.get("reference")}` (best LR, cosine).')
  parts.append(corpus_line(d))
  if d.get('partial'):
    parts.append('**Partial run**: stopped before ' + ', '.join(
        f'`{n}`' for n in d['partial']) + ' ran; the rows below are the '
        'optimizers it finished. `lm.py --resume` with the same settings '
        '(and this file as `<out>/lm_<device>.json`) runs the rest.')
  overrides = {k: v for k, v in (s.get('overrides') or {}).items() if v}
  if overrides:
    parts.append('Per-optimizer settings beyond the defaults: ' + '; '.join(
        f'`{k}`: ' + ', '.join(f'{a}={b}' for a, b in v.items())
        for k, v in overrides.items()) + '.')
  # Recomputed from the raw runs so that every file gets the current columns.
  summary = lm.summarize(d['results'], s) if 'results' in d else d.get(
      'summary', [])
  rows = []
  for r in summary:
    spread = r.get('final_val_spread')
    edge = ' (edge)' if r.get('best_lr_interior') is False else ''
    rows.append([f'`{r["optimizer"]}`', r['schedule'],
                 _fmt(r['best_lr'], '.0e') + edge,
                 _fmt(r['final_val_loss'], '.4f') + (
                     f' ± {spread / 2:.4f}' if spread is not None else ''),
                 r['seeds'], _fmt(r['tokens_per_s'], '.0f'),
                 _fmt(r.get('steps_to_target'), 'd') if isinstance(
                     r.get('steps_to_target'), int) else '–',
                 _fmt(r.get('seconds_to_target'), '.1f'),
                 _base_reach(r), _fmt(r.get('train_val_gap'), '+.3f')])
  parts.append(_table(['optimizer', 'schedule', 'best peak LR',
                       'final val loss (nats/byte)', 'seeds', 'tokens/s',
                       'steps to target', 'seconds to target',
                       "LITE, seed 0: step at base's final loss "
                       '(base steps ÷ it)', 'val − train (end)'], rows))
  progress = _progress_table(d.get('results', {}), s.get('steps', 0))
  if progress:
    parts.append('Validation loss along the run (cosine, best LR, mean over '
                 'seeds), at a quarter, half, three quarters and the end of '
                 'the steps:')
    parts.append(progress)
  sweep_rows = []
  for name, e in d.get('results', {}).items():
    if 'error' in e:
      sweep_rows.append([f'`{name}`', 'error: ' + e['error'][:80]])
      continue
    sweep_rows.append([f'`{name}`', ', '.join(
        f'{r["peak_lr"]:g}: {_fmt(r["final_val_loss"], ".4f")}'
        for r in e.get('sweep', []))])
  parts.append('LR sweep (cosine, final val loss per peak LR):')
  parts.append(_table(['optimizer', 'peak LR: val loss'], sweep_rows))
  png = path[:-5] + '.png'
  if os.path.exists(png):
    parts.append(f'![loss curves]({_rel(png)})')
  return '\n\n'.join(parts)


def corpus_line(d):
  """Which data a language-model results file was trained on."""
  c = d.get('corpus')
  if not c or c.get('name') == 'pydoc':
    return ('**Old corpus:** `pydoc_data.topics` (466 KB; the training split '
            'is one epoch every ~820 steps of 8×64 bytes), so long runs '
            'repeat their data and partly measure memorisation (no '
            'train–validation gap was recorded for this file).')
  return (f'Corpus: the standard library sources of Python {c["python"]} '
          f'({c["train_files"]} training files, {c["train_bytes"]:,} bytes, '
          f'sha256 `{c["train_sha256"][:12]}…`; {c["val_files"]} held-out '
          f'files, {c["val_bytes"]:,} bytes). "(edge)": the best peak LR '
          'sat at an edge of the swept grid.')


def _base_reach(row):
  """"600 of `muon`'s 1000 (1.67×)" for a LITE row; '–' otherwise."""
  if not row.get('base'):
    return '–'
  st = row.get('steps_to_base_final')
  if st is None:
    return f'not reached (`{row["base"]}`: {row["base_steps"]})'
  return (f'{st} of `{row["base"]}`\'s {row["base_steps"]} '
          f'({row["step_saving"]:.2f}×)')


def synthetic_section(path, d):
  parts = [_head(path, d)]
  rows = []
  for r in d.get('muon_vs_gd', []):
    extra = (f'tr/λmax {r["tr/lmax"]:.2f}' if 'tr/lmax' in r else
             f'J/L {r.get("J/L", float("nan")):.2f}')
    rows.append([r['problem'], r['seed'], extra, _fmt(r['gd_final_rel'],
                                                      '.2e'),
                 f'{_fmt(r["muon_svd_final_rel"], ".2e")} '
                 f'(lr {r["muon_svd_best_lr"]:.1e})',
                 f'{_fmt(r["ol_muon_final_rel"], ".2e")} '
                 f'(lr {r["ol_muon_best_lr"]:.1e})', r['winner']])
  if rows:
    parts.append('Muon vs GD (f − f*)/(f₀ − f*) at the horizon; GD at 1/L, '
                 'Muon with the best constant LR of the grid:')
    parts.append(_table(['problem', 'seed', 'spectrum', 'GD (1/L)',
                         'Muon, exact polar (Alg. 2)', '`ol.muon`', 'winner'],
                        rows))
  lq = d.get('lite_quadratic')
  if lq:
    parts.append(
        f'LITE quadratic (App. H): λ = {lq["lambda"]}, η = {lq["eta"]:.3g}, '
        f'1−α = {1 - lq["alpha"]:.2f}, β₁ = {lq["beta1"]}; LITE: χ = '
        f'{lq["chi"]}, β₂ = {lq["beta2"]} on the flat directions.')
    parts.append(_table(
        ['', 'steps to 1e-2·|e₀| (flat convex)',
         'growth of |e| (flat negative, escape)', 'final |e| (sharp)'],
        [[tag, lq[tag]['steps_flat_convex_to_1e-2'],
          ', '.join(f'{v:.2g}' for v in lq[tag]['escape_factor_negative']),
          ', '.join(f'{v:.1e}' for v in lq[tag]['sharp_final_abs_error'])]
         for tag in ('base', 'lite')]))
  kr = d.get('kronecker')
  if kr:
    names = list(kr['runs'][0]['results'])
    parts.append(f'Kronecker quadratic {kr["shape"]}, cond(A) = cond(B) = '
                 f'{kr["info"]["cond_A"]:.0e}, {kr["steps"]} steps, best LR '
                 f'of {len(kr["lr_grid"])} (logspace '
                 f'{kr["lr_grid"][0]:g}…{kr["lr_grid"][-1]:g}):')
    rows = []
    for n in sorted(names, key=lambda n: kr['runs'][0]['results'][n].get(
        'final_rel', float('inf'))):
      vals = [run['results'].get(n, {}) for run in kr['runs']]
      rows.append([f'`{n}`', ' / '.join(_fmt(v.get('final_rel'), '.2e')
                                        if 'error' not in v else 'error'
                                        for v in vals),
                   ' / '.join(_fmt(v.get('best_lr'), '.2g') for v in vals)])
    parts.append(_table(['optimizer', '(f − f*)/f₀ per seed', 'best LR'],
                        rows))
  for suffix, alt in (('_muon_vs_gd', 'Muon vs GD'), ('_lite', 'LITE'),
                      ('_kronecker', 'Kronecker')):
    png = path[:-5] + suffix + '.png'
    if os.path.exists(png):
      parts.append(f'![{alt}]({_rel(png)})')
  return '\n\n'.join(parts)


def state_bytes_section(path, d):
  """Optimizer-state bytes per parameter (benchmarks/state_bytes.py)."""
  models = list(d.get('models', {}))
  table = {}
  for r in d['rows']:
    cell = table.setdefault(r['optimizer'], {}).setdefault(r['model'], {})
    cell[r['state_dtype']] = r['bytes_per_param']
  header = ['optimizer'] + [f'{m} f32 / bf16' for m in models]
  rows = []
  for name, cells in table.items():
    rows.append([f'`{name}`'] + [
        f'{cells.get(m, {}).get("float32", float("nan")):.2f} / '
        f'{cells.get(m, {}).get("bfloat16", float("nan")):.2f}'
        for m in models])
  return (_head(path, d) + '\n\nOptimizer-state bytes per parameter '
          '(float32 state / bfloat16 `mu_dtype` and factor dtypes):\n\n'
          + _table(header, rows))


def memory_section(path, d):
  """Update temporaries per parameter byte (benchmarks/memory.py)."""
  models = d.get('models', {})
  cols = sorted({(r['mode'], r['model'], r.get('scheduler', 'concurrency'))
                 for r in d['rows']},
                key=lambda c: (c[0] != 'one_device', c[2] != 'concurrency',
                               models.get(c[1], {}).get('n_params', 0)))
  cells, state = {}, {}
  for r in d['rows']:
    col = (r['mode'], r['model'], r.get('scheduler', 'concurrency'))
    cells.setdefault(r['optimizer'], {}).setdefault(col, {})[
        r['budget']] = r['temp_per_param']
    if r['mode'] == 'one_device':
      # The state per parameter byte depends on the tree (e.g. SOAP's
      # factors stop at max_precond_dim): one figure per model.
      state.setdefault(r['optimizer'], {})[r['model']] = r['state_per_param']
  state_models = [c[1] for c in cols if c[0] == 'one_device'
                  and c[2] == 'concurrency']

  def cell(budgets):
    if set(budgets) == {'default'}:
      return f'{budgets["default"]:.2f}'
    return ' / '.join(_fmt(budgets.get(b), '.2f')
                      for b in ('default', 'none', 'smallest'))

  def label(c):
    n = models.get(c[1], {}).get('n_params')
    size = f'{n / 1e6:.0f}M' if n else '?'
    sched = '' if c[2] == 'concurrency' else ', memory scheduler'
    return f'{c[0]} {c[1]} ({size}{sched})'

  header = (['optimizer', 'state ' + ' / '.join(state_models)]
            + [label(c) for c in cols])
  rows = [[f'`{name}`', ' / '.join(_fmt(state.get(name, {}).get(m), '.2f')
                                   for m in state_models)]
          + [cell(cells[name][c]) if c in cells[name] else '–'
             for c in cols] for name in cells]
  return (_head(path, d) + '\n\nXLA temporaries of one jitted update '
          '(`memory_analysis().temp_size_in_bytes`) per parameter byte, at '
          '`memory_budget` default / `None` / `0` (`adamw`, `optax_muon`: '
          'their one setting); `state`: optimizer-state bytes per parameter '
          'byte on each one-device tree. `distribute8`: per device, over '
          'the per-device parameter bytes (FSDP on 8 host devices). '
          '"memory scheduler": XLA:CPU with '
          '`--xla_cpu_enable_concurrency_optimized_scheduler=false`.'
          '\n\n' + _table(header, rows))


def distributed_section(path, d):
  """Owner-computes vs plain GSPMD per optimizer (benchmarks/distributed.py)."""
  t = d.get('targets', {})
  parts = [_head(path, d)]

  def cell(v, key, spec):
    if v is None:
      return 'not integrated'
    if 'error' in v:
      return 'error'
    return _fmt(v.get(key), spec)

  if d.get('rows'):
    rows = []
    for r in d['rows']:
      p, q = r.get('plain') or {}, r.get('distribute')
      rows.append([r['model'], f'`{r["optimizer"]}`', r['layout'],
                   cell(p, 'bytes_over_params', '.2f'),
                   cell(q, 'bytes_over_params', '.2f'),
                   f'{cell(p, "collective_count", "d")} / '
                   f'{cell(q, "collective_count", "d")}',
                   cell(p, 'flops_over_ideal', '.2f'),
                   cell(q, 'flops_over_ideal', '.2f'),
                   cell(q if q else p, 'max_abs_diff', '.1e')])
    parts.append(
        'Per step, 8 host devices, read from the compiled program: '
        'collective bytes per device / parameter bytes (target ≤ '
        f'{t.get("bytes_over_params", 2)}), collectives executed (while '
        'loops × trip count), per-device FLOPs / (single-device FLOPs / 8) '
        f'(target ≤ {t.get("flops_over_ideal", 1.2)}), max |difference| of '
        'the updated parameters to one device (`distribute` where '
        f'integrated, else plain; target ≤ {t.get("max_abs_diff", 1e-5)}).')
    parts.append(_table(['model', 'optimizer', 'layout', 'bytes plain',
                         'bytes distribute', 'collectives plain / dist.',
                         'FLOPs plain', 'FLOPs distribute', 'max diff'],
                        rows))
  if d.get('compile'):
    rows = []
    depths = d['compile'][0].get('depths', [6, 24])
    for r in d['compile']:
      row = [f'`{r["optimizer"]}`' + (' (baseline)' if r.get('baseline')
                                      else '')]
      for v in ('one_device', 'distribute', 'scanned', 'distribute_scanned'):
        c = r.get(v)
        if c is None:
          row += [('–' if r.get('baseline') or v not in r
                   else 'not integrated'), '–', '–']
          continue
        secs = c['seconds']
        row += [' → '.join(f'{x:.1f}' for x in secs), f'{c["ratio"]:.2f}',
                f'{(secs[-1] - secs[0]) / (depths[-1] - depths[0]):.2f}']
      rows.append(row)
    parts.append(
        f'Compile time of `jax.jit(tx.update)` (CPU seconds of the '
        f'process), small tree at '
        f'{depths[0]} → {depths[-1]} layers (target ratio ≤ '
        f'{t.get("compile_ratio", 1.5)}), and the seconds each added layer '
        'costs; optax\'s own per-leaf transforms are the floor of a '
        'per-layer tree. *Scanned*: the same model with its layers stacked '
        'as `nnx.scan` stores them, passed with `stacked=` labels and dims '
        '(one leaf per weight), on one device and with `distribute` '
        '(FSDP on the fan-in axis):')
    parts.append(_table(['optimizer', 'one device (s)', 'ratio',
                         's / layer', 'distribute, FSDP (s)', 'ratio',
                         's / layer', 'scanned (s)', 'ratio', 's / layer',
                         'scanned, distribute (s)', 'ratio', 's / layer'],
                        rows))
  if d.get('note'):
    parts.append(d['note'])
  return '\n\n'.join(parts)


def distributed_polar_section(path, d):
  """``shard_polar`` vs per-leaf polar factors on host devices."""
  header = ['layout', 'mesh', 'matrices', 'per-leaf (s)', 'shard_polar (s)',
            'speed-up', 'FLOPs per device, per-leaf / sharded',
            'max abs diff']
  rows = [[r['layout'], str(r['mesh']), str(r['matrices']),
           f'{r["per_leaf_s"]:.3f}', f'{r["shard_polar_s"]:.3f}',
           f'{r["speedup"]:.2f}', f'{r["flops_ratio"]:.2f}',
           f'{r["max_abs_diff"]:.1e}'] for r in d['rows']]
  note = f'\n\n{d["note"]}' if d.get('note') else ''
  return _head(path, d) + '\n\n' + _table(header, rows) + note


def _speed(row):
  """'1.25× (1.10–1.40)' from a horizon summary row."""
  if not row or row.get('speedup_mean') is None:
    return '–'
  lo, hi = row['speedup_min'], row['speedup_max']
  n = len([v for v in row['speedups'] if v is not None])
  return (f'{row["speedup_mean"]:.2f}×' +
          (f' ({lo:.2f}–{hi:.2f}, {n} seeds)' if n > 1 else ' (1 seed)'))


def horizon_section(path, d):
  """LITE's speedup over its base per token budget (benchmarks/horizon.py)."""
  s = d['settings']
  parts = [_head(path, d)]
  if not d.get('complete'):
    done = [f'{b["steps"]} steps: ' + ', '.join(b['optimizers'])
            for b in d.get('budgets', [])]
    parts.append('**Partial results** (the run was stopped before the end; '
                 'finished so far — ' + '; '.join(done) + ').')
  if d.get('note'):
    parts.append(f'*Note recorded with the run: {d["note"]}*')
  parts.append(
      f'Model `{s["model"]}` ({d["n_params"] / 1e6:.2f}M params, seq '
      f'{s["seq_len"]}, batch {s["batch"]}), warm-up {s["warmup"]} steps at '
      f'every budget, seeds {s["seeds"]}; peak LR tuned per budget on '
      f'{", ".join(s["tune_schedules"])} (grid extended until the best is '
      f'interior, at most {s["max_extend"]} extensions; "edge" marks a best '
      'that stayed at an edge), other schedules reuse the cosine LR. '
      'Speedup (per seed, same schedule) = budget ÷ the step at which the '
      "LITE run reaches its base's final val loss (interpolated between "
      "evaluations); below 1 = the step at which the base reaches LITE's "
      'final loss ÷ budget.')
  parts.append(corpus_line(d))
  rows_by = {(r['steps'], r['schedule'], r['optimizer']): r
             for r in d.get('summary', [])}
  keys = sorted({(r['steps'], r['tokens_per_param'], r['schedule'])
                 for r in d.get('summary', [])},
                key=lambda k: (k[2], k[0]))
  table = []
  for steps, tpp, sched in keys:
    def cell(n, steps=steps, sched=sched):
      return rows_by.get((steps, sched, n))

    def val(n, cell=cell):
      return _fmt(cell(n)['final_val_loss'], '.4f') if cell(n) else '–'

    table.append([f'{steps} ({tpp:.2g} tok/param)', sched, val('muon'),
                  val('muon_lite'), _speed(cell('muon_lite')), val('soap'),
                  val('soap_lite'), _speed(cell('soap_lite')), val('adamw')])
  parts.append('Final validation loss (nats/byte, mean over seeds) and '
               'LITE speedup (mean, min–max over seeds):')
  parts.append(_table(['budget (steps)', 'schedule', '`muon`', '`muon_lite`',
                       'speedup muon_lite', '`soap`', '`soap_lite`',
                       'speedup soap_lite', '`adamw`'], table))
  detail = []
  for r in sorted(d.get('summary', []),
                  key=lambda r: (r['schedule'], r['optimizer'], r['steps'])):
    detail.append([f'`{r["optimizer"]}`', r['schedule'], r['steps'],
                   _fmt(r['best_lr'], '.2g') + (
                       '' if r['best_lr_interior'] else ' (edge)'),
                   f'{r["final_val_loss"]:.4f} ± '
                   f'{r["final_val_spread"] / 2:.4f}',
                   _fmt(r.get('train_val_gap'), '+.3f'),
                   _fmt(r['tokens_per_s'], '.0f')])
  parts.append('Per optimizer: best peak LR, final val loss (± half the '
               'spread over seeds), train–validation gap at the end (val − '
               'train loss on fixed windows; near 0 = no memorisation), '
               'tokens/s:')
  parts.append(_table(['optimizer', 'schedule', 'steps', 'best peak LR',
                       'final val loss', 'val − train', 'tokens/s'], detail))
  png = path[:-5] + '.png'
  if os.path.exists(png):
    parts.append(f'![LITE speedup vs horizon]({_rel(png)})')
  return '\n\n'.join(parts)


def refresh_every_section(path, d):
  """Final validation loss against the refresh interval k
  (benchmarks/refresh_every.py)."""
  st = d.get('settings', {})
  rows = []
  for r in d.get('summary', []):
    spread = r.get('final_val_spread')
    within = r.get('within_seed_spread')
    rows.append([f'`{r["optimizer"]}`', r['every'],
                 _fmt(r['peak_lr'], '.2g'), r['seeds'],
                 f'{r["final_val_loss"]:.4f}',
                 _fmt(spread, '.4f'), _fmt(r.get('minus_k1'), '+.4f'),
                 '–' if within is None else ('yes' if within else 'no')])
  commands = d.get('commands') or []
  extra = ''.join(f' `{c}`;' for c in commands)
  return (_head(path, d) + (f' (and{extra[:-1]})' if extra else '') +
          f'\n\nModel `{st.get("model")}`, {st.get("steps")} steps of '
          f'{st.get("batch")}×{st.get("seq_len")} bytes, cosine schedule, '
          'the race\'s best peak LR per optimizer. k: `root_every` (FISMO) or '
          '`filter_every` (Muon-LITE); k = 1 is the paper. Spread: max − '
          'min over the seeds; "within": |mean − mean at k = 1| ≤ the larger '
          'of the two spreads. Runs marked in the JSON as taken from the '
          'race were not repeated.\n\n' +
          _table(['optimizer', 'k', 'peak LR', 'seeds', 'final val loss',
                  'spread', '− k=1', 'within'], rows))


def gpu_suite_section(path, d):
  """The one-shot accelerator suite (tables built by gpu_suite.render)."""
  import gpu_suite  # noqa: E402  (imports jax/flax only when needed)
  return _head(path, d) + '\n\n' + gpu_suite.render(d)


# The README's choice table: (label, quality, step time, state). Quality is
# ('lm', name) from the LM race or ('refresh', name, k) from the refresh
# race; step time a key of step_time_models' medium tree; state
# (state_bytes optimizer, text after it) or a text.
CHOICE_ROWS = (
    ('`optax.adamw`', ('lm', 'adamw'), 'adamw', ('adamw', '')),
    ('`muon`', ('lm', 'muon'), 'muon', ('muon', '')),
    ('`muon_lite`', ('lm', 'muon_lite'), 'muon_lite', ('muon_lite', '')),
    ('`muon_lite`, `filter_every=5`', ('refresh', 'muon_lite', 5),
     'muon_lite+k5', ('muon_lite', ' + the filters')),
    ('`soap`', ('lm', 'soap'), 'soap', ('soap', '')),
    ('`soap_lite`', ('lm', 'soap_lite'), 'soap_lite', ('soap_lite', '')),
    ('`shampoo`', ('lm', 'shampoo'), 'shampoo', ('shampoo', '')),
    ('`fismo`', ('refresh', 'fismo', 1), 'fismo', ('fismo', '')),
    ('`fismo`, `root_every=10`', ('refresh', 'fismo', 10), 'fismo+k10',
     ('fismo', ' + the roots')),
    ('`fismo_lite`', ('lm', 'fismo_lite'), 'fismo_lite', ('fismo_lite', '')),
    ('`rmnp`', ('lm', 'rmnp'), 'rmnp', ('rmnp', '')),
    ('`rmnp_lite`', ('lm', 'rmnp_lite'), 'rmnp_lite', ('rmnp_lite', '')),
    ('`normuon`', ('lm', 'normuon'), 'normuon',
     ('muon', ' + one float per neuron')),
    ('`normuon_lite`', ('lm', 'normuon_lite'), 'normuon_lite',
     'as `normuon`'),
    ('`muon`, `cautious_weight_decay=True`', ('lm', 'muon_cautious'),
     'muon_cautious', ('muon', '')),
)
CHOICE_FILES = ('lm_tiny1000_stdlib_cpu.json', 'refresh_every_cpu.json',
                'step_time_models_cpu.json', 'state_bytes.json')


def choice_table(results_dir) -> str:
  """The README's table: final validation loss (LM race, mean of its
  seeds), step time × ``muon`` on the medium tree (median / mean) and state
  bytes per parameter of a transformer block (float32); the lowest loss in
  bold. A run made with overrides says so beside its loss."""
  def load(name):
    with open(os.path.join(results_dir, name)) as f:
      return json.load(f)

  lm_d, refresh_d, steps_d, state_d = map(load, CHOICE_FILES)
  lm_rows = {r['optimizer']: r for r in lm_d['summary']}
  refresh = {(r['optimizer'], r['every']): r['final_val_loss']
             for r in refresh_d['summary']}
  medium = next(m for m in steps_d['models'] if m['name'] == 'medium')
  state = {r['optimizer']: r['bytes_per_param'] for r in state_d['rows']
           if r['model'] == 'transformer_block'
           and r['state_dtype'] == 'float32'}

  def quality(src):
    if src[0] == 'refresh':
      return refresh[src[1:]], ''
    row = lm_rows[src[1]]
    over = ', '.join(f'`{k}={v}`' for k, v in (row['overrides'] or {}).items())
    return row['final_val_loss'], f' (run with {over})' if over else ''

  losses = [quality(q) for _, q, _, _ in CHOICE_ROWS]
  best = min(loss for loss, _ in losses)
  rows = []
  for (label, _, step, mem), (loss, note) in zip(CHOICE_ROWS, losses):
    t = medium['optimizers'][step]
    cell = f'{loss:.3f}'
    rows.append([label, (f'**{cell}**' if round(loss, 3) == round(best, 3)
                         else cell) + note,
                 f'{t["ratio_to_muon"]:.2f} / {t["ratio_to_muon_mean"]:.2f}',
                 mem if isinstance(mem, str)
                 else f'{state[mem[0]]:.2f}{mem[1]}'])
  return _table(['optimizer', 'val loss (nats/byte)',
                 'step time × muon, median / mean', 'state B/param'], rows)


SECTIONS = {'step_time': step_time_section, 'lm': lm_section,
            'refresh_every': refresh_every_section,
            'gpu_suite': gpu_suite_section,
            'horizon': horizon_section,
            'synthetic': synthetic_section,
            'state_bytes': state_bytes_section,
            'memory': memory_section,
            'distributed': distributed_section,
            'distributed_polar': distributed_polar_section}


def generate(results_dir):
  text = {}
  for name in NAMES:
    blocks = []
    for f in _files(results_dir, name):
      with open(f) as fh:
        d = json.load(fh)
      try:
        blocks.append(SECTIONS[name](f, d))
      except Exception as e:  # a malformed file must not kill the report
        blocks.append(f'*{_rel(f)}: could not be summarised ({e!r}).*')
    text[name] = ('\n\n'.join(blocks) if blocks else
                  f'*No results yet: run `python benchmarks/{name}.py '
                  '--quick`.*')
  return text


def relink(body, doc):
  """Links and images relative to the root -> relative to ``doc``'s folder."""
  prefix = os.path.relpath(ROOT, os.path.dirname(os.path.abspath(doc)))
  prefix = '' if prefix == '.' else prefix.replace(os.sep, '/') + '/'
  return re.sub(r'\]\((benchmarks/)', lambda m: '](' + prefix + m.group(1),
                body)


def update_doc(doc, text):
  """Fills the marker pairs of ``doc`` (added at the end when missing)."""
  src = open(doc).read() if os.path.exists(doc) else ''
  missing = [n for n in NAMES if f'<!-- BEGIN GENERATED:{n} -->' not in src]
  if missing:
    add = '' if '## Generated tables' in src else (
        '\n\n## Generated tables\n\nGenerated by `python benchmarks/report.py` '
        'from `benchmarks/results/`; do not edit between the markers.\n')
    for n in missing:
      add += (f'\n### {n}\n\n<!-- BEGIN GENERATED:{n} -->\n'
              f'<!-- END GENERATED:{n} -->\n')
    src = src.rstrip('\n') + add
  for n in NAMES:
    src = fill_marker(src, n, relink(text[n], doc))
  with open(doc, 'w') as f:
    f.write(src if src.endswith('\n') else src + '\n')


def fill_marker(src: str, name: str, body: str) -> str:
  """``src`` with the text between marker pair ``name`` set to ``body``."""
  pat = re.compile(rf'(<!-- BEGIN GENERATED:{name} -->)(.*?)'
                   rf'(<!-- END GENERATED:{name} -->)', re.S)
  return pat.sub(lambda m: m.group(1) + '\n' + body + '\n' + m.group(3),
                 src)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--doc', default=os.path.join(ROOT, 'docs', 'benchmarks.md'),
                 help='the page whose markers get the tables')
  p.add_argument('--results', default=os.path.join(HERE, 'results'))
  p.add_argument('--readme', default=None,
                 help='the README whose "choice" markers get the table '
                      "(default: the repository's, with the default "
                      '--results only)')
  p.add_argument('--summary', default=None,
                 help='also write this markdown file (default: '
                      '<results>/SUMMARY.md)')
  args = p.parse_args(argv)
  text = generate(args.results)
  summary = args.summary or os.path.join(args.results, 'SUMMARY.md')
  os.makedirs(os.path.dirname(os.path.abspath(summary)), exist_ok=True)
  with open(summary, 'w') as f:
    f.write('# Benchmark results (generated by benchmarks/report.py)\n\n')
    for n in NAMES:
      f.write(f'## {n}\n\n{text[n]}\n\n')
  print(f'wrote {summary}')
  if os.path.exists(args.doc):
    update_doc(args.doc, text)
    print(f'updated {args.doc}')
  else:
    print(f'[note] {args.doc} does not exist: not touched.')
  readme = args.readme or (
      os.path.join(ROOT, 'README.md')
      if os.path.abspath(args.results) == os.path.join(HERE, 'results')
      else None)
  if readme and all(os.path.exists(os.path.join(args.results, f))
                    for f in CHOICE_FILES):
    with open(readme) as f:
      src = f.read()
    with open(readme, 'w') as f:
      f.write(fill_marker(src, 'choice', choice_table(args.results)))
    print(f'updated {readme}')
  return text


if __name__ == '__main__':
  main()
