"""Step time at the default ``memory_budget`` against ``memory_budget=None``.

Side by side in one process: for each model tree of ``models.CONFIGS`` and
each optax_lite optimizer, both steps (update + apply, the state carried)
are compiled, then timed in alternating rounds so that the machine's load
falls on both alike. Reports the median of each and the ratio
``default / None`` (``None`` is the behaviour before the budget: one
kernel call per shape).

Writes ``benchmarks/results/budget_step_time_cpu.json``.

  python benchmarks/budget_step_time.py                  # small, medium
  python benchmarks/budget_step_time.py --optimizers muon,fismo --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from _common import (OL_OPTIMIZERS, compiled_train_step,  # noqa: E402
                     interleaved_times, metadata, progress, rand_like,
                     registry, result_path, write_json)

LR = 1e-3


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--models', default='small,medium')
  ap.add_argument('--optimizers', default=','.join(OL_OPTIMIZERS))
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--steps', type=int, default=3, help='steps per round')
  ap.add_argument('--out', default=None, help='results directory')
  args = ap.parse_args(argv)
  names = args.optimizers.split(',')
  reg = registry(names)
  out = {'meta': metadata(args), 'rows': []}
  jobs = [(m, n) for m in args.models.split(',') for n in names]
  for model, name in progress(jobs, desc='budget step time'):
    params = nnx.state(models.make_model(model, 0), nnx.Param)
    grads = rand_like(jax.random.key(1), params, 0.01)
    runs = {b: compiled_train_step(reg[name](LR, memory_budget=v), params,
                                   grads)
            for b, v in (('none', None), ('default', 'auto'))}
    times = interleaved_times(runs, args.rounds, args.steps)
    med = {b: statistics.median(t) for b, t in times.items()}
    row = {'model': model, 'optimizer': name,
           'none_median_s': med['none'], 'default_median_s': med['default'],
           'ratio_default_over_none': med['default'] / med['none'],
           'rounds': args.rounds, 'steps_per_round': args.steps}
    out['rows'].append(row)
    print(f'{model:7s} {name:11s} none {med["none"] * 1e3:8.1f} ms  default '
          f'{med["default"] * 1e3:8.1f} ms  ratio '
          f'{row["ratio_default_over_none"]:.3f}', flush=True)
    write_json(result_path('budget_step_time', args.out), out)
  return out


if __name__ == '__main__':
  main()
