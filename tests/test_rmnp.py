"""Tests of row_normalize, rmnp and the RMNP diagonal-dominance diagnostics."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import optax_lite as ol
from optax_lite.linalg import diagnostics
from optax_lite.transforms.row_normalize import row_normalize
from conftest import assert_tree_finite, assert_trees_close, nnx_losses


def _apply(tx, tree):
  out, _ = tx.update(tree, tx.init(tree))
  return out


# ----------------------------------------------------------- row_normalize


# Every example is a new shape, so a new compile: 12 examples, not 25.
@settings(max_examples=12)
@given(shape=st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, max_side=9),
                       hnp.array_shapes(min_dims=3, max_dims=4, max_side=5)),
       seed=st.integers(0, 2**16), axis=st.sampled_from(['input', 'output']))
def test_every_row_has_unit_norm(shape, seed, axis):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  out = np.asarray(_apply(row_normalize(axis=axis), {'w': jnp.asarray(x)})['w'])
  # Default dims: all leading axes are fan-in, the last one is fan-out.
  if axis == 'input':  # one unit vector per output unit, over the fan-in axes
    norms = np.sqrt(np.sum(out.reshape(-1, shape[-1]) ** 2, axis=0))
    ref = x.reshape(-1, shape[-1]) / np.linalg.norm(
        x.reshape(-1, shape[-1]), axis=0, keepdims=True)
  else:  # one unit vector per fan-in index, over the output axis
    norms = np.sqrt(np.sum(out ** 2, axis=-1)).ravel()
    ref = x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)


def test_flax_nnx_linear_kernel_is_normalised_per_output_unit():
  layer = nnx.Linear(7, 3, rngs=nnx.Rngs(0))
  kernel = layer.kernel[...]
  assert kernel.shape == (7, 3)  # Flax [in, out]
  out = np.asarray(_apply(row_normalize(), {'k': kernel})['k'])
  # Every output unit's fan-in vector (a column of the Flax kernel) is unit.
  np.testing.assert_allclose(np.linalg.norm(out, axis=0), 1.0, rtol=1e-6)
  assert not np.allclose(np.linalg.norm(out, axis=1), 1.0)
  # Same as the authors' F.normalize(W, dim=-1) on the PyTorch (out, in) W.
  w_torch = np.asarray(kernel).T
  ref = w_torch / np.maximum(np.linalg.norm(w_torch, axis=-1, keepdims=True),
                             1e-12)
  np.testing.assert_allclose(out, ref.T, rtol=1e-6)


def test_zero_rows_stay_zero_and_finite():
  x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  x[:, 1] = 0.0  # output unit 1 has a zero fan-in vector
  out = np.asarray(_apply(row_normalize(), {'w': jnp.asarray(x)})['w'])
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[:, 1], 0.0)
  np.testing.assert_allclose(np.linalg.norm(out[:, [0, 2, 3]], axis=0), 1.0,
                             rtol=1e-6)
  zero = _apply(row_normalize(), {'w': jnp.zeros((3, 5))})['w']
  np.testing.assert_array_equal(zero, 0.0)


@given(seed=st.integers(0, 2**16))
def test_invariant_to_positive_scaling(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(5, 8)).astype(np.float32)
  s = rng.uniform(1e-3, 1e3, size=(1, 8)).astype(np.float32)  # per output
  tx = row_normalize()
  a = _apply(tx, {'w': jnp.asarray(x)})
  b = _apply(tx, {'w': jnp.asarray(x * s)})
  c = _apply(tx, {'w': jnp.asarray(37.5 * x)})
  assert_trees_close(a, b, rtol=1e-5, atol=1e-6)
  assert_trees_close(a, c, rtol=1e-5, atol=1e-6)


def test_equals_polar_factor_when_rows_are_orthogonal():
  # RMNP = Muon when V Vᵀ is diagonal (paper orientation: rows = outputs).
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(9, 4)))
  v = (q * np.array([3.0, 0.5, 2.0, 7.0])).T  # (out=4, in=9), orthogonal rows
  kernel = jnp.asarray(v.T, jnp.float32)  # Flax (in, out)
  out = _apply(row_normalize(), {'k': kernel})['k']
  np.testing.assert_allclose(out, ol.polar_factor(kernel, 'svd'), atol=1e-6)


def test_dims_none_passes_through_and_bf16(maybe_jit):
  x = {'a': jnp.ones((4, 3), jnp.bfloat16), 'b': jnp.ones((4, 3))}
  tx = row_normalize(dims={'a': ol.MatrixDims(0, 1), 'b': None})
  out, _ = maybe_jit(tx.update)(x, tx.init(x))
  assert out['a'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out['a'], np.float32), 0.5, rtol=1e-2)
  np.testing.assert_array_equal(out['b'], 1.0)


@pytest.mark.parametrize('kwargs, name', [
    (dict(axis='rows'), 'axis'), (dict(eps=0.0), 'eps'),
    (dict(eps=-1.0), 'eps')])
def test_row_normalize_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    row_normalize(**kwargs)


# --------------------------------------------------------------- diagnostics


def test_diagonal_dominance_on_hand_made_matrix():
  v = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
  # Gram = [[1,0,1],[0,4,2],[1,2,2]] -> r = 1/(1/2), 4/(2/2), 2/(3/2).
  r = diagnostics.dominance_ratios(v)
  np.testing.assert_allclose(r, [2.0, 4.0, 4.0 / 3.0], rtol=1e-6)
  d = ol.diagonal_dominance(v)
  np.testing.assert_allclose([d.r_avg, d.r_min, d.r_max],
                             [(2 + 4 + 4 / 3) / 3, 4 / 3, 4.0], rtol=1e-6)
  # Identical rows: every ratio is exactly 1. Orthogonal rows: huge.
  np.testing.assert_allclose(diagnostics.dominance_ratios(jnp.ones((4, 3))),
                             1.0, rtol=1e-6)
  assert float(ol.diagonal_dominance(jnp.eye(3)).r_min) > 1e20
  # Leaf form: a Flax (in, out) kernel is transposed so rows = output units.
  leaf = ol.leaf_diagonal_dominance(v.T)
  np.testing.assert_allclose(leaf.r_max, 4.0, rtol=1e-6)
  batched = ol.leaf_diagonal_dominance(jnp.stack([v.T, v.T]),
                                       ol.MatrixDims(1, 2))
  assert batched.r_avg.shape == (2,)
  with pytest.raises(ValueError, match='2 rows'):
    diagnostics.dominance_ratios(jnp.ones((1, 5)))


def test_condition_number():
  np.testing.assert_allclose(ol.condition_number(jnp.diag(jnp.array(
      [1.0, 2.0, 4.0]))), 4.0, rtol=1e-6)
  q = ol.polar_factor(jnp.asarray(np.random.default_rng(0).normal(
      size=(5, 8)), jnp.float32), 'svd')
  np.testing.assert_allclose(ol.condition_number(q), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------- rmnp


def _reference_code(grads, lr, beta, wd, w0):
  """The authors' torch RMNP step on the PyTorch (out, in) weight, in numpy."""
  w, buf, out = w0.copy(), np.zeros_like(w0), []
  for g in grads:
    buf = beta * buf + g
    u = g + beta * buf
    u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    u = u * max(1.0, w.shape[0] / w.shape[1]) ** 0.5
    w = w * (1 - lr * wd) - lr * u
    out.append(w.copy())
  return out


@pytest.mark.parametrize('shape_in_out', [(6, 10), (10, 6)])
def test_rmnp_matches_authors_code_on_flax_layout(shape_in_out):
  rng = np.random.default_rng(0)
  fan_in, fan_out = shape_in_out
  w0 = rng.normal(size=(fan_in, fan_out)).astype(np.float32)
  b0 = rng.normal(size=(fan_out,)).astype(np.float32)
  grads = [(rng.normal(size=w0.shape), rng.normal(size=b0.shape))
           for _ in range(4)]
  lr, wd = 0.05, 0.1
  tx = ol.rmnp(lr, weight_decay=wd, adam_learning_rate=0.01)
  params = {'layer': {'kernel': jnp.asarray(w0), 'bias': jnp.asarray(b0)}}
  state = tx.init(params)
  adam = optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  bias, adam_state = jnp.asarray(b0), adam.init(jnp.asarray(b0))
  ref = _reference_code([g.T for g, _ in grads], lr, 0.95, wd, w0.T)
  for (gk, gb), wref in zip(grads, ref):
    g = {'layer': {'kernel': jnp.asarray(gk, jnp.float32),
                   'bias': jnp.asarray(gb, jnp.float32)}}
    upd, state = tx.update(g, state, params)
    params = optax.apply_updates(params, upd)
    bu, adam_state = adam.update(jnp.asarray(gb, jnp.float32), adam_state,
                                 bias)
    bias = optax.apply_updates(bias, bu)
    np.testing.assert_allclose(params['layer']['kernel'], wref.T, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(params['layer']['bias'], bias, rtol=1e-6)


def test_rmnp_adam_weight_decay_none_inherits_weight_decay():
  """``adam_weight_decay=None`` (default) uses ``weight_decay``, as muon."""
  params = {'layer': {'kernel': jnp.ones((6, 4)), 'bias': jnp.ones((4,))}}
  g = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)

  def bias_update(**kw):
    tx = ol.rmnp(0.05, **kw)
    return tx.update(g, tx.init(params), params)[0]['layer']['bias']

  for wd in (0.0, 0.3):
    np.testing.assert_allclose(bias_update(weight_decay=wd),
                               bias_update(weight_decay=wd,
                                           adam_weight_decay=wd))
  assert not np.allclose(bias_update(weight_decay=0.0),
                         bias_update(weight_decay=0.0, adam_weight_decay=0.3))


def test_rmnp_paper_variant_is_algorithm_2_and_momentum_forms_agree():
  rng = np.random.default_rng(3)
  grads = [{'k': jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)}
           for _ in range(5)]
  params = {'k': jnp.zeros((5, 7))}

  def run(tx):
    st, outs = tx.init(params), []
    for g in grads:
      u, st = tx.update(g, st, params)
      outs.append(u)
    return outs

  paper = run(ol.rmnp(1.0, variant='paper', weight_decay=0.0,
                      scaling='none', labels=lambda p: {'k': 'matrix'}))
  v = np.zeros((7, 5))  # paper layout (out, in)
  for g, u in zip(grads, paper):
    v = 0.95 * v + 0.05 * np.asarray(g['k']).T
    d = v / np.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_allclose(u['k'], -d.T, rtol=1e-5, atol=1e-6)
  # EMA + Nesterov gives the same direction as heavy-ball + Nesterov (code).
  ema = run(ol.rmnp(1.0, ema=True, weight_decay=0.0))
  code = run(ol.rmnp(1.0, weight_decay=0.0))
  for a, b in zip(ema, code):
    assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


def test_rmnp_zero_gradient_and_bf16_jit(maybe_jit):
  params = {'dense': {'kernel': jnp.ones((8, 16), jnp.bfloat16),
                      'bias': jnp.zeros((16,), jnp.bfloat16)}}
  tx = ol.rmnp(0.01, weight_decay=0.0, mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  upd, state = maybe_jit(tx.update)(jax.tree.map(jnp.zeros_like, params),
                                    state, params)
  assert_tree_finite(upd)
  np.testing.assert_array_equal(np.asarray(upd['dense']['kernel'],
                                           np.float32), 0.0)
  g = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(
      size=p.shape), jnp.bfloat16), params)
  upd, state = maybe_jit(tx.update)(g, state, params)
  assert upd['dense']['kernel'].dtype == jnp.bfloat16
  assert_tree_finite(upd)
  # Unit columns times the width factor sqrt(16/8), times lr.
  norms = np.linalg.norm(np.asarray(upd['dense']['kernel'], np.float32),
                         axis=0)
  np.testing.assert_allclose(norms, 0.01 * np.sqrt(2.0), rtol=2e-2)


def test_rmnp_trains_nnx_model():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 16, rngs=rngs)
      self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
  y = jnp.sin(x.sum(-1, keepdims=True))
  losses = nnx_losses(Net(nnx.Rngs(0)),
                      ol.rmnp(0.02, adam_learning_rate=0.01),
                      lambda m: jnp.mean((m(x) - y) ** 2), steps=60)
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize('kwargs, name', [
    (dict(momentum=1.0), 'momentum'), (dict(momentum=-0.1), 'momentum'),
    (dict(variant='torch'), 'variant'), (dict(axis='rows'), 'axis'),
    (dict(eps=0.0), 'eps'), (dict(scaling='max'), 'scaling'),
    (dict(weight_decay=-1.0), 'weight_decay'),
    (dict(adam_b2=1.0), 'adam_b2')])
def test_rmnp_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ol.rmnp(0.01, **kwargs)
  with pytest.raises(ValueError, match='learning_rate'):
    ol.rmnp(-1.0)
