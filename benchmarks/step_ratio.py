"""Step time of optimizer variants as a multiple of Muon's, side by side.

For a model tree of ``models.CONFIGS``, ``ol.muon`` and each variant (a
named optimizer with keyword overrides, e.g. ``muon_lite:filter_every=5``)
are compiled (update + apply, the state carried), then timed in
alternating rounds of ``--steps`` steps, so that the machine's load falls
on all alike. A round's time per step is amortised over its steps (with
``--steps`` a multiple of ``k``, every round holds the same number of
``k``-step refreshes); the reported ratio is the median over rounds of a
variant's time per step over Muon's in the same round.

Writes ``benchmarks/results/step_ratio_cpu.json``.

  python benchmarks/step_ratio.py --models small \\
      --variants muon_lite:filter_every=5 fismo:root_every=10
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from _common import (compiled_train_step, interleaved_times,  # noqa: E402
                     metadata, progress, rand_like, registry, result_path,
                     write_json)

LR = 1e-3
BASE = 'muon'


def parse_variant(text: str) -> tuple[str, dict]:
  """``"name:key=value,key=value"`` → ``(name, {key: value})``."""
  name, _, rest = text.partition(':')
  kwargs = {}
  for item in filter(None, rest.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--variants: {item!r} in {text!r} is not key=value')
    try:
      kwargs[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      kwargs[key] = value
  return name, kwargs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default='small')
  ap.add_argument('--variants', nargs='+',
                  default=['muon_lite:filter_every=5', 'fismo:root_every=10'])
  ap.add_argument('--rounds', type=int, default=7)
  ap.add_argument('--steps', type=int, default=10, help='steps per round')
  ap.add_argument('--out', default=None, help='results directory')
  args = ap.parse_args(argv)
  variants = [(BASE, BASE, {})] + [(v, *parse_variant(v))
                                   for v in args.variants]
  reg = registry(sorted({name for _, name, _ in variants}))
  out = {'meta': metadata(args), 'base': BASE, 'rows': []}
  for model in progress(args.models.split(','), desc='step ratio'):
    params = nnx.state(models.make_model(model, 0), nnx.Param)
    grads = rand_like(jax.random.key(1), params, 0.01)
    runs = {label: compiled_train_step(reg[name](LR, **kw), params, grads)
            for label, name, kw in variants}
    times = interleaved_times(runs, args.rounds, args.steps)
    base = times[BASE]
    for label in runs:
      ratios = [t / b for t, b in zip(times[label], base)]
      row = {'model': model, 'variant': label,
             'median_s': statistics.median(times[label]),
             'ratio_to_muon': statistics.median(ratios),
             'ratio_min': min(ratios), 'ratio_max': max(ratios),
             'rounds': args.rounds, 'steps_per_round': args.steps}
      out['rows'].append(row)
      print(f'{model:7s} {label:28s} {row["median_s"] * 1e3:8.1f} ms/step  '
            f'× muon {row["ratio_to_muon"]:.2f} '
            f'({row["ratio_min"]:.2f}–{row["ratio_max"]:.2f})', flush=True)
    write_json(result_path('step_ratio', args.out), out)
  return out


if __name__ == '__main__':
  main()
