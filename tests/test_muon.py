"""muon, momentum, scale_by_shape and the labelling helper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import optax_lite as ol
from conftest import assert_trees_close, nnx_losses


def mlp_params(key, bias=True):
  k1, k2, k3 = jax.random.split(key, 3)
  p = {'l1': {'kernel': jax.random.normal(k1, (8, 16)) * 0.3},
       'l2': {'kernel': jax.random.normal(k2, (16, 12)) * 0.3},
       'l3': {'kernel': jax.random.normal(k3, (12, 4)) * 0.3}}
  if bias:
    for name, n in (('l1', 16), ('l2', 12), ('l3', 4)):
      p[name]['bias'] = jnp.zeros(n)
  return p


def mlp_loss(p, x, y):
  h = x
  for i, name in enumerate(('l1', 'l2', 'l3')):
    h = h @ p[name]['kernel'] + p[name].get('bias', 0.0)
    if i < 2:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def run(tx, params, steps=8, seed=0):
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (32, 8))
  y = jax.random.normal(jax.random.PRNGKey(seed + 1), (32, 4))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(mlp_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize('bias', [False, True])
def test_matches_optax_contrib_muon(bias):
  """A check against a real peer: same settings, same trajectory."""
  params = mlp_params(jax.random.PRNGKey(0), bias)
  lr = 0.02
  ref = optax.contrib.muon(lr, beta=0.95, nesterov=True)
  ours = ol.muon(lr, momentum=0.95, ema=True, bias_correction=True,
                 method='jordan', steps=5, scaling='width', weight_decay=0.0,
                 adam_b1=0.9, adam_b2=0.999, adam_weight_decay=0.0,
                 adam_nesterov=True, labels=lambda p: jax.tree.map(
                     lambda x: 'matrix' if x.ndim == 2 else 'other', p))
  p_ref, _ = run(ref, params)
  p_ours, _ = run(ours, params)
  assert_trees_close(p_ours, p_ref, rtol=0, atol=1e-5)


def test_matches_optax_contrib_muon_with_consistent_rms_and_decay():
  params = mlp_params(jax.random.PRNGKey(1), bias=False)
  ref = optax.contrib.muon(0.01, consistent_rms=0.2, weight_decay=0.1)
  ours = ol.muon(0.01, ema=True, bias_correction=True, method='jordan',
                 scaling='rms', rms=0.2, weight_decay=0.1)
  assert_trees_close(run(ours, params)[0], run(ref, params)[0], atol=1e-5)


def test_width_scaling_factor():
  g = {'w': jnp.ones((4, 16))}  # fan_in 4, fan_out 16 -> sqrt(4) = 2
  u, _ = ol.scale_by_shape('width').update(g, None)
  np.testing.assert_allclose(u['w'], 2.0)
  u, _ = ol.scale_by_shape('rms', 0.2).update(g, None)
  np.testing.assert_allclose(u['w'], 0.2 * 4.0)


def test_muon_update_rms_matches_target():
  params = {'w': jnp.zeros((64, 32))}
  tx = ol.muon(1.0, weight_decay=0.0)
  g = {'w': jax.random.normal(jax.random.PRNGKey(0), (64, 32))}
  u, _ = tx.update(g, tx.init(params), params)
  rms = float(jnp.sqrt(jnp.mean(u['w'] ** 2)))
  assert abs(rms - 0.2) < 0.02, rms


def test_momentum_forms():
  g1, g2 = jnp.array([1.0]), jnp.array([2.0])
  hb = ol.momentum(0.5, nesterov=False)
  s = hb.init(g1)
  _, s = hb.update(g1, s)
  u, s = hb.update(g2, s)
  np.testing.assert_allclose(u, 0.5 * 1 + 2)  # m2 = 0.5 m1 + g2
  ema = ol.momentum(0.5, nesterov=False, ema=True)
  s = ema.init(g1)
  _, s = ema.update(g1, s)
  u, _ = ema.update(g2, s)
  np.testing.assert_allclose(u, 0.5 * 0.5 + 0.5 * 2)
  nest = ol.momentum(0.5, nesterov_coeff=2.0)
  s = nest.init(g1)
  u, _ = nest.update(g1, s)
  np.testing.assert_allclose(u, 1 + 2 * 1)  # m1 + beta g1
  nes = ol.momentum(0.5, nesterov=True)
  u, _ = nes.update(g1, nes.init(g1))
  np.testing.assert_allclose(u, 0.5 * 1 + 1)


@pytest.mark.parametrize('mu_dtype', [None, jnp.bfloat16, jnp.float32])
def test_state_shapes_and_dtypes(mu_dtype):
  params = mlp_params(jax.random.PRNGKey(0))
  params['l1']['kernel'] = params['l1']['kernel'].astype(jnp.bfloat16)
  tx = ol.muon(0.01, mu_dtype=mu_dtype)
  state = tx.init(params)
  inner = state.inner_states['matrix'].inner_state
  mu = inner[0].mu
  assert mu['l2']['kernel'].shape == (16, 12)
  want = mu_dtype or jnp.float32
  assert mu['l2']['kernel'].dtype == want
  assert mu['l1']['kernel'].dtype == (mu_dtype or jnp.bfloat16)
  assert isinstance(mu['l1']['bias'], optax.MaskedNode)
  # One jitted step keeps structure, shapes and dtypes.
  g = jax.tree.map(jnp.ones_like, params)
  u, new_state = jax.jit(tx.update)(g, state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert u['l1']['kernel'].dtype == jnp.bfloat16


def test_learning_rate_schedule():
  """Each step's update is the schedule's value at that step times the update
  of ``learning_rate=1`` (matrix and AdamW leaves alike, decay included)."""
  params = mlp_params(jax.random.PRNGKey(0))
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.02, 3, 10)
  scheduled, unit = ol.muon(sched), ol.muon(1.0)
  s, t = scheduled.init(params), unit.init(params)
  scheduled_update = jax.jit(scheduled.update)
  unit_update = jax.jit(unit.update)
  x = jax.random.normal(jax.random.PRNGKey(2), (32, 8))
  y = jax.random.normal(jax.random.PRNGKey(3), (32, 4))
  g = jax.grad(mlp_loss)(params, x, y)
  for k in range(5):
    u, s = scheduled_update(g, s, params)
    v, t = unit_update(g, t, params)
    lr = float(sched(k))
    if k == 0:  # the warm-up starts at 0: no step at all
      assert lr == 0.0
      assert all(not np.any(np.asarray(a)) for a in jax.tree.leaves(u))
    else:
      scaled = jax.tree.map(lambda a, lr=lr: lr * a, v)
      assert_trees_close(u, scaled, rtol=1e-5, atol=1e-9)
      assert np.any(np.asarray(u['l2']['kernel']))


@pytest.mark.parametrize('kwargs,name', [
    (dict(learning_rate=-1.0), 'learning_rate'),
    (dict(learning_rate=0.1, momentum=1.0), 'momentum'),
    (dict(learning_rate=0.1, momentum=-0.1), 'momentum'),
    (dict(learning_rate=0.1, steps=0), 'steps'),
    (dict(learning_rate=0.1, method='qr'), 'method'),
    (dict(learning_rate=0.1, scaling='big'), 'scaling'),
    (dict(learning_rate=0.1, weight_decay=-1.0), 'weight_decay'),
    (dict(learning_rate=0.1, adam_b2=1.5), 'adam_b2'),
])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises((ValueError, TypeError), match=name):
    ol.muon(**kwargs)


def test_integer_leaf_rejected():
  tx = ol.muon(0.1)
  with pytest.raises(TypeError, match='floating'):
    tx.init({'w': jnp.ones((3, 3), jnp.int32)})


class TinyLM(nnx.Module):

  def __init__(self, vocab, d, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.hidden = nnx.Linear(d, 2 * d, rngs=rngs)
    self.norm = nnx.RMSNorm(2 * d, rngs=rngs)
    self.proj = nnx.Linear(2 * d, d, rngs=rngs)
    self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = h + self.proj(self.norm(jax.nn.gelu(self.hidden(h))))
    return self.lm_head(h)


def test_labels_on_nnx_model():
  model = TinyLM(11, 8, nnx.Rngs(0))
  labels = ol.label_params(nnx.state(model, nnx.Param))
  flat = {ol.labels.path_str(p): l for p, l in
          jax.tree_util.tree_leaves_with_path(labels)}
  assert flat == {'embed/embedding': 'embedding', 'hidden/kernel': 'matrix',
                  'hidden/bias': 'other', 'norm/scale': 'norm',
                  'proj/kernel': 'matrix', 'proj/bias': 'other',
                  'lm_head/kernel': 'head'}


def test_labels_on_linen_and_overrides():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, t):
      h = nn.Embed(13, 6)(t)
      h = nn.LayerNorm()(nn.Dense(6)(h))
      return nn.Dense(13, use_bias=False)(h)  # untied head, no telling name

  params = Net().init(jax.random.PRNGKey(0), jnp.zeros((2,), jnp.int32))
  labels = ol.label_params(params)
  flat = {ol.labels.path_str(p): l for p, l in
          jax.tree_util.tree_leaves_with_path(labels)}
  assert flat['params/Embed_0/embedding'] == 'embedding'
  assert flat['params/Dense_1/kernel'] == 'head'  # found by (d, vocab) shape
  assert flat['params/Dense_0/kernel'] == 'matrix'
  assert flat['params/LayerNorm_0/scale'] == 'norm'
  over = ol.label_params(params, overrides={r'Dense_0/kernel': 'other'})
  flat_over = {ol.labels.path_str(p): l for p, l in
               jax.tree_util.tree_leaves_with_path(over)}
  # The override relabels exactly the leaf it names, nothing else.
  assert flat_over == dict(flat, **{'params/Dense_0/kernel': 'other'})
  with pytest.raises(ValueError, match='overrides'):
    ol.label_params(params, overrides={'Dense': 'bogus'})


def test_flax_matrix_dims_for_attention():
  attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                decode=False, rngs=nnx.Rngs(0))
  dims = ol.flax_matrix_dims(nnx.state(attn, nnx.Param))
  is_leaf = lambda x: isinstance(x, ol.MatrixDims) or x is None
  flat = {ol.labels.path_str(p): d for p, d in
          jax.tree_util.tree_leaves_with_path(dims, is_leaf=is_leaf)}
  assert flat['query/kernel'] == ol.MatrixDims(0, (1, 2))
  assert flat['out/kernel'] == ol.MatrixDims((0, 1), 2)


def test_nnx_model_trains_and_loss_falls():
  tokens = jnp.arange(64) % 16
  target = (tokens * 3 + 1) % 16

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(
        m(tokens), target).mean()

  losses = nnx_losses(TinyLM(16, 16, nnx.Rngs(0)), ol.muon(0.02), loss_fn,
                      steps=60)
  assert losses[-1] < 0.5 * losses[0], losses[::10]
