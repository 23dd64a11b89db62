"""LITE: spectral filter, lite_flat_boost, muon_lite (and Appendix H)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, strategies as st

import optax_lite as ol
from optax_lite.linalg import matrix_view, subspace
from optax_lite.transforms import lite as lite_lib
from optimizer_zoo import update_trajectory
from conftest import (assert_injected_matches_plain, assert_tree_finite,
                      assert_trees_close, nnx_losses)


def gapped_matrix(key, m, n, top, ds):
  """Singular values: ``ds`` in [top/2, top], the rest in [0.02, 0.5]."""
  k1, k2 = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, min(m, n))))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, min(m, n))))
  s = jnp.concatenate([jnp.linspace(top, top / 2, ds),
                       jnp.linspace(0.5, 0.02, min(m, n) - ds)])
  return (u * s) @ v.T


# --------------------------------------------------------------------------
# The filter (pure linalg)
# --------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(40, 24), (24, 40)])
def test_filter_matches_exact_projector_at_fixed_tau(shape):
  m = gapped_matrix(jax.random.PRNGKey(0), *shape, top=8.0, ds=3)
  for side in ('left', 'right'):
    p = subspace.sharp_projector(m, 1.5, side=side)
    pe = subspace.exact_sharp_projector(m, 3, side=side)
    assert float(jnp.linalg.norm(p - pe)) < 0.02
  t_exact = subspace.spectral_filter(m, 1.5, method='svd')
  np.testing.assert_allclose(t_exact @ t_exact.T,
                             subspace.exact_sharp_projector(m, 3), atol=1e-5)


@pytest.mark.parametrize('deadband', [0.0, 0.5])
def test_threshold_controller_settles_at_target_rank(deadband):
  rows, cols = 64, 48
  ds = lite_lib.sharp_dim(0.1, rows, cols, 'reference')
  m = gapped_matrix(jax.random.PRNGKey(1), rows, cols, top=10.0, ds=ds)
  geo = ol.muon_geometry(sharp_ratio=0.1, threshold_deadband=deadband)
  view = matrix_view(m.shape)
  state = geo.init(view, m)
  p_exact = subspace.exact_sharp_projector(m, ds)
  eye = jnp.eye(rows)[None]
  traces, errors = [], []
  @jax.jit
  def step(s):
    out = geo.directions(view, m, m, s, jnp.int32(1), False)
    p = (eye - out.flat(eye))[0]
    return out.state, jnp.trace(p), jnp.linalg.norm(p - p_exact)

  for _ in range(60):
    state, trace, error = step(state)
    traces.append(float(trace))
    errors.append(float(error))
  late_t, late_e = np.array(traces[30:]), np.array(errors[30:])
  # Paper controller (bang-bang): tau oscillates at the lower edge of the
  # gap, so on alternate steps the soft filter lets in part of the dense
  # band below (trace up to ~d_s + 2), and is exact on the other steps.
  assert np.all(np.abs(late_t - ds) < 2.5), late_t
  assert np.median(late_e) < 0.75 and late_e.min() < 0.05, late_e
  if deadband:
    assert np.all(late_e < 0.05), late_e  # rests inside the gap


@pytest.mark.parametrize('m', [jnp.zeros((12, 8)),
                               jnp.outer(jnp.arange(12.0), jnp.ones(8)),
                               jnp.full((12, 8), 1e-20)])
def test_filter_never_nan_on_degenerate_input(m):
  geo = ol.muon_geometry()
  view = matrix_view(m.shape)
  out = geo.directions(view, m, m, geo.init(view, m), jnp.int32(1), True)
  assert_tree_finite((out.d_m, out.d_g, out.flat(out.d_m), out.state))


def test_layout_flax_kernel_equals_torch_transpose():
  """The flat/sharp split of an (in, out) kernel equals the torch one."""
  layer = nnx.Linear(24, 40, rngs=nnx.Rngs(0))  # kernel [in=24, out=40]
  w = layer.kernel.value
  m = gapped_matrix(jax.random.PRNGKey(2), 24, 40, top=6.0, ds=3)
  # torch layout (out, in): projector on the input side = right vectors.
  p_torch = subspace.sharp_projector(m.T, 1.5, side='right')
  flat_torch = w.T - w.T @ p_torch  # torch: W (I − PᵀP) on the right
  geo = ol.muon_geometry()
  view = matrix_view(w.shape)
  ratio = (jnp.array([1.5 / float(jnp.linalg.norm(m))]),)
  out = geo.directions(view, m, m, ratio, jnp.int32(1), False)
  flat_flax = out.finish(out.flat(out.to_coords(w)))
  np.testing.assert_allclose(flat_flax, flat_torch.T, atol=2e-3)
  assert p_torch.shape == (24, 24)  # fan-in side


# --------------------------------------------------------------------------
# Reduction to the base optimizers
# --------------------------------------------------------------------------


def _params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {'w': jax.random.normal(k1, (24, 40)) * 0.1,
          'conv': jax.random.normal(k2, (3, 3, 4, 8)) * 0.1,
          'embed': {'embedding': jax.random.normal(k3, (30, 6))},
          'norm': {'scale': jnp.ones(6)}, 'bias': jnp.zeros(40),
          'lm_head': {'kernel': jax.random.normal(k3, (6, 30))}}


def _trajectory(tx, params, steps=4):
  return update_trajectory(tx, params, steps)


def test_muon_lite_reduces_to_muon():
  params = _params(jax.random.PRNGKey(0))
  base = ol.muon(0.01)
  lite = ol.muon_lite(0.01, chi=1.0, beta1=0.0, beta2=0.0, emb_chi=1.0)
  for a, b in zip(_trajectory(lite, params), _trajectory(base, params)):
    assert_trees_close(a, b, rtol=0, atol=1e-6)


def test_adamw_lite_reduces_to_adamw():
  params = {'e': jax.random.normal(jax.random.PRNGKey(0), (20, 5))}
  for a, b in zip(_trajectory(ol.adamw_lite(0.01, chi=1.0), params),
                  _trajectory(optax.adamw(0.01, b1=0.9, b2=0.95,
                                          weight_decay=0.1), params)):
    assert_trees_close(a, b, rtol=0, atol=1e-6)


@jax.jit
def _base_reduced_full(g):
  base = optax.chain(ol.momentum(0.95), ol.orthogonalize(), ol.scale_by_shape())
  red = ol.lite_flat_boost(ol.muon_geometry(), chi=1.0, scaling='rms')
  full = ol.lite_flat_boost(ol.muon_geometry(), chi=2.0, beta1=-0.25,
                            beta2=1.0, scaling='rms')
  return tuple(t.update(g, t.init(g))[0] for t in (base, red, full))


# A few shapes (square, tall, wide, thin) so that one jitted program per
# shape serves many examples; the values span eight orders of magnitude.
@given(seed=st.integers(0, 1000), scale=st.floats(1e-4, 1e4),
       shape=st.sampled_from([(2, 12), (12, 2), (7, 7), (12, 5), (3, 9)]))
def test_hypothesis_reduction_and_finiteness(seed, scale, shape):
  g = {'w': scale * jax.random.normal(jax.random.PRNGKey(seed), shape)}
  ub, ur, uf = _base_reduced_full(g)
  np.testing.assert_allclose(ur['w'], ub['w'], atol=1e-5)
  assert_tree_finite(uf)


def test_boost_amplifies_flat_component_only():
  """chi scales the flat part of the update, leaves the sharp part."""
  m = gapped_matrix(jax.random.PRNGKey(3), 32, 20, top=8.0, ds=2)
  g = {'w': m}
  geo_svd = ol.muon_geometry(sharp_ratio=0.05, method='svd')
  t1 = ol.lite_flat_boost(geo_svd, chi=1.0)
  t3 = ol.lite_flat_boost(geo_svd, chi=3.0)
  u1, _ = t1.update(g, t1.init(g))
  u3, _ = t3.update(g, t3.init(g))
  geo = ol.muon_geometry(sharp_ratio=0.05, method='svd')
  view = matrix_view(m.shape)
  out = geo.directions(view, m, m, geo.init(view, m), jnp.int32(1), False)
  flat1 = out.flat(view.to_matrix(u1['w']))
  sharp1 = view.to_matrix(u1['w']) - flat1
  flat3 = out.flat(view.to_matrix(u3['w']))
  np.testing.assert_allclose(flat3, 3 * flat1, atol=1e-4)
  np.testing.assert_allclose(view.to_matrix(u3['w']) - flat3, sharp1,
                             atol=1e-4)


# --------------------------------------------------------------------------
# Appendix H: the quadratic with sharp, flat and negative-curvature dirs
# --------------------------------------------------------------------------


def identity_geometry(flat_mask):
  """F = I with a known flat set of coordinates (Appendix H's setting)."""

  def init(view, param):
    del view, param
    return ()

  def directions(view, m_term, g, leaf_state, count, need_g):
    del view, leaf_state, count
    flat = lambda x: flat_mask * x
    return lite_lib.LeafDirections(m_term, g if need_g else None, flat,
                                   lambda x: x, lambda w: w, ())

  return ol.transforms.Geometry(init, directions, needs_matrix=False)


def test_appendix_h_quadratic():
  lam = jnp.array([10.0, 5.0] + [0.05] * 6 + [-0.02] * 4)
  b = jnp.ones_like(lam) * 0.1
  flat = (jnp.abs(lam) < 1.0).astype(jnp.float32)
  neg = lam < 0
  f = lambda w: 0.5 * jnp.sum(lam * w * w) + b @ w
  grad = jax.grad(f)
  alpha, beta, eta = 0.1, 0.5, 0.02

  def run(chi, beta2, steps=150):
    tx = optax.chain(
        ol.lite_flat_boost(identity_geometry(flat), chi=chi, beta1=beta,
                           beta2=beta2, momentum=1 - alpha, nesterov=False),
        optax.scale(-eta))
    w = jnp.zeros_like(lam)
    s = tx.init(w)
    for _ in range(steps):
      u, s = tx.update(grad(w), s, w)
      w = w + u
    return w

  w_base = run(1.0, beta)
  w_lite = run(2.0, 2.0)
  assert float(f(w_lite)) < float(f(w_base))
  # Escape along negative curvature: larger excursion in those coordinates.
  assert float(jnp.linalg.norm(w_lite[neg])) > 1.5 * float(
      jnp.linalg.norm(w_base[neg]))
  # Flat convex coordinates: closer to their minimiser −b/λ.
  conv = (flat > 0) & ~neg
  target = -b / lam
  assert float(jnp.linalg.norm((w_lite - target)[conv])) < float(
      jnp.linalg.norm((w_base - target)[conv]))
  # Sharp coordinates stay stable (near their minimiser).
  np.testing.assert_allclose(w_lite[:2], target[:2], atol=1e-2)


# --------------------------------------------------------------------------
# Named optimizer, schedules, bad input
# --------------------------------------------------------------------------


def test_muon_lite_state_and_nnx_training():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(16, 16, rngs=rngs)
      self.hidden = nnx.Linear(16, 32, rngs=rngs)
      self.norm = nnx.RMSNorm(32, rngs=rngs)
      self.lm_head = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, t):
      return self.lm_head(self.norm(jax.nn.gelu(self.hidden(self.embed(t)))))

  tokens = jnp.arange(64) % 16
  target = (tokens * 5 + 3) % 16

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(
        m(tokens), target).mean()

  losses = nnx_losses(Net(nnx.Rngs(0)), ol.muon_lite(
      0.02, total_steps=40, warmup_steps=4), loss_fn, steps=40)
  assert losses[-1] < 0.5 * losses[0]


def test_reference_schedules():
  b2 = ol.beta2_ramp(-0.25, 1.0, total_steps=100, warmup_steps=10,
                     flat_warmup=0.5)
  assert float(b2(5)) == pytest.approx(-0.25)
  assert float(b2(55)) == pytest.approx(1.0)
  assert float(b2(32)) == pytest.approx(-0.25 + 1.25 * 22 / 45, rel=1e-5)
  ramp = ol.chi_schedule(2.0, mode='ramp', total_steps=100, warmup_steps=10)
  decay = ol.chi_schedule(4.0, mode='decay', total_steps=100, warmup_steps=10)
  assert float(ramp(5)) == 1.0 and float(ramp(60)) == pytest.approx(2.0, 0.1)
  assert float(decay(11)) == pytest.approx(4.0, rel=0.01)
  assert float(decay(100)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize('kwargs,name', [
    (dict(chi=0.5), 'chi'), (dict(beta1=1.0, beta2=0.5), 'beta2'),
    (dict(sharp_ratio=0.0), 'sharp_ratio'),
    (dict(sharp_ratio=1.0), 'sharp_ratio'),
    (dict(threshold_rate=1.0), 'threshold_rate'),
    (dict(variant='fast'), 'variant'), (dict(momentum=1.2), 'momentum')])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises((ValueError, TypeError), match=name):
    ol.muon_lite(0.01, **kwargs)


def test_bfloat16_params_with_float32_state():
  params = {'w': jnp.ones((16, 8), jnp.bfloat16)}
  tx = ol.muon_lite(0.01, mu_dtype=jnp.float32)
  state = tx.init(params)
  g = {'w': jax.random.normal(jax.random.PRNGKey(0), (16, 8)).astype(
      jnp.bfloat16)}
  u, state = jax.jit(tx.update)(g, state, params)
  assert u['w'].dtype == jnp.bfloat16
  mus = [x for x in jax.tree.leaves(state) if x.shape == (16, 8)]
  assert mus and all(x.dtype == jnp.float32 for x in mus)
  assert_tree_finite(u)


# --------------------------------------------------------------------------
# SOAP-LITE, RMNP-LITE, FISMO-LITE: reduction to their bases
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name,base_kw', [
    ('soap', dict(precondition_frequency=2)),
    ('rmnp', {}),
    ('fismo', {}),
])
def test_lite_variants_reduce_to_base(name, base_kw):
  params = _params(jax.random.PRNGKey(1))
  base = getattr(ol, name)(0.01, **base_kw)
  lite = getattr(ol, name + '_lite')(0.01, chi=1.0, beta1=0.0, beta2=0.0,
                                     emb_chi=1.0, **base_kw)
  for a, b in zip(_trajectory(lite, params, steps=5),
                  _trajectory(base, params, steps=5)):
    assert_trees_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize('name', ['soap_lite', 'rmnp_lite', 'fismo_lite'])
def test_lite_variants_finite_and_boosted(name):
  params = _params(jax.random.PRNGKey(2))
  kw = dict(precondition_frequency=2) if name == 'soap_lite' else {}
  ups = _trajectory(getattr(ol, name)(0.01, **kw), params, steps=5)
  base = _trajectory(getattr(ol, name.replace('_lite', ''))(0.01, **kw),
                     params, steps=5)
  assert_tree_finite(ups)
  # The boosted update is larger than the base one on the matrix leaf.
  assert float(jnp.linalg.norm(ups[-1]['w'])) > float(
      jnp.linalg.norm(base[-1]['w']))


def test_soap_lite_mask_tracks_sharp_fraction():
  """The soft mask keeps ≈ r_s·mn coordinates fully sharp."""
  geo = ol.soap_geometry(sharp_ratio=0.2, precondition_frequency=1)
  w = jnp.zeros((16, 12))
  view = matrix_view(w.shape)
  state = geo.init(view, w)
  scales = jnp.logspace(-2, 1, 16)[:, None] * jnp.logspace(-1, 1, 12)[None]
  @jax.jit
  def step(state, i):
    g = scales * jax.random.normal(jax.random.PRNGKey(i), w.shape)
    out = geo.directions(view, g, g, state, i, False)
    s = 1.0 - out.flat(jnp.ones((1, 16, 12)))
    return out.state, jnp.mean(s >= 0.999)

  fracs = []
  for i in range(1, 61):
    state, frac = step(state, jnp.int32(i))
    fracs.append(float(frac))
  assert 0.1 < np.mean(fracs[-20:]) < 0.3, fracs[-20:]


# --------------------------------------------------------------------------
# Muon-LITE against a float64 transcription of the reference (muonlite.py)
# --------------------------------------------------------------------------

# Polar Express rows as the reference lists them; it divides all but the
# last by (1.01, 1.01³, 1.01⁵) and normalises by 1.01·‖X‖_F + 1e-8.
_PE_ROWS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375)]
_PE = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_ROWS[:-1]
       ] + [_PE_ROWS[-1]]


def _ref_polar(g, steps=6):
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) * 1.01 + 1e-8)
  for a, b, c in (_PE[:steps] + [_PE[-1]] * max(0, steps - len(_PE))):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def _ref_cosine(step, warmup, total, peak, min_ratio):
  if step < warmup:
    return peak * (step + 1) / warmup
  progress = (step - warmup) / (total - warmup)
  return peak * (min_ratio + (1 - min_ratio) * 0.5 * (
      1 + math.cos(math.pi * progress)))


def _ref_muon_lite(w_torch, grads, *, lr, wd, total, warmup, chi=2.0,
                   beta1=-0.25, beta2=1.0, theta=0.95, ratio_s=0.1):
  """The reference's Muon-LITE branch (use_muon == 1, cosine, flat_warmup
  = 1), transcribed: PyTorch layout ``(out, in)``; weights after each step.
  """
  w = np.array(w_torch, np.float64)
  m, n = w.shape
  k = min(int(ratio_s * min(m, n)) + 1, min(m, n) - 1)
  t_f = 0.5
  t_beta = int(t_f * (total - warmup)) + warmup
  thr, mom, out = 1.0 / math.sqrt(min(m, n)), np.zeros_like(w), []
  for it, g in enumerate(grads):
    if t_beta > 0 and it >= t_beta:
      b2 = beta2
    elif it <= warmup:
      b2 = beta1
    else:
      b2 = beta1 - (beta1 - beta2) * (it - warmup) / (t_beta - warmup)
    if it <= warmup:
      lr_times = 1.0
    else:
      lr_f = _ref_cosine(it, warmup, total, chi, 0.1 / chi)
      lr_s = _ref_cosine(it, warmup, total, 1.0, 0.1) + 1e-9
      lr_times = min(lr_f / lr_s, 1 + (it - warmup) / (total - warmup) * (
          chi - 1) / t_f)
    mom = mom * theta + g * (1 - theta)
    big_m = mom + g * (1 - theta) / theta
    m_ns = _ref_polar(big_m)
    tau = np.linalg.norm(big_m) * thr + 1e-9
    t = (m_ns + _ref_polar(big_m / tau - m_ns)) / 2
    thr = min(1.0, thr * (1.05 if np.linalg.norm(t) > math.sqrt(k)
                           else 0.95))
    p_flat = np.eye(n) - t.T @ t
    h = _ref_polar(g)
    upd = m_ns + beta1 * h + (b2 - beta1) * (h @ p_flat)
    upd = upd + (lr_times - 1) * upd @ p_flat
    flat_wd = w @ p_flat
    w = w * (1 - lr * wd)
    w = w - lr * wd * (lr_times - 1) * flat_wd
    w = w - 0.2 * lr * math.sqrt(max(m, n)) * upd
    out.append(w.copy())
  return out


def _lite_grads(kind, shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    if kind == 'gaussian':
      out.append(rng.standard_normal(shape))
    else:  # two singular values far above a flat band
      s = min(shape)
      u, _ = np.linalg.qr(rng.standard_normal((shape[0], s)))
      v, _ = np.linalg.qr(rng.standard_normal((shape[1], s)))
      sv = np.concatenate([[8.0, 6.0], np.linspace(0.5, 0.05, s - 2)])
      out.append((u * sv) @ v.T)
  return out


@pytest.mark.parametrize('kind', ['gapped', 'gaussian'])
@pytest.mark.parametrize('shape', [(24, 16), (16, 24)])
def test_muon_lite_matches_reference_transcription(shape, kind):
  """``muon_lite(filter_route="reference")`` (float64) follows muonlite.py.

  ``shape`` is the Flax kernel ``(fan_in, fan_out)``; the reference sees its
  transpose ``(out, in)`` and projects on its input side (``I − TᵀT``),
  which is our fan-in side. 14 steps with total 24, warmup 2: β₂ and χ ramp
  over steps 3–13 and the threshold controller moves every step.
  """
  steps, total, warmup, lr, wd = 14, 24, 2, 0.02, 0.1
  rng = np.random.default_rng(1)
  w0 = rng.standard_normal(shape) * 0.1
  grads = _lite_grads(kind, shape, steps)
  ref = _ref_muon_lite(w0.T, [g.T for g in grads], lr=lr, wd=wd,
                       total=total, warmup=warmup)
  with jax.enable_x64(True):
    tx = ol.muon_lite(lr, weight_decay=wd, total_steps=total,
                      warmup_steps=warmup, filter_route='reference',
                      labels={'w': 'matrix'})
    params = {'w': jnp.asarray(w0, jnp.float64)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i, g in enumerate(grads):
      u, state = step({'w': jnp.asarray(g, jnp.float64)}, state, params)
      assert u['w'].dtype == jnp.float64
      params = optax.apply_updates(params, u)
      got = np.asarray(params['w'])
      want = ref[i].T
      prev = w0 if i == 0 else ref[i - 1].T
      err = np.linalg.norm(got - want) / np.linalg.norm(want - prev)
      assert err <= 1e-6, (i, err)
  travelled = np.linalg.norm(ref[-1].T - w0)
  assert travelled > 0.01  # the comparison is not vacuous


# --------------------------------------------------------------------------
# optax habits: inject_hyperparams, tree_map_params, sharding of the state
# --------------------------------------------------------------------------

_INJECT_KW = {
    'muon_lite': dict(total_steps=20, warmup_steps=2),
    'adamw_lite': {},
    'rmnp_lite': dict(total_steps=20),
    'soap_lite': dict(precondition_frequency=2),
    'fismo_lite': {},
    'normuon_lite': dict(total_steps=20, warmup_steps=2),
}
_STATIC = {
    'muon_lite': ('total_steps', 'warmup_steps'),
    'normuon_lite': ('total_steps', 'warmup_steps'),
    'rmnp_lite': ('total_steps',),
    'soap_lite': ('precondition_frequency',),
}


def _inject_params(square=False):
  p = _params(jax.random.PRNGKey(4))
  w = p['w'][:8, :8] if square else p['w']
  return {'w': w, 'embed': p['embed'], 'bias': p['bias']}


@pytest.mark.parametrize('name', [
    'adamw_lite', 'muon_lite', 'rmnp_lite', 'soap_lite', 'fismo_lite',
    'normuon_lite'])
def test_inject_hyperparams_matches_plain_and_lr_is_live(name):
  """``inject_hyperparams(ol.X)(learning_rate=…)`` equals ``ol.X(…)`` step
  for step, and changing the injected learning rate changes the step.

  SOAP-LITE gets a square leaf: on a rank-deficient one, SOAP's null-space
  coordinates turn the 1-ulp difference between a Python float and its
  float32 array (``1 − b₂``) into 1e-3 (issue 11 §3).
  """
  params = _inject_params(square=name == 'soap_lite')
  if name == 'adamw_lite':
    params = {'e': params['embed']['embedding']}
  kw = _INJECT_KW[name]
  plain = getattr(ol, name)(0.01, **kw)
  inj = optax.inject_hyperparams(getattr(ol, name),
                                 static_args=_STATIC.get(name, ()))(
                                     learning_rate=0.01, **kw)
  si, _ = assert_injected_matches_plain(plain, inj, params, steps=3)
  ui = jax.jit(inj.update)
  g = jax.tree.map(jnp.ones_like, params)
  a, _ = ui(g, si, params)
  si.hyperparams['learning_rate'] = jnp.asarray(0.03)
  b, _ = ui(g, si, params)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert all(np.allclose(3 * x, y, rtol=1e-4, atol=1e-8)
             for x, y in zip(la, lb) if x.ndim == 2), name


def test_inject_hyperparams_structural_int_names_static_args():
  with pytest.raises(TypeError, match='static_args'):
    opt = optax.inject_hyperparams(ol.muon_lite)(0.01, total_steps=10)
    opt.init({'w': jnp.ones((8, 4))})


@pytest.mark.parametrize('name', [
    'muon_lite', 'adamw_lite', 'rmnp_lite', 'fismo_lite', 'soap_lite',
    'normuon_lite'])
def test_tree_map_params_on_lite_state(name):
  """The state's params-shaped parts are found by optax's tree_map_params."""
  params = _inject_params()
  tx = getattr(ol, name)(0.01, **_INJECT_KW[name])
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda x: x + 1.0, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  is_lite = lambda x: isinstance(x, lite_lib.LiteState)
  lite = [(a, b) for a, b in zip(jax.tree.leaves(state, is_leaf=is_lite),
                                 jax.tree.leaves(mapped, is_leaf=is_lite))
          if is_lite(a)]
  assert lite
  for before, after in lite:  # momentum mapped, count left alone
    assert int(after.count) == int(before.count)
    for x, y in zip(jax.tree.leaves(before.mu), jax.tree.leaves(after.mu)):
      np.testing.assert_allclose(y, x + 1.0)


@pytest.mark.parametrize('name, kw, base', [
    ('soap_lite', dict(null_threshold=0.5), dict(precondition_frequency=2)),
    ('fismo_lite', dict(trace_damping=0.0), {}),
    ('fismo_lite', dict(min_eig=0.5), {}),
    ('fismo_lite', dict(root_iters=2), dict(root_method='newton')),
    ('fismo_lite', dict(warm_iters=1), dict(root_method='newton_warm')),
    ('fismo_lite', dict(root_eps=1.0), {}),
])
def test_named_lite_passes_inner_keyword_through(name, kw, base):
  """A changed keyword of SOAP's / the whitening's changes the update."""
  params = {'w': _inject_params()['w']}
  key = jax.random.PRNGKey(7)

  def run(extra):
    tx = getattr(ol, name)(0.01, **base, **extra)
    state, k, step = tx.init(params), key, jax.jit(tx.update)
    for _ in range(3):
      k, sub = jax.random.split(k)
      g = {'w': jax.random.normal(sub, params['w'].shape)}
      u, state = step(g, state, params)
    return u['w']

  a, b = run({}), run(kw)
  assert bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))
  assert float(jnp.linalg.norm(a - b)) > 1e-3 * float(jnp.linalg.norm(a))


def test_lite_state_keeps_parameter_sharding():
  """Momentum and second moments are created with the param's sharding."""
  devs = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devs[:1]), ('x',))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  params = {'w': jax.device_put(jnp.ones((8, 6)), spec),
            'embed': {'embedding': jax.device_put(jnp.ones((10, 4)), spec)}}
  state = ol.muon_lite(0.01).init(params)
  found = [x for x in jax.tree.leaves(state)
           if x.shape in ((8, 6), (10, 4))]
  assert len(found) >= 3  # mu of w, mu and nu of the embedding
  assert all(x.sharding == spec for x in found), [x.sharding for x in found]


@pytest.mark.multidevice
@pytest.mark.parametrize('name', ['muon_lite', 'rmnp_lite', 'fismo_lite'])
def test_lite_state_keeps_fsdp_sharding(name):
  """On 8 devices, FSDP-sharded params give equally sharded momentum and
  second moments: eagerly, and under ``jax.jit(tx.init)`` with explicit
  sharding (where ``jnp.zeros(p.shape)`` would come out unsharded)."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 8:
    pytest.fail('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Explicit,))

  def check(state):
    found = [x for x in jax.tree.leaves(state)
             if x.shape in ((16, 8), (24, 4))]
    assert len(found) >= 3
    for x in found:
      assert x.sharding.is_equivalent_to(spec, x.ndim), x.sharding

  with jax.set_mesh(mesh):
    spec = NamedSharding(mesh, P('fsdp'))
    params = {'w': jax.device_put(jnp.ones((16, 8)), spec),
              'embed': {'embedding': jax.device_put(jnp.ones((24, 4)),
                                                    spec)}}
    tx = getattr(ol, name)(0.01)
    check(tx.init(params))
    check(jax.jit(tx.init)(params))


@pytest.mark.parametrize('name', ['muon_lite', 'soap_lite'])
def test_lite_one_device_mesh_stacks(name):
  """``distribute=`` a one-device mesh runs the engine's ``"stacked"``
  placement (each shape's matrices in one call) and equals the one-device
  leaf-by-leaf step to round-off over 3 steps (refreshes included)."""
  from optax_lite.linalg import engine
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('x',))
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {'a': jax.random.normal(ks[0], (6, 10)),
            'b': jax.random.normal(ks[1], (6, 10)),
            'c': jax.random.normal(ks[2], (10, 6)),
            'embed': {'embedding': jax.random.normal(ks[3], (7, 4))}}
  kinds = []
  orig = engine.step_leaves

  def spy(method, kernel, placement, *a, **k):
    kinds.append(placement.kind)
    return orig(method, kernel, placement, *a, **k)

  def run(**kw):
    tx = getattr(ol, name)(0.01, **kw)
    p, state, step = params, tx.init(params), jax.jit(tx.update)
    for t in range(3):
      g = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 2.0)), p)
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    return p

  engine.step_leaves = spy
  try:
    ref = run()
    assert set(kinds) == {'per_leaf'}, kinds
    kinds.clear()
    out = run(distribute=mesh)
    # The matrix leaves stacked (the embedding's element-wise LITE has no
    # matrix and stays per leaf).
    assert 'stacked' in kinds, kinds
  finally:
    engine.step_leaves = orig
  for k in ('a', 'b', 'c'):
    np.testing.assert_allclose(out[k], ref[k], atol=1e-5, rtol=0)


@pytest.mark.multidevice
def test_lite_state_without_distribute_steps_on_owners():
  """A state made without ``distribute`` (no owner stacks) updated with
  ``distribute=`` over 8 devices takes the engine's ``"owner"`` placement
  (its state travelling) and equals the one-device step to round-off."""
  if len(jax.devices()) < 8:
    pytest.fail('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ('x',))
  ks = jax.random.split(jax.random.PRNGKey(4), 6)
  params = {f'w{i}': jax.random.normal(ks[i], (8, 12)) for i in range(3)}
  params['t'] = jax.random.normal(ks[3], (12, 8))
  grads = [jax.tree.map(lambda x, k=k: jnp.sin(x * 3.0) + 0.1 * k, params)
           for k in range(2)]
  from optax_lite.linalg import engine
  kinds, orig = [], engine.step_leaves

  def spy(method, kernel, placement, *a, **k):
    kinds.append(placement.kind)
    return orig(method, kernel, placement, *a, **k)

  tx1, tx8 = ol.muon_lite(0.01), ol.muon_lite(0.01, distribute=mesh)
  s1 = s8 = tx1.init(params)
  engine.step_leaves = spy
  try:
    for g in grads:
      u1, s1 = jax.jit(tx1.update)(g, s1, params)
      u8, s8 = jax.jit(tx8.update)(g, s8, params)
      for k in params:
        np.testing.assert_allclose(u8[k], u1[k], atol=1e-5, rtol=0)
  finally:
    engine.step_leaves = orig
  assert 'owner' in kinds, kinds
  assert jax.tree.structure(s8) == jax.tree.structure(s1)
