"""Per-head orthogonalisation: ``flax_matrix_dims(per_head=True)``, fused
QKV kernels (``split_sizes=``), ``MatrixDims(split=...)``.

The reference is NumPy: each head's slice (and each fused block) is
orthogonalised on its own by an SVD, ``U Vᵀ``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

import optax_lite as ol
import optimizer_zoo as zoo
from conftest import nnx_losses
from optax_lite.linalg import matrices

D, H, HD = 16, 4, 8
PER_HEAD = functools.partial(ol.flax_matrix_dims, per_head=True)


def _polar_np(a):
  u, _, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
  return u @ vt


def _attention_grads(seed=0):
  """Gradients shaped like nnx.MultiHeadAttention's kernels (and biases)."""
  r = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
  return {'query': {'kernel': n(D, H, HD), 'bias': n(H, HD)},
          'key': {'kernel': n(D, H, HD), 'bias': n(H, HD)},
          'value': {'kernel': n(D, H, HD), 'bias': n(H, HD)},
          'out': {'kernel': n(H, HD, D), 'bias': n(D)}}


def test_flax_attention_kernel_layouts_get_per_head_dims():
  mha = nnx.MultiHeadAttention(num_heads=H, in_features=D, qkv_features=H * HD,
                               decode=False, rngs=nnx.Rngs(0))
  state = nnx.state(mha, nnx.Param)
  # Flax's layouts: q/k/v [d, heads, head_dim], out [heads, head_dim, d].
  assert state['query']['kernel'].shape == (D, H, HD)
  assert state['out']['kernel'].shape == (H, HD, D)
  dims = ol.flax_matrix_dims(state, per_head=True)
  for name in ('query', 'key', 'value'):
    assert dims[name]['kernel'] == ol.MatrixDims(0, 2)
  assert dims['out']['kernel'] == ol.MatrixDims(1, 2)
  whole = ol.flax_matrix_dims(state)
  assert whole['query']['kernel'] == ol.MatrixDims(0, (1, 2))
  v = matrices.matrix_view((D, H, HD), dims['query']['kernel'])
  assert v.matrix_shape == (H, D, HD)
  v = matrices.matrix_view((H, HD, D), dims['out']['kernel'])
  assert v.matrix_shape == (H, HD, D)


def test_per_head_polar_factors_are_the_slices_polar_factors():
  g = _attention_grads()
  kernels = {k: {'kernel': v['kernel']} for k, v in g.items()}
  tx = ol.orthogonalize('svd', dims=PER_HEAD)
  u, _ = jax.jit(tx.update)(kernels, tx.init(kernels))
  for name in ('query', 'key', 'value'):
    for h in range(H):
      np.testing.assert_allclose(
          u[name]['kernel'][:, h, :],
          _polar_np(kernels[name]['kernel'][:, h, :]), atol=2e-5)
  for h in range(H):
    np.testing.assert_allclose(u['out']['kernel'][h],
                               _polar_np(kernels['out']['kernel'][h]),
                               atol=2e-5)
  # Not the whole-matrix polar factor.
  whole, _ = ol.orthogonalize('svd').update(kernels, None)
  assert float(jnp.max(jnp.abs(whole['query']['kernel'] -
                               u['query']['kernel']))) > 0.1


@pytest.mark.parametrize('sizes,per_head', [((32, 8, 8), True),
                                            ((16, 16, 16), False),
                                            ((16, 16, 16), True)])
def test_fused_qkv_blocks_and_heads(sizes, per_head):
  """A fused [d, q+k+v] kernel (grouped-query: 4 query heads, 1 key and 1
  value head of 8) cut per head, or into equal q/k/v blocks."""
  g = {'attn': {'qkv': {'kernel': jax.random.normal(
      jax.random.PRNGKey(1), (D, sum(sizes)))}}}
  dims = ol.flax_matrix_dims(g, per_head=per_head,
                             split_sizes={'qkv': sizes}, head_dim=HD)
  block = HD if per_head else sizes[0]
  assert dims['attn']['qkv']['kernel'] == ol.MatrixDims(0, 1, split=(1,
                                                                     block))
  u, _ = ol.orthogonalize('svd', dims=dims).update(g, None)
  x, out = g['attn']['qkv']['kernel'], u['attn']['qkv']['kernel']
  for start in range(0, sum(sizes), block):
    np.testing.assert_allclose(out[:, start:start + block],
                               _polar_np(x[:, start:start + block]),
                               atol=2e-5)


def test_split_view_round_trips_and_shifts_with_stacking():
  x = jnp.arange(2 * 6 * 12, dtype=jnp.float32).reshape(2, 6, 12)
  dims = ol.MatrixDims(1, 2, split=(2, 4))
  v = matrices.matrix_view(x.shape, dims)
  assert v.matrix_shape == (2 * 3, 6, 4)
  np.testing.assert_array_equal(v.from_matrix(v.to_matrix(x)), x)
  # The block of columns 4..7 of layer 1 is matrix 1·3 + 1.
  np.testing.assert_array_equal(v.to_matrix(x)[4], x[1, :, 4:8])
  # stacked= shifts the split axis with the others.
  g = {'blocks': {'qkv': {'kernel': jnp.ones((3, D, 3 * HD))}}}
  d = ol.flax_matrix_dims(g, stacked='blocks', per_head=True,
                          split_sizes={'qkv': (HD, HD, HD)}, head_dim=HD)
  assert d['blocks']['qkv']['kernel'] == ol.MatrixDims(1, 2, split=(2, HD))
  sv = matrices.matrix_view((3, D, 3 * HD), d['blocks']['qkv']['kernel'])
  assert sv.matrix_shape == (9, D, HD)


def _muon_step(params, grads, **kw):
  tx = ol.muon(0.1, weight_decay=0.01, method='svd', **kw)
  return jax.jit(tx.update)(grads, tx.init(params), params)[0]


def test_muon_per_head_end_to_end_matches_numpy():
  """First muon step: u = −η(0.2·sqrt(max(d, head_dim))·polar(G_h) + λW),
  per head (the Nesterov look-ahead (1+μ)G has the same polar factor)."""
  params = {'attn': _attention_grads(1), 'mlp': {'kernel': jnp.ones((D, 8))}}
  grads = jax.tree.map(lambda p: p * 0.5 + 1.0, _attention_grads(2))
  grads = {'attn': grads, 'mlp': {'kernel': jnp.ones((D, 8))}}
  u = _muon_step(params, grads, dims=PER_HEAD)
  scale = 0.2 * np.sqrt(max(D, HD))
  for h in range(H):
    want = -0.1 * (scale * _polar_np(grads['attn']['key']['kernel'][:, h])
                   + 0.01 * np.asarray(params['attn']['key']['kernel'][:, h]))
    np.testing.assert_allclose(u['attn']['key']['kernel'][:, h], want,
                               atol=2e-6)
    want = -0.1 * (scale * _polar_np(grads['attn']['out']['kernel'][h])
                   + 0.01 * np.asarray(params['attn']['out']['kernel'][h]))
    np.testing.assert_allclose(u['attn']['out']['kernel'][h], want,
                               atol=2e-6)


def test_muon_per_head_bfloat16_inject_and_distribute():
  params = {'attn': _attention_grads(3)}
  grads = {'attn': _attention_grads(4)}
  ref = _muon_step(params, grads, dims=PER_HEAD)
  # bfloat16 leaves: same update up to bfloat16 rounding.
  p16, g16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
              for t in (params, grads))
  u16 = _muon_step(p16, g16, dims=PER_HEAD)
  for a, b in zip(jax.tree.leaves(u16), jax.tree.leaves(ref)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2)
  # inject_hyperparams: dims is structural (a callable would be taken for a
  # schedule), so it is a static argument.
  inj = optax.inject_hyperparams(ol.muon, static_args=('dims', 'method'))(
      learning_rate=0.1, weight_decay=0.01, method='svd', dims=PER_HEAD)
  u, _ = jax.jit(inj.update)(grads, inj.init(params), params)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('x',))
  ud = _muon_step(params, grads, dims=PER_HEAD, distribute=mesh)
  for a, b, c in zip(jax.tree.leaves(u), jax.tree.leaves(ud),
                     jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, c, atol=1e-6)
    np.testing.assert_allclose(b, c, atol=1e-6)


def test_nnx_optimizer_trains_with_per_head_muon():
  mha = nnx.MultiHeadAttention(num_heads=H, in_features=D, qkv_features=H * HD,
                               decode=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, D))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 5, D))
  losses = nnx_losses(mha, ol.muon(0.02, dims=PER_HEAD),
                      lambda m: jnp.mean((m(x) - y) ** 2), steps=8)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize('kwargs,match', [
    (dict(split_sizes={'qkv': (16, 16)}), 'split_sizes'),       # sum 32 ≠ 48
    (dict(split_sizes={'qkv': (32, 8, 8)}), 'split_sizes'),     # unequal
    (dict(split_sizes={'qkv': (32, 8, 8)}, per_head=True), 'head_dim'),
    (dict(split_sizes={'qkv': (32, 8, 8)}, per_head=True, head_dim=16),
     'head_dim'),
    (dict(split_sizes={'qkv': (48,)}), 'split_sizes'),
    (dict(split_sizes={'(': (24, 24)}), 'split_sizes'),
    (dict(split_sizes=[('qkv', (24, 24))]), 'split_sizes'),
    (dict(head_dim=0), 'head_dim'),
    (dict(per_head='yes'), 'per_head'),
])
def test_bad_per_head_arguments(kwargs, match):
  g = {'qkv': {'kernel': jnp.ones((D, 48))}}
  with pytest.raises((ValueError, TypeError), match=match):
    ol.flax_matrix_dims(g, **kwargs)


@pytest.mark.parametrize('dims,match', [
    (ol.MatrixDims(0, 1, split=(1, 5)), 'does not divide'),
    (ol.MatrixDims(0, 2, split=(1, 2)), 'reduction or output'),
    (ol.MatrixDims(0, 1, split=4), 'split'),
])
def test_bad_split_dims(dims, match):
  with pytest.raises(ValueError, match=match):
    matrices.matrix_view((D, 4, 12), dims)


@pytest.mark.parametrize('name', ['rmnp', 'muon_lite', 'soap', 'fismo'])
def test_matrix_family_accepts_per_head_dims(name):
  """The views carry the split/batch axes to every matrix transform."""
  params = {'attn': _attention_grads(5)}
  grads = {'attn': _attention_grads(6)}
  fused = {'qkv': {'kernel': jax.random.normal(jax.random.PRNGKey(2),
                                               (D, 3 * H * HD))}}
  params.update(fused)
  grads.update(jax.tree.map(lambda x: x + 1.0, fused))
  dims = functools.partial(ol.flax_matrix_dims, per_head=True,
                           split_sizes={'qkv': (H * HD,) * 3}, head_dim=HD)
  tx = zoo.make(name, dims=dims)
  step = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(3):
    u, state = step(grads, state, params)
  for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert a.shape == p.shape and np.all(np.isfinite(a))


def test_tree_map_params_through_per_head_muon_and_qk_clip():
  params = {'attn': _attention_grads(7)}
  tx = optax.chain(ol.muon(0.1, dims=PER_HEAD), ol.qk_clip(10.0))
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: p + 1.0, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  moved = [float(jnp.max(a - b)) for a, b in
           zip(jax.tree.leaves(mapped), jax.tree.leaves(state))
           if a.dtype != jnp.int32]
  assert moved and all(m == 1.0 for m in moved)
