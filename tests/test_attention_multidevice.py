"""Gram Newton–Schulz, per-head dims and QK-clip with ``distribute=`` on 8
host devices (FSDP-sharded parameters): equal to one device.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8 -m
multidevice``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from conftest import fsdp_put, host_mesh

pytestmark = pytest.mark.multidevice

D, H, HD = 16, 4, 8
DIMS = functools.partial(ol.flax_matrix_dims, per_head=True,
                         split_sizes={'qkv': (H * HD,) * 3}, head_dim=HD)


def _params(seed=0):
  ks = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
  n = lambda *s: jax.random.normal(next(ks), s) / np.sqrt(s[0])  # noqa: E731
  p = {'head': {'kernel': n(D, 32)}}
  for i in range(2):
    p[f'block{i}'] = {
        'attn': {'query': {'kernel': n(D, H, HD) * 4},
                 'key': {'kernel': n(D, H, HD) * 4},
                 'value': {'kernel': n(D, H, HD)},
                 'out': {'kernel': n(H, HD, D)}},
        'fused': {'qkv': {'kernel': n(D, 3 * H * HD)}},
        'up': {'kernel': n(D, 4 * D)},     # 1:4, the Gram form
        'down': {'kernel': n(4 * D, D)}}
  return p


def _max_logits(params):
  """A stand-in for the forward pass's per-head max logits."""
  return {f'block{i}/attn': jnp.abs(params[f'block{i}']['attn']['query'][
      'kernel']).sum(axis=(0, 2)) for i in range(2)}


def _run(tx, params, grads_list, with_logits):
  @jax.jit
  def step(p, s, g):
    kw = {'max_logits': _max_logits(p)} if with_logits else {}
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s
  state = tx.init(params)
  for g in grads_list:
    params, state = step(params, state, g)
  return params


@pytest.mark.parametrize('clip', [False, True])
def test_gram_per_head_qk_clip_distributed_equal_one_device(clip):
  mesh = host_mesh()
  params = _params()
  grads = [jax.tree.map(lambda x, k=k: 0.3 * jnp.sin(x * (k + 2)), params)
           for k in range(2)]

  def make(distribute):
    tx = ol.muon(0.05, method='gram_polar_express', dims=DIMS,
                 distribute=distribute)
    return optax.chain(tx, ol.qk_clip(5.0)) if clip else tx

  ref = _run(make(None), params, grads, clip)
  sp = fsdp_put(params, mesh)
  dtx = make(ol.PolarSharding(mesh, layout='sharded'))
  out = _run(dtx, sp, [fsdp_put(g, mesh) for g in grads], clip)
  for x, y, s in zip(jax.tree.leaves(out), jax.tree.leaves(ref),
                     jax.tree.leaves(sp)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    # FSDP-sharded leaves keep their sharding. (A replicated per-head
    # output kernel [4, 8, 16] comes back split along its last axis: the
    # "sharded" layout returns results split along a divisible axis.)
    if not s.sharding.is_fully_replicated:
      assert x.sharding.is_equivalent_to(s.sharding, x.ndim)
  if clip:  # the clip engaged (the logit stand-in, ~10, exceeds 5)
    assert float(jnp.min(_max_logits(params)['block0/attn'])) > 5.0
    plain = _run(ol.muon(0.05, method='gram_polar_express', dims=DIMS),
                 params, grads, False)
    q, q_plain = (t['block0']['attn']['query']['kernel']
                  for t in (out, plain))
    assert float(jnp.max(jnp.abs(q))) < 0.9 * float(jnp.max(jnp.abs(q_plain)))
