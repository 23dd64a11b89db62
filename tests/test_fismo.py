"""Tests of fisher_whiten (FISMO Algorithm 1) and the fismo optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from optax_lite.linalg import roots as roots_lib
from optax_lite.transforms.fisher_whiten import fisher_whiten
from optax_lite.transforms.momentum import momentum
from optax_lite.transforms.orthogonalize import orthogonalize
from conftest import assert_tree_finite, assert_trees_close


def _isqrt(a):
  w, v = np.linalg.eigh(a)
  return (v * w ** -0.5) @ v.T


def _alg1(grads, gamma, mu, beta=0.9, polar=True):
  """Algorithm 1 of the paper in float64, PyTorch layout (G is out × in)."""
  m, n = grads[0].shape
  p, q, mom, outs = np.eye(m), np.eye(n), np.zeros((m, n)), []
  for g in grads:
    lt = g @ np.linalg.inv(q) @ g.T / n + mu * np.trace(p) / m * np.eye(m)
    pt = gamma * p + (1 - gamma) * lt
    p = m / np.trace(pt) * pt
    p = 0.5 * (p + p.T)
    rt = g.T @ np.linalg.inv(p) @ g / m + mu * np.trace(q) / n * np.eye(n)
    qt = gamma * q + (1 - gamma) * rt
    q = n / np.trace(qt) * qt
    q = 0.5 * (q + q.T)
    gw = _isqrt(p) @ g @ _isqrt(q)
    if polar:
      mom = beta * mom + (1 - beta) * gw
      u, _, vt = np.linalg.svd(mom, full_matrices=False)
      gw = u @ vt
    outs.append(_isqrt(p) @ gw @ _isqrt(q))
  return outs, p, q


def _inner(beta=0.9, method='svd'):
  return optax.chain(momentum(beta, ema=True, nesterov=False),
                     orthogonalize(method))


_CACHE = {}


def _whiten(inner=None, **kw):
  """A cached ``(fisher_whiten, jitted update)`` pair (saves compiles)."""
  key = (inner, tuple(sorted(kw.items())))
  if key not in _CACHE:
    tx = fisher_whiten(_inner(*inner) if inner else None, **kw)
    _CACHE[key] = (tx, jax.jit(tx.update))
  return _CACHE[key]


def _run(tx, grads, params, update=None):
  state, outs = tx.init(params), []
  update = update or jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    outs.append(u)
  return outs, state


# ---------------------------------------------------- Algorithm 1, layout


@pytest.mark.parametrize('polar', [False, True])
def test_matches_algorithm_1_with_p_on_the_output_side(polar):
  rng = np.random.default_rng(0)
  fan_in, fan_out = 9, 6
  grads = [rng.normal(size=(fan_out, fan_in)) for _ in range(5)]  # torch
  tx = fisher_whiten(_inner() if polar else None, gamma=0.9, damping=1e-2,
                     min_eig=0.0, trace_damping=0.0)
  params = {'k': jnp.zeros((fan_in, fan_out))}  # Flax [in, out]
  outs, state = _run(tx, [{'k': jnp.asarray(g.T, jnp.float32)}
                          for g in grads], params)
  ref, p, q = _alg1(grads, 0.9, 1e-2, polar=polar)
  for u, r in zip(outs, ref):
    np.testing.assert_allclose(np.asarray(u['k']).T, r, rtol=2e-4, atol=2e-5)
  assert state.p['k'].shape == (fan_out, fan_out)  # P: output side
  assert state.q['k'].shape == (fan_in, fan_in)    # Q: input side
  np.testing.assert_allclose(state.p['k'], p, atol=1e-5)
  np.testing.assert_allclose(state.q['k'], q, atol=1e-5)
  # Gauss–Seidel is not transpose-equivariant: declaring the Flax input axis
  # as the output axis gives the algorithm applied to G instead of Gᵀ, a
  # different update (so the orientation above is a real choice).
  swapped = fisher_whiten(_inner() if polar else None, gamma=0.9,
                          damping=1e-2, min_eig=0.0, trace_damping=0.0,
                          dims=ol.MatrixDims(1, 0))
  outs_t, _ = _run(swapped, [{'k': jnp.asarray(g.T, jnp.float32)}
                             for g in grads], params)
  ref_t, _, _ = _alg1([g.T for g in grads], 0.9, 1e-2, polar=polar)
  np.testing.assert_allclose(np.asarray(outs_t[-1]['k']), ref_t[-1],
                             rtol=2e-4, atol=2e-5)
  assert np.abs(ref_t[-1] - ref[-1].T).max() > 1e-3


def test_identity_inner_is_kronecker_natural_gradient():
  rng = np.random.default_rng(1)
  params = {'k': jnp.zeros((7, 5))}
  tx, update = _whiten(None, gamma=0.8, damping=1e-2, min_eig=0.0,
                       trace_damping=0.0)
  outs, state = _run(tx, [{'k': jnp.asarray(rng.normal(size=(7, 5)),
                                            jnp.float32)} for _ in range(4)],
                     params, update)
  g = rng.normal(size=(7, 5)).astype(np.float32)
  u, state = update({'k': jnp.asarray(g)}, state)
  p = np.asarray(state.p['k'], np.float64)
  q = np.asarray(state.q['k'], np.float64)
  # Paper: P⁻¹ G Q⁻¹ with G = gᵀ; Flax view: Q⁻¹ g P⁻¹.
  ref = np.linalg.inv(q) @ g @ np.linalg.inv(p)
  np.testing.assert_allclose(u['k'], ref, rtol=1e-4, atol=1e-5)


def test_newton_roots_agree_with_eigh():
  rng = np.random.default_rng(2)
  grads = [{'k': jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)}
           for _ in range(6)]
  params = {'k': jnp.zeros((10, 6))}
  a, sa = _run(fisher_whiten(_inner(), root_method='eigh'), grads, params)
  b, sb = _run(fisher_whiten(_inner(), root_method='newton'), grads, params)
  assert_trees_close(sa.p, sb.p, atol=1e-4)
  assert_trees_close(sa.q, sb.q, atol=1e-4)
  assert_trees_close(a[-1], b[-1], rtol=1e-3, atol=1e-3)


def test_max_factor_size_keeps_that_side_identity():
  rng = np.random.default_rng(3)
  params = {'k': jnp.zeros((6, 40))}  # fan_in 6 (Q kept), fan_out 40 (P = I)
  tx = fisher_whiten(None, gamma=0.5, damping=1e-2, min_eig=0.0,
                     trace_damping=0.0, max_factor_size=16)
  state = tx.init(params)
  assert state.p['k'].shape == (1,) and state.q['k'].shape == (6, 6)
  g = rng.normal(size=(6, 40)).astype(np.float32)
  u, state = tx.update({'k': jnp.asarray(g)}, state)
  # One-sided: R = G_torchᵀ G_torch / m = g gᵀ / fan_out, update Q⁻¹ g.
  r = g.astype(np.float64) @ g.T / 40 + 1e-2 * np.eye(6)
  qt = 0.5 * np.eye(6) + 0.5 * r
  q = 6 * qt / np.trace(qt)
  np.testing.assert_allclose(state.q['k'], q, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(u['k'], np.linalg.inv(q) @ g, rtol=1e-4,
                             atol=1e-5)


# ------------------------------------------------------------ invariants


def _spd_and_traces(state, leaf='k'):
  p = np.asarray(state.p[leaf], np.float64)
  q = np.asarray(state.q[leaf], np.float64)
  for f in (p, q):
    np.testing.assert_allclose(f, f.T, atol=1e-6)
    np.testing.assert_allclose(np.trace(f), f.shape[0], rtol=1e-5)
    assert np.linalg.eigvalsh(f)[0] > 0.0
  return np.linalg.cond(p), np.linalg.cond(q)


def _some_rank_one(seed, steps, scale, every, at):
  """``steps`` (12, 8) gradients ``scale · N(0, 1)``, the ``t``-th rank one
  instead where ``t % every == at``."""
  rng = np.random.default_rng(seed)
  for t in range(steps):
    g = rng.normal(size=(12, 8))
    if t % every == at:
      g = np.outer(rng.normal(size=12), rng.normal(size=8))
    yield {'k': jnp.asarray(scale * g, jnp.float32)}


@pytest.mark.parametrize('scale_invariant', [False, True])
@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e2])
def test_factors_stay_spd_with_right_traces(scale, scale_invariant):
  params = {'k': jnp.zeros((12, 8))}
  tx, update = _whiten((0.95, 'polar_express'),
                       scale_invariant=scale_invariant)
  state = tx.init(params)
  for t, g in enumerate(_some_rank_one(4, 60, scale, every=3, at=1)):
    u, state = update(g, state)
    assert_tree_finite(u)
    if t % 15 == 14:
      _spd_and_traces(state)
  cond_p, _ = _spd_and_traces(state)
  if scale_invariant or scale == 1.0:
    assert cond_p > 1.05  # the factors really adapt
  if scale == 1e-3 and not scale_invariant:
    assert cond_p < 1.05  # Algorithm 1 at small gradients: P stays ≈ I


@pytest.mark.parametrize('root_method, scale_invariant', [
    ('eigh', False), ('newton', False),
    pytest.param('eigh', True, marks=pytest.mark.slow),
    pytest.param('newton', True, marks=pytest.mark.slow)])
def test_degenerate_gradients_never_give_nan(root_method, scale_invariant):
  rng = np.random.default_rng(5)
  shape = (10, 16)
  tx, update = _whiten((0.95, 'polar_express'), root_method=root_method,
                       scale_invariant=scale_invariant)
  params = {'k': jnp.zeros(shape)}
  state = tx.init(params)
  kinds = [np.zeros(shape),
           1e-8 * rng.normal(size=shape),
           1e4 * rng.normal(size=shape),
           1e4 * np.outer(rng.normal(size=10), rng.normal(size=16)),
           np.outer(rng.normal(size=10), rng.normal(size=16)),
           1e-8 * np.outer(rng.normal(size=10), rng.normal(size=16))]
  for t in range(30):
    g = kinds[t % len(kinds)]
    u, state = update({'k': jnp.asarray(g, jnp.float32)}, state)
    assert_tree_finite(u)
    assert_tree_finite(state)
    _spd_and_traces(state)
  u0, _ = update({'k': jnp.zeros(shape)}, tx.init(params))
  np.testing.assert_array_equal(u0['k'], 0.0)  # zero gradient: zero update


def test_scale_invariant_factors_do_not_depend_on_gradient_scale():
  rng = np.random.default_rng(6)
  grads = [rng.normal(size=(8, 5)) for _ in range(10)]
  params = {'k': jnp.zeros((8, 5))}
  tx = fisher_whiten(_inner(), scale_invariant=True)
  _, s1 = _run(tx, [{'k': jnp.asarray(g, jnp.float32)} for g in grads],
               params)
  _, s2 = _run(tx, [{'k': jnp.asarray(1e-4 * g, jnp.float32)}
                    for g in grads], params)
  assert_trees_close(s1.p, s2.p, atol=1e-4)
  assert_trees_close(s1.q, s2.q, atol=1e-4)


# ---------------------------------------------------------------- theory


def test_theorem_4_2_direction_is_optimal_in_the_trust_region():
  rng = np.random.default_rng(7)
  fan_in, fan_out = 9, 6

  def spd(d):
    a = rng.normal(size=(d, d))
    f = a @ a.T + 0.3 * np.eye(d)
    return d * f / np.trace(f)

  p, q = spd(fan_out), spd(fan_in)  # paper P (m × m), Q (n × n)
  g = rng.normal(size=(fan_out, fan_in))  # paper G
  # γ = 1 freezes the injected factors; β = 0 polar is the LMO of (3).
  tx = fisher_whiten(orthogonalize('svd'), gamma=1.0, min_eig=0.0,
                     trace_damping=0.0)
  params = {'k': jnp.zeros((fan_in, fan_out))}
  state = tx.init(params)._replace(p={'k': jnp.asarray(p, jnp.float32)},
                                   q={'k': jnp.asarray(q, jnp.float32)})
  u, _ = tx.update({'k': jnp.asarray(g.T, jnp.float32)}, state)
  dw = -np.asarray(u['k'], np.float64).T  # the step direction, paper layout
  ph, qh = np.linalg.inv(_isqrt(p)), np.linalg.inv(_isqrt(q))
  # Tight constraint and optimal value −‖G̃‖_* (Theorem 4.2).
  np.testing.assert_allclose(np.linalg.norm(ph @ dw @ qh, 2), 1.0, rtol=1e-4)
  nuc = np.linalg.norm(_isqrt(p) @ g @ _isqrt(q), 'nuc')
  best = np.sum(g * dw)
  np.testing.assert_allclose(best, -nuc, rtol=1e-4)
  # No random feasible direction does better; nor does Muon's (rescaled).
  for _ in range(2000):
    phi = rng.normal(size=(fan_out, fan_in))
    phi /= np.linalg.norm(phi, 2)
    d = _isqrt(p) @ phi @ _isqrt(q)
    assert np.sum(g * d) >= best - 1e-5
  uu, _, vt = np.linalg.svd(g, full_matrices=False)
  muon = -(uu @ vt)
  muon /= np.linalg.norm(ph @ muon @ qh, 2)
  assert np.sum(g * muon) > best + 1e-3


def _noisy_kronecker_grads(steps, scale, seed=0):
  """Gradients A C B + A^{1/2} Z B^{1/2} (paper layout), cond(A) = cond(B)
  = 10."""
  rng = np.random.default_rng(seed)
  m, n = 16, 24

  def spd(d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    ev = np.logspace(0, 1, d)
    ev *= d / ev.sum()
    return (q * ev) @ q.T, (q * np.sqrt(ev)) @ q.T

  (a, ah), (b, bh) = spd(m), spd(n)
  c = rng.normal(size=(m, n))
  return [{'w': {'kernel': jnp.asarray(
      scale * (a @ c @ b + ah @ rng.normal(size=(m, n)) @ bh).T,
      jnp.float32)}} for _ in range(steps)]


def _median_condition(tx, grads):
  params = {'w': {'kernel': jnp.zeros((24, 16))}}
  outs, _ = _run(tx, grads, params)
  return float(np.median([ol.condition_number(u['w']['kernel'])
                          for u in outs[-15:]]))


@pytest.mark.parametrize('scale, scale_invariant', [(1.0, False),
                                                    (1e-3, True)])
def test_update_condition_number_lies_between_muon_and_adam(
    scale, scale_invariant):
  grads = _noisy_kronecker_grads(60, scale)
  k_muon = _median_condition(ol.muon(0.1, weight_decay=0.0), grads)
  k_fismo = _median_condition(
      ol.fismo(0.1, weight_decay=0.0, scale_invariant=scale_invariant), grads)
  k_adam = _median_condition(optax.adam(0.1, b1=0.9, b2=0.95), grads)
  assert k_muon < 1.1 < 2.0 * k_muon < k_fismo < k_adam, (k_muon, k_fismo,
                                                           k_adam)


# -------------------------------------------------------------- optimizer


def _model_params(dtype=jnp.float32):
  rng = np.random.default_rng(8)
  return {'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 10)), dtype),
                    'bias': jnp.zeros((10,), dtype)},
          'norm': {'scale': jnp.ones((10,), dtype)}}


def test_gamma_one_equals_muon_direction():
  params = _model_params()
  rng = np.random.default_rng(9)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                              jnp.float32), params)
           for _ in range(5)]
  a, _ = _run(ol.fismo(0.02, gamma=1.0), grads, params)
  b, _ = _run(ol.muon(0.02, ema=True, nesterov=False), grads, params)
  for x, y in zip(a, b):
    assert_trees_close(x, y, rtol=1e-5, atol=1e-7)
  # With γ < 1 the factors adapt and the direction differs from Muon's.
  c, _ = _run(ol.fismo(0.02, gamma=0.5, damping=1e-2), grads, params)
  assert np.abs(np.asarray(c[-1]['dense']['kernel'])
                - np.asarray(b[-1]['dense']['kernel'])).max() > 1e-4


def _run_bf16(tx, update, seed):
  """Three steps of ``tx`` on the bfloat16 model with bfloat16 gradients;
  returns the last ``(params, update, state)``."""
  params = _model_params(jnp.bfloat16)
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                           jnp.bfloat16), params)
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
  return params, upd, state


def test_fismo_bf16_and_jit(maybe_jit):
  tx = ol.fismo(0.02, mu_dtype=jnp.bfloat16)
  params, upd, state = _run_bf16(tx, maybe_jit(tx.update), seed=10)
  assert_tree_finite(upd)
  assert upd['dense']['kernel'].dtype == jnp.bfloat16
  assert params['dense']['kernel'].dtype == jnp.bfloat16
  factors = [leaf for leaf in jax.tree.leaves(state)
             if getattr(leaf, 'shape', ()) in ((10, 10), (6, 6))]
  assert factors and all(f.dtype == jnp.float32 for f in factors)


def test_fismo_trains_a_small_regression():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = x @ w_true
  params = {'dense': {'kernel': jnp.zeros((8, 4)), 'bias': jnp.zeros((4,))}}
  tx = ol.fismo(optax.cosine_decay_schedule(0.3, 100), weight_decay=0.0,
                scale_invariant=True)
  state = tx.init(params)

  def loss(p):
    return jnp.mean((x @ p['dense']['kernel'] + p['dense']['bias'] - y) ** 2)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  losses = []
  for _ in range(100):
    params, state, l = step(params, state)
    losses.append(float(l))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize('kwargs, name', [
    (dict(gamma=1.5), 'gamma'), (dict(gamma=-0.1), 'gamma'),
    (dict(damping=0.0), 'damping'), (dict(damping=-1e-3), 'damping'),
    (dict(root_method='cholesky'), 'root_method'),
    (dict(momentum=1.0), 'momentum'), (dict(momentum=-0.5), 'momentum'),
    (dict(min_eig=1.0), 'min_eig'), (dict(root_eps=-1.0), 'root_eps'),
    (dict(max_factor_size=0), 'max_factor_size'),
    (dict(method='qr'), 'method'), (dict(scaling='max'), 'scaling')])
def test_fismo_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ol.fismo(0.01, **kwargs)


def test_fisher_whiten_bad_hyperparameters():
  with pytest.raises(ValueError, match='gamma'):
    fisher_whiten(gamma=2.0)
  with pytest.raises(ValueError, match='damping'):
    fisher_whiten(damping=0.0)
  with pytest.raises(ValueError, match='root_method'):
    fisher_whiten(root_method='svd')
  with pytest.raises(ValueError, match='factor_dtype'):
    fisher_whiten(factor_dtype=jnp.int32)


# ------------------------------------------- owner-computes (distribute=)


def test_distribute_bad_input_names_distribute():
  for make in (lambda d: fisher_whiten(distribute=d),
               lambda d: ol.fismo(0.01, distribute=d)):
    with pytest.raises(TypeError, match='distribute'):
      make('fsdp')
    with pytest.raises(ValueError, match='distribute'):
      make((jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('x',)),
            'y'))


@pytest.mark.parametrize('kw', [
    {}, {'root_method': 'newton_warm', 'root_every': 2,
         'max_factor_size': 8}])
def test_distribute_one_device_mesh_equals_per_leaf(kw):
  """A one-device mesh runs the grouped (stacked) path; it equals the
  per-leaf path of ``distribute=None``, state included, over 3 steps."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('x',))
  rng = np.random.default_rng(3)
  shapes = {'a': (6, 10), 'b': (10, 6), 'c': (6, 10), 'd': (2, 6, 10),
            'v': (5,)}
  dims = {'a': ol.MatrixDims(0, 1), 'b': ol.MatrixDims(0, 1),
          'c': ol.MatrixDims(0, 1), 'd': ol.MatrixDims(1, 2), 'v': None}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in shapes.items()} for _ in range(3)]
  inner = optax.chain(momentum(0.9, ema=True, nesterov=False),
                      orthogonalize('svd', dims=dims))
  ref_u, ref_s = _run(fisher_whiten(inner, dims=dims, **kw), grads, params)
  out_u, out_s = _run(fisher_whiten(inner, dims=dims, distribute=mesh, **kw),
                      grads, params)
  assert_trees_close(out_u, ref_u, atol=1e-5, rtol=1e-5)
  assert jax.tree.structure(out_s) == jax.tree.structure(ref_s)
  assert_trees_close(out_s, ref_s, atol=1e-5, rtol=1e-5)
  # One device: nothing owner-resident, the per-leaf state as without mesh.
  assert out_s.owned is None and ref_s.owned is None


@pytest.mark.parametrize('nesterov,ema,mu_dtype', [
    (False, True, None), (True, False, None), (True, True, jnp.bfloat16)])
def test_owner_inner_step_equals_its_transform(nesterov, ema, mu_dtype):
  """``fismo``'s owner-resident inner step (momentum, then the polar factor
  of each matrix, tall ones via wide) on stacked matrices equals its plain
  transform on the same matrices as leaves, momentum included, 3 steps."""
  from optax_lite.optimizers.fismo import _momentum_polar
  from optax_lite.transforms.orthogonalize import polar_kernel
  inner = optax.chain(momentum(0.9, nesterov=nesterov, ema=ema,
                               mu_dtype=mu_dtype), orthogonalize())
  own = _momentum_polar(inner, decay=0.9, nesterov=nesterov, ema=ema,
                        mu_dtype=mu_dtype,
                        polar=polar_kernel('polar_express', 6, 1e-7, None),
                        steps=6)
  assert isinstance(own, ol.transforms.OwnerInner)
  rng = np.random.default_rng(5)
  for shape in ((3, 6, 10), (2, 10, 6)):
    xs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)]
    state, (mu,) = inner.init(list(xs[0])), own.init(xs[0])
    assert mu.dtype == (mu_dtype or jnp.float32) and mu.shape == shape
    for x in xs:
      ref, state = inner.update(list(x), state)
      y, (mu,) = own.step(x, mu)
      np.testing.assert_allclose(y, jnp.stack(ref), atol=1e-6, rtol=1e-6)
      np.testing.assert_allclose(mu.astype(jnp.float32),
                                 jnp.stack(state[0].mu).astype(jnp.float32),
                                 atol=1e-6, rtol=1e-6)
  assert own.cost(6, 10) > own.cost(6, 6) > 0


def test_owner_inner_on_one_device_is_its_transform():
  """Without ``distribute`` (the fused per-leaf step) or on a one-device
  mesh (the plain transform, stacked) ``fisher_whiten`` with an
  ``OwnerInner`` computes what its plain transform does: same updates and
  state; a bad ``inner`` is a TypeError naming it."""
  from optax_lite.optimizers.fismo import _momentum_polar
  from optax_lite.transforms.orthogonalize import polar_kernel
  inner = optax.chain(momentum(0.9, ema=True, nesterov=False),
                      orthogonalize())
  own = _momentum_polar(inner, decay=0.9, nesterov=False, ema=True,
                        mu_dtype=None,
                        polar=polar_kernel('polar_express', 6, 1e-7, None),
                        steps=6)
  rng = np.random.default_rng(6)
  params = {'a': jnp.zeros((6, 10)), 'b': jnp.zeros((10, 6))}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                              jnp.float32), params)
           for _ in range(2)]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('x',))
  ref_u, ref_s = _run(fisher_whiten(inner), grads, params)
  for kw in ({}, {'distribute': mesh}):
    out_u, out_s = _run(fisher_whiten(own, **kw), grads, params)
    assert jax.tree.structure(out_s) == jax.tree.structure(ref_s)
    # Two programs of the same float32 math (fused differently): 1.4e-6
    # absolute measured on O(0.3) entries after two polar factors.
    assert_trees_close(out_u, ref_u, atol=1e-5, rtol=1e-5)
    assert_trees_close(out_s, ref_s, atol=1e-5, rtol=1e-5)
  with pytest.raises(TypeError, match='inner'):
    fisher_whiten(inner=lambda g: g)


@pytest.mark.parametrize('kw', [
    {}, {'memory_budget': None},
    {'root_method': 'newton_warm', 'root_every': 2, 'max_factor_size': 8}])
def test_fused_one_device_step_equals_unfused(kw):
  """On one device an ``OwnerInner`` runs fused, each matrix's whitening,
  inner step and map back in one call: the updates and the state (same
  structure, the momentum where the plain transform keeps it) equal those
  of its plain transform around the whitening, over 3 steps, with a leaf
  the whitening skips (``dims`` ``None``: plain inner step), a leaf with
  both sides over ``max_factor_size`` and cached warm roots."""
  from optax_lite.optimizers.fismo import _momentum_polar
  from optax_lite.transforms.orthogonalize import polar_kernel
  shapes = {'a': (6, 10), 'b': (10, 6), 'c': (2, 6, 10), 'e': (12, 10),
            'v': (2, 5)}
  dims = {'a': ol.MatrixDims(0, 1), 'b': ol.MatrixDims(0, 1),
          'c': ol.MatrixDims(1, 2), 'e': ol.MatrixDims(0, 1), 'v': None}
  inner = optax.chain(momentum(0.9, ema=True, nesterov=False),
                      orthogonalize(dims=dims))
  own = _momentum_polar(inner, decay=0.9, nesterov=False, ema=True,
                        mu_dtype=None,
                        polar=polar_kernel('polar_express', 6, 1e-7, None),
                        steps=6)
  rng = np.random.default_rng(7)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in shapes.items()} for _ in range(3)]
  ref_u, ref_s = _run(fisher_whiten(inner, dims=dims, **kw), grads, params)
  out_u, out_s = _run(fisher_whiten(own, dims=dims, **kw), grads, params)
  assert jax.tree.structure(out_s) == jax.tree.structure(ref_s)
  assert_trees_close(out_u, ref_u, atol=1e-5, rtol=1e-5)
  assert_trees_close(out_s, ref_s, atol=1e-5, rtol=1e-5)
  assert int(out_s.inner_state[0].count) == 3
  # The skipped leaf got the plain momentum, unwhitened.
  np.testing.assert_array_equal(out_s.inner_state[0].mu['v'],
                                ref_s.inner_state[0].mu['v'])


# ------------------------------------------------- amortised roots (root_every)


def _alg1_lagged(grads, gamma, mu, k):
  """Algorithm 1 (float64, PyTorch layout) with the roots refreshed on steps
  ``t % k == 0`` and the cached ``P_s^{-1/2}``, ``Q_s^{-1/2}`` used in
  between (statistics, whitening, mapping back); identity inner transform."""
  m, n = grads[0].shape
  p, q, outs = np.eye(m), np.eye(n), []
  p_r, q_r = np.eye(m), np.eye(n)
  for t, g in enumerate(grads):
    refresh = t % k == 0
    q_s = _isqrt(q) if refresh else q_r  # root of Q_{t-1} or cached Q_s
    lt = (g @ q_s) @ (g @ q_s).T / n + mu * np.trace(p) / m * np.eye(m)
    pt = gamma * p + (1 - gamma) * lt
    p = m / np.trace(pt) * pt
    p = 0.5 * (p + p.T)
    if refresh:
      p_r = _isqrt(p)
    rt = (p_r @ g).T @ (p_r @ g) / m + mu * np.trace(q) / n * np.eye(n)
    qt = gamma * q + (1 - gamma) * rt
    q = n / np.trace(qt) * qt
    q = 0.5 * (q + q.T)
    if refresh:
      q_r = _isqrt(q)
    # Identity inner: P_s^{-1/2} (P_s^{-1/2} G Q_s^{-1/2}) Q_s^{-1/2}.
    outs.append(p_r @ p_r @ g @ q_r @ q_r)
  return outs


def test_root_every_one_is_the_default_bit_for_bit():
  rng = np.random.default_rng(20)
  params = {'a': jnp.zeros((9, 6)), 'b': jnp.zeros((2, 5, 40))}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                              jnp.float32), params)
           for _ in range(4)]
  kw = dict(gamma=0.8, damping=1e-2, max_factor_size=16)
  a, sa = _run(fisher_whiten(_inner(0.9, 'polar_express'), **kw), grads,
               params)
  b, sb = _run(fisher_whiten(_inner(0.9, 'polar_express'), root_every=1,
                             **kw), grads, params)
  for x, y in zip(jax.tree.leaves((a, sa)), jax.tree.leaves((b, sb))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Nothing is cached with root_every=1.
  assert all(leaf.shape == (1,) for leaf in
             jax.tree.leaves((sb.p_isqrt, sb.q_isqrt)))
  # Same through the optimizer (and Algorithm 1 is still matched, see
  # test_matches_algorithm_1_with_p_on_the_output_side).
  mp = _model_params()
  mg = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                           jnp.float32), mp)
        for _ in range(3)]
  c, _ = _run(ol.fismo(0.02), mg, mp)
  d, _ = _run(ol.fismo(0.02, root_every=1), mg, mp)
  for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(d)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_root_every_matches_lagged_reference_and_caches_exact_roots():
  rng = np.random.default_rng(21)
  fan_in, fan_out, k = 9, 6, 5
  grads = [rng.normal(size=(fan_out, fan_in)) for _ in range(12)]  # torch
  tx, update = _whiten(None, gamma=0.8, damping=1e-2, min_eig=0.0,
                       trace_damping=0.0, root_every=k)
  params = {'k': jnp.zeros((fan_in, fan_out))}
  state = tx.init(params)
  assert state.p_isqrt['k'].shape == (fan_out, fan_out)
  assert state.q_isqrt['k'].shape == (fan_in, fan_in)
  ref = _alg1_lagged(grads, 0.8, 1e-2, k)
  prev_p = prev_q = None
  for t, g in enumerate(grads):
    u, state = update({'k': jnp.asarray(g.T, jnp.float32)}, state)
    np.testing.assert_allclose(np.asarray(u['k']).T, ref[t], rtol=2e-4,
                               atol=2e-5)
    pr, qr = np.asarray(state.p_isqrt['k']), np.asarray(state.q_isqrt['k'])
    p = np.asarray(state.p['k'], np.float64)
    q = np.asarray(state.q['k'], np.float64)
    if t % k == 0:  # refresh: exact inverse roots of this step's factors
      np.testing.assert_allclose(pr, _isqrt(p), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(qr, _isqrt(q), rtol=1e-4, atol=1e-5)
      if prev_p is not None:
        assert np.abs(pr - prev_p).max() > 1e-4
        assert np.abs(qr - prev_q).max() > 1e-4
    else:  # skipped: roots untouched, factors still move
      np.testing.assert_array_equal(pr, prev_p)
      np.testing.assert_array_equal(qr, prev_q)
      assert np.abs(pr - _isqrt(p)).max() > 1e-5
    prev_p, prev_q = pr, qr
  # The first step is a full Algorithm-1 step.
  ref1, _, _ = _alg1(grads[:1], 0.8, 1e-2, polar=False)
  np.testing.assert_allclose(np.asarray(ref[0]), ref1[0], rtol=1e-10)


def test_root_every_skipped_steps_compute_no_root():
  params = {'k': jnp.zeros((9, 6))}
  tx = fisher_whiten(_inner(0.9, 'polar_express'), root_every=4)
  jaxpr = jax.make_jaxpr(tx.update)({'k': jnp.ones((9, 6))},
                                    tx.init(params)).jaxpr

  def prims(jx, into_cond=True):
    out = []
    for eqn in jx.eqns:
      if eqn.primitive.name == 'cond' and not into_cond:
        continue
      out.append(eqn.primitive.name)
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          sub = getattr(sub, 'jaxpr', sub)
          if hasattr(sub, 'eqns'):
            out += prims(sub, into_cond)
    return out

  conds = [e for e in jaxpr.eqns if e.primitive.name == 'cond']
  assert len(conds) == 1
  skip, refresh = conds[0].params['branches']  # (false, true)
  assert prims(refresh.jaxpr).count('eigh') == 3
  assert 'eigh' not in prims(skip.jaxpr)
  assert 'eigh' not in prims(jaxpr, into_cond=False)


@pytest.mark.parametrize('k, scale', [(5, 1.0), (3, 1e2)])
def test_root_every_stays_finite(k, scale):
  params = {'k': jnp.zeros((12, 8))}
  tx, update = _whiten((0.95, 'polar_express'), root_every=k)
  state = tx.init(params)
  for g in _some_rank_one(22, 30, scale, every=4, at=3):
    u, state = update(g, state)
    assert_tree_finite(u)
    assert np.abs(np.asarray(u['k'])).max() > 0
  assert_tree_finite(state)
  _spd_and_traces(state)
  assert int(state.count) == 30


def test_root_every_identity_side_and_factor_dtype():
  params = {'k': jnp.zeros((6, 40))}  # fan_out 40 > 16: P stays I
  tx = fisher_whiten(None, max_factor_size=16, root_every=3,
                     factor_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert state.p_isqrt['k'].shape == (1,)
  assert state.q_isqrt['k'].shape == (6, 6)
  rng = np.random.default_rng(23)
  update = jax.jit(tx.update)
  for _ in range(4):
    u, state = update({'k': jnp.asarray(rng.normal(size=(6, 40)),
                                        jnp.float32)}, state)
  assert_tree_finite(u)
  assert state.q['k'].dtype == jnp.bfloat16
  assert state.q_isqrt['k'].dtype == jnp.bfloat16
  assert state.p_isqrt['k'].shape == (1,)


def test_fismo_root_every_bf16_and_jit(maybe_jit):
  tx = ol.fismo(0.02, mu_dtype=jnp.bfloat16, root_every=2)
  _, upd, state = _run_bf16(tx, maybe_jit(tx.update), seed=24)
  assert_tree_finite(upd)
  assert upd['dense']['kernel'].dtype == jnp.bfloat16
  fw = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, ol.FisherWhitenState))
        if isinstance(s, ol.FisherWhitenState)]
  assert len(fw) == 1
  roots = [leaf for leaf in jax.tree.leaves((fw[0].p_isqrt, fw[0].q_isqrt))
           if leaf.shape != (1,)]
  assert sorted(r.shape for r in roots) == [(6, 6), (10, 10)]
  assert all(r.dtype == jnp.float32 for r in roots)
  assert int(fw[0].count) == 3


def test_fismo_lite_passes_root_every():
  params = _model_params()
  tx = ol.fismo_lite(0.02, root_every=4)
  state = jax.eval_shape(tx.init, params)
  fw = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, ol.FisherWhitenState))
        if isinstance(s, ol.FisherWhitenState)]
  assert len(fw) == 1
  assert sorted(x.shape for x in jax.tree.leaves(
      (fw[0].p_isqrt, fw[0].q_isqrt)) if x.shape != (1,)) == [(6, 6),
                                                             (10, 10)]


@pytest.mark.parametrize('value, error', [(0, ValueError), (-3, ValueError),
                                          (2.5, TypeError),
                                          (True, TypeError)])
def test_root_every_bad_values(value, error):
  with pytest.raises(error, match='root_every'):
    fisher_whiten(root_every=value)
  with pytest.raises(error, match='root_every'):
    ol.fismo(0.01, root_every=value)
  with pytest.raises(error, match='root_every'):
    ol.fismo_lite(0.01, root_every=value)


# -------------------------------- stability on non-square leaves (issue 11)


def _kron_quadratic(shape, cond, rng):
  """``½ tr((W − W*)ᵀ A (W − W*) B)`` with ``cond(B ⊗ A) = cond``."""
  def spd(d, c):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return jnp.asarray((q * np.logspace(0, np.log10(c), d)) @ q.T,
                       jnp.float32)

  a, b = spd(shape[0], np.sqrt(cond)), spd(shape[1], np.sqrt(cond))
  w_star = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def loss(w):
    e = w - w_star
    return 0.5 * jnp.sum(e * (a @ e @ b))

  return jnp.zeros(shape), loss


def _embedded_parabola(shape, rng):
  """optax's parabola (start ``[-1, 10, 1]``, minimum ``[1, -1, 1]``) tiled
  over the matrix, with a 0.1 jitter so the gradient is not exactly rank 1."""
  k = shape[0] * shape[1]
  start = np.resize([-1.0, 10.0, 1.0], k).reshape(shape)
  start = start + 0.1 * rng.normal(size=shape)
  target = jnp.asarray(np.resize([1.0, -1.0, 1.0], k).reshape(shape),
                       jnp.float32)
  return jnp.asarray(start, jnp.float32), lambda w: jnp.sum((w - target) ** 2)


def _embedded_rosenbrock(shape, rng):
  """optax's Rosenbrock (``a = 1, b = 100``, minimum at 1) on the matrix's
  entries in pairs ``(x, y)``, started near 0."""
  def loss(w):
    z = w.reshape(-1, 2)
    return jnp.sum((1.0 - z[:, 0]) ** 2
                   + 100.0 * (z[:, 1] - z[:, 0] ** 2) ** 2)

  return jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32), loss


def _non_square_problems():
  """Independent problems, one matrix leaf each, in 8 × 6 and 6 × 8."""
  rng = np.random.default_rng(0)
  problems = {}
  for shape in [(8, 6), (6, 8)]:
    tag = 'x'.join(map(str, shape))
    for cond in (1.0, 10.0, 100.0):
      problems[f'quadratic{cond:g}_{tag}'] = _kron_quadratic(shape, cond, rng)
    problems[f'parabola_{tag}'] = _embedded_parabola(shape, rng)
    problems[f'rosenbrock_{tag}'] = _embedded_rosenbrock(shape, rng)
  return problems


def _loss_curves(tx, problems, steps):
  """Each leaf's loss along ``steps`` updates (one jitted scan). Every
  optimizer here treats leaves independently, so this is one run per
  problem."""
  names = sorted(problems)
  w0 = {k: problems[k][0] for k in names}

  def losses(w):
    return jnp.stack([problems[k][1](w[k]) for k in names])

  def run(w):
    def body(carry, _):
      w, s = carry
      ls, vjp = jax.vjp(losses, w)
      g, = vjp(jnp.ones_like(ls))
      u, s = tx.update(g, s, w)
      return (optax.apply_updates(w, u), s), ls
    (w, _), ls = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
    return jnp.concatenate([ls, losses(w)[None]])

  curves = np.asarray(jax.jit(run)(w0))
  return {k: curves[:, i] for i, k in enumerate(names)}


def test_fismo_converges_on_non_square_leaves_where_muon_does():
  # Issue 11 §4: with trace_damping=0 (Algorithm 1's absolute damping only)
  # FISMO and FISMO-LITE blew up on these problems (final/initial loss up to
  # 7e7) while Muon converged; the rank-deficient side's factor had
  # λ_min ≈ 2e-5. Peak learning rate 0.03 (cosine to 0 over 3,000 steps),
  # 0.3 on the parabolas (at 0.03 Muon does not reach 1e-2 of the start).
  problems = _non_square_problems()
  steps = 3000
  sched = optax.cosine_decay_schedule(3e-2, steps)
  parabolas = {k: k.startswith('parabola') for k in problems}
  for name, opt in [('muon', ol.muon), ('fismo', ol.fismo),
                    ('fismo_lite', ol.fismo_lite)]:
    tx = optax.chain(opt(sched, weight_decay=0.0),
                     optax.masked(optax.scale(10.0), parabolas))
    for k, curve in _loss_curves(tx, problems, steps).items():
      assert np.isfinite(curve).all(), (name, k)
      ratio = curve / curve[0]
      assert ratio[-1] <= 1e-2, (name, k, ratio[-1])
      assert ratio.max() <= 1.5, (name, k, ratio.max())


# ------------------------------------- optax.inject_hyperparams (issue 14)


def _inject_run(tx, grads, params, n=4, update=None):
  state = tx.init(params)
  update = update or jax.jit(tx.update)
  outs = []
  for g in grads[:n]:
    u, state = update(g, state, params)
    outs.append(u)
  return outs, state


def _model_grads(params, n, seed=30):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                             p.dtype), params)
          for _ in range(n)]


@pytest.mark.parametrize('kwargs', [
    dict(learning_rate=0.02),
    dict(learning_rate=0.02, gamma=0.8, damping=1e-2, min_eig=1e-4,
         trace_damping=0.5, momentum=0.9, root_every=3, root_iters=12,
         root_method='newton')])
def test_fismo_inject_hyperparams_matches_plain(kwargs):
  params = _model_params()
  grads = _model_grads(params, 4)
  plain, _ = _inject_run(ol.fismo(**kwargs), grads, params)
  injected = optax.inject_hyperparams(ol.fismo)(**kwargs)
  outs, state = _inject_run(injected, grads, params)
  for x, y in zip(outs, plain):
    assert_trees_close(x, y, rtol=1e-5, atol=1e-7)
  # The learning rate and γ are live hyperparameters of the jitted step.
  update = jax.jit(injected.update)
  u1, _ = update(grads[0], state, params)
  half = state._replace(hyperparams={**state.hyperparams,
                                     'learning_rate': jnp.asarray(0.01)})
  u2, _ = update(grads[0], half, params)
  assert_trees_close(u2, jax.tree.map(lambda u: 0.5 * u, u1), rtol=1e-5,
                     atol=1e-8)
  fresh = injected.init(params)  # a refresh step (count 0)
  u1, _ = update(grads[0], fresh, params)
  other = fresh._replace(hyperparams={**fresh.hyperparams,
                                      'gamma': jnp.asarray(0.3)})
  u3, _ = update(grads[0], other, params)
  k1, k3 = u1['dense']['kernel'], u3['dense']['kernel']
  assert float(jnp.max(jnp.abs(k1 - k3))) > 1e-4 * float(
      jnp.max(jnp.abs(k1)))


def test_fismo_inject_structural_ints_name_static_args():
  params = _model_params()
  grads = _model_grads(params, 2)
  injected = optax.inject_hyperparams(ol.fismo)(learning_rate=0.02,
                                                root_every=2)
  expected = r"static_args=\('max_factor_size', 'root_every'\)"
  with pytest.raises(TypeError, match=expected):
    jax.jit(injected.init)(params)
  static = optax.inject_hyperparams(ol.fismo, static_args=(
      'root_every', 'max_factor_size'))(learning_rate=0.02, root_every=2)
  a, _ = _inject_run(static, grads, params, n=2,
                     update=jax.jit(static.update))
  b, _ = _inject_run(ol.fismo(0.02, root_every=2), grads, params, n=2)
  for x, y in zip(a, b):
    assert_trees_close(x, y, rtol=1e-5, atol=1e-7)
  with pytest.raises(TypeError, match='root_every'):
    fisher_whiten(root_every=2.5)


# ----------------------------------------- warm-started roots (issue 13 §6)


def test_warm_inverse_sqrt_refines_a_previous_root():
  rng = np.random.default_rng(40)
  d = 24
  a = rng.normal(size=(d, d))
  prev = a @ a.T / d + 0.5 * np.eye(d)
  prev *= d / np.trace(prev)
  s = rng.normal(size=(d, 16))
  s = s @ s.T / 16 + np.eye(d)
  new = 0.95 * prev + 0.05 * d * s / np.trace(s)  # one EMA step
  ref = _isqrt(new)
  start = jnp.asarray(_isqrt(prev), jnp.float32)
  errs = []
  for iters in (1, 3, 6):
    z = roots_lib.inverse_sqrt_warm(jnp.asarray(new, jnp.float32), start,
                                    iters=iters)
    errs.append(np.linalg.norm(np.asarray(z, np.float64) - ref)
                / np.linalg.norm(ref))
  # From 4.5e-2 (the previous root): 6e-3, 8e-5, 1.6e-6 (float32 eigh: 7e-7).
  assert errs[0] > 1e-3 and errs[1] < 2e-4 and errs[2] < 5e-6, errs
  # A far start (the factor jumped) falls back to the cold iteration.
  far = roots_lib.inverse_sqrt_warm(jnp.asarray(new, jnp.float32),
                                    5.0 * jnp.eye(d), iters=3)
  np.testing.assert_allclose(far, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('root_every', [1, 3])
def test_newton_warm_roots_agree_with_eigh(root_every):
  rng = np.random.default_rng(41)
  params = {'k': jnp.zeros((10, 6))}
  grads = [{'k': jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)}
           for _ in range(12)]
  a, sa = _run(fisher_whiten(_inner(), root_every=root_every), grads,
               params)
  b, sb = _run(fisher_whiten(_inner(), root_method='newton_warm',
                             root_every=root_every), grads, params)
  assert_trees_close(sa.p, sb.p, atol=1e-5)
  assert_trees_close(sa.q, sb.q, atol=1e-5)
  for x, y in zip(a, b):
    assert_trees_close(x, y, rtol=1e-4, atol=1e-5)
  # The roots live in the state (warm starts), equal to eigh's of the
  # factors of the last refresh.
  assert sb.p_isqrt['k'].shape == (6, 6)
  if root_every == 1:
    np.testing.assert_allclose(sb.p_isqrt['k'],
                               _isqrt(np.asarray(sb.p['k'], np.float64)),
                               rtol=1e-4, atol=1e-5)


def test_fismo_roots_benchmark_smoke(tmp_path):
  import importlib
  import json
  import os
  import sys
  bench_dir = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'benchmarks')
  sys.path.insert(0, bench_dir)
  try:
    fismo_roots = importlib.import_module('fismo_roots')
  finally:
    sys.path.remove(bench_dir)
  fismo_roots.main(['--sizes', '8', '--leaf', '', '--repeats', '1',
                    '--out', str(tmp_path)])
  (path,) = tmp_path.glob('fismo_roots_*.json')
  data = json.loads(path.read_text())
  (r,) = data['roots']
  assert r['warm_6']['rel_error'] < 1e-5 < r['start_rel_error']
  assert r['eigh']['rel_error'] < 1e-5
  assert r['warm_3']['eigh_over_this'] > 0.0


def test_auto_root_method_per_platform(monkeypatch):
  import importlib
  fw_lib = importlib.import_module('optax_lite.transforms.fisher_whiten')
  assert fw_lib.auto_root_method('cpu') == 'eigh'
  for platform in ('gpu', 'cuda', 'rocm', 'tpu'):
    assert fw_lib.auto_root_method(platform) == 'newton_warm'
  params = {'k': jnp.zeros((5, 3))}

  def root_shapes(**kw):
    return [r.shape for r in jax.tree.leaves(
        fisher_whiten(_inner(), **kw).init(params).p_isqrt)]

  warm, eigh = root_shapes(root_method='newton_warm'), root_shapes(
      root_method='eigh')
  assert warm == [(3, 3)] and warm != eigh  # warm roots live in the state
  # On this CPU "auto" (the default) is eigh; built on an accelerator it
  # is newton_warm.
  assert fw_lib.auto_root_method() == 'eigh'
  assert root_shapes() == eigh
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert root_shapes() == warm
  with pytest.raises(ValueError, match='root_method'):
    fisher_whiten(_inner(), root_method='qr')


def test_newton_warm_trains_as_eigh_does():
  """The accuracy FISMO needs from warm roots: 150 steps of a 12x7
  least-squares fit (ill-conditioned inputs) end at the loss and weights
  that eigh gives."""
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(64, 12)) * np.linspace(0.3, 3, 12),
                  jnp.float32)
  target = jnp.asarray(rng.normal(size=(12, 7)), jnp.float32)
  y = a @ target

  def loss(w):
    return jnp.mean((a @ w - y) ** 2)

  def train(root_method):
    tx = ol.fismo(optax.cosine_decay_schedule(0.5, 150),
                  root_method=root_method, weight_decay=0.0)
    w = jnp.zeros((12, 7))
    state = tx.init(w)

    @jax.jit
    def step(w, state):
      u, state = tx.update(jax.grad(loss)(w), state, w)
      return optax.apply_updates(w, u), state

    for _ in range(150):
      w, state = step(w, state)
    return w

  w_eigh, w_warm = train('eigh'), train('newton_warm')
  start, end = float(loss(jnp.zeros((12, 7)))), float(loss(w_eigh))
  # Both end at ~3e-4 of the start loss (47.9 -> 0.0155 and 0.0158 when
  # written); the trajectories drift apart by ~1% of the weights' scale.
  assert end < 1e-3 * start, (start, end)
  assert abs(float(loss(w_warm)) - end) <= 0.05 * end
  np.testing.assert_allclose(w_warm, w_eigh, atol=0.02 * float(
      jnp.abs(w_eigh).max()))
