"""``fisher_whiten(distribute=)`` / ``fismo(distribute=)`` on 8 host devices.

Beyond the shared ``tests/test_distribute_multidevice.py`` (two steps of the
named optimizer): the whole state (factors, cached roots, momentum) after
several steps with cached and warm-started roots, on tall, wide, stacked
(``[layers, in, out]``) and one-sided (``max_factor_size``) leaves, equals
the single-device one (updates and inner state; the factors live on their
owners, ``OwnerStacks`` split over the devices), and a ``distribute=None``
state runs under the mesh. Run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lite as ol
from conftest import host_mesh
from optax_lite.linalg import grouped
from optax_lite.transforms.fisher_whiten import fisher_whiten

pytestmark = pytest.mark.multidevice


_mesh = host_mesh


def _tree(key=0, scale=1.0):
  shapes = {'tall': (40, 16), 'wide': (16, 40), 'square': (16, 16),
            'stacked': (3, 16, 24), 'vec': (16,)}
  ks = jax.random.split(jax.random.PRNGKey(key), len(shapes))
  return {k: scale * jax.random.normal(kk, s)
          for kk, (k, s) in zip(ks, shapes.items())}


DIMS = {'tall': ol.MatrixDims(0, 1), 'wide': ol.MatrixDims(0, 1),
        'square': ol.MatrixDims(0, 1), 'stacked': ol.MatrixDims(1, 2),
        'vec': None}


def _fsdp(tree, mesh):
  def put(x):
    parts = [None] * x.ndim
    if x.ndim >= 2 and x.shape[-2] % 8 == 0:
      parts[-2] = 'fsdp'
    return jax.device_put(x, NamedSharding(mesh, P(*parts)))
  return jax.tree.map(put, tree)


def _steps(update, state, grads):
  outs = []
  for g in grads:
    u, state = update(g, state)
    outs.append(u)
  return outs, state


def _close(a, b, tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), atol=tol, rtol=tol)


def _inner(distribute=None):
  return optax.chain(ol.momentum(0.9, ema=True, nesterov=False),
                     ol.orthogonalize(dims=DIMS, distribute=distribute))


@pytest.mark.parametrize('kw', [
    {'root_method': 'newton_warm', 'root_every': 2},
    pytest.param({'root_method': 'eigh', 'max_factor_size': 32},
                 marks=pytest.mark.slow),
])
def test_state_equals_single_device_after_several_steps(kw):
  mesh = _mesh()
  params = _tree()
  grads = [_tree(k, scale=0.3) for k in range(1, 4)]
  tx = fisher_whiten(_inner(), dims=DIMS, **kw)
  dtx = fisher_whiten(_inner(mesh), dims=DIMS, distribute=mesh, **kw)
  update, dupdate = jax.jit(tx.update), jax.jit(dtx.update)
  ref_u, ref_s = _steps(update, tx.init(params), grads)
  out_u, out_s = _steps(dupdate, dtx.init(params),
                        [_fsdp(g, mesh) for g in grads])
  for a, b in zip(out_u, ref_u):
    _close(a, b, 1e-5)
  _close(out_s.inner_state, ref_s.inner_state, 1e-5)
  # The factors live on their owners: per-leaf placeholders, OwnerStacks.
  assert isinstance(out_s.owned, grouped.OwnerStacks)
  assert ref_s.owned is None
  for name in ('tall', 'wide', 'square', 'stacked'):
    assert out_s.p[name].shape == (1,) and out_s.q_isqrt[name].shape == (1,)
  if 'max_factor_size' in kw:  # the 40-sides stay identity placeholders
    assert ref_s.p['wide'].shape == (1,) and ref_s.q['tall'].shape == (1,)
  else:  # roots refreshed on steps 0 and 2, cached on step 1
    assert ref_s.p_isqrt['wide'].shape == (40, 40)
  # Continuing: one more step (a refresh with root_every=2) agrees.
  u1, s1 = update(grads[0], ref_s)
  u2, s2 = dupdate(_fsdp(grads[0], mesh), out_s)
  _close(u1, u2, 1e-5)
  _close(s1.inner_state, s2.inner_state, 1e-5)
  # A per-leaf state (distribute=None's) still runs under the mesh (the
  # factors then travel); an owner-resident one needs its mesh.
  u3, s3 = dupdate(_fsdp(grads[0], mesh), ref_s)
  _close(u1, u3, 1e-5)
  _close(s1, s3, 1e-5)
  with pytest.raises(ValueError, match='distribute'):
    update(grads[0], out_s)


@pytest.mark.parametrize('kw', [{}, {'root_every': 2}])
def test_owner_resident_factors(kw):
  """The factors (and cached roots) are split along the first axis of
  ``OwnerStacks`` after ``sharded_init`` and after a jitted step with
  ``state_shardings``; ``tree_map_params`` runs."""
  mesh = _mesh()
  # default dims (a dims dict does not fit tree_map_params's placeholder)
  mats = lambda t: {k: v for k, v in t.items() if k != 'vec'}
  sp = _fsdp(mats(_tree()), mesh)
  inner = optax.chain(ol.momentum(0.9, ema=True, nesterov=False),
                      ol.orthogonalize(distribute=mesh))
  tx = fisher_whiten(inner, distribute=mesh, root_method='eigh', **kw)
  state = ol.sharded_init(tx.init, sp)

  def check(s):
    arrays = jax.tree.leaves(s.owned)
    # 4 shape groups (tall, wide, square, stacked), P and Q each (and the
    # two cached roots with root_every=2)
    assert len(arrays) == 8 * (2 if kw else 1)
    for x in arrays:
      assert x.shape[0] % 8 == 0
      shard = x.addressable_shards[0].data
      assert shard.shape == (x.shape[0] // 8,) + x.shape[1:]

  check(state)
  shardings = ol.linalg.distributed.state_shardings(
      jax.eval_shape(tx.init, sp), sp)
  step = jax.jit(tx.update, out_shardings=(
      jax.tree.map(lambda x: x.sharding, sp), shardings))
  for k in (1, 2):
    _, state = step(_fsdp(mats(_tree(k, 0.3)), mesh), state)
    check(state)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: p, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
