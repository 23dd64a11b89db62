"""``filter_every`` in the owner-compute placements on 8 host devices.

Muon-, NorMuon- and FISMO-LITE with ``filter_every=3``: ``distribute=``
(the cached filter owner-resident, made by ``ol.sharded_init``) equals one
device within 1e-5 over the refresh steps 0 and 3 and the held steps
between; a one-device state steps on the owners (its cache travelling);
and the portable form carries the cache between placements.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import optax_lite as ol
from optax_lite.transforms.lite_muon import MuonCachedGeometryState
import multidevice_worker
from optimizer_zoo import make

pytestmark = pytest.mark.multidevice

NAMES = ['muon_lite', 'normuon_lite', 'fismo_lite']
STEPS = 5
EVERY = 3
TOL = 1e-5


def _tree():
  rng = np.random.default_rng(5)
  shapes = {'embed': {'embedding': (64, 16)}, 'norm': {'scale': (16,)},
            'attn': {n: {'kernel': (16, 16)} for n in 'qk'},
            'mlp': {'up': {'kernel': (16, 40)}, 'down': {'kernel': (40, 16)}}}
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32),
      shapes, is_leaf=is_shape)
  grads = [jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), params)
           for _ in range(STEPS)]
  return params, grads


_mesh, _put = multidevice_worker.fsdp_mesh, multidevice_worker.put_fsdp


def _run(tx, mesh, params, state, grads):
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(_put(g, mesh), state, params)
    out.append(u)
  return out, state


def _gap(a, b):
  """Max abs difference relative to the largest entry of ``b``."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-30)
    worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)) / scale)
  return worst


def _cached_filters(state):
  """The ``sharp_filter`` trees of the LITE states inside ``state``."""
  is_lite = lambda x: isinstance(x, ol.transforms.LiteState)
  return [x.geometry.sharp_filter
          for x in jax.tree.leaves(state, is_leaf=is_lite)
          if is_lite(x) and hasattr(x.geometry, 'sharp_filter')]


@pytest.mark.parametrize('name', NAMES)
def test_distribute_equals_one_device(name):
  params0, grads = _tree()
  m8 = _mesh(8)
  tx8 = make(name, distribute=m8, filter_every=EVERY)
  tx1 = make(name, filter_every=EVERY)
  p8, p1 = _put(params0, m8), _put(params0, None)
  s8 = ol.sharded_init(tx8.init, p8)
  assert any(isinstance(x, ol.linalg.grouped.OwnerStacks) for x in
             jax.tree.leaves(s8, is_leaf=lambda x: isinstance(
                 x, ol.linalg.grouped.OwnerStacks)))
  u8, s8 = _run(tx8, m8, p8, s8, grads)
  u1, s1 = _run(tx1, None, p1, tx1.init(p1), grads)
  for k in range(STEPS):
    assert _gap(u8[k], u1[k]) <= TOL, (name, k)
  # The portable form of the 8-device state is the one-device state,
  # cached filters included.
  port8 = ol.portable_state(tx8, s8, p8)
  port1 = ol.portable_state(tx1, s1, p1)
  assert jax.tree.structure(port8) == jax.tree.structure(port1)
  filters = _cached_filters(port8)
  assert len(filters) == 1
  assert filters[0]['mlp']['down']['kernel'].shape == (1, 16, 16)
  assert _gap(port8, port1) <= TOL


@pytest.mark.parametrize('name', ['muon_lite', 'fismo_lite'])
def test_one_device_state_steps_on_the_owners(name):
  """A state made without ``distribute`` (the cache travelling to the
  owners each step) gives the one-device updates."""
  params0, grads = _tree()
  m8 = _mesh(8)
  tx8 = make(name, distribute=m8, filter_every=EVERY)
  tx1 = make(name, filter_every=EVERY)
  p8, p1 = _put(params0, m8), _put(params0, None)
  u8, _ = _run(tx8, m8, p8, tx1.init(p8), grads[:4])
  u1, _ = _run(tx1, None, p1, tx1.init(p1), grads[:4])
  for k in range(4):
    assert _gap(u8[k], u1[k]) <= TOL, (name, k)


def test_checkpoint_moves_the_cache_between_placements():
  """Two steps on 8 devices (one refresh, one held step), moved to 4
  devices and to one through the portable form: the next steps (a held
  step, then a refresh) equal the uninterrupted 8-device run."""
  params0, grads = _tree()
  m8, m4 = _mesh(8), _mesh(4)
  name = 'muon_lite'
  tx8 = make(name, distribute=m8, filter_every=EVERY)
  p8 = _put(params0, m8)
  _, s8 = _run(tx8, m8, p8, ol.sharded_init(tx8.init, p8), grads[:2])
  want, _ = _run(tx8, m8, p8, s8, grads[2:4])
  portable = ol.portable_state(tx8, s8, p8)
  lite_state = portable.inner_states['matrix'].inner_state[0]
  assert isinstance(lite_state.geometry, MuonCachedGeometryState)
  cache = lite_state.geometry.sharp_filter['mlp']['up']['kernel']
  assert cache.shape == (1, 16, 16) and float(jnp.max(jnp.abs(cache))) > 0
  for mesh in (m4, None):
    tx = (make(name, filter_every=EVERY) if mesh is None
          else make(name, distribute=mesh, filter_every=EVERY))
    q = _put(params0, mesh)
    state = ol.place_state(tx, portable, q)
    got, _ = _run(tx, mesh, q, state, grads[2:4])
    for a, b in zip(got, want):
      assert _gap(a, b) <= TOL, mesh


def test_state_shardings_cover_the_cache():
  params0, _ = _tree()
  m8 = _mesh(8)
  tx = make('muon_lite', distribute=m8, filter_every=EVERY)
  p8 = _put(params0, m8)
  shapes = jax.eval_shape(tx.init, p8)
  shardings = ol.state_shardings(shapes, p8)
  assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
  state = ol.sharded_init(tx.init, p8)
  for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(sh, x.ndim)
  u, state2 = jax.jit(tx.update)(_put(_tree()[1][0], m8), state, p8)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
