"""Polar factor kernel and the orthogonalize transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from jax.sharding import Mesh

import optax_lite as ol
from optax_lite.linalg import polar as polar_lib

from conftest import assert_tree_finite
import optimizer_zoo as zoo


def matrix_with_condition(key, shape, cond):
  """A random matrix whose singular values span [1/cond, 1] log-uniformly."""
  *batch, m, n = shape
  k1, k2 = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, min(m, n))))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, min(m, n))))
  s = jnp.logspace(0, -np.log10(cond), min(m, n))
  return (u * s) @ jnp.swapaxes(v, -1, -2)


def max_sv_error(p):
  s = np.linalg.svd(np.asarray(p, np.float64), compute_uv=False)
  return float(np.max(np.abs(s - 1)))


@pytest.mark.parametrize('shape', [(48, 32), (32, 48), (3, 20, 30),
                                   (2, 2, 30, 20)])
@pytest.mark.parametrize('cond', [10.0, 100.0])
def test_polar_express_matches_svd(shape, cond):
  x = matrix_with_condition(jax.random.PRNGKey(0), shape, cond)
  exact = ol.polar_factor(x, 'svd')
  approx = ol.polar_factor(x, 'polar_express')
  assert approx.shape == x.shape
  # Polar Express at 6 steps: near-exact for cond ≤ 100.
  np.testing.assert_allclose(approx, exact, atol=0.02)
  assert max_sv_error(approx) < 0.05


@pytest.mark.parametrize('method,bound', [('jordan', 0.35), ('cubic', 0.1)])
def test_other_methods_close_to_orthogonal(method, bound):
  x = matrix_with_condition(jax.random.PRNGKey(1), (40, 24), 10.0)
  steps = 20 if method == 'cubic' else None
  assert max_sv_error(ol.polar_factor(x, method, steps)) < bound


def test_svd_reference_is_exact_and_rank_aware():
  x = matrix_with_condition(jax.random.PRNGKey(2), (20, 12), 1e3)
  p = ol.polar_factor(x, 'svd')
  np.testing.assert_allclose(p.T @ p, np.eye(12), atol=1e-5)
  # A rank-1 matrix has a rank-1 polar factor.
  r1 = jnp.outer(jnp.arange(1.0, 6.0), jnp.arange(1.0, 4.0))
  p1 = np.asarray(ol.polar_factor(r1, 'svd'))
  assert np.linalg.matrix_rank(p1, tol=1e-4) == 1


def test_polar_express_beats_jordan_at_cond_1e3():
  x = matrix_with_condition(jax.random.PRNGKey(3), (64, 64), 1e3)
  pe = max_sv_error(ol.polar_factor(x, 'polar_express', 6))
  jo = max_sv_error(ol.polar_factor(x, 'jordan', 5))
  assert pe < jo


@pytest.mark.parametrize('method', ['polar_express', 'gram_polar_express',
                                    'jordan', 'cubic', 'svd'])
def test_zero_matrix_gives_zeros(method):
  out = ol.polar_factor(jnp.zeros((3, 5, 20)), method)
  assert not np.any(np.isnan(out))
  np.testing.assert_array_equal(out, 0.0)


def test_bfloat16():
  x = matrix_with_condition(jax.random.PRNGKey(4), (32, 48), 10.0)
  out = ol.polar_factor(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             ol.polar_factor(x, 'svd'), atol=0.08)


def test_jit_and_static_steps():
  x = matrix_with_condition(jax.random.PRNGKey(5), (16, 24), 10.0)
  f = jax.jit(ol.polar_factor, static_argnames=('method', 'steps'))
  np.testing.assert_allclose(f(x, method='polar_express', steps=6),
                             ol.polar_factor(x), atol=1e-6)


def test_iteration_is_a_scan_not_an_unrolled_loop():
  x = jnp.ones((8, 8))
  jaxpr = str(jax.make_jaxpr(
      lambda x: polar_lib.newton_schulz(x, polar_lib.coefficients(
          'polar_express', 6)))(x))
  assert 'scan' in jaxpr
  assert jaxpr.count('dot_general') <= 4  # one step's products, not six


def test_coefficient_table():
  t = polar_lib.coefficients('polar_express', 10)
  assert t.shape == (10, 3)
  np.testing.assert_allclose(t[8], t[7])  # last row repeats beyond 8
  np.testing.assert_allclose(t[7], (1.875, -1.25, 0.375))
  np.testing.assert_allclose(t[0, 0], 8.28721201814563 / 1.01)


@pytest.mark.parametrize('method', ['polar_express', 'gram_polar_express',
                                    'jordan', 'cubic', 'svd'])
def test_polar_by_method_is_the_one_dispatch(method):
  """``polar_by_method`` is what ``polar_factor`` and ``orthogonalize`` run,
  and Polar Express normalises by 1.01·‖X‖_F (its tuned σ_max)."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 7))
  got = polar_lib.polar_by_method(x, method)
  np.testing.assert_allclose(got, ol.polar_factor(x, method), atol=1e-6)
  u, _ = ol.orthogonalize(method).update({'w': x[0]}, optax.EmptyState())
  np.testing.assert_allclose(u['w'], got[0], atol=1e-6)
  if method == 'polar_express':
    plain = polar_lib.newton_schulz(x, polar_lib.coefficients(method))
    assert float(jnp.max(jnp.abs(plain - got))) > 1e-4  # factor matters
    scaled = polar_lib.newton_schulz(x, polar_lib.coefficients(method),
                                     norm_factor=1.01)
    np.testing.assert_allclose(scaled, got, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(method='newton'), 'method'), (dict(steps=0), 'steps'),
    (dict(steps=2.5), 'steps')])
def test_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ol.polar_factor(jnp.ones((3, 3)), **kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    ol.orthogonalize(**kwargs)


def test_integer_and_vector_input_rejected():
  with pytest.raises(TypeError, match='floating'):
    ol.polar_factor(jnp.ones((3, 3), jnp.int32))
  with pytest.raises(ValueError, match='rank'):
    ol.polar_factor(jnp.ones((3,)))


# --------------------------------------------------------------------------
# Gram Newton–Schulz
# --------------------------------------------------------------------------


def _plain_ns_float64(x, steps=6):
  """Polar Express as ``X ← aX + (bA + cA²)X`` in float64 NumPy."""
  x = np.asarray(x, np.float64)
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = np.swapaxes(x, -1, -2)
  x = x / (1.01 * np.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
  for a, b, c in polar_lib.coefficients('polar_express', steps):
    g = x @ np.swapaxes(x, -1, -2)
    x = a * x + (b * g + c * g @ g) @ x
  return np.swapaxes(x, -1, -2) if tall else x


@pytest.mark.parametrize('shape', [(12, 48), (48, 12), (2, 10, 31), (16, 16)])
@pytest.mark.parametrize('restart_every', [1, 2, 3, 6])
def test_gram_is_the_same_polynomial_in_float64(shape, restart_every):
  """In exact-ish arithmetic Gram NS equals the plain iteration, whatever
  the restart period (the restarts only fight round-off)."""
  x = np.random.default_rng(0).standard_normal(shape)
  with jax.enable_x64(True):
    got = polar_lib.newton_schulz_gram(
        jnp.asarray(x), polar_lib.coefficients('polar_express'),
        norm_factor=1.01, restart_every=restart_every)
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, _plain_ns_float64(x), atol=1e-12)


@pytest.mark.parametrize('shape', [(48, 192), (192, 48), (64, 112),
                                   (3, 32, 128)])
def test_gram_band_at_condition_100_float32(shape):
  x = matrix_with_condition(jax.random.PRNGKey(11), shape, 100.0)
  m, n = shape[-2:]
  assert polar_lib.uses_gram(m, n, 6)
  gram = ol.polar_factor(x, 'gram_polar_express')
  assert max_sv_error(gram) <= 0.01
  np.testing.assert_allclose(gram, ol.polar_factor(x), atol=2e-4)


def test_gram_dispatch_by_shape():
  """1:4 runs the Gram form (one X-sized product every 2 steps), a square
  matrix the plain iteration (fewer flops there)."""
  def products(shape):
    jaxpr = jax.make_jaxpr(lambda x: polar_lib.polar_by_method(
        x, 'gram_polar_express'))(jnp.ones(shape))
    return str(jaxpr)
  wide, square = products((16, 64)), products((32, 32))
  plain = str(jax.make_jaxpr(polar_lib.polar_by_method)(jnp.ones((32, 32))))
  assert square == plain
  # Gram: a scan over 3 segments, each one X Xᵀ, one Q X and s×s products.
  assert 'scan' in wide and 'length=3' in wide
  assert wide.count('dot_general') <= 8
  assert not polar_lib.uses_gram(64, 64, 6)
  assert not polar_lib.uses_gram(64, 96, 6)   # l = 1.5 s: a tie, plain
  assert polar_lib.uses_gram(64, 97, 6)
  assert polar_lib.uses_gram(256, 64, 6)


def test_gram_flops_model():
  s, l = 64, 256
  # 3 segments of 2 steps: 3·(2·s²l + 5·s³) multiply-adds, 2 flops each.
  assert polar_lib.gram_flops(s, l, 6) == 2 * 3 * (2 * s * s * l + 5 * s**3)
  assert polar_lib.gram_flops(l, s, 6) == polar_lib.gram_flops(s, l, 6)
  # 7 steps: a trailing 1-step segment costs what a plain step costs.
  assert (polar_lib.gram_flops(s, l, 7) - polar_lib.gram_flops(s, l, 6)
          == polar_lib.flops(s, l, 1))
  ratio = polar_lib.flops(s, l, 6) / polar_lib.flops(
      s, l, 6, method='gram_polar_express')
  assert ratio == pytest.approx(54 / 39)
  assert polar_lib.flops(s, s, 6, 'gram_polar_express') == polar_lib.flops(
      s, s, 6)


def test_gram_restarts_are_what_keeps_bfloat16_stable():
  """Without restarts the accumulated Q amplifies bfloat16 round-off past
  any band; restarting every 2 steps (the default) holds it."""
  x = matrix_with_condition(jax.random.PRNGKey(12), (48, 192), 100.0)
  coeffs = polar_lib.coefficients('polar_express')

  def band(k):
    return max_sv_error(polar_lib.newton_schulz_gram(
        x, coeffs, norm_factor=1.01, ns_dtype=jnp.bfloat16,
        restart_every=k))
  assert band(polar_lib.GRAM_RESTART_EVERY) <= 0.02
  assert band(6) > 0.5


def test_gram_bfloat16_leaf_and_jit():
  x = matrix_with_condition(jax.random.PRNGKey(13), (24, 96), 10.0)
  f = jax.jit(ol.polar_factor, static_argnames=('method', 'steps'))
  out = f(x.astype(jnp.bfloat16), method='gram_polar_express')
  assert out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             ol.polar_factor(x, 'svd'), atol=0.08)


def test_gram_bad_restart_every():
  with pytest.raises(ValueError, match='restart_every'):
    polar_lib.newton_schulz_gram(jnp.ones((2, 4)),
                                 polar_lib.coefficients('polar_express'),
                                 restart_every=0)


# --------------------------------------------------------------------------
# orthogonalize
# --------------------------------------------------------------------------


def test_orthogonalize_transform(maybe_jit):
  tx = ol.orthogonalize()
  g = {'a': matrix_with_condition(jax.random.PRNGKey(6), (24, 16), 10.0)}
  state = tx.init(g)
  assert isinstance(state, optax.EmptyState)
  u, _ = maybe_jit(tx.update)(g, state)
  np.testing.assert_allclose(u['a'], ol.polar_factor(g['a']), atol=1e-6)


_ORTHOGONALIZE = ol.orthogonalize()
_orthogonalize = jax.jit(_ORTHOGONALIZE.update)  # one compile for all examples


@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 100))
def test_orthogonalize_is_invariant_to_positive_scaling(scale, seed):
  g = jax.random.normal(jax.random.PRNGKey(seed), (12, 20))
  state = _ORTHOGONALIZE.init({'w': g})
  a, _ = _orthogonalize({'w': g}, state)
  b, _ = _orthogonalize({'w': g * scale}, state)
  np.testing.assert_allclose(a['w'], b['w'], atol=2e-5)


def test_conv_kernel_default_reshape():
  # [kh, kw, in, out] -> (kh*kw*in, out)
  g = jax.random.normal(jax.random.PRNGKey(7), (3, 3, 4, 8))
  tx = ol.orthogonalize()
  u, _ = tx.update({'k': g}, tx.init({'k': g}))
  expected = ol.polar_factor(g.reshape(36, 8)).reshape(3, 3, 4, 8)
  np.testing.assert_allclose(u['k'], expected, atol=1e-6)


def test_attention_kernel_explicit_dims():
  # [d, heads, head_dim] -> (d, heads*head_dim)
  g = jax.random.normal(jax.random.PRNGKey(8), (16, 4, 8))
  tx = ol.orthogonalize(dims=ol.MatrixDims(0, (1, 2)))
  u, _ = tx.update({'q': g}, tx.init({'q': g}))
  expected = ol.polar_factor(g.reshape(16, 32)).reshape(16, 4, 8)
  np.testing.assert_allclose(u['q'], expected, atol=1e-6)
  # Batch axis: MatrixDims(1, 2) on [heads, d, k] orthogonalises per head.
  g2 = jax.random.normal(jax.random.PRNGKey(9), (4, 16, 8))
  u2, _ = ol.orthogonalize(dims=ol.MatrixDims(1, 2)).update({'x': g2}, None)
  np.testing.assert_allclose(u2['x'][2], ol.polar_factor(g2[2]), atol=1e-6)


def test_dims_tree_with_none_passes_leaf_through():
  g = {'w': jnp.ones((4, 6)), 'b': jnp.arange(3.0)}
  tx = ol.orthogonalize(dims={'w': ol.MatrixDims(), 'b': None})
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(u['b'], g['b'])


def test_vector_leaf_under_default_dims_raises():
  tx = ol.orthogonalize()
  with pytest.raises(ValueError, match='rank'):
    tx.update({'b': jnp.ones(3)}, tx.init({'b': jnp.ones(3)}))


def test_wrong_rank_for_explicit_spec_raises():
  tx = ol.orthogonalize(dims=ol.MatrixDims(0, 2))
  with pytest.raises(ValueError, match='dims'):
    tx.update({'w': jnp.ones((3, 4))}, None)


def test_orthogonalize_finite_on_tiny_and_huge():
  for s in (1e-30, 1e-8, 1e8):
    u, _ = ol.orthogonalize().update(
        {'w': s * jax.random.normal(jax.random.PRNGKey(0), (8, 5))}, None)
    assert_tree_finite(u)


# --------------------------------------------------------------------------
# method="gram_polar_express" on the Muon family
# --------------------------------------------------------------------------

_FAMILY = ['muon', 'muon_lite', 'fismo', 'fismo_lite']


def _family_update(name, dtype=jnp.float32, jit=True, **kw):
  params = zoo.params_tree(dtype=dtype)
  # The conv kernel (18 × 4) is seen through the Gram form, (8, 12) is not.
  assert polar_lib.uses_gram(18, 4, 6) and not polar_lib.uses_gram(8, 12, 6)
  grads = zoo.grads_like(params)
  tx = zoo.make(name, **kw)
  step = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  u, state = step(grads, state, params)
  u, _ = step(grads, state, params)
  return u


@pytest.mark.parametrize('name', _FAMILY)
def test_gram_method_on_family_matches_polar_express(name):
  ref = _family_update(name)
  got = _family_update(name, method='gram_polar_express')
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)
  bf = _family_update(name, dtype=jnp.bfloat16, method='gram_polar_express')
  assert_tree_finite(bf)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))


def test_gram_method_under_inject_hyperparams_and_distribute():
  params, grads = zoo.params_tree(), zoo.grads_like(zoo.params_tree())
  plain = ol.muon(0.01, method='gram_polar_express')
  inj = optax.inject_hyperparams(ol.muon, static_args=('method',))(
      learning_rate=0.01, method='gram_polar_express')
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('x',))
  dist = ol.muon(0.01, method='gram_polar_express', distribute=mesh)
  ref, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  for tx in (inj, dist):
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, atol=1e-6)
