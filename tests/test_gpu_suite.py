"""The GPU suite's dry run: every part runs at tiny sizes on the CPU.

``benchmarks/gpu_suite.py --dry-run`` runs the same code paths as the
one-shot accelerator run (polar throughput, step times on an LM tree, a short
LM race, eigh vs Newton inverse roots) at tiny sizes, writes the results JSON
and ``report.py`` renders it. No timing is asserted.
"""

import json
import math
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'benchmarks')
sys.path.insert(0, BENCH)
os.environ.setdefault('BENCH_NO_PROGRESS', '1')

import gpu_suite  # noqa: E402
import report  # noqa: E402


def test_dry_run_writes_and_renders(tmp_path):
  out, path = gpu_suite.main(['--dry-run', '--out', str(tmp_path)])
  assert os.path.basename(path) == 'gpu_suite_quick_cpu.json'
  with open(path) as f:
    d = json.load(f)
  assert d['dry_run'] is True and d['device'] == d['meta']['device_kind']
  # (a) polar: both dtypes per shape, positive throughput, a real polar factor.
  assert {(tuple(r['shape']), r['dtype']) for r in d['polar']} == {
      (tuple(s), t) for s in gpu_suite.DRY['polar_sizes']
      for t in ('float32', 'bfloat16')}
  for r in d['polar']:
    assert r['polar_tflops'] > 0 and r['fraction_of_matmul'] > 0
    assert r['max_sv_error'] < (0.01 if r['dtype'] == 'float32' else 0.03)
  # (b) step time: ratios against both references.
  rows = d['step']['optimizers']
  assert set(rows) == set(gpu_suite.DRY['step_optimizers'])
  assert math.isclose(rows['adamw']['vs_adamw'], 1.0)
  assert math.isclose(rows['optax_muon']['vs_optax_muon'], 1.0)
  assert all(r['vs_adamw'] > 0 for r in rows.values())
  # (c) LM: a finite loss per run.
  runs = d['lm']['runs']
  assert [r['optimizer'] for r in runs] == list(
      gpu_suite.DRY['lm_optimizers'])
  assert all(math.isfinite(r['final_val_loss']) for r in runs)
  # (d) roots: 30 Newton iterations agree with eigh.
  assert all(r['newton30_rel_err'] < 1e-3 for r in d['roots'])
  # report.py renders the file among the results.
  text = report.generate(str(tmp_path))['gpu_suite']
  assert 'Dry run' in text and 'fraction of matmul' in text
  assert 'optax.contrib.muon' in text and 'eigh (ms)' in text
  assert 'gpu_suite_quick_cpu.json' in text
