"""Flax attention: biases go to AdamW, kernels are (d, heads·head_dim)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import optax_lite as ol
from optimizer_zoo import NAMED, make

D, HEADS, HEAD_DIM = 8, 2, 4


def _flat(tree):
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, ol.MatrixDims))
  return {ol.labels.path_str(p): x for p, x in leaves}


def _nnx_attention():
  return nnx.MultiHeadAttention(num_heads=HEADS, in_features=D,
                                qkv_features=HEADS * HEAD_DIM, decode=False,
                                rngs=nnx.Rngs(0))


def _linen_attention_params():
  attn = nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                         qkv_features=HEADS * HEAD_DIM)
  x = jnp.ones((1, 3, D))
  return attn, attn.init(jax.random.PRNGKey(0), x, x)


def _svd_polar(m):
  u, _, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
  return u @ vt


def _assert_polar_of_view(update, grad, rows, cols):
  """``update`` ∝ −polar(grad seen as a (rows, cols) matrix)."""
  u = -np.asarray(update, np.float64).reshape(rows, cols)
  want = _svd_polar(np.asarray(grad).reshape(rows, cols))
  u = u / np.linalg.norm(u)
  want = want / np.linalg.norm(want)
  np.testing.assert_allclose(u, want, atol=1e-5)


def test_attention_biases_are_not_matrices_nnx():
  labels = _flat(ol.label_params(nnx.state(_nnx_attention(), nnx.Param)))
  for name in ('query', 'key', 'value'):
    assert labels[f'{name}/bias'] == 'other'  # shape (heads, head_dim)
    assert labels[f'{name}/kernel'] == 'matrix'
  assert labels['out/bias'] == 'other'
  assert labels['out/kernel'] == 'matrix'


def test_attention_biases_are_not_matrices_linen():
  _, params = _linen_attention_params()
  labels = _flat(ol.label_params(params))
  for name in ('query', 'key', 'value'):
    assert labels[f'params/{name}/bias'] == 'other'
    assert labels[f'params/{name}/kernel'] == 'matrix'
  # A 2-D leaf named like a bias is a bias, in a plain dict too.
  plain = {'w': jnp.ones((3, 4)), 'q_bias': jnp.ones((3, 4))}
  assert ol.label_params(plain) == {'w': 'matrix', 'q_bias': 'other'}


def test_muon_default_sees_nnx_query_kernel_as_d_by_heads_head_dim():
  model = _nnx_attention()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, D))

  def loss(m):
    return jnp.sum(jnp.tanh(m(x)) ** 2)

  grads = nnx.grad(loss)(model)
  before = nnx.state(model, nnx.Param)
  q0 = np.asarray(before['query']['kernel'].get_value())
  o0 = np.asarray(before['out']['kernel'].get_value())
  opt = nnx.Optimizer(model, ol.muon(1.0, method='svd', weight_decay=0.0),
                      wrt=nnx.Param)
  opt.update(model, grads)
  after = nnx.state(model, nnx.Param)
  dq = np.asarray(after['query']['kernel'].get_value()) - q0
  do = np.asarray(after['out']['kernel'].get_value()) - o0
  assert dq.shape == (D, HEADS, HEAD_DIM)
  _assert_polar_of_view(dq, grads['query']['kernel'], D, HEADS * HEAD_DIM)
  _assert_polar_of_view(do, grads['out']['kernel'], HEADS * HEAD_DIM, D)
  # The (d·heads, head_dim) view, the plain default rule, differs.
  plain = _svd_polar(np.asarray(grads['query']['kernel']).reshape(
      D * HEADS, HEAD_DIM)).reshape(D, HEADS * HEAD_DIM)
  assert not np.allclose(-dq.reshape(D, -1) / np.linalg.norm(dq),
                         plain / np.linalg.norm(plain), atol=1e-3)


@pytest.mark.parametrize('name', ['soap', 'rmnp'])
def test_named_optimizers_default_to_the_flax_view_linen(name):
  """Linen attention: no dims= gives the (d, heads·head_dim) query view."""
  attn, params = _linen_attention_params()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, D))
  grads = jax.grad(lambda p: jnp.sum(attn.apply(p, x, x) ** 2))(params)
  outs = []
  for dims in (None, ol.MatrixDims(0, (1, 2)), ol.MatrixDims((0, 1), 2)):
    tx = getattr(ol, name)(0.1, dims=dims)
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(2):  # SOAP's first step is Adam in the identity basis
      upd, state = step(grads, state, params)
    outs.append(upd['params']['query']['kernel'])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-7)
  # ... and not the plain rule's (d·heads, head_dim).
  assert not np.allclose(outs[0], outs[2], rtol=1e-3, atol=1e-5)


def test_flax_matrix_dims_accepts_nnx_state():
  model = _nnx_attention()
  state = nnx.state(model, nnx.Param)
  dims = ol.flax_matrix_dims(state)
  flat = _flat(dims)
  assert flat['query/kernel'] == ol.MatrixDims(0, (1, 2))
  assert flat['out/kernel'] == ol.MatrixDims((0, 1), 2)
  assert flat['query/bias'] is None or isinstance(flat['query/bias'],
                                                  ol.MatrixDims)
  x = jnp.ones((1, 3, D))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  # As dims= (the tree, built from the State), and labels= from the State.
  for kwargs in ({'dims': dims},
                 {'labels': ol.label_params(state)}):
    m = _nnx_attention()
    opt = nnx.Optimizer(m, ol.muon(0.1, **kwargs), wrt=nnx.Param)
    opt.update(m, grads)
    new = nnx.state(m, nnx.Param)['query']['kernel'].get_value()
    assert np.all(np.isfinite(new))
    assert not np.allclose(new, state['query']['kernel'].get_value())


def test_flax_matrix_dims_of_a_module_says_what_to_pass():
  with pytest.raises(TypeError, match=r'nnx\.state\(model, nnx\.Param\)'):
    ol.flax_matrix_dims(_nnx_attention())


@pytest.mark.parametrize('name', NAMED)
def test_complex_leaf_error_says_what_to_do(name):
  """Every named optimizer refuses a complex matrix leaf with the hint."""
  params = {'w': jnp.ones((4, 3), jnp.complex64), 'v': jnp.ones((4, 3))}
  tx = make(name)
  with pytest.raises(TypeError, match='(?i)complex') as err:
    tx.update(params, tx.init(params), params)
  msg = str(err.value)
  assert 'integer' not in msg.lower()
  assert 'real' in msg and 'labels=' in msg


def test_complex_leaf_routed_to_adamw_as_the_hint_says():
  params = {'w': jnp.ones((4, 3), jnp.complex64), 'v': jnp.ones((4, 3))}
  tx = ol.muon(0.1, labels=lambda p: ol.label_params(
      p, overrides={'^w$': 'other'}))
  upd, _ = tx.update(params, tx.init(params), params)
  assert upd['w'].dtype == jnp.complex64
  assert np.all(np.isfinite(np.asarray(upd['w']).view(np.float32)))
  assert np.any(np.asarray(upd['w']) != 0)


def _layer_trees(n_layers=3):
  """A scanned block's parameters, stacked and as separate layers."""
  ks = jax.random.split(jax.random.PRNGKey(7), 4)
  stacked = {
      'blocks': {'attn': {'q': {'kernel': jax.random.normal(
                     ks[0], (n_layers, D, HEADS, HEAD_DIM))}},
                 'mlp': {'up': {'kernel': jax.random.normal(
                     ks[1], (n_layers, D, 12))}},
                 'norm': {'scale': 1.0 + 0.1 * jax.random.normal(
                     ks[2], (n_layers, D))}},
      'embed': {'embedding': jax.random.normal(ks[3], (16, D))}}
  return stacked, _unstack(stacked, n_layers)


def _unstack(stacked, n_layers):
  """``{'layer<i>': block i, 'embed': …}`` from a stacked tree."""
  layers = {f'layer{i}': jax.tree.map(lambda x, i=i: x[i], stacked['blocks'])
            for i in range(n_layers)}
  return dict(layers, embed=stacked['embed'])


def test_stacked_leaves_label_and_dims():
  stacked, _ = _layer_trees()
  labels = _flat(ol.label_params(stacked, stacked='^blocks/'))
  assert labels['blocks/norm/scale'] == 'norm'  # (layers, d): a gain
  assert labels['blocks/mlp/up/kernel'] == 'matrix'
  assert _flat(ol.label_params(stacked))['blocks/norm/scale'] == 'matrix'
  dims = _flat(ol.flax_matrix_dims(stacked, stacked='^blocks/'))
  assert dims['blocks/attn/q/kernel'] == ol.MatrixDims(1, (2, 3))
  assert dims['blocks/mlp/up/kernel'] == ol.MatrixDims((1,), 2)
  assert dims['blocks/norm/scale'] is None
  assert dims['embed/embedding'] == ol.MatrixDims((0,), 1)
  with pytest.raises(ValueError, match='stacked'):
    ol.label_params(stacked, stacked='(')
  with pytest.raises(TypeError, match='stacked'):
    ol.flax_matrix_dims(stacked, stacked=1)


# The Kronecker optimizers' tolerances below are the default compiler's
# round-off on the guard's ramp / near the eigenvalue floor: another
# compiler's fusion moves those coordinates by more (3.9e-5 of a 9e-6
# bound, SOAP, OPTAX_LITE_FAST_COMPILE=1).
_ROUND_OFF_TUNED = ('soap', 'soap_lite', 'shampoo')


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.default_compiler)
    if n in _ROUND_OFF_TUNED else n for n in NAMED])
def test_stacked_layers_step_like_separate_layers(name):
  """A ``(layers, …)`` leaf with ``stacked=`` labels and dims takes, over
  four steps (SOAP/Shampoo refresh their bases every 2), exactly the steps
  its layers take as separate leaves. (The LITE optimizers' AdamW-LITE keeps
  one sharp-mask threshold per leaf, so their stacked norm gains share it:
  for them only the matrices are compared.)"""
  stacked, layers = _layer_trees()
  n = len(stacked['blocks']['norm']['scale'])
  rx = '^blocks/'
  tx_s = make(name, labels=lambda p: ol.label_params(p, stacked=rx),
              dims=lambda p: ol.flax_matrix_dims(p, stacked=rx))
  tx_l = make(name, dims=ol.flax_matrix_dims)
  key = jax.random.PRNGKey(3)
  ps, pl = stacked, layers
  ss, sl = tx_s.init(ps), tx_l.init(pl)
  for step in range(4):
    k = jax.random.fold_in(key, step)
    gs = jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), ps)
    gl = _unstack(gs, n)
    us, ss = jax.jit(tx_s.update)(gs, ss, ps)
    ul, sl = jax.jit(tx_l.update)(gl, sl, pl)
    want = jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[ul[f'layer{i}'] for i in range(n)])
    got = us['blocks']
    if name.endswith('_lite'):
      got, want = ({k: v for k, v in t.items() if k != 'norm'}
                   for t in (got, want))
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
    want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want)])
    # Shampoo: a batched and a per-leaf eigh differ by float32 round-off
    # (~ε·λ_max in every eigenvalue), which the inverse fourth root turns
    # into up to ~1e-3 of the largest entry for eigenvalues just above the
    # round-off floor (16ε·λ_max); everything else agrees entry by entry.
    # SOAP / SOAP-LITE: a coordinate near the round-off bound gets a weight
    # on the guard's ramp, whose slope turns the batched-vs-per-leaf
    # amplitude round-off (~ε‖G‖) into ~ε/(511τ) ≈ 1.2e-4 of that
    # coordinate's step (measured: 6.7e-6 absolute on 23 of 504 entries;
    # on an AMD EPYC, 4.1e-6 on 13 for SOAP and 1.0e-5 on 33 for SOAP-LITE,
    # whose steps are twice as large). Null columns' amplitudes, whose
    # basis is arbitrary, moved it by 4.7e-5 before the guard took them
    # as one cluster (kron_roundoff._neighbour_leak).
    atol = {'shampoo': 1e-3, 'soap': 3e-4, 'soap_lite': 3e-4}.get(
        name, 0.0) * np.max(np.abs(want)) or 2e-6
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=atol,
                               err_msg=f'step {step}')
    ps = jax.tree.map(jnp.add, ps, us)
    pl = jax.tree.map(jnp.add, pl, ul)
