"""``qk_clip`` (MuonClip): the K2 rescale rule on a tiny attention layer.

The reference is NumPy: the per-head max logit of a tiny multi-head
attention layer (Flax layouts: q/k kernels ``[d, heads, head_dim]``, biases
``[heads, head_dim]``), ``γ = min(1, τ/S)``, ``W ← √γ (W + u)`` per head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

import optax_lite as ol
from optax_lite.transforms.qk_clip import logits_by_module

B, T, D, H, HD = 2, 5, 8, 3, 4
TAU = 10.0


def _x(seed=0):
  return np.random.default_rng(seed).standard_normal((B, T, D))


def _proj(x, p, heads_of=None):
  out = np.einsum('btd,dhk->bthk', x, np.asarray(p['kernel'], np.float64))
  if 'bias' in p:
    out = out + np.asarray(p['bias'], np.float64)
  return out


def max_logits_np(params, x, module='attn'):
  """Per-head max of ``q·k / sqrt(head_dim)`` (grouped keys repeated)."""
  q = _proj(x, params[module]['query'])
  k = _proj(x, params[module]['key'])
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  return logits.max(axis=(0, 2, 3))


def _params(key_heads=H, seed=1):
  r = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
  # Head 0 large, head 1 medium, head 2 small logits.
  grow = jnp.asarray([3.0, 1.0, 0.1])
  attn = {'query': {'kernel': n(D, H, HD) * grow[None, :, None],
                    'bias': n(H, HD) * 0.1},
          'key': {'kernel': n(D, key_heads, HD), 'bias': n(key_heads, HD)},
          'value': {'kernel': n(D, H, HD)},
          'out': {'kernel': n(H, HD, D)}}
  return {'attn': attn, 'mlp': {'kernel': n(D, D)}}


def _clip(params, updates, max_logits, tau=TAU, **kw):
  tx = ol.qk_clip(tau, **kw)
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params,
                              max_logits=max_logits)
  return out


def test_rule_zero_update_puts_exceeding_heads_at_threshold():
  params, x = _params(), _x()
  s = max_logits_np(params, x)
  over = s > TAU
  assert over[0] and not over[2]  # the fixture has both kinds of heads
  zeros = jax.tree.map(jnp.zeros_like, params)
  u = _clip(params, zeros, {'attn': {'max_logits': jnp.asarray(s)}})
  new = optax.apply_updates(params, u)
  s_new = max_logits_np(new, x)
  np.testing.assert_allclose(s_new[over], TAU, rtol=1e-5)
  np.testing.assert_array_equal(s_new[~over], s[~over])
  for name in ('query', 'key'):
    for leaf in ('kernel', 'bias'):
      a = np.asarray(new['attn'][name][leaf])
      b = np.asarray(params['attn'][name][leaf])
      np.testing.assert_array_equal(np.take(a, np.flatnonzero(~over), -2),
                                    np.take(b, np.flatnonzero(~over), -2))
  for path in (('attn', 'value'), ('attn', 'out'), ('mlp',)):
    sub_new, sub_old = new, params
    for k in path:
      sub_new, sub_old = sub_new[k], sub_old[k]
    np.testing.assert_array_equal(sub_new['kernel'], sub_old['kernel'])


def test_rule_with_a_step_is_sqrt_gamma_times_stepped_weights():
  """K2 order: the optimizer's step first, then the clip of W + u."""
  params = _params()
  s = max_logits_np(params, _x())
  u = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params)
  out = _clip(params, u, {'attn': jnp.asarray(s)})
  gamma = np.where(s > TAU, TAU / s, 1.0)
  for name in ('query', 'key'):
    for leaf in ('kernel', 'bias'):
      w = np.asarray(params['attn'][name][leaf], np.float64) + 0.05
      want = w * np.sqrt(gamma)[:, None]
      got = np.asarray(params['attn'][name][leaf] + out['attn'][name][leaf])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Everything else, and unclipped heads, keep the incoming update exactly.
  np.testing.assert_array_equal(out['attn']['value']['kernel'],
                                u['attn']['value']['kernel'])
  np.testing.assert_array_equal(out['attn']['query']['kernel'][:, 2],
                                u['attn']['query']['kernel'][:, 2])


def test_grouped_query_keys_are_shared_and_left_alone():
  """GQA (3 query heads on 1 key head): the queries take all of γ."""
  params, x = _params(key_heads=1), _x()
  s = max_logits_np(params, x)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u = _clip(params, zeros, {'attn': jnp.asarray(s)})
  new = optax.apply_updates(params, u)
  np.testing.assert_array_equal(new['attn']['key']['kernel'],
                                params['attn']['key']['kernel'])
  s_new = max_logits_np(new, x)
  over = s > TAU
  np.testing.assert_allclose(s_new[over], TAU, rtol=1e-5)
  np.testing.assert_array_equal(s_new[~over], s[~over])


def test_k2_rotary_query_takes_gamma_and_shared_rotary_key_is_untouched():
  """MLA-like: logit_h = q^C_h·k^C_h + q^R_h·k^R with k^R shared."""
  r = np.random.default_rng(3)
  n = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
  params = {'attn': {'q_c': {'kernel': n(D, H, HD) * 2},
                     'k_c': {'kernel': n(D, H, HD)},
                     'q_r': {'kernel': n(D, H, 2) * 2},
                     'k_r': {'kernel': n(D, 2)}}}
  x = _x(4)

  def logits(p):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p['attn'])
    qc = np.einsum('btd,dhk->bthk', x, p['q_c']['kernel'])
    kc = np.einsum('btd,dhk->bthk', x, p['k_c']['kernel'])
    qr = np.einsum('btd,dhk->bthk', x, p['q_r']['kernel'])
    kr = np.einsum('btd,dk->btk', x, p['k_r']['kernel'])
    return (np.einsum('bthk,bshk->bhts', qc, kc) +
            np.einsum('bthk,bsk->bhts', qr, kr)).max(axis=(0, 2, 3))

  s = logits(params)
  tau = float(np.median(s))
  zeros = jax.tree.map(jnp.zeros_like, params)
  u = _clip(params, zeros, {'attn': jnp.asarray(s)}, tau=tau,
            query=r'q_c/kernel$', key=r'k_c/kernel$',
            query_rotary=r'q_r/kernel$')
  new = optax.apply_updates(params, u)
  np.testing.assert_array_equal(new['attn']['k_r']['kernel'],
                                params['attn']['k_r']['kernel'])
  gamma = np.where(s > tau, tau / s, 1.0)
  np.testing.assert_allclose(
      new['attn']['q_r']['kernel'],
      np.asarray(params['attn']['q_r']['kernel']) * gamma[:, None],
      rtol=1e-6)
  s_new = logits(new)
  np.testing.assert_allclose(s_new, np.minimum(s, tau), rtol=1e-5)


class _Attn(nnx.Module):
  """nnx.MultiHeadAttention that sows its per-head max logits."""

  def __init__(self, rngs):
    self.mha = nnx.MultiHeadAttention(
        num_heads=H, in_features=D, qkv_features=H * HD, decode=False,
        attention_fn=self.attention, rngs=rngs)

  @staticmethod
  def attention(query, key, value, *, module=None, **kw):
    logits = jnp.einsum('...qhd,...khd->...hqk', query, key)
    logits = logits / jnp.sqrt(query.shape[-1])
    module.sow(nnx.Intermediate, 'max_logits',
               jnp.max(logits, axis=(0, 2, 3)))
    return nnx.dot_product_attention(query, key, value, **kw)

  def __call__(self, x):
    return self.mha(x, sow_weights=True)


def test_nnx_sow_paths_and_optimizer_update():
  model = _Attn(nnx.Rngs(0))
  x = jnp.asarray(_x(5), jnp.float32)
  _, sown = nnx.capture(model, nnx.Intermediate)(x)
  by_module = logits_by_module(sown)
  assert set(by_module) == {'mha'} and by_module['mha'].shape == (H,)
  state = nnx.state(model, nnx.Param)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64),
                   nnx.to_pure_dict(state))['mha']
  np.testing.assert_allclose(by_module['mha'], max_logits_np({'a': p}, x, 'a'),
                             rtol=1e-4)
  tau = float(by_module['mha'].min()) * 0.5
  opt = nnx.Optimizer(model, optax.chain(ol.muon(0.0, weight_decay=0.0),
                                         ol.qk_clip(tau)), wrt=nnx.Param)
  grads = jax.tree.map(jnp.zeros_like, state)
  opt.update(model, grads, max_logits=sown)
  after = logits_by_module(nnx.capture(model, nnx.Intermediate)(x)[1])['mha']
  np.testing.assert_allclose(after, tau, rtol=1e-4)


def test_bfloat16_inject_and_distribute():
  params = _params()
  s = jnp.asarray(max_logits_np(params, _x()))
  u = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params)
  ref = _clip(params, u, {'attn': s})
  p16, u16 = (jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
              for t in (params, u))
  out16 = _clip(p16, u16, {'attn': s})
  for a, b, w in zip(jax.tree.leaves(out16), jax.tree.leaves(ref),
                     jax.tree.leaves(params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b,
                               atol=0.02 * (1 + float(jnp.max(jnp.abs(w)))))
  inj = optax.inject_hyperparams(ol.qk_clip)(threshold=TAU)
  state = inj.init(params)
  step = jax.jit(inj.update)
  got, state = step(u, state, params, max_logits={'attn': s})
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  state.hyperparams['threshold'] = jnp.asarray(1e6)  # nothing clipped
  got, _ = step(u, state, params, max_logits={'attn': s})
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(u)):
    np.testing.assert_array_equal(a, b)
  # After an optimizer with distribute= (one-device mesh: same math).
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('x',))
  g = jax.tree.map(lambda p: 0.1 * p + 0.3, params)
  outs = []
  for dist in (None, mesh):
    tx = optax.chain(ol.muon(0.01, distribute=dist), ol.qk_clip(TAU))
    o, _ = jax.jit(tx.update)(g, tx.init(params), params,
                              max_logits={'attn': s})
    outs.append(o)
  for a, b in zip(*(jax.tree.leaves(o) for o in outs)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert float(jnp.max(jnp.abs(outs[0]['attn']['query']['kernel']))) > 0.05


@pytest.mark.parametrize('kwargs,match', [
    (dict(threshold=0.0), 'threshold'), (dict(threshold=-1.0), 'threshold'),
    (dict(threshold=float('nan')), 'threshold'),
    (dict(threshold=1.0, query='('), 'query'),
    (dict(threshold=1.0, head_axis=jnp.asarray(-2)), 'head_axis'),
    (dict(threshold=1.0, head_axis=1.5), 'head_axis'),
    (dict(threshold=1.0, logits_name=''), 'logits_name'),
])
def test_bad_construction_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ol.qk_clip(**kwargs)


@pytest.mark.parametrize('logits,match', [
    (None, 'max_logits'),
    ({'attn': jnp.ones((H, 2))}, 'shape'),
    ({'attn': jnp.ones((H + 1,))}, 'heads'),
    ({'other': jnp.ones((H,))}, 'no query leaves'),
    ({}, 'no entry'),
])
def test_bad_update_arguments(logits, match):
  params = _params()
  tx = ol.qk_clip(TAU)
  with pytest.raises(ValueError, match=match):
    tx.update(params, tx.init(params), params, max_logits=logits)
  with pytest.raises(ValueError, match='params'):
    tx.update(params, tx.init(params), None, max_logits={'attn': 1.0})
