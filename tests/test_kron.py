"""SOAP / Shampoo: eigenbasis helpers, kron_precondition, named optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from conftest import (assert_injected_matches_plain, assert_tree_finite,
                      assert_trees_close)
from optax_lite.linalg import eigenbasis as eig_lib
from optax_lite.linalg.matrices import MatrixDims
from optax_lite.optimizers import kron as kron_opt
from optax_lite.transforms import kron_precondition as kp


def _designed(m, n, svals, seed=0):
  """``U diag(svals) Vᵀ`` with random orthonormal U, V."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, len(svals))))
  v, _ = np.linalg.qr(rng.standard_normal((n, len(svals))))
  return (u * np.asarray(svals)) @ v.T, u, v


def _eig_desc(a):
  lam, q = np.linalg.eigh(np.asarray(a, np.float64))
  return lam[::-1], q[:, ::-1]


def _assert_same_columns(q, q_ref, k, atol=1e-4):
  """First k columns of q equal those of q_ref up to sign."""
  q = np.asarray(q, np.float64)[:, :k]
  q_ref = np.asarray(q_ref, np.float64)[:, :k]
  overlap = np.abs(np.sum(q * q_ref, axis=0))
  np.testing.assert_allclose(overlap, np.ones(k), atol=atol)


def _polar(g):
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return u @ vt


# ---------------------------------------------------------------- linalg ---
def test_eigenbasis_init_sorted_descending():
  a = np.random.default_rng(1).standard_normal((2, 5, 5))
  a = a @ np.swapaxes(a, -1, -2)
  q, lam = eig_lib.eigenbasis_init(jnp.asarray(a, jnp.float32))
  assert q.shape == (2, 5, 5) and lam.shape == (2, 5)
  assert np.all(np.diff(np.asarray(lam), axis=-1) <= 0)
  for b in range(2):
    ref_lam, ref_q = _eig_desc(a[b])
    np.testing.assert_allclose(lam[b], ref_lam, rtol=1e-4, atol=1e-4)
    _assert_same_columns(q[b], ref_q, 5)
    np.testing.assert_allclose(q[b] @ np.diag(lam[b]) @ q[b].T, a[b],
                               atol=1e-3)


def test_eigenbasis_zero_matrix_is_safe():
  q, lam = eig_lib.eigenbasis_init(jnp.zeros((3, 3)))
  assert np.all(np.isfinite(q)) and np.all(np.isfinite(lam))
  np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
  q0 = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal(
      (3, 3)))[0], jnp.float32)
  q1, perm = eig_lib.eigenbasis_refresh(jnp.zeros((3, 3)), q0)
  assert np.all(np.isfinite(q1))
  np.testing.assert_allclose(q1, q0[:, perm], atol=1e-6)


def test_eigenbasis_refresh_converges_to_eigenvectors():
  # Distinct eigenvalues 16, 9, 4, 1: ratios <= 0.5625 per power step.
  g, u, _ = _designed(5, 4, [4., 3., 2., 1.], seed=2)
  a = jnp.asarray(g @ g.T, jnp.float32)
  q = jnp.asarray(np.linalg.qr(np.random.default_rng(3).standard_normal(
      (5, 5)))[0], jnp.float32)
  for _ in range(60):
    q, _ = eig_lib.eigenbasis_refresh(a, q)
  np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-5)
  _assert_same_columns(q, u, 4)


def test_refresh_sorts_columns_and_permutes_nu():
  g, _, _ = _designed(4, 4, [4., 3., 2., 1.], seed=4)
  lam, qe = _eig_desc(g @ g.T)
  a = jnp.asarray(g @ g.T, jnp.float32)[None]
  swapped = jnp.asarray(qe[:, [1, 0, 2, 3]], jnp.float32)[None]
  nu = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4)
  q_l, q_r, nu2, lam_l, _ = kp.soap_refresh_bases(
      a, jnp.zeros((1, 1)), swapped, jnp.zeros((1, 1)), nu)
  np.testing.assert_allclose(lam_l[0], lam, rtol=1e-3, atol=1e-4)
  assert q_r.shape == (1, 1)
  np.testing.assert_array_equal(nu2[0], np.asarray(nu[0])[[1, 0, 2, 3]])
  _assert_same_columns(q_l[0], qe, 4)


def test_rotate_roundtrip_and_identity_sides():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32)
  q_l = jnp.asarray(np.linalg.qr(rng.standard_normal((2, 4, 4)))[0],
                    jnp.float32)
  q_r = jnp.asarray(np.linalg.qr(rng.standard_normal((2, 3, 3)))[0],
                    jnp.float32)
  np.testing.assert_allclose(kp.rotate_back(kp.rotate(x, q_l, q_r), q_l, q_r),
                             x, atol=1e-5)
  empty = jnp.zeros((2, 1))
  np.testing.assert_array_equal(kp.rotate(x, empty, empty), x)
  np.testing.assert_allclose(kp.rotate(x, q_l, empty),
                             np.swapaxes(q_l, 1, 2) @ x, atol=1e-6)


# ------------------------------------------------------------------ SOAP ---
@pytest.mark.parametrize('shape', [(6, 4), (3, 5)])
def test_soap_basis_after_first_step_is_exact(shape):
  g = jax.random.normal(jax.random.PRNGKey(0), shape)
  tx = kp.kron_precondition('soap')
  state = tx.init({'w': jnp.zeros(shape)})
  u, state = jax.jit(tx.update)({'w': g}, state)
  r = min(shape)
  _, ql_ref = _eig_desc(g @ g.T)
  _, qr_ref = _eig_desc(g.T @ g)
  _assert_same_columns(state.q_l['w'][0], ql_ref, r)
  _assert_same_columns(state.q_r['w'][0], qr_ref, r)
  for q in (state.q_l['w'][0], state.q_r['w'][0]):
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5)
  # Reference behaviour: step 1 only initialises (zero update, M, V = 0).
  np.testing.assert_array_equal(u['w'], np.zeros(shape))
  np.testing.assert_array_equal(state.nu['w'], np.zeros(shape))
  np.testing.assert_allclose(state.stats_l['w'][0], 0.05 * g @ g.T,
                             rtol=1e-5, atol=1e-6)


def test_soap_qr_refresh_converges_on_fixed_gradient():
  g, u, v = _designed(6, 4, [4., 3., 2., 1.], seed=6)
  g = jnp.asarray(g, jnp.float32)
  tx = kp.kron_precondition('soap', shampoo_beta=0.0,
                            precondition_frequency=1)
  state = tx.init({'w': jnp.zeros((6, 4))})
  _, state = jax.jit(tx.update)({'w': g}, state)
  _assert_same_columns(state.q_l['w'][0], u, 4)
  # Start the power iteration from random bases: it must find them again.
  rng = np.random.default_rng(7)
  rand = lambda n: jnp.asarray(np.linalg.qr(rng.standard_normal(
      (1, n, n)))[0], jnp.float32)
  state = state._replace(q_l={'w': rand(6)}, q_r={'w': rand(4)})
  update = jax.jit(tx.update)
  for _ in range(50):
    _, state = update({'w': g}, state)
  _assert_same_columns(state.q_l['w'][0], u, 4)
  _assert_same_columns(state.q_r['w'][0], v, 4)
  assert_tree_finite(state)


def test_soap_identity_bases_equals_adam(maybe_jit):
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  params = {'w': jnp.zeros((5, 3)), 'b': jnp.zeros(3),
            'c': jnp.zeros((2, 3, 4))}
  tx = kp.kron_precondition('soap', max_precond_dim=0)
  ref = optax.scale_by_adam(b1=0.95, b2=0.99, eps=1e-8)
  s, s_ref = tx.init(params), ref.init(params)
  step, step_ref = maybe_jit(tx.update), maybe_jit(ref.update)
  for k in keys:
    g = jax.tree.map(lambda p, kk=k: jax.random.normal(kk, p.shape), params)
    u, s = step(g, s)
    u_ref, s_ref = step_ref(g, s_ref)
    assert_trees_close(u, u_ref, rtol=1e-6, atol=1e-7)


def test_soap_vectors_are_adam_and_matrices_preconditioned():
  params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
  tx = kp.kron_precondition('soap')
  ref = optax.scale_by_adam(b1=0.95, b2=0.99, eps=1e-8)
  s, s_ref = tx.init(params), ref.init(params)
  assert s.q_l['b'].shape == (1, 1) and s.q_l['w'].shape == (1, 4, 4)
  for i in range(3):
    g = jax.tree.map(lambda p, i=i: jax.random.normal(
        jax.random.PRNGKey(i), p.shape), params)
    u, s = jax.jit(tx.update)(g, s)
    u_ref, s_ref = jax.jit(ref.update)(g, s_ref)
    np.testing.assert_allclose(u['b'], u_ref['b'], rtol=1e-6, atol=1e-7)
  assert np.abs(np.asarray(u['w'] - u_ref['w'])).max() > 1e-3


def test_soap_helpers_reproduce_transform():
  g = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3))
  dims = MatrixDims(1, 2)
  tx = kp.scale_by_soap(dims=dims, precondition_frequency=2)
  s = tx.init({'w': g})
  leaf = kp.SoapLeaf(*(f['w'] for f in s[1:9]))  # not owned (None)
  leaf_step = jax.jit(lambda leaf, g, t: kp.soap_leaf_update(
      leaf, g, t, b1=0.95, b2=0.99, shampoo_beta=0.95, eps=1e-8,
      precondition_frequency=2))
  for t in range(1, 5):
    gt = g * t - 0.3
    u, s = jax.jit(tx.update)({'w': gt}, s)
    leaf, d = leaf_step(leaf, gt, jnp.int32(t))
    np.testing.assert_allclose(kp.soap_direction(d), u['w'], rtol=1e-5,
                               atol=1e-6)
    assert d.numerator.shape == d.denominator.shape == d.grad_rot.shape
  np.testing.assert_allclose(leaf.nu, s.nu['w'], rtol=1e-6)


def test_soap_pieces_compose_to_scale_by_soap():
  """Basis upkeep and rotated Adam, each public, make ``scale_by_soap``;
  the basis upkeep alone follows its rules (EMA factors, eigh at call 1,
  refresh after real step k)."""
  k = 2
  g0 = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 3))
  tx = kp.scale_by_soap(precondition_frequency=k)
  s = tx.init({'w': g0[0]})
  basis = kp.soap_basis_init(1, 5, 3, left=True, right=True)
  mu = nu = jnp.zeros((1, 5, 3))
  ema = np.zeros((5, 5))
  for c in range(1, 7):
    g = g0 * c - 0.3 * (c % 2)
    count = jnp.int32(c)
    u, s = tx.update({'w': g[0]}, s)
    basis = kp.soap_basis_update(basis, g, count, shampoo_beta=0.95)
    ema = 0.95 * ema + 0.05 * np.asarray(g[0] @ g[0].T, np.float64)
    np.testing.assert_allclose(basis.stats_l[0], ema, rtol=1e-5, atol=1e-6)
    t, first = kp.soap_step_index(count, basis)
    assert int(t) == c - 1 and bool(first) == (c == 1)
    mu, nu, d = kp.soap_rotated_adam(mu, nu, g, basis, t, first, b1=0.95,
                                     b2=0.99, eps=1e-8)
    np.testing.assert_allclose(kp.soap_direction(d)[0], u['w'], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(d.denominator, np.sqrt(d.nu_hat) + 1e-8
                               if c > 1 else 1.0, rtol=1e-6)
    q_before = basis.q_l
    basis, nu = kp.soap_basis_refresh(basis, nu, t, precondition_frequency=k)
    refreshed = not np.allclose(q_before, basis.q_l)
    assert refreshed == (c > 1 and (c - 1) % k == 0), c
  np.testing.assert_allclose(basis.q_l[0], s.q_l['w'][0], atol=1e-5)
  np.testing.assert_allclose(nu[0], s.nu['w'], rtol=1e-5, atol=1e-9)


def test_soap_one_sided_and_state_shapes():
  params = {'w': jnp.zeros((6, 4)), 'conv': jnp.zeros((2, 2, 3, 5)),
            'bat': jnp.zeros((3, 4, 5)), 'v': jnp.zeros(7)}
  # A dims tree: None = no matrix view (identity on both sides, i.e. Adam).
  dims = {'w': MatrixDims(0, 1), 'conv': MatrixDims((0, 1, 2), 3),
          'bat': MatrixDims(1, 2), 'v': None}
  tx = kp.scale_by_soap(max_precond_dim=5, dims=dims)
  s = tx.init(params)
  shapes = jax.tree.map(jnp.shape, s)
  # Moments are shaped like the params (they shard like them).
  assert shapes.mu == shapes.nu == jax.tree.map(jnp.shape, params)
  assert shapes.q_l == {'w': (1, 1), 'conv': (1, 1),
                        'bat': (3, 4, 4), 'v': (1, 1)}
  assert shapes.q_r == {'w': (1, 4, 4), 'conv': (1, 5, 5),
                        'bat': (3, 5, 5), 'v': (1, 1)}
  assert shapes.stats_l == shapes.q_l and shapes.stats_r == shapes.q_r
  g = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(0),
                                               p.shape), params)
  for _ in range(2):
    u, s = jax.jit(tx.update)(g, s)
  assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
  assert_tree_finite((u, s))


@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_nd_leaves_match_reshaped_matrix_and_batches(mode):
  key = jax.random.PRNGKey(8)
  conv = jax.random.normal(key, (2, 2, 3, 4))
  tx = kp.kron_precondition(mode, precondition_frequency=2)
  update = jax.jit(tx.update)
  s1, s2 = tx.init({'k': conv}), tx.init({'k': conv.reshape(12, 4)})
  for t in range(3):
    g = conv * (t + 1) + 0.1 * t
    u1, s1 = update({'k': g}, s1)
    u2, s2 = update({'k': g.reshape(12, 4)}, s2)
    np.testing.assert_allclose(u1['k'].reshape(12, 4), u2['k'], rtol=1e-5,
                               atol=1e-6)
  # Batch axes: each slice is preconditioned independently.
  bat = jax.random.normal(key, (3, 4, 5))
  txb = kp.kron_precondition(mode, dims=MatrixDims(1, 2),
                             precondition_frequency=2)
  sb = txb.init({'k': bat})
  singles = [tx.init({'k': bat[i]}) for i in range(3)]
  for t in range(3):
    g = bat * (t + 1) - 0.2
    ub, sb = jax.jit(txb.update)({'k': g}, sb)
    for i in range(3):
      ui, singles[i] = update({'k': g[i]}, singles[i])
      np.testing.assert_allclose(ub['k'][i], ui['k'], rtol=1e-4, atol=1e-5)


def test_soap_moves_the_eigenbasis_direction_sensibly():
  """SOAP minimises a small ill-conditioned least-squares problem."""
  rng = np.random.default_rng(9)
  a = jnp.asarray(rng.standard_normal((32, 8)) * np.logspace(0, 1.5, 8),
                  jnp.float32)
  w_true = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  b = a @ w_true
  loss = lambda w: jnp.mean((a @ w - b) ** 2)
  opt = optax.chain(kp.kron_precondition('soap'),
                    optax.scale_by_learning_rate(0.05))
  w = jnp.zeros((8, 4))
  s = opt.init(w)

  @jax.jit
  def step(w, s):
    u, s = opt.update(jax.grad(loss)(w), s)
    return optax.apply_updates(w, u), s

  l0 = loss(w)
  for _ in range(150):
    w, s = step(w, s)
  assert loss(w) < 1e-2 * l0


# --------------------------------------------------------------- Shampoo ---
@pytest.mark.parametrize('shape,accumulation,root_method', [
    ((5, 5), 'sum', 'eigh'), ((6, 4), 'sum', 'eigh'), ((3, 7), 'ema', 'eigh'),
    ((5, 5), 'ema', 'newton'),  # Newton: full-rank factors only
])
def test_shampoo_first_step_is_polar(shape, accumulation, root_method):
  m, n = shape
  r = min(shape)
  g, _, _ = _designed(m, n, np.linspace(2.0, 1.0, r), seed=m * 10 + n)
  g = jnp.asarray(g, jnp.float32)
  tx = kp.kron_precondition('shampoo', b1=0.0, graft='none',
                            accumulation=accumulation, matrix_eps=1e-9,
                            exponent=0.25, root_method=root_method)
  u, _ = tx.update({'w': g}, tx.init({'w': g}))
  tol = 2e-3 if m == n else 2e-2  # null-space round-off times eps^{-1/4}
  np.testing.assert_allclose(u['w'], _polar(g), atol=tol)


def test_shampoo_half_exponent_gives_pseudo_inverse_transpose():
  g, _, _ = _designed(4, 4, [2.0, 1.5, 1.2, 1.0], seed=11)
  g = jnp.asarray(g, jnp.float32)
  tx = kp.kron_precondition('shampoo', b1=0.0, graft='none', exponent=0.5,
                            matrix_eps=1e-9)
  u, _ = tx.update({'w': g}, tx.init({'w': g}))
  np.testing.assert_allclose(u['w'], np.linalg.pinv(np.asarray(g)).T,
                             atol=1e-3)


def test_shampoo_grafting_matches_adam_norm():
  params = {'w': jnp.zeros((5, 3))}
  tx = kp.kron_precondition('shampoo', b1=0.9, b2=0.999)
  ref = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
  s, s_ref = tx.init(params), ref.init(params)
  for i in range(4):
    g = {'w': jax.random.normal(jax.random.PRNGKey(i), (5, 3))}
    u, s = jax.jit(tx.update)(g, s)
    u_ref, s_ref = jax.jit(ref.update)(g, s_ref)
    np.testing.assert_allclose(np.linalg.norm(u['w']),
                               np.linalg.norm(u_ref['w']), rtol=1e-5)
  # The direction is not Adam's (it is preconditioned).
  assert np.abs(np.asarray(u['w'] - u_ref['w'])).max() > 1e-3


def test_shampoo_roots_refresh_every_k_steps():
  tx = kp.kron_precondition('shampoo', precondition_frequency=3)
  s = tx.init({'w': jnp.zeros((4, 3))})
  history = []
  for i in range(7):
    g = {'w': jax.random.normal(jax.random.PRNGKey(i), (4, 3))}
    _, s = jax.jit(tx.update)(g, s)
    history.append(np.asarray(s.precond_l['w']))
  changed = [not np.allclose(history[i], history[i - 1])
             for i in range(1, 7)]
  # Recomputed at steps 1, 4, 7 (index 0, 3, 6).
  assert changed == [False, False, True, False, False, True]


def test_shampoo_one_sided_auto_exponent_is_polar():
  g, _, _ = _designed(6, 4, [2.0, 1.7, 1.3, 1.0], seed=12)
  g = jnp.asarray(g, jnp.float32)
  # Left side (6) is above max_precond_dim: R^{-1/2} alone gives G(GᵀG)^{-1/2}.
  tx = kp.kron_precondition('shampoo', b1=0.0, graft='none',
                            max_precond_dim=5, matrix_eps=1e-9)
  s = tx.init({'w': g})
  assert s.precond_l['w'].shape == (1, 1)
  u, _ = tx.update({'w': g}, s)
  np.testing.assert_allclose(u['w'], _polar(g), atol=1e-3)


# --------------------------------------------------------- robustness -----
@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_zero_gradient_first_step_is_finite(mode):
  params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
  tx = kp.kron_precondition(mode, precondition_frequency=2)
  s = tx.init(params)
  step = jax.jit(tx.update)
  u, s = step(jax.tree.map(jnp.zeros_like, params), s)
  assert_tree_finite((u, s))
  np.testing.assert_array_equal(u['w'], np.zeros((4, 3)))
  q = s.q_l['w'][0] if mode == 'soap' else s.precond_l['w'][0]
  np.testing.assert_allclose(q @ q.T, np.eye(4), atol=1e-6)
  for i in range(4):
    g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i),
                                                      p.shape), params)
    u, s = step(g, s)
    assert_tree_finite((u, s))
  assert np.abs(np.asarray(u['w'])).max() > 0


@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_bfloat16_params_float32_state(mode):
  params = {'w': jnp.zeros((4, 3), jnp.bfloat16), 'b': jnp.zeros(3,
                                                                 jnp.bfloat16)}
  tx = kp.kron_precondition(mode)
  s = tx.init(params)
  for i in range(3):
    g = jax.tree.map(lambda p, i=i: jax.random.normal(
        jax.random.PRNGKey(i), p.shape, jnp.bfloat16), params)
    u, s = jax.jit(tx.update)(g, s)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s)
             if x.ndim > 0)
  assert_tree_finite((u, s))


@pytest.mark.parametrize('mode,kwargs,name', [
    ('soap', dict(precondition_frequency=0), 'precondition_frequency'),
    ('shampoo', dict(precondition_frequency=0), 'precondition_frequency'),
    ('soap', dict(b1=1.0), 'b1'),
    ('soap', dict(b2=-0.1), 'b2'),
    ('soap', dict(shampoo_beta=1.0), 'shampoo_beta'),
    ('shampoo', dict(shampoo_beta=1.5), 'shampoo_beta'),
    ('soap', dict(eps=0.0), 'eps'),
    ('shampoo', dict(eps=-1.0), 'eps'),
    ('shampoo', dict(matrix_eps=0.0), 'matrix_eps'),
    ('shampoo', dict(accumulation='max'), 'accumulation'),
    ('shampoo', dict(root_method='svd'), 'root_method'),
    ('shampoo', dict(graft='sgd'), 'graft'),
    ('shampoo', dict(exponent=0.0), 'exponent'),
    ('shampoo', dict(exponent=0.3, root_method='newton'), 'exponent'),
    ('soap', dict(max_precond_dim=-1), 'max_precond_dim'),
    ('soap', dict(null_threshold=-1e-3), 'null_threshold'),
    ('shampoo', dict(null_threshold=-1.0), 'null_threshold'),
    ('cholesky', dict(), 'mode'),
])
def test_bad_input_raises(mode, kwargs, name):
  with pytest.raises(ValueError, match=name):
    kp.kron_precondition(mode, **kwargs)


def test_bad_input_named_optimizers():
  with pytest.raises(ValueError, match='precondition_frequency'):
    kron_opt.soap(1e-3, precondition_frequency=0)
  with pytest.raises(ValueError, match='b2'):
    kron_opt.shampoo(1e-3, b2=1.0)
  with pytest.raises(ValueError, match='learning_rate'):
    kron_opt.soap(-1.0)
  with pytest.raises(TypeError):
    kp.kron_precondition('soap', graft='adam')


# ------------------------------------------------------ named optimizers ---
@pytest.mark.parametrize('name', ['soap', 'shampoo'])
def test_named_optimizers_route_and_train(name):
  params = {'embed': {'embedding': jnp.ones((10, 4)) * 0.1},
            'layer': {'kernel': jnp.ones((4, 6)) * 0.1, 'bias': jnp.zeros(6)},
            'norm': {'scale': jnp.ones(6)}}
  opt = getattr(kron_opt, name)(1e-2, weight_decay=0.0)
  s = opt.init(params)
  # Only the hidden kernel carries Kronecker state.
  kstate = [x for x in jax.tree.leaves(
      s, is_leaf=lambda z: isinstance(z, (kp.SoapState, kp.ShampooState)))
            if isinstance(x, (kp.SoapState, kp.ShampooState))]
  assert len(kstate) == 1
  leaves = jax.tree.leaves(kstate[0].stats_l)
  assert [x.shape for x in leaves] == [(1, 4, 4)]

  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
  y = jax.random.normal(jax.random.PRNGKey(1), (16, 6))

  def loss(p):
    h = x @ p['layer']['kernel'] + p['layer']['bias']
    h = h * p['norm']['scale'] + p['embed']['embedding'][:16 % 10].sum()
    return jnp.mean((h - y) ** 2)

  @jax.jit
  def step(p, s):
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  l0 = loss(params)
  for _ in range(40):
    params, s = step(params, s)
  assert_tree_finite((params, s))
  assert loss(params) < 0.9 * l0


def test_named_soap_weight_decay_only_on_matrix_path():
  params = {'layer': {'kernel': jnp.ones((4, 3))}}
  opt = kron_opt.soap(0.1, weight_decay=0.5)
  s = opt.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  # Step 1 only builds SOAP's statistics: no decay either (the reference).
  u, s = opt.update(zero, s, params)
  np.testing.assert_array_equal(u['layer']['kernel'], np.zeros((4, 3)))
  u, s = opt.update(zero, s, params)
  np.testing.assert_allclose(u['layer']['kernel'], -0.05 * np.ones((4, 3)),
                             rtol=1e-6)
  # Without a preconditioned side SOAP is Adam from step 1, decay included.
  opt = kron_opt.soap(0.1, weight_decay=0.5, max_precond_dim=0)
  u, _ = opt.update(zero, opt.init(params), params)
  np.testing.assert_allclose(u['layer']['kernel'], -0.05 * np.ones((4, 3)),
                             rtol=1e-6)


@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_nonfinite_gradient_is_not_hidden(mode):
  """A NaN gradient gives a NaN step (for optax.apply_if_finite to see)."""
  params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
  tx = kp.kron_precondition(mode)
  g = {'w': jnp.full((4, 3), jnp.nan), 'b': jnp.ones(3)}
  u, _ = jax.jit(tx.update)(g, tx.init(params))
  assert not np.all(np.isfinite(np.asarray(u['w'])))
  assert np.all(np.isfinite(np.asarray(u['b'])))


@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_bfloat16_state_dtypes_are_kept(mode):
  params = {'w': jnp.zeros((4, 3))}
  tx = kp.kron_precondition(mode, mu_dtype=jnp.bfloat16,
                            precond_dtype=jnp.bfloat16,
                            precondition_frequency=2)
  s = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(3):
    g = {'w': jax.random.normal(jax.random.PRNGKey(i), (4, 3))}
    u, s = step(g, s)
  assert u['w'].dtype == jnp.float32
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s)
             if x.ndim > 0)
  assert_tree_finite((u, s))


def _reference_soap(p0, grads, *, lr, b1, b2, shampoo_beta, eps, wd, k,
                    q_init=None):
  """SOAP's reference step (nikhilvyas/SOAP ``soap.py``) in float64 NumPy.

  PyTorch layout: ``p`` is ``(out, in)``; ``GG[0]`` is ``out × out`` and
  ``GG[1]`` is ``in × in``. Transcribed from the reference's rules: the
  first call only accumulates ``GG`` and takes ``eigh`` (descending), the
  first moment is kept in the rotated basis, ``ε`` is added before the bias
  correction (folded into the step size), the weight decay acts on the
  updated weight, and after real step ``t`` with ``t mod k = 0`` the bases
  take one QR power step after sorting by ``diag(QᵀGGQ)`` (``V`` permuted
  alongside; ``M`` projected back with the old and forward with the new
  basis). ``q_init`` replaces ``eigh``'s bases on the first call where its
  answer is not unique (a rank-deficient ``GG``). Returns the parameters
  after every call.
  """
  p = np.array(p0, np.float64)
  gg = [np.zeros((p.shape[0],) * 2), np.zeros((p.shape[1],) * 2)]
  proj = lambda x, q: q[0].T @ x @ q[1]
  back = lambda x, q: q[0] @ x @ q[1].T
  q = None
  step = 0
  exp_avg = np.zeros_like(p)
  exp_avg_sq = np.zeros_like(p)
  out = []

  def update_preconditioner(g, q, exp_avg, exp_avg_sq):
    if q is not None:
      exp_avg = back(exp_avg, q)
    gg[0] = shampoo_beta * gg[0] + (1 - shampoo_beta) * g @ g.T
    gg[1] = shampoo_beta * gg[1] + (1 - shampoo_beta) * g.T @ g
    if q is None:
      q = q_init or [_eig_desc(gg[0])[1], _eig_desc(gg[1])[1]]
    if step > 0 and step % k == 0:
      new_q = []
      for ind, (m, o) in enumerate(zip(gg, q)):
        order = np.argsort(-np.diag(o.T @ m @ o), kind='stable')
        exp_avg_sq = np.take(exp_avg_sq, order, axis=ind)
        new_q.append(np.linalg.qr(m @ o[:, order])[0])
      q = new_q
    if step > 0:
      exp_avg = proj(exp_avg, q)
    return q, exp_avg, exp_avg_sq

  for g in grads:
    g = np.asarray(g, np.float64)
    if q is None:
      q, exp_avg, exp_avg_sq = update_preconditioner(g, q, exp_avg,
                                                     exp_avg_sq)
      out.append(p.copy())
      continue
    g_rot = proj(g, q)
    step += 1
    exp_avg = b1 * exp_avg + (1 - b1) * g_rot
    exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g_rot ** 2
    denom = np.sqrt(exp_avg_sq) + eps
    step_size = lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    p = p - step_size * back(exp_avg / denom, q)
    p = p - lr * wd * p
    q, exp_avg, exp_avg_sq = update_preconditioner(g, q, exp_avg, exp_avg_sq)
    out.append(p.copy())
  return out


def _find_state(state, cls):
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda z: isinstance(
      z, cls)) if isinstance(x, cls)]
  assert len(found) == 1, found
  return found[0]


def _soap_trajectory(w0, grads, **kw):
  """``ol.soap`` in float64 on one matrix leaf; parameters after each step."""
  with jax.enable_x64(True):
    opt = kron_opt.soap(precond_dtype=jnp.float64, mu_dtype=jnp.float64,
                        labels=lambda p: jax.tree.map(lambda _: 'matrix', p),
                        **kw)
    params = {'w': jnp.asarray(w0, jnp.float64)}
    state = opt.init(params)

    @jax.jit
    def step(params, state, g):
      u, state = opt.update({'w': g}, state, params)
      return optax.apply_updates(params, u), state

    out, states = [], []
    for g in grads:
      params, state = step(params, state, jnp.asarray(g, jnp.float64))
      out.append(np.asarray(params['w']))
      states.append(state)
  return out, states


@pytest.mark.parametrize('k', [10, 3])
@pytest.mark.parametrize('shape', [(6, 6), (7, 4), (4, 7)])
def test_soap_matches_reference_transcription(shape, k):
  """``ol.soap`` (float64) follows the reference step over 30 steps.

  Flax layout ``(fan_in, fan_out)`` here, the reference's ``(out, in)`` is
  the transpose: its ``GG[0]`` is our ``R``, its ``GG[1]`` our ``L``. On a
  non-square leaf the first ``eigh`` has a null space whose basis is not
  unique; the transcription is given our basis there (checked to be an
  eigenbasis), and the null-space rule is switched off
  (``null_threshold=0``), since by design SOAP here gives coordinates
  without gradient energy a zero update (see ``scale_by_soap``).
  """
  kw = dict(b1=0.95, b2=0.99, shampoo_beta=0.95, eps=1e-8)
  lr, steps = 1e-2, 30
  rng = np.random.default_rng(sum(shape) * 10 + k)
  # Step 1 well conditioned (the first eigh sees one gradient), then noise.
  g1, _, _ = _designed(*shape, np.linspace(2.0, 1.0, min(shape)), seed=k)
  grads = [g1] + [rng.standard_normal(shape) for _ in range(steps - 1)]
  w0 = rng.standard_normal(shape) * 0.1
  extra = {} if shape[0] == shape[1] else dict(null_threshold=0.0)
  ours, states = _soap_trajectory(w0, grads, learning_rate=lr,
                                  weight_decay=0.0, precondition_frequency=k,
                                  **kw, **extra)
  soap_state = _find_state(states[0], kp.SoapState)
  q_l, q_r = (np.asarray(soap_state.q_l['w'][0]),
              np.asarray(soap_state.q_r['w'][0]))
  g = grads[0]
  for q, s in ((q_l, g @ g.T), (q_r, g.T @ g)):
    np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-12)
    off = q.T @ s @ q
    np.testing.assert_allclose(off - np.diag(np.diag(off)), 0.0, atol=1e-12)
  ref = _reference_soap(w0.T, [x.T for x in grads], lr=lr, wd=0.0, k=k,
                        q_init=[q_r, q_l], **{'shampoo_beta': 0.95, 'b1': 0.95,
                                              'b2': 0.99, 'eps': 1e-8})
  travelled = np.linalg.norm(ref[-1].T - w0)
  errs = [np.linalg.norm(a - b.T) / travelled for a, b in zip(ours, ref)]
  assert max(errs) <= 1e-6, max(errs)
  np.testing.assert_array_equal(ours[0], w0)  # step 1: statistics only


def test_soap_null_rule_leaves_full_rank_reference_match():
  """The default null_threshold changes nothing on full-rank factors (here
  a first gradient with singular values 3 … 0.05, so λ_min/λ_max = 2.8e-4,
  well above τ = 1e-5): the reference match above holds with it on."""
  lr, k, shape = 1e-2, 3, (5, 5)
  rng = np.random.default_rng(11)
  g1, _, _ = _designed(*shape, [3.0, 1.0, 0.3, 0.1, 0.05], seed=2)
  grads = [g1] + [rng.standard_normal(shape) for _ in range(11)]
  w0 = rng.standard_normal(shape) * 0.1
  on, _ = _soap_trajectory(w0, grads, learning_rate=lr, weight_decay=0.0,
                           precondition_frequency=k)
  off, _ = _soap_trajectory(w0, grads, learning_rate=lr, weight_decay=0.0,
                            precondition_frequency=k, null_threshold=0.0)
  np.testing.assert_allclose(on, off, rtol=0, atol=1e-13)


def test_soap_weight_decay_reference_deviation():
  """Weight decay: none on step 1 (as the reference); then the decay of the
  old weight (optax) instead of the updated one differs by O(lr·wd)."""
  lr, wd, k = 1e-2, 0.1, 3
  rng = np.random.default_rng(3)
  g1, _, _ = _designed(5, 5, np.linspace(2.0, 1.0, 5), seed=1)
  grads = [g1] + [rng.standard_normal((5, 5)) for _ in range(11)]
  w0 = rng.standard_normal((5, 5))
  ours, _ = _soap_trajectory(w0, grads, learning_rate=lr, weight_decay=wd,
                             precondition_frequency=k)
  np.testing.assert_array_equal(ours[0], w0)
  ref = _reference_soap(w0.T, [x.T for x in grads], lr=lr, wd=wd, k=k,
                        b1=0.95, b2=0.99, shampoo_beta=0.95, eps=1e-8)
  travelled = np.linalg.norm(ref[-1].T - w0)
  err = max(np.linalg.norm(a - b.T) for a, b in zip(ours, ref)) / travelled
  assert err <= 2 * lr * wd, err


# ------------------------------------------------ round-off is no update ---
PERTURB_SHAPES = [(1, 7), (7, 1), (4, 16), (16, 4), (32, 80), (80, 32)]


_SLOW = pytest.mark.slow


@pytest.mark.parametrize('name,k,steps', [
    ('soap', 10, 4), ('soap_lite', 10, 4), ('shampoo', 10, 4),
    ('soap', 2, 6),  # two refreshes while still rank-deficient
    pytest.param('soap_lite', 2, 6, marks=_SLOW),
    pytest.param('shampoo', 2, 6, marks=_SLOW)])
def test_gradient_perturbation_moves_little(name, k, steps):
  """A 1e-6 relative change of the gradients moves the parameters by at
  most 1e-4 of the distance travelled after 4 steps, on rank-deficient
  (non-square) leaves too: null-space round-off gets no update. With k = 2
  the bases are refreshed twice while still rank-deficient."""
  rng = np.random.default_rng(0)
  params = {f'w{i}': jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
            for i, s in enumerate(PERTURB_SHAPES)}
  grads, perturbed = [], []
  for _ in range(steps):
    g = {n: rng.standard_normal(v.shape) for n, v in params.items()}
    r = {n: rng.standard_normal(v.shape) for n, v in params.items()}
    grads.append(g)
    perturbed.append({n: g[n] + 1e-6 * np.linalg.norm(g[n]) * r[n]
                      / np.linalg.norm(r[n]) for n in g})
  kw = dict(weight_decay=0.0, precondition_frequency=k,
            labels=lambda p: jax.tree.map(lambda _: 'matrix', p))
  if name == 'soap_lite':
    kw['total_steps'] = 100
  opt = getattr(ol, name)(1e-2, **kw)

  # One jitted step, looped here: a jit of the whole unrolled run compiled
  # every step's SOAP refresh separately (75 s of a cold suite).
  @jax.jit
  def step(params, s, g):
    u, s = opt.update(g, s, params)
    return optax.apply_updates(params, u), s

  def run(params, grads):
    s = opt.init(params)
    for g in grads:
      params, s = step(params, s, g)
    return params

  as_f32 = lambda gs: [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
                       for g in gs]
  a = run(params, as_f32(grads))
  b = run(params, as_f32(perturbed))
  for n, w0 in params.items():
    travelled = np.linalg.norm(np.asarray(a[n]) - np.asarray(w0))
    moved = np.linalg.norm(np.asarray(a[n]) - np.asarray(b[n]))
    assert travelled > 0 and moved <= 1e-4 * travelled, (
        n, w0.shape, moved / travelled)


def test_soap_null_cluster_moves_alike_in_any_basis():
  """1×7: R has rank 1 after step 1, so ``eigh`` fills the other 6 columns
  with a basis picked by rounding. A second gradient moves the parameters
  in that null space too (nothing carrying signal stays frozen), by the
  same step whatever basis of it ``eigh`` picked; the first gradient again
  (no signal there, only round-off) moves them along itself alone."""
  g1 = jax.random.normal(jax.random.PRNGKey(0), (1, 7))
  g2 = jax.random.normal(jax.random.PRNGKey(1), (1, 7))
  tx = kp.scale_by_soap()
  s = tx.init({'w': g1})
  _, s = tx.update({'w': g1}, s)
  lam = np.asarray(s.lam_r['w'][0])
  assert lam[0] > 0 and np.all(lam[1:] == 0)
  q = np.asarray(s.q_r['w'][0])
  turn, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
  q_turned = q.copy()
  q_turned[:, 1:] = q[:, 1:] @ turn
  turned = s._replace(q_r={'w': jnp.asarray(q_turned[None], jnp.float32)})

  def step(tx, g, state):
    return np.asarray(tx.update({'w': g}, state)[0]['w'])

  u = step(tx, g2, s)
  rot = u @ q
  assert np.linalg.norm(rot[0, 1:]) > 0.5 * np.linalg.norm(rot)
  np.testing.assert_allclose(step(tx, g2, turned), u, rtol=0,
                             atol=1e-6 * np.abs(u).max())
  same = step(tx, g1, s) @ q
  assert np.abs(same[0, 0]) > 0.1
  np.testing.assert_allclose(same[0, 1:], 0.0, atol=1e-6)
  # The reference's rule (off) steps by ±1 per coordinate of whatever basis
  # eigh picked: another basis, another step.
  tx0 = kp.scale_by_soap(null_threshold=0.0)
  u0 = step(tx0, g2, s)
  assert np.abs(step(tx0, g2, turned) - u0).max() > 0.1 * np.abs(u0).max()


@pytest.mark.parametrize('null', [4, 7])  # within the band of 4, wider
def test_roundoff_weight_ignores_how_a_null_cluster_is_turned(null):
  """The round-off weights of the non-null coordinates are a function of the
  null cluster as a subspace: any basis of it (``eigh`` on another CPU, or
  batched, picks another) gives the same weights, here with a coordinate on
  the guard's ramp next to the cluster (a sum of |θ·A| over the cluster's
  columns, the bound before, moved its weight by 1.6e-2)."""
  rng = np.random.default_rng(5)
  m, live = 6, 5
  lam = np.concatenate([np.geomspace(3.0, 0.05, live), np.zeros(null)])
  x = rng.standard_normal((m, live + null))
  x[:, live - 1] = 3e-3 * rng.choice([-1.0, 1.0], m)  # on the ramp
  turn, _ = np.linalg.qr(rng.standard_normal((null, null)))
  y = x.copy()
  y[:, live:] = x[:, live:] @ turn
  weight = lambda z: np.asarray(kp.roundoff_weight(
      jnp.asarray(z[None] ** 2, jnp.float32), None, None,
      jnp.asarray(lam[None], jnp.float32)))[0]
  wx, wy = weight(x), weight(y)
  assert 0.05 < wx[:, live - 1].min() and wx[:, live - 1].max() < 0.95
  np.testing.assert_allclose(wx[:, :live], wy[:, :live], rtol=0, atol=1e-5)


# ---------------------------------------------- optax.inject_hyperparams ---
@pytest.mark.parametrize('name,kw', [
    ('soap', {}), ('soap', dict(b1=0, precondition_frequency=2)),
    ('shampoo', dict(b1=0)), ('shampoo', dict(exponent=0.5, eps=1e-7))])
def test_inject_hyperparams_matches_plain_and_lr_is_live(name, kw):
  """``inject_hyperparams(ol.X)(learning_rate=…)`` equals ``ol.X(…)`` step
  for step (integer float-args such as ``b1=0`` included), and the injected
  learning rate is live."""
  params = {'w': jax.random.normal(jax.random.PRNGKey(0), (4, 3)) * 0.1,
            'b': jnp.zeros(3)}
  plain = getattr(ol, name)(0.01, **kw)
  inj = optax.inject_hyperparams(getattr(ol, name))(learning_rate=0.01, **kw)
  si, g = assert_injected_matches_plain(plain, inj, params, steps=5)
  ui = jax.jit(inj.update)
  a, _ = ui(g, si, params)
  si.hyperparams['learning_rate'] = jnp.asarray(0.03)
  b, _ = ui(g, si, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert float(jnp.abs(x).max()) > 0
    # wd·W is scaled by the learning rate too: the whole step triples.
    np.testing.assert_allclose(y, 3 * x, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize('name', ['soap', 'shampoo'])
def test_inject_hyperparams_structural_ints_name_static_args(name):
  params = {'w': jnp.ones((4, 3))}
  inj = optax.inject_hyperparams(getattr(ol, name))(learning_rate=0.01)
  with pytest.raises(TypeError, match=r"static_args=\('max_precond_dim',\)"):
    jax.jit(inj.init)(params)
  static = optax.inject_hyperparams(
      getattr(ol, name), static_args=('max_precond_dim',))(learning_rate=0.01)
  state = jax.jit(static.init)(params)
  u, _ = jax.jit(static.update)({'w': jnp.ones((4, 3))}, state, params)
  assert_tree_finite(u)
  newton = optax.inject_hyperparams(ol.shampoo)(
      learning_rate=0.01, root_method='newton', exponent=0.25)
  with pytest.raises(TypeError, match=r"static_args=\('exponent',\)"):
    jax.jit(newton.update)({'w': jnp.ones((4, 3))}, newton.init(params),
                           params)


# ------------------------------------------------------------ distribute ---
@pytest.mark.parametrize('make', [
    lambda d: kp.scale_by_soap(distribute=d),
    lambda d: kp.scale_by_shampoo(distribute=d),
    lambda d: kp.kron_precondition('shampoo', distribute=d),
    lambda d: kron_opt.soap(1e-3, distribute=d),
    lambda d: kron_opt.shampoo(1e-3, distribute=d)])
def test_bad_distribute_raises_naming_it(make):
  with pytest.raises(TypeError, match='distribute'):
    make('fsdp')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('fsdp',))
  with pytest.raises(ValueError, match='distribute'):
    make((mesh, 'tp'))


@pytest.mark.parametrize('mode,kw', [
    ('soap', {}), ('shampoo', {}), ('shampoo', {'graft': 'none'}),
    ('shampoo', {'root_method': 'newton', 'exponent': 0.25})])
def test_distribute_one_device_equals_leaf_by_leaf(mode, kw):
  """A 1-device mesh stacks same-shape matrices into one kernel call (and a
  ``[3, m, n]`` leaf's slices with them); the state and updates equal the
  leaf-by-leaf path (``distribute=None``) over steps with refreshes."""
  rng = np.random.default_rng(5)
  shapes = {'a': (6, 4), 'b': (6, 4), 'c': (3, 6, 4), 'd': (4, 9),
            'v': (5,), 'big': (2, 40)}
  dims = {'a': MatrixDims(0, 1), 'b': MatrixDims(0, 1),
          'c': MatrixDims(1, 2), 'd': MatrixDims(0, 1), 'v': None,
          'big': MatrixDims(0, 1)}
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()} for _ in range(5)]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('fsdp',))
  txs = [kp.kron_precondition(mode, dims=dims, precondition_frequency=2,
                              max_precond_dim=20, distribute=d, **kw)
         for d in (None, mesh)]
  states = [tx.init(grads[0]) for tx in txs]
  # One device: nothing to make resident, the single-device state layout.
  assert states[0].owned is None and states[1].owned is None
  for g in grads:
    outs = [jax.jit(tx.update)(g, s) for tx, s in zip(txs, states)]
    (u0, s0), (u1, s1) = outs
    states = [s0, s1]
    assert jax.tree.structure(s0) == jax.tree.structure(s1)
    for x, y in zip(jax.tree.leaves((u0, s0)), jax.tree.leaves((u1, s1))):
      assert x.shape == y.shape and x.dtype == y.dtype
      # Shampoo's tall leaves run transposed (L and R swapped): round-off.
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(u0['c']).max()) > 0


@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_tree_map_params_with_a_dims_tree(mode):
  """``tree_map_params`` calls ``init`` with a leafless placeholder, which a
  per-leaf ``dims`` tree must not be matched against."""
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
  tx = kp.kron_precondition(mode, dims={'w': MatrixDims(0, 1), 'b': None})
  state = tx.init(params)
  assert state.owned is None
  for _ in range(2):
    _, state = tx.update(params, state)
  assert float(jnp.abs(state.mu['w']).max()) > 0
  mapped = optax.tree_utils.tree_map_params(tx, lambda p: 2 * p, state)
  np.testing.assert_array_equal(mapped.mu['w'], 2 * state.mu['w'])
  assert jax.tree.structure(mapped) == jax.tree.structure(state)


# ------------------------------------- round-off guard in the right units ---
@pytest.mark.parametrize('seed', [6, 102])
def test_soap_defaults_match_reference_on_full_rank_square(seed):
  """At its defaults ``ol.soap`` (float64) follows the reference on square
  full-rank 32×32 Gaussian gradients whose first factor is ill-conditioned
  (λ_min/λ_max = 8.2e-7 and 3.5e-10): the round-off level scales with the
  dtype's ε, so no real direction is frozen (issue 23: 0.18 of the
  distance travelled with the former energy threshold 1e-5)."""
  shape, steps, k = (32, 32), 30, 10
  rng = np.random.default_rng(seed)
  grads = [rng.standard_normal(shape) for _ in range(steps)]
  w0 = rng.standard_normal(shape) * 0.1
  kw = dict(b1=0.95, b2=0.99, shampoo_beta=0.95, eps=1e-8)
  ours, _ = _soap_trajectory(w0, grads, learning_rate=1e-2, weight_decay=0.0,
                             precondition_frequency=k, **kw)
  ref = _reference_soap(w0.T, [x.T for x in grads], lr=1e-2, wd=0.0, k=k,
                        **kw)
  travelled = np.linalg.norm(ref[-1].T - w0)
  err = max(np.linalg.norm(a - b.T) for a, b in zip(ours, ref)) / travelled
  assert err <= 1e-3, err


def _rosenbrock_pairs(w):
  """optax's Rosenbrock (a = 1, b = 100) on consecutive entries."""
  z = w.reshape(-1, 2)
  return jnp.sum((1.0 - z[:, 0]) ** 2 + 100.0 * (z[:, 1] - z[:, 0] ** 2) ** 2)


def _distances_after(tx, problems, steps):
  """``‖W − W*‖_F`` per problem after ``steps`` updates (one jitted scan)."""
  names = sorted(problems)

  def run(w):
    def body(carry, _):
      w, s = carry
      g = {k: jax.grad(problems[k][1])(w[k]) for k in names}
      u, s = tx.update(g, s, w)
      return (optax.apply_updates(w, u), s), None
    (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
    return {k: jnp.linalg.norm(w[k] - problems[k][2]) for k in names}

  out = jax.jit(run)({k: problems[k][0] for k in names})
  return {k: float(v) for k, v in out.items()}


def _matrix_opt(name):
  extra = dict(total_steps=10_000) if name == 'soap_lite' else {}
  return getattr(ol, name)(1e-2, weight_decay=0.0, **extra,
                           labels=lambda p: jax.tree.map(lambda _: 'matrix',
                                                         p))


@pytest.mark.parametrize('name', ['soap', 'shampoo', 'soap_lite'])
def test_embedded_rosenbrock_from_zeros_converges(name):
  """optax's Rosenbrock embedded in an 8×6 matrix from zeros (pairs along
  rows and along columns), lr 1e-2, no decay: within 3e-2 of the minimum
  after 10,000 steps. Every pair stays equal, so the gradient has rank 1
  and its second direction carries 1e-6 … 1e-8 of the energy: the former
  energy threshold froze it (SOAP ended 0.36 away, SOAP-LITE 0.07)."""
  ones = jnp.ones((8, 6))
  problems = {
      'rows': (jnp.zeros((8, 6)), _rosenbrock_pairs, ones),
      'cols': (jnp.zeros((8, 6)), lambda w: _rosenbrock_pairs(w.T), ones)}
  for k, d in _distances_after(_matrix_opt(name), problems, 10_000).items():
    assert d <= 3e-2, (name, k, d)


@_SLOW
@pytest.mark.parametrize('name', ['soap', 'shampoo', 'soap_lite'])
def test_fismo_convergence_targets_reached(name):
  """The optax targets of ``test_fismo`` (Kronecker quadratics of condition
  1, 10, 100, the embedded parabola and Rosenbrock, 8×6 and 6×8), lr 1e-2
  constant, no decay: within 3e-2 of the minimum after 10,000 steps."""
  import test_fismo  # noqa: PLC0415 (a test helper, slow test only)
  problems = {}
  for k, (w0, loss) in test_fismo._non_square_problems().items():
    if k.startswith('rosenbrock'):
      star = jnp.ones_like(w0)
    else:  # quadratic: one Newton step lands on the minimum
      flat = lambda v, w0=w0, loss=loss: loss(v.reshape(w0.shape))
      star = (w0.ravel() - jnp.linalg.solve(
          jax.hessian(flat)(w0.ravel()),
          jax.grad(flat)(w0.ravel()))).reshape(w0.shape)
    problems[k] = (w0, loss, star)
  for k, d in _distances_after(_matrix_opt(name), problems, 10_000).items():
    assert d <= 3e-2, (name, k, d)


@pytest.mark.parametrize('name', ['soap', 'soap_lite'])
def test_full_batch_first_step_round_off_is_no_update(name):
  """Full batch: the same gradient at calls 1, 2, 3 (SOAP's first step is
  statistics only, so the parameters do not move). The bases then
  diagonalise the gradient and its rotated off-diagonal entries are
  round-off; a 1e-6 relative change of the gradient moves the parameters
  by ≤ 1e-3 of the distance travelled (issue 23: 1.4–1.7, Adam's ratio
  turned the round-off into ±1 steps)."""
  rng = np.random.default_rng(0)
  extra = dict(total_steps=100) if name == 'soap_lite' else {}
  tx = getattr(ol, name)(1e-2, weight_decay=0.0, **extra,
                         labels=lambda p: jax.tree.map(lambda _: 'matrix', p))
  shapes = {'square': (64, 64), 'tall': (128, 32)}
  g = {k: rng.standard_normal(s) for k, s in shapes.items()}
  r = {k: rng.standard_normal(s) for k, s in shapes.items()}
  g2 = {k: g[k] + 1e-6 * np.linalg.norm(g[k]) * r[k] / np.linalg.norm(r[k])
        for k in g}
  p0 = {k: jnp.zeros(s) for k, s in shapes.items()}

  @jax.jit
  def run(g):
    s, p = tx.init(p0), p0
    for _ in range(3):
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    return p

  as_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  a, b = run(as_f32(g)), run(as_f32(g2))
  for k in shapes:
    travelled = float(jnp.linalg.norm(a[k]))
    moved = float(jnp.linalg.norm(a[k] - b[k]))
    assert travelled > 0 and moved <= 1e-3 * travelled, (k, moved / travelled)
