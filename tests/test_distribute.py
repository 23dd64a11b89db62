"""Owner-computes grouping (one device) and optimizer-state plumbing.

The multi-device half (spreading over 8 host devices) is in
``tests/test_multidevice.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from optax_lite.linalg import grouped, polar
from optimizer_zoo import make, params_tree

COEFFS = polar.coefficients('polar_express')


def _ns(x):
  return polar.newton_schulz(x, COEFFS, norm_factor=1.01)


@pytest.mark.parametrize('name', ['muon', 'rmnp', 'normuon', 'muonh'])
def test_tree_map_params_maps_momentum(name):
  tx = make(name)
  params = params_tree()
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: p + 1.0, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  # Every parameter-shaped state leaf (momentum, Adam moments) is mapped;
  # counts and per-matrix statistics (NorMuon's variances, MuonH's radii)
  # are not (tests/test_tree_map_params.py checks which).
  changed = 0
  for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(state)):
    if a.dtype == jnp.int32 or not np.array_equal(a, b + 1.0):
      np.testing.assert_array_equal(a, b)
    else:
      changed += 1
  assert changed >= 4


def test_momentum_init_keeps_dtype_and_shape():
  p = {'w': jnp.ones((3, 4), jnp.bfloat16)}
  s = ol.momentum(0.9, mu_dtype=jnp.float32).init(p)
  assert s.mu['w'].dtype == jnp.float32 and s.mu['w'].shape == (3, 4)
  s = ol.momentum(0.9).init(p)
  assert s.mu['w'].dtype == jnp.bfloat16


def _leaves(shapes, key=0):
  ks = jax.random.split(jax.random.PRNGKey(key), len(shapes))
  return [(jax.random.normal(k, s),) for k, s in zip(ks, shapes)]


def test_group_items_by_shape_dtype_and_key():
  leaves = _leaves([(2, 8, 16), (1, 8, 16), (3, 4, 4), (1, 8, 16)])
  leaves[3] = (leaves[3][0].astype(jnp.bfloat16),)
  groups = grouped.group_items(leaves)
  assert sorted(groups.values()) == [[0, 1], [2], [3]]
  groups = grouped.group_items(leaves, keys=['a', 'b', 'a', 'a'])
  assert sorted(groups.values()) == [[0], [1], [2], [3]]


def test_group_items_rejects_mismatched_batch():
  x = jnp.ones((2, 3, 3))
  with pytest.raises(ValueError, match='leading'):
    grouped.group_items([(x, jnp.ones((3, 3, 3)))])
  with pytest.raises(TypeError, match='leaves'):
    grouped.group_items([x])


def test_grouped_map_one_device_matches_per_leaf():
  leaves = _leaves([(3, 8, 16), (5, 8, 16), (1, 4, 4), (2, 16, 16)])
  calls = []

  def fn(x):
    calls.append(x.shape)
    return _ns(x)

  out = jax.jit(lambda ls: grouped.grouped_map(fn, ls))(leaves)
  # One kernel call per distinct shape, not per leaf.
  assert sorted(calls) == [(1, 4, 4), (2, 16, 16), (8, 8, 16)]
  for o, (x,) in zip(out, leaves):
    assert o.shape == x.shape
    np.testing.assert_allclose(o, _ns(x), atol=2e-6)


def test_grouped_map_several_inputs_and_outputs():
  a = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5))
  b = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
  c = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5))
  d = jax.random.normal(jax.random.PRNGKey(3), (2, 5))
  fn = lambda m, v: {'mv': jnp.einsum('bij,bj->bi', m, v), 'tr': jnp.trace(
      m, axis1=1, axis2=2)}
  out = grouped.grouped_map(fn, [(a, b), (c, d)])
  for o, (m, v) in zip(out, [(a, b), (c, d)]):
    np.testing.assert_allclose(o['mv'], fn(m, v)['mv'], rtol=1e-6)
    np.testing.assert_allclose(o['tr'], fn(m, v)['tr'], rtol=1e-6)


def test_assign_lpt_balances_by_cost():
  # 18 items of cost 3 and 24 of cost 1 over 8 devices (the small LM's
  # 256x688 and 256x256 matrices, roughly): total 78, optimum >= 9.75.
  asg = grouped.assign_lpt([18, 24], [3.0, 1.0], 8)
  assert asg.counts.sum(axis=0).tolist() == [18, 24]
  assert asg.loads.max() <= 10.0
  for g in range(2):
    pairs = set(zip(asg.device[g].tolist(), asg.slot[g].tolist()))
    assert len(pairs) == asg.counts[:, g].sum()  # no slot used twice
  # Padding each group to a multiple of 8 would cost 3*24 + 1*24 = 96 / 8.
  assert asg.loads.max() < 96 / 8


def test_assign_lpt_bad_devices():
  with pytest.raises(ValueError, match='num_devices'):
    grouped.assign_lpt([1], [1.0], 0)


def test_distribute_argument_checks():
  from jax.sharding import Mesh
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('x',))
  with pytest.raises(ValueError, match='distribute'):
    ol.orthogonalize(distribute=mesh, shard_polar=mesh)
  with pytest.raises(ValueError, match='distribute'):
    ol.orthogonalize(distribute=(mesh, 'nope'))
  with pytest.raises(TypeError, match='distribute'):
    ol.muon(1e-2, distribute='x')
  # A one-device mesh is the grouped single-device path: same result.
  g = {'a': jax.random.normal(jax.random.PRNGKey(0), (6, 10)),
       'b': jax.random.normal(jax.random.PRNGKey(1), (10, 6))}
  ref, _ = ol.orthogonalize().update(g, None)
  out, _ = ol.orthogonalize(distribute=mesh).update(g, None)
  for k in g:
    np.testing.assert_allclose(out[k], ref[k], atol=1e-6)
