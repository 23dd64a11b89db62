"""The theory made visible: three synthetic problems, honest either way.

1. **Muon vs gradient descent** (Shen et al., "On the Convergence Analysis of
   Muon", arXiv 2505.23737; extract ``shared/notes/seed_muon_convergence.md``
   §3.2–3.3). Matrix quadratics ``f(W) = tr((W−W*)ᵀ Q (W−W*))`` with a
   concentrated spectrum (``Q`` eigenvalues logspace(0, −6); 4 spikes + a
   1e-5 bulk) against a flat one (``Q = I``), and linear least squares
   ``f(W) = ‖WX − Y‖²/(2B)`` with power-law features (σᵢ ∝ 1/i) against
   Gaussian ones. ``W₀ = 0``; GD uses ``η = 1/L`` (``L = λ_max`` of the
   Hessian); Muon is the paper's Algorithm 2 (exact polar factor, no
   momentum, ``ol.orthogonalize('svd')``) and the practical ``ol.muon``
   (Nesterov 0.95, Polar Express, no weight decay), each with the best
   constant LR on a log grid at the fixed horizon. Along the runs we plot the
   paper's ratio ``ρ_t = ‖∇f‖*²·L / (‖∇f‖_F²·J_t)`` with the global
   ``L = λ_max(H)`` and ``J_t = ⟨O, H[O]⟩``, ``O = polar(∇f)`` (the
   extract's recommended variant; ρ_t > 1 predicts a Muon step beats a GD
   step).
2. **The LITE quadratic** (LITE paper, Appendix H, eq. 58):
   ``f(w) = ½ Σ λᵢ wᵢ² + bᵀw`` with sharp (λ ≫ 0), flat convex
   (0 < λ ≪ 1) and flat negative-curvature (λ < 0) directions; the unified
   update (2) with ``F = I`` (base) against LITE (Algorithm 1 with the exact
   flat projector: χ = 2 and β₂ = 1 on flat directions). Loss and
   per-direction error vs steps, and the dominant root ``r₁`` of eq. (63).
3. **An ill-conditioned Kronecker quadratic** ``f(W) = ½⟨E, A E B⟩``,
   ``E = W − W*``, Hessian ``B ⊗ A`` with both factors ill-conditioned in
   random bases, where Kronecker preconditioners (soap, shampoo, fismo)
   should beat muon. Every optimizer of the registry, best LR on a grid.

For the LR sweeps, optimizers are built with ``learning_rate=1`` and
``weight_decay=0`` and their update is multiplied by each ``η`` of the grid
(identical to passing ``η`` whenever the learning rate is the chain's final
scaling, as in every optimizer here); the grid runs under ``jax.vmap``.

  python benchmarks/synthetic.py --quick
  python benchmarks/synthetic.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_lite as ol  # noqa: E402

import _common  # noqa: E402

jax.config.update('jax_enable_x64', False)


# ---------------------------------------------------------------------------
# Problems: f, grad, Hessian-vector product, L, f*.
# ---------------------------------------------------------------------------


def _orth(rng, n):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return q


def matrix_quadratic(spectrum: str, m: int, n: int, seed: int):
  """BM-1: f(W) = tr((W−W*)ᵀ Q (W−W*)), Q = diag(λ)."""
  rng = np.random.default_rng(seed)
  if spectrum == 'logspace':
    lam = np.logspace(0, -6, m)
  elif spectrum == 'spike':
    lam = np.full(m, 1e-5)
    lam[:4] = 1.0
  elif spectrum == 'isotropic':
    lam = np.ones(m)
  else:
    raise ValueError(spectrum)
  w_star = jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(n), jnp.float32)
  q = jnp.asarray(lam, jnp.float32)[:, None]

  def f(w):
    e = w - w_star
    return jnp.sum(q * e * e)

  return dict(f=f, grad=jax.grad(f), hvp=lambda w, v: 2.0 * q * v,
              L=2.0 * float(lam.max()), f_star=0.0, w0=jnp.zeros((m, n)),
              info={'tr/lmax': float(lam.sum() / lam.max()),
                    'cond': float(lam.max() / lam.min())})


def linear_model(features: str, c: int, d: int, b: int, seed: int):
  """BM-2: f(W) = ‖W X − Y‖_F² / (2B), W ∈ R^{c×d}, one-hot teacher Y."""
  rng = np.random.default_rng(seed)
  if features == 'gaussian':
    x = rng.standard_normal((d, b)) / np.sqrt(d)
  elif features.startswith('powerlaw'):
    p = float(features[len('powerlaw'):] or 1)
    u = _orth(rng, d)
    v, _ = np.linalg.qr(rng.standard_normal((b, d)))
    x = (u * np.arange(1, d + 1) ** -p) @ v.T
  else:
    raise ValueError(features)
  a = x @ x.T / b
  x = x / np.sqrt(np.linalg.eigvalsh(a).max())  # λ_max(XXᵀ/B) = 1
  a = x @ x.T / b
  teacher = rng.standard_normal((c, d))
  y = np.eye(c)[np.argmax(teacher @ x, axis=0)].T  # (c, b)
  w_opt = np.linalg.lstsq(x.T, y.T, rcond=None)[0].T
  f_star = float(np.sum((w_opt @ x - y) ** 2) / (2 * b))
  xj, yj, aj = (jnp.asarray(t, jnp.float32) for t in (x, y, a))

  def f(w):
    return jnp.sum(jnp.square(w @ xj - yj)) / (2 * b)

  lam = np.linalg.eigvalsh(a)[::-1]
  return dict(f=f, grad=jax.grad(f), hvp=lambda w, v: v @ aj,
              L=float(lam[0]), f_star=f_star, w0=jnp.zeros((c, d)),
              info={'cond': float(lam[0] / max(lam[-1], 1e-30)),
                    'J/L': float(lam[:c].sum() / lam[0])})


def _nuclear(g):
  return jnp.sum(jnp.linalg.svd(g, compute_uv=False))


def rho(prob, w):
  """ρ = ‖G‖*²·L / (‖G‖_F²·J), J = ⟨O, H[O]⟩, O = polar(G)."""
  g = prob['grad'](w)
  o = ol.polar_factor(g, 'svd')
  j = jnp.sum(o * prob['hvp'](w, o))
  return _nuclear(g) ** 2 * prob['L'] / (jnp.sum(g * g) * j + 1e-30)


# ---------------------------------------------------------------------------
# Running a transform with an LR grid under vmap.
# ---------------------------------------------------------------------------


def run_grid(prob, tx, etas, steps: int, rho_every: int = 0):
  """Runs ``W ← W + η·tx(∇f)`` for each η; returns (curves, rhos).

  ``curves``: (len(etas), steps + 1) of f − f*; ``rhos``: (len(etas),
  steps // rho_every) of ρ_t along each run (empty if ``rho_every == 0``).
  """
  params0 = {'w': prob['w0'].astype(jnp.float32)}

  def one(eta):
    def body(carry, t):
      p, s = carry
      g = jax.tree.map(prob['grad'], p)
      u, s = tx.update(g, s, p)
      p = jax.tree.map(lambda x, d: x + eta * d, p, u)
      r = (jax.lax.cond(t % rho_every == 0, lambda: rho(prob, p['w']),
                        lambda: jnp.float32(jnp.nan))
           if rho_every else jnp.float32(jnp.nan))
      return (p, s), (prob['f'](p['w']) - prob['f_star'], r)

    (_, _), (fs, rs) = jax.lax.scan(body, (params0, tx.init(params0)),
                                    jnp.arange(steps))
    f0 = prob['f'](params0['w']) - prob['f_star']
    return jnp.concatenate([f0[None], fs]), rs

  curves, rhos = jax.jit(jax.vmap(one))(jnp.asarray(etas, jnp.float32))
  curves = np.asarray(curves, np.float64)
  rhos = np.asarray(rhos, np.float64)
  if rho_every:
    rhos = rhos[:, ::rho_every]
  return curves, rhos


def best_of(curves, etas):
  """Index of the η with the smallest final f − f* (non-finite excluded)."""
  final = np.where(np.isfinite(curves[:, -1]), curves[:, -1], np.inf)
  i = int(np.argmin(final))
  return i, float(etas[i])


def gd_tx():
  return optax.sgd(1.0)  # update = −g; η multiplies it


def muon_svd_tx():
  """Algorithm 2 of the paper: W ← W − η polar(∇f), exact SVD."""
  return optax.chain(ol.orthogonalize('svd'), optax.scale(-1.0))


def ol_tx(name, **kw):
  reg = _common.registry([name])
  return reg[name](1.0, weight_decay=0.0, **kw)


# ---------------------------------------------------------------------------
# 1. Muon vs GD.
# ---------------------------------------------------------------------------


def muon_vs_gd(quick: bool, seeds, smoke: bool = False):
  m, n, steps = (16, 32, 1000) if quick else (32, 64, 4000)
  lin_steps = 1000 if quick else 3000
  grid = np.logspace(-4, 0, 9 if quick else 17)
  rho_every = 25 if quick else 50
  d, b = 64, 512
  if smoke:
    m, n, steps, lin_steps, grid, rho_every, d, b = (
        4, 8, 10, 10, np.logspace(-3, -1, 2), 5, 8, 32)
  problems = {
      'quadratic/logspace (concentrated)':
          lambda s: (matrix_quadratic('logspace', m, n, s), steps),
      'quadratic/spike4+bulk (concentrated)':
          lambda s: (matrix_quadratic('spike', m, n, s), steps),
      'quadratic/isotropic (flat)':
          lambda s: (matrix_quadratic('isotropic', m, n, s), steps),
      'linear/powerlaw1 features (concentrated)':
          lambda s: (linear_model('powerlaw1', 4, d, b, s), lin_steps)
          if smoke else (linear_model('powerlaw1', 10, d, b, s), lin_steps),
      'linear/gaussian features (flat)':
          lambda s: (linear_model('gaussian', 4, d, b, s), lin_steps)
          if smoke else (linear_model('gaussian', 10, d, b, s), lin_steps),
  }
  out = []
  for name, make in _common.progress(list(problems.items()),
                                     desc='muon vs gd'):
    for seed in seeds:
      prob, t = make(seed)
      gd, gd_rho = run_grid(prob, gd_tx(), [1.0 / prob['L']], t, rho_every)
      mu, mu_rho = run_grid(prob, muon_svd_tx(), grid, t, rho_every)
      i, eta = best_of(mu, grid)
      olm, olm_rho = run_grid(prob, ol_tx('muon'), grid, t, rho_every)
      k, eta2 = best_of(olm, grid)
      f0 = gd[0, 0]
      row = {
          'problem': name, 'seed': seed, 'steps': t, **prob['info'],
          'gd_final_rel': gd[0, -1] / f0,
          'muon_svd_final_rel': mu[i, -1] / f0, 'muon_svd_best_lr': eta,
          'ol_muon_final_rel': olm[k, -1] / f0, 'ol_muon_best_lr': eta2,
          'lr_grid': grid.tolist(),
          'curves': {'gd': _thin(gd[0] / f0), 'muon_svd': _thin(mu[i] / f0),
                     'ol.muon': _thin(olm[k] / f0)},
          'rho_every': rho_every,
          'rho': {'gd': gd_rho[0].tolist(), 'muon_svd': mu_rho[i].tolist(),
                  'ol.muon': olm_rho[k].tolist()},
      }
      row['winner'] = ('muon' if min(row['muon_svd_final_rel'],
                                     row['ol_muon_final_rel']) <
                       row['gd_final_rel'] else 'gd')
      out.append(row)
  return out


def _thin(curve, n=200):
  curve = np.asarray(curve)
  idx = np.unique(np.linspace(0, len(curve) - 1, n).astype(int))
  return {'step': idx.tolist(), 'value': curve[idx].tolist()}


# ---------------------------------------------------------------------------
# 2. LITE quadratic (Appendix H).
# ---------------------------------------------------------------------------


def lite_roots(lam, eta, alpha, beta):
  """Dominant root r₁ = T + sqrt(T² − D) of eq. (63) (|.| if complex)."""
  t = 1 - (alpha + eta * lam * (beta + 1)) / 2
  d = (1 - alpha) * (1 - eta * beta * lam)
  disc = t * t - d
  return np.where(disc >= 0, t + np.sqrt(np.maximum(disc, 0)),
                  np.sqrt(np.abs(d)))


def lite_quadratic(quick: bool, steps: int | None = None):
  """Eq. (58) with update (2), F = I: base vs LITE (Algorithm 1)."""
  lam = np.array([1.0, 0.5,            # sharp
                  1e-3, 3e-3, 1e-2,    # flat convex
                  -1e-3, -3e-3])       # flat negative curvature
  kind = ['sharp'] * 2 + ['flat convex'] * 3 + ['flat negative'] * 2
  flat = np.array([k != 'sharp' for k in kind])
  alpha, beta1 = 0.05, 0.0             # 1 − α = 0.95 momentum
  chi, beta2 = 2.0, 1.0                # LITE on flat directions
  # Stability bound (65) for the sharp directions, base β; take half of it.
  eta = 0.5 * 2 * (2 - alpha) / (lam.max() * max(1 + 2 * beta1 - alpha * beta1,
                                                 2 * beta1 * (1 - alpha)))
  steps = steps or (600 if quick else 3000)
  rng = np.random.default_rng(0)
  b = rng.standard_normal(lam.size)
  w_star = -b / lam
  e0 = np.where(lam > 0, -w_star, 1e-3)  # w₀ = 0; saddle: start 1e-3 away

  def run(lite: bool):
    e = e0.copy()
    mom = np.zeros_like(e)
    errs, losses = [np.abs(e)], [0.5 * np.sum(lam * e * e)]
    for _ in range(steps):
      g = lam * e
      mom = (1 - alpha) * mom + g
      if lite:
        u = np.where(flat, chi * (mom + beta2 * g), mom + beta1 * g)
      else:
        u = mom + beta1 * g
      e = e - eta * u
      errs.append(np.abs(e))
      losses.append(0.5 * np.sum(lam * e * e))
    return np.array(errs), np.array(losses)

  res = {'lambda': lam.tolist(), 'kind': kind, 'eta': eta, 'alpha': alpha,
         'beta1': beta1, 'beta2': beta2, 'chi': chi, 'steps': steps,
         'loss_note': 'f(w) − f(w*) = ½ Σ λᵢ eᵢ² (negative directions make '
                      'it negative: escaping lowers the loss)'}
  for tag, lite in (('base', False), ('lite', True)):
    errs, losses = run(lite)
    res[tag] = {'loss': _thin(losses), 'abs_error': {
        f'{k} λ={l:g}': _thin(errs[:, i]) for i, (k, l) in enumerate(
            zip(kind, lam))}}
    conv = [i for i in range(lam.size) if kind[i] == 'flat convex']
    rel = errs[:, conv] / errs[0, conv]
    hit = [int(np.argmax(rel[:, j] < 1e-2)) if np.any(rel[:, j] < 1e-2)
           else None for j in range(len(conv))]
    neg = [i for i in range(lam.size) if kind[i] == 'flat negative']
    res[tag]['steps_flat_convex_to_1e-2'] = hit
    res[tag]['escape_factor_negative'] = (errs[-1, neg] / errs[0, neg]).tolist()
    res[tag]['sharp_final_abs_error'] = errs[-1, :2].tolist()
    res[tag]['final_loss'] = float(losses[-1])
  res['r1_base'] = lite_roots(lam, eta, alpha, beta1).tolist()
  res['r1_lite_flat'] = lite_roots(lam, chi * eta, alpha, beta2).tolist()
  return res


# ---------------------------------------------------------------------------
# 3. Kronecker quadratic.
# ---------------------------------------------------------------------------


def kron_quadratic(m, n, kappa_a, kappa_b, seed):
  rng = np.random.default_rng(seed)
  qa, qb = _orth(rng, m), _orth(rng, n)
  la = np.logspace(0, -np.log10(kappa_a), m)
  lb = np.logspace(0, -np.log10(kappa_b), n)
  a = jnp.asarray((qa * la) @ qa.T, jnp.float32)
  bm = jnp.asarray((qb * lb) @ qb.T, jnp.float32)
  w_star = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

  def f(w):
    e = w - w_star
    return 0.5 * jnp.sum(e * (a @ e @ bm))

  return dict(f=f, grad=jax.grad(f), hvp=lambda w, v: a @ v @ bm,
              L=float(la.max() * lb.max()), f_star=0.0,
              w0=jnp.zeros((m, n)),
              info={'cond_A': kappa_a, 'cond_B': kappa_b,
                    'cond_H': kappa_a * kappa_b})


def kronecker(quick: bool, seeds, smoke: bool = False, names=None):
  m, n, steps = (32, 48, 300) if quick else (64, 128, 1000)
  grid = np.logspace(-3, 0, 7 if quick else 13)
  if smoke:
    m, n, steps, grid = 4, 6, 10, np.logspace(-2, -1, 2)
  reg = _common.registry(names)
  out = {'shape': [m, n], 'steps': steps, 'lr_grid': grid.tolist(),
         'runs': []}
  for seed in seeds:
    prob = kron_quadratic(m, n, 1e2, 1e2, seed)
    out['info'] = prob['info']
    gd, _ = run_grid(prob, gd_tx(), [1.0 / prob['L']], steps)
    f0 = gd[0, 0]
    rows = {'gd (1/L)': {'final_rel': gd[0, -1] / f0, 'best_lr': 1 / prob['L'],
                         'curve': _thin(gd[0] / f0)}}
    for name, factory in _common.progress(list(reg.items()),
                                          desc=f'kron seed {seed}'):
      try:
        tx = factory(1.0, weight_decay=0.0)
        cur, _ = run_grid(prob, tx, grid, steps)
      except Exception as e:
        rows[name] = {'error': f'{type(e).__name__}: {e}'[:300]}
        print(f'[error] kronecker {name}: {rows[name]["error"]}')
        continue
      i, eta = best_of(cur, grid)
      rows[name] = {'final_rel': cur[i, -1] / f0, 'best_lr': eta,
                    'curve': _thin(cur[i] / f0),
                    'final_rel_by_lr': (cur[:, -1] / f0).tolist()}
    out['runs'].append({'seed': seed, 'results': rows})
  return out


# ---------------------------------------------------------------------------


def main(argv=None):
  p = _common.arg_parser(__doc__)
  p.add_argument('--parts', nargs='*', default=None,
                 help='default: muon_gd lite kron')
  p.add_argument('--seeds', type=int, nargs='*', default=None)
  p.add_argument('--optimizers', nargs='*', default=None,
                 help='registry subset for the Kronecker quadratic')
  p.add_argument('--smoke', action='store_true',
                 help='tiny sizes (for the smoke test), not a benchmark')
  p.add_argument('--out', default=None)
  p.add_argument('--no-plot', action='store_true')
  args = p.parse_args(argv)
  seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
  parts = args.parts if args.parts is not None else ['muon_gd', 'lite', 'kron']
  print(f'device {_common.device_kind()}; parts {parts}; seeds {seeds}')
  out = {'meta': _common.metadata(args)}
  if 'muon_gd' in parts:
    out['muon_vs_gd'] = muon_vs_gd(args.quick, seeds, args.smoke)
  if 'lite' in parts:
    out['lite_quadratic'] = lite_quadratic(args.quick,
                                           20 if args.smoke else None)
  if 'kron' in parts:
    out['kronecker'] = kronecker(args.quick, seeds, args.smoke,
                                 args.optimizers)
  path = _common.result_path('synthetic', args.out, quick=args.quick)
  _common.write_json(path, out)
  if not args.no_plot:
    plot(out, path[:-5])
  print_summary(out)
  return out


def print_summary(out):
  for r in out.get('muon_vs_gd', []):
    print(f'{r["problem"]:42s} seed {r["seed"]}: GD {r["gd_final_rel"]:.2e} '
          f'Muon-SVD {r["muon_svd_final_rel"]:.2e} ol.muon '
          f'{r["ol_muon_final_rel"]:.2e} -> {r["winner"]}')
  lq = out.get('lite_quadratic')
  if lq:
    for tag in ('base', 'lite'):
      print(f'LITE quadratic {tag}: flat-convex steps to 1e-2 '
            f'{lq[tag]["steps_flat_convex_to_1e-2"]}, negative escape '
            f'{["%.3g" % v for v in lq[tag]["escape_factor_negative"]]}, '
            'sharp |e| '
            f'{["%.1e" % v for v in lq[tag]["sharp_final_abs_error"]]}')
  kr = out.get('kronecker')
  if kr:
    for run in kr['runs']:
      items = sorted(((v.get('final_rel', np.inf), k) for k, v in
                      run['results'].items()), key=lambda t: t[0])
      print(f'Kronecker seed {run["seed"]}: ' + ', '.join(
          f'{k} {v:.2e}' for v, k in items))


def plot(out, stem):
  plt = _common.setup_matplotlib()
  rows = out.get('muon_vs_gd', [])
  if rows:
    probs = list(dict.fromkeys(r['problem'] for r in rows))
    fig, axes = plt.subplots(2, len(probs), figsize=(4 * len(probs), 7.5))
    axes = np.asarray(axes).reshape(2, len(probs))
    for j, name in enumerate(probs):
      r = [x for x in rows if x['problem'] == name][0]
      for key, c in r['curves'].items():
        axes[0, j].semilogy(c['step'], np.maximum(c['value'], 1e-16), label=key)
      axes[0, j].set_title(name, fontsize=8)
      axes[0, j].set(xlabel='step', ylabel='(f − f*)/(f₀ − f*)')
      for key, rr in r['rho'].items():
        rr = np.asarray(rr, np.float64)
        axes[1, j].semilogy(np.arange(len(rr)) * r['rho_every'], rr, label=key)
      axes[1, j].axhline(1.0, color='k', lw=0.8, ls=':')
      axes[1, j].set(xlabel='step', ylabel='ρ = ‖∇f‖*²L / (‖∇f‖F² J)')
      axes[0, j].legend(fontsize=7)
      axes[1, j].legend(fontsize=7)
    _common.save_figure(fig, stem + '_muon_vs_gd.png', dpi=100)
  lq = out.get('lite_quadratic')
  if lq:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for tag, ls in (('base', '--'), ('lite', '-')):
      c = lq[tag]['loss']
      axes[0].plot(c['step'], c['value'], ls, label=tag)
      for i, (k, c) in enumerate(lq[tag]['abs_error'].items()):
        axes[1].semilogy(c['step'], np.maximum(c['value'], 1e-16), ls,
                         color=f'C{i}', label=f'{tag} {k}')
    axes[0].set(xlabel='step', ylabel='f(w) − f(w*)',
                title='LITE quadratic (App. H): loss')
    axes[0].set_yscale('symlog', linthresh=1e-3)
    axes[1].set(xlabel='step', ylabel='|wᵢ − wᵢ*|',
                title='per-direction error (dashed: base, solid: LITE)')
    axes[0].legend()
    axes[1].legend(fontsize=6, ncol=2)
    _common.save_figure(fig, stem + '_lite.png', dpi=100)
  kr = out.get('kronecker')
  if kr:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, v in kr['runs'][0]['results'].items():
      if 'curve' in v:
        ax.semilogy(v['curve']['step'], np.maximum(v['curve']['value'], 1e-16),
                    label=f'{k} (lr {v["best_lr"]:.2g})')
    ax.set(xlabel='step', ylabel='(f − f*)/(f₀ − f*)',
           title=f'Kronecker quadratic {kr["shape"]}, cond(H) = '
                 f'{kr["info"]["cond_H"]:.0e}')
    ax.legend(fontsize=7)
    _common.save_figure(fig, stem + '_kronecker.png', dpi=100)


if __name__ == '__main__':
  main()
