"""Smoke test of the benchmark scripts: each runs a few steps at tiny sizes.

Keeps ``benchmarks/*.py`` from rotting as the library changes. Not a
benchmark: no timing or quality assertions, only that every script runs end
to end, writes well-formed JSON with the device name and the report renders
it between the markers of docs/benchmarks.md.
"""

import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'benchmarks')
sys.path.insert(0, BENCH)

os.environ.setdefault('BENCH_NO_PROGRESS', '1')

import _common  # noqa: E402
import horizon  # noqa: E402
import lm  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import step_ratio  # noqa: E402
import step_time  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture(scope='module')
def out_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('bench'))


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_registry_rejects_unknown_names_and_overrides():
  reg = _common.registry(['adamw', 'optax_muon', 'muon'])
  assert set(reg) == {'adamw', 'optax_muon', 'muon'}
  with pytest.raises(ValueError, match='not_an_optimizer'):
    _common.registry(['adamw', 'not_an_optimizer'])
  full = _common.registry()
  assert set(full) == set(_common.ALL_NAMES)
  # A typo in an override raises, naming the key; the real key is applied.
  with pytest.raises(TypeError, match='root_evry'):
    full['fismo'](1e-3, root_evry=10)
  with pytest.raises(TypeError, match='weight_decy'):
    full['adamw'](1e-3, weight_decy=0.0)
  full['fismo'](1e-3, root_every=10)
  full['adamw'](1e-3, weight_decay=0.0)


def test_lm_rejects_unknown_override_before_training():
  reg = _common.registry(['fismo'])
  with pytest.raises(TypeError, match='root_evry'):
    lm.with_overrides(reg, {'fismo': {'root_evry': 10}})
  with pytest.raises(ValueError, match='fismoo'):
    lm.with_overrides(reg, {'fismoo': {'root_every': 10}})
  bound = lm.with_overrides(reg, {'fismo': {'root_every': 10}})
  assert bound['fismo'].keywords == {'root_every': 10}


def test_step_time_overrides_and_side_by_side_copies():
  """``step_time.py --set``: ``NAME.KEY=VALUE`` binds a keyword to NAME,
  ``NAME+LABEL.KEY=VALUE`` adds a copy timed beside NAME; a typo raises
  before anything is timed."""
  args = step_time.parse_args(['--set', 'muon_lite.filter_route=reference',
                               'muon_lite+every5.filter_every=5'])
  _, _, _, overrides, _ = step_time.plan(args)
  reg = step_time.with_overrides(_common.registry(['muon_lite']), overrides)
  assert set(reg) == {'muon_lite', 'muon_lite+every5'}
  assert reg['muon_lite'].keywords == {'filter_route': 'reference'}
  # The copy starts from NAME as overridden so far.
  assert reg['muon_lite+every5'].keywords == {'filter_route': 'reference',
                                              'filter_every': 5}
  with pytest.raises(TypeError, match='filter_evry'):
    step_time.with_overrides(_common.registry(['muon_lite']),
                             {'muon_lite+x': {'filter_evry': 5}})
  with pytest.raises(ValueError, match='muon_litee'):
    step_time.with_overrides(_common.registry(['muon_lite']),
                             {'muon_litee+x': {'filter_every': 5}})


def test_time_fn_counts_repeats():
  calls = []
  res = _common.time_fn(lambda: calls.append(1), warmup=2, repeats=3)
  assert len(calls) == 5 and res['repeats'] == 3
  assert 0 <= res['min_s'] <= res['median_s']


def test_step_time_smoke(out_dir):
  out = step_time.main(['--sizes', '16x32', '--models', '--optimizers',
                        'adamw', 'muon', '--repeats', '1',
                        '--ortho-sizes', '16x24', '--out', out_dir,
                        '--no-plot'])
  path = _common.result_path('step_time', out_dir)
  data = _load(path)
  assert data['meta']['device_kind'] == _common.device_kind()
  leaf = data['leaves'][0]
  assert leaf['shape'] == [16, 32]
  rows = leaf['optimizers']
  assert rows['adamw']['ratio_to_adamw'] == pytest.approx(1.0)
  assert rows['muon']['state_bytes_per_param'] == pytest.approx(4.0, abs=0.2)
  assert rows['adamw']['state_bytes_per_param'] == pytest.approx(8.0, abs=0.2)
  assert 'orthogonalize_pe6 / matmul_floor6' in leaf['polar']['ratios']
  kron = leaf['kron']['ratios']
  assert {'eigh / rotations', 'qr_refresh / rotations',
          'inverse_root_newton30 / rotations'} <= set(kron)
  assert all(np.isfinite(v) and v > 0 for v in kron.values())
  orth = data['orthogonality'][0]
  # Polar Express (6 steps) is closer to orthogonal than optax's presets.
  assert orth['ol.polar_express(6)'] < orth['optax.standard(5)']
  assert out['headline']


def test_step_ratio_smoke(out_dir):
  out = step_ratio.main(['--models', 'nano', '--variants',
                         'muon_lite:filter_every=2', '--rounds', '2',
                         '--steps', '2', '--out', out_dir])
  rows = {r['variant']: r for r in out['rows']}
  assert set(rows) == {'muon', 'muon_lite:filter_every=2'}
  assert rows['muon']['ratio_to_muon'] == 1.0
  assert rows['muon_lite:filter_every=2']['median_s'] > 0
  assert _load(os.path.join(out_dir, 'step_ratio_cpu.json'))['base'] == 'muon'
  with pytest.raises(ValueError, match='--variants'):
    step_ratio.parse_variant('fismo:root_every')


def test_step_time_polar_only_smoke(out_dir):
  step_time.main(['--sizes', '16x64', '--polar-only', '--repeats', '1',
                  '--ortho-sizes', '16x64', '--out', out_dir])
  data = _load(_common.result_path('polar_step_time', out_dir))
  leaf = data['leaves'][0]
  assert leaf['optimizers'] == {} and data['models'] == []
  gram = leaf['polar']['gram_vs_polar_express']
  assert gram['flops']['uses_gram']
  assert gram['ratios']['flops gram forced/pe'] < 1
  assert all(v > 0 for v in gram['ratios'].values())
  orth = data['orthogonality'][0]
  assert orth['ol.gram_polar_express(6)'] == pytest.approx(
      orth['ol.polar_express(6)'], abs=1e-3)


def test_lm_smoke(out_dir):
  out = lm.main(['--model', 'nano', '--steps', '4', '--batch', '2',
                 '--seq-len', '16', '--grid', '1e-3', '3e-3', '--optimizers',
                 'adamw', 'muon', 'muon_lite', '--schedules', 'cos',
                 '--seeds', '0', '1', '--max-extend', '0', '--out', out_dir,
                 '--no-plot'])
  data = _load(_common.result_path('lm', out_dir))
  assert data['meta']['device_kind'] == _common.device_kind()
  assert data['corpus']['name'] == 'stdlib'
  assert data['corpus']['train_bytes'] > 5_000_000
  for name in ('adamw', 'muon', 'muon_lite'):
    entry = data['results'][name]
    assert [r['peak_lr'] for r in entry['sweep']] == [1e-3, 3e-3]
    assert entry['best_lr_interior'] is False  # two values: always an edge
    assert [r['seed'] for r in entry['runs']] == [0, 1]
    run = entry['runs'][0]
    assert len(run['train_loss']) == 4
    assert np.isfinite(run['final_val_loss'])
    assert run['tokens'] == 4 * 2 * 16
    assert run['train_val_gap'] == pytest.approx(
        run['final_val_loss'] - run['final_train_eval_loss'])
  # Seeds differ (own init and batches) though they share one compile.
  r0, r1 = data['results']['muon']['runs']
  assert r0['final_val_loss'] != r1['final_val_loss']
  # muon reaches its own final loss by definition.
  row = [r for r in out['summary'] if r['optimizer'] == 'muon'][0]
  assert row['steps_to_target'] == 4


def test_stdlib_corpus_split_by_file(tmp_path):
  # A fake standard library: installed packages and test packages are out.
  for rel, text in (('a.py', 'alpha\n'), ('pkg/b.py', 'beta\n'),
                    ('pkg/c.txt', 'not python\n'),
                    ('site-packages/x.py', 'installed\n'),
                    ('test/t.py', 'test\n'), ('z/tests/u.py', 'test\n')):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert models.stdlib_files(str(tmp_path)) == ['a.py', 'pkg/b.py']
  assert models.stdlib_files(str(tmp_path), tests=True) == [
      'a.py', 'pkg/b.py', 'test/t.py', 'z/tests/u.py']
  with pytest.raises(ValueError, match='val_fraction'):
    models.load_corpus(val_fraction=1.5)
  with pytest.raises(ValueError, match='corpus'):
    models.load_corpus('c4')

  # The real one: deterministic, split by file, no file on both sides.
  files = models.stdlib_files()
  assert files == sorted(files) and len(files) > 300
  val = [f for f in files if models.is_val_file(f, 0.1)]
  assert 0.05 < len(val) / len(files) < 0.2
  # Membership depends on the path only, not on the other files.
  assert val == [f for f in val if models.is_val_file(f, 0.1)]
  assert [f for f in files[::2] if models.is_val_file(f, 0.1)] == [
      f for f in val if f in set(files[::2])]
  c = models.load_corpus()
  again = models._stdlib_corpus.__wrapped__(None, 0.1)
  assert c.info == again.info
  assert np.array_equal(c.train, again.train)
  info = c.info
  assert info['train_files'] + info['val_files'] == len(files)
  assert info['val_files'] == len(val)
  assert info['train_bytes'] == c.train.size > 5_000_000
  assert len(info['train_sha256']) == 64
  train_bytes = c.train.tobytes()
  big_val = [f for f in val if os.path.getsize(
      os.path.join(info['root'], f)) > 4000][:3]
  assert big_val
  for f in big_val:  # a held-out file's text is in val, not in train
    with open(os.path.join(info['root'], f), 'rb') as fh:
      chunk = fh.read()[-2000:]
    assert chunk in c.val.tobytes() and chunk not in train_bytes
  tr, va = models.load_corpus('pydoc')
  assert tr.size > 10 * va.size / 2 and va.size > 0


def test_tune_extends_grid_until_best_is_interior():
  calls = []

  def run_at(lr):  # a bowl in log-LR with its minimum at 1e-4
    calls.append(lr)
    return {'peak_lr': lr, 'final_val_loss': (np.log10(lr) + 4.0) ** 2}

  runs, best, interior = lm.tune(run_at, [1e-2, 3e-3, 1e-3])
  assert interior and best['peak_lr'] == pytest.approx(1e-4, rel=0.2)
  lrs = [r['peak_lr'] for r in runs]
  assert lrs == sorted(lrs) and lrs[0] < best['peak_lr'] < lrs[-1]
  assert len(calls) == 6  # 3 + two steps down + one past the minimum
  # Upper edge; a diverged (NaN) value counts as worst.
  runs, best, interior = lm.tune(
      lambda lr: {'peak_lr': lr, 'final_val_loss':
                  float('nan') if lr > 0.05 else -lr}, [1e-3, 3e-3])
  assert interior and best['peak_lr'] == pytest.approx(2.7e-2)
  assert [r['peak_lr'] for r in runs] == pytest.approx(
      [1e-3, 3e-3, 9e-3, 2.7e-2, 8.1e-2])
  # Out of extensions: reported as not interior.
  _, best, interior = lm.tune(run_at, [1.0, 0.1], max_extend=1)
  assert not interior and best['peak_lr'] == pytest.approx(0.01)


def test_horizon_smoke(out_dir, capsys):
  argv = ['--model', 'nano', '--seq-len', '16', '--batch', '2',
          '--base-steps', '8', '--multipliers', '1', '2', '--grid', '1e-3',
          '3e-3', '1e-2', '--max-extend', '0', '--seeds', '0', '1',
          '--schedules', 'cos', '--tune-schedules', 'cos', '--evals', '4',
          '--optimizers', 'muon', 'muon_lite', '--out', out_dir, '--no-plot']
  out = horizon.main(argv)
  path = _common.result_path('horizon', out_dir)
  data = _load(path)
  assert data['complete'] and data['corpus']['name'] == 'stdlib'
  assert [b['steps'] for b in data['budgets']] == [8, 16]
  b0, b1 = data['budgets']
  for b in data['budgets']:
    e = b['optimizers']['muon_lite']['schedules']['cos']
    assert [r['seed'] for r in e['runs']] == [0, 1]
    assert all(r['steps'] == b['steps'] for r in e['runs'])
  assert [r['peak_lr'] for r in b0['optimizers']['muon_lite']['schedules'][
      'cos']['sweep']] == [1e-3, 3e-3, 1e-2]
  # The second budget's grid starts around the first budget's best LR.
  best0 = b0['optimizers']['muon']['schedules']['cos']['best_lr']
  assert [r['peak_lr'] for r in
          b1['optimizers']['muon']['schedules']['cos']['sweep']] == (
              pytest.approx(horizon.next_grid(best0, 3.0)))
  rows = [r for r in out['summary'] if r['optimizer'] == 'muon_lite']
  assert len(rows) == 2 and all(len(r['speedups']) == 2 for r in rows)
  assert all(r['train_val_gap'] is not None for r in rows)
  # --resume with the same settings reuses every finished entry.
  capsys.readouterr()
  again = horizon.main(argv + ['--resume', path])
  assert '4 finished entries' in capsys.readouterr().out  # 2 budgets x 2
  assert again['summary'] == out['summary']
  text = report.horizon_section(path, data)
  assert 'speedup muon_lite' in text and 'Partial' not in text
  # --assemble gathers finished parts only: a budget never run is missing.
  part = horizon.main(argv[:argv.index('--multipliers') + 1] + ['1', '2', '4']
                      + argv[argv.index('--multipliers') + 3:] +
                      ['--assemble', '--resume', path])
  assert not part['complete']
  assert [b['steps'] for b in part['budgets']] == [8, 16]
  assert 'Partial' in report.horizon_section(path, _load(path))


def test_horizon_speedup_definition():
  def run(vals, steps=None):
    steps = steps or [10 * i for i in range(len(vals))]
    return {'steps': steps[-1], 'val_steps': steps, 'val_loss': vals,
            'final_val_loss': vals[-1], 'diverged': False}
  base = run([4.0, 3.0, 2.0, 1.5, 1.0])  # 40 steps, ends at 1.0
  # LITE crosses 1.0 halfway between steps 10 (1.2) and 20 (0.8): 2.67x.
  assert horizon.speedup(run([4.0, 1.2, 0.8, 0.7, 0.6]), base) == (
      pytest.approx(40 / 15))
  # LITE ends at 2.0, which the base reaches at step 20: 0.5x.
  assert horizon.speedup(run([4.0, 3.5, 3.0, 2.5, 2.0]), base) == (
      pytest.approx(0.5))
  assert horizon.crossing(run([4.0, float('nan')]), 1.0) is None
  with pytest.raises(ValueError, match='optimizers'):
    horizon.resolve_settings(horizon.parse_args(['--optimizers', 'sgd']))


def test_lm_override_parsing():
  assert lm.parse_override('fismo.root_every=10') == ('fismo', 'root_every',
                                                       10)
  assert lm.parse_override('muon.method=svd') == ('muon', 'method', 'svd')
  assert lm.parse_override('soap.b2=0.95') == ('soap', 'b2', 0.95)
  for bad in ('fismo=10', 'root_every', '.k=1', 'fismo.=1'):
    with pytest.raises(ValueError, match='--set'):
      lm.parse_override(bad)


def test_lm_lite_reach_of_base():
  def run(losses):
    steps = [10 * i for i in range(len(losses))]
    return {'schedule': 'cos', 'steps': steps[-1], 'final_val_loss': losses[-1],
            'val_steps': steps, 'val_loss': losses, 'val_time_s': steps,
            'tokens_per_s': 1.0}
  results = {'muon': {'best_lr': 1.0, 'runs': [run([3., 2., 1.5, 1.2, 1.0])]},
             'muon_lite': {'best_lr': 1.0, 'runs': [run([3., 1.5, 1.0, .9])]},
             'soap_lite': {'best_lr': 1.0, 'runs': [run([3., 2.])]}}
  rows = {r['optimizer']: r for r in lm.summarize(results, {})}
  assert 'base' not in rows['muon']
  lite = rows['muon_lite']
  # muon ends at 1.0 after 40 steps; muon_lite is at 1.0 by step 20.
  assert (lite['base'], lite['steps_to_base_final']) == ('muon', 20)
  assert lite['step_saving'] == pytest.approx(2.0)
  assert 'base' not in rows['soap_lite']  # no soap runs to compare with


def test_report_progress_table_means_over_seeds():
  def run(seed, losses):
    return {'schedule': 'cos', 'seed': seed, 'steps': 40,
            'val_steps': [0, 10, 20, 30, 40], 'val_loss': losses}
  diverged = dict(run(1, [3., 2.5]), steps=10, val_steps=[0, 10])
  table = report._progress_table({
      'muon': {'runs': [run(0, [3., 2., 1.5, 1.2, 1.0]),
                        run(1, [3., 2.2, 1.7, 1.4, 1.2])]},
      # A run that stopped at step 10 of 40 has nothing at the later marks.
      'soap': {'runs': [run(0, [3., 2., 1.5, 1.2, 1.0]), diverged]}}, 40)
  assert '| step 10 | step 20 | step 30 | step 40 |' in table
  assert '| `muon` | 2.100 | 1.600 | 1.300 | 1.100 |' in table
  assert '| `soap` | 2.250 | – | – | – |' in table
  assert report._progress_table({}, 40) is None


def test_report_labels_runs_with_any_setting_flag_custom():
  def mode(args, name='lm_cpu.json'):
    return report._head(name, {'meta': {'args': args, 'argv': []}})
  defaults = {'quick': False, 'out': '/tmp/x', 'no_plot': True,
              'model': None, 'schedules': None, 'set': []}
  assert 'full mode' in mode(defaults)
  for flag, value in (('warmup', 100), ('schedules', ['cos']),
                      ('set', ['fismo.root_every=10'])):
    assert 'custom settings' in mode(dict(defaults, **{flag: value}))
  assert 'quick mode' in mode(dict(defaults, warmup=5), 'lm_quick_cpu.json')


def test_lm_schedules_shape():
  for kind in ('cos', 'wsd'):
    f = lm.make_schedule(kind, 1.0, 100, 10)
    vals = np.array([float(f(t)) for t in range(100)])
    assert vals.max() == pytest.approx(1.0)
    assert vals[0] < 0.2
  cos = lm.make_schedule('cos', 1.0, 100, 10)
  assert float(cos(99)) == pytest.approx(0.1, abs=1e-3)
  wsd = lm.make_schedule('wsd', 1.0, 100, 10)
  assert float(wsd(79)) == pytest.approx(1.0)
  assert float(wsd(100)) == pytest.approx(0.0, abs=1e-6)


def test_synthetic_smoke(out_dir):
  synthetic.main(['--smoke', '--seeds', '0', '--optimizers', 'adamw', 'muon',
                  '--out', out_dir, '--no-plot'])
  data = _load(_common.result_path('synthetic', out_dir))
  assert data['meta']['device_kind'] == _common.device_kind()
  assert len(data['muon_vs_gd']) == 5
  for row in data['muon_vs_gd']:
    assert row['winner'] in ('muon', 'gd')
  assert {'base', 'lite'} <= set(data['lite_quadratic'])
  assert {'gd (1/L)', 'adamw', 'muon'} <= set(
      data['kronecker']['runs'][0]['results'])


def test_rho_values():
  import jax.numpy as jnp
  prob = synthetic.matrix_quadratic('isotropic', 4, 6, 0)  # H = 2 I, L = 2
  rank1 = jnp.outer(jnp.arange(1., 5.), jnp.ones(6))
  # Rank-one gradient: ||G||_*^2 = ||G||_F^2 and J = 2 ||O||_F^2 = 2 = L.
  rho = synthetic.rho(dict(prob, grad=lambda w: rank1), prob['w0'])
  assert float(rho) == pytest.approx(1.0, rel=1e-4)
  # Full-rank flat gradient (orthonormal rows): ||G||_*^2 / ||G||_F^2 = 4
  # and J / L = 4, so rho = 1 again; a concentrated Hessian makes it > 1.
  eye = jnp.eye(4, 6)
  rho = synthetic.rho(dict(prob, grad=lambda w: eye), prob['w0'])
  assert float(rho) == pytest.approx(1.0, rel=1e-4)
  conc = synthetic.matrix_quadratic('logspace', 4, 6, 0)
  rho = synthetic.rho(dict(conc, grad=lambda w: eye), conc['w0'])
  assert float(rho) > 2.0


def test_report_fills_markers(out_dir, tmp_path):
  doc = tmp_path / 'docs' / 'benchmarks.md'
  doc.parent.mkdir()
  doc.write_text('# T\n\n<!-- BEGIN GENERATED:lm -->\nold\n'
                 '<!-- END GENERATED:lm -->\nafter\n')
  report.main(['--doc', str(doc), '--results', out_dir, '--summary',
               str(tmp_path / 'S.md')])
  text = doc.read_text()
  # The placeholder line, not the substring: paths may contain "old".
  assert '\nold\n' not in text and 'after' in text
  for name in report.NAMES:
    assert f'<!-- BEGIN GENERATED:{name} -->' in text
    assert f'<!-- END GENERATED:{name} -->' in text
  assert text.count('## Generated tables') == 1
  assert '| `muon` |' in text


def test_readme_choice_table_is_the_generated_one():
  """The README's "Which optimizer" table is ``report.choice_table`` of the
  committed results, as ``python benchmarks/report.py`` writes it (no
  number typed by hand)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(report.__file__)))
  with open(os.path.join(root, 'README.md')) as f:
    readme = f.read()
  want = report.choice_table(os.path.join(root, 'benchmarks', 'results'))
  assert report.fill_marker(readme, 'choice', want) == readme
  assert '<!-- BEGIN GENERATED:choice -->\n' + want in readme
  assert '| `muon` | 1.374 |' in want  # the LM race's mean over seeds


def test_report_links_are_relative_to_the_page(tmp_path):
  body = ('*Source: [`benchmarks/results/a.json`](benchmarks/results/a.json)*'
          '\n![plot](benchmarks/results/a.png)')
  in_docs = report.relink(body, os.path.join(report.ROOT, 'docs', 'b.md'))
  assert '](../benchmarks/results/a.json)' in in_docs
  assert '](../benchmarks/results/a.png)' in in_docs
  assert '[`benchmarks/results/a.json`]' in in_docs  # the shown name stays
  at_root = report.relink(body, os.path.join(report.ROOT, 'README.md'))
  assert at_root == body
