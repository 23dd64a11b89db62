"""Hypothesis properties of every transform over random shapes and scales.

* finite in -> finite out (two steps, so stateful transforms use their state),
  shapes and dtypes preserved;
* scale invariance ``T(c·G) = T(G)`` (c > 0) where the math says so: the
  polar factor, row normalisation, LITE around Muon's geometry, FISMO's
  whitening with ``scale_invariant=True`` around a polar factor, and SOAP
  (approximately, up to its ε) at moderate scales;
* homogeneity ``T(c·G) = c·T(G)`` for the linear ones: momentum and the
  shape scaling.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import optax_lite as ol
from optax_lite.transforms import lite as lite_tx


def _transforms():
  return {
      'momentum': lambda: ol.momentum(0.9),
      'momentum_ema_bc': lambda: ol.momentum(0.9, ema=True,
                                             bias_correction=True),
      'scale_by_shape': lambda: ol.scale_by_shape('rms'),
      'orthogonalize': lambda: ol.orthogonalize(),
      'orthogonalize_svd': lambda: ol.orthogonalize('svd'),
      'row_normalize': lambda: ol.row_normalize(),
      'fisher_whiten': lambda: ol.fisher_whiten(),
      'fisher_whiten_polar': lambda: ol.fisher_whiten(
          ol.orthogonalize(), scale_invariant=True),
      'soap': lambda: ol.kron_precondition('soap', precondition_frequency=1),
      'shampoo': lambda: ol.kron_precondition('shampoo',
                                              precondition_frequency=1),
      'lite_muon': lambda: lite_tx.lite_flat_boost(
          lite_tx.muon_geometry(), chi=2.0, beta1=-0.25, beta2=1.0),
      'lite_diagonal': lambda: lite_tx.lite_flat_boost(
          lite_tx.diagonal_geometry(), chi=4.0, nesterov=False),
  }


ALL = list(_transforms())
# T(cG) = T(G): rtol, and the scale range it is checked on (log10).
INVARIANT = {
    'orthogonalize': (2e-4, 4), 'orthogonalize_svd': (2e-4, 4),
    'row_normalize': (1e-5, 4), 'lite_muon': (2e-3, 3),
    'fisher_whiten_polar': (2e-3, 3), 'soap': (2e-3, 2),
}
# SOAP is scale invariant on every shape: on a rectangular (rank-deficient)
# gradient the null space of its statistics gets no update (see
# test_soap_rank_deficient_noise), so round-off is not normalised to O(1).
SQUARE_ONLY = ()
SQUARE_SHAPES = [(1, 1), (4, 4)]
# T(cG) = c·T(G).
HOMOGENEOUS = ['momentum', 'momentum_ema_bc', 'scale_by_shape']

# A fixed pool of shapes (square, wide, tall, 1×1, 1×n, n×1, conv-like ND)
# so that each transform compiles once per shape; hypothesis explores the
# pool, the scales and the random values.
SHAPES = [(1, 1), (1, 7), (7, 1), (4, 4), (3, 8), (8, 3), (2, 3, 5),
          (3, 3, 2, 4)]
shapes = st.sampled_from(SHAPES)
_RUNNERS = {}


def _runner(name):
  """A jitted two-step run of transform ``name``, compiled once per shape."""
  if name not in _RUNNERS:
    tx = _transforms()[name]()

    @jax.jit
    def run(g1, g2, w):
      params = {'w': w}
      state = tx.init(params)
      u1, state = tx.update({'w': g1}, state, params)
      u2, state = tx.update({'w': g2}, state, params)
      return [u1, u2], state

    _RUNNERS[name] = run
  return _RUNNERS[name]


def _grads(shape, seed, scale):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  g1 = jax.random.normal(k1, shape) * scale
  g2 = jax.random.normal(k2, shape) * scale
  return g1, g2


def _run(name, gs, params):
  return _runner(name)(gs[0]['w'], gs[1]['w'], params['w'])


@pytest.mark.parametrize('name', ALL)
@settings(max_examples=8)
@given(shape=shapes, log_scale=st.floats(-4, 4), seed=st.integers(0, 99))
def test_finite_in_finite_out(name, shape, log_scale, seed):
  g1, g2 = _grads(shape, seed, 10.0 ** log_scale)
  params = {'w': jnp.ones(shape) * 0.1}
  outs, state = _run(name, [{'w': g1}, {'w': g2}], params)
  for u in outs:
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
  chex.assert_tree_all_finite(outs)
  chex.assert_tree_all_finite(state)


@pytest.mark.parametrize('name', ALL)
def test_zero_and_rank_one_input(name):
  params = {'w': jnp.ones((3, 8))}
  r1 = jnp.outer(jnp.arange(1.0, 4.0), jnp.linspace(-1, 1, 8))
  z = jnp.zeros((3, 8))
  for pair in ([z, r1], [r1, z], [z, z]):
    outs, state = _run(name, [{'w': pair[0]}, {'w': pair[1]}], params)
    chex.assert_tree_all_finite(outs)
    chex.assert_tree_all_finite(state)


@pytest.mark.parametrize('name', sorted(INVARIANT))
@settings(max_examples=8)
@given(shape=shapes, log_c=st.floats(-1, 1), seed=st.integers(0, 99),
       data=st.data())
def test_scale_invariance(name, shape, log_c, seed, data):
  rtol, span = INVARIANT[name]
  if name in SQUARE_ONLY:
    shape = data.draw(st.sampled_from(SQUARE_SHAPES), label='square shape')
  log_base = data.draw(st.floats(-span / 2, span / 2), label='log_base')
  g1, g2 = _grads(shape, seed, 10.0 ** log_base)
  c = 10.0 ** (log_c * span / 2)
  params = {'w': jnp.ones(shape)}
  ref, _ = _run(name, [{'w': g1}, {'w': g2}], params)
  out, _ = _run(name, [{'w': c * g1}, {'w': c * g2}], params)
  for a, b in zip(out, ref):
    chex.assert_trees_all_close(
        a, b, rtol=rtol, atol=rtol * max(1e-6, float(jnp.abs(b['w']).max())))


@pytest.mark.parametrize('name', HOMOGENEOUS)
@settings(max_examples=10)
@given(shape=shapes, log_c=st.floats(-3, 3), seed=st.integers(0, 99))
def test_homogeneity(name, shape, log_c, seed):
  g1, g2 = _grads(shape, seed, 1.0)
  c = 10.0 ** log_c
  params = {'w': jnp.ones(shape)}
  ref, _ = _run(name, [{'w': g1}, {'w': g2}], params)
  out, _ = _run(name, [{'w': c * g1}, {'w': c * g2}], params)
  for a, b in zip(out, ref):
    chex.assert_trees_all_close(a, jax.tree.map(lambda x: c * x, b),
                                rtol=1e-5, atol=1e-6 * c)


def test_orthogonalize_output_is_orthogonal_for_any_scale():
  """A spot check that the invariance tests compare something non-trivial."""
  g = jax.random.normal(jax.random.PRNGKey(0), (6, 9)) * 1e3
  u, _ = ol.orthogonalize('svd').update({'w': g}, optax.EmptyState())
  np.testing.assert_allclose(u['w'] @ u['w'].T, np.eye(6), atol=1e-5)


def test_soap_rank_deficient_noise():
  """On a 1×7 gradient (R has rank ≤ 2) SOAP(c·G) equals SOAP(G).

  The null space of ``R`` carries only round-off; SOAP gives it a zero
  update (``null_threshold``) instead of Adam-normalising it to ±1.
  """
  g1, g2 = _grads((1, 7), 0, 1.0)
  params = {'w': jnp.ones((1, 7))}
  ref, _ = _run('soap', [{'w': g1}, {'w': g2}], params)
  out, _ = _run('soap', [{'w': 10 * g1}, {'w': 10 * g2}], params)
  for a, b in zip(out, ref):
    chex.assert_trees_all_close(a, b, rtol=2e-3, atol=2e-3)
