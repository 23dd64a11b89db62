"""SOAP / Shampoo ``distribute=`` on 8 host devices: owner-resident state.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Beyond the
shared ``test_distribute_multidevice.py`` (updates after 2 steps): over 5
steps with ``precondition_frequency=2`` (so that SOAP's QR refresh and
Shampoo's root recomputation run on the owners, on state that never left
them) every update equals the single-device run, on a tall, a wide and a
stacked ``[3, m, n]`` leaf (its slices are separate work items), with the
parameters FSDP-sharded and replicated. The per-matrix state lives in an
``OwnerStacks`` split along its first axis, ``sharded_init`` and a jitted
step keep it there, orbax restores it as saved, and
``optax.tree_utils.tree_map_params`` works.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lite as ol
from conftest import host_mesh
from optax_lite.linalg import grouped
from optax_lite.linalg.matrices import MatrixDims
from optimizer_zoo import grad_stream, make, params_tree

pytestmark = pytest.mark.multidevice

SHAPES = {'tall': (24, 8), 'wide': (8, 24), 'stacked': (3, 16, 8),
          'square': (16, 16), 'bias': (8,)}
DIMS = {'tall': MatrixDims(0, 1), 'wide': MatrixDims(0, 1),
        'stacked': MatrixDims(1, 2), 'square': MatrixDims(0, 1),
        'bias': None}
MODES = [('soap', {}), ('shampoo', {}), ('shampoo', {'graft': 'none'})]


_mesh = host_mesh


def _put(tree, mesh, layout):
  def spec(x):
    parts = [None] * x.ndim
    if layout == 'sharded' and x.ndim >= 2 and x.shape[-2] % 8 == 0:
      parts[-2] = 'fsdp'   # the fan-in axis
    return NamedSharding(mesh, P(*parts))
  return jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)


def _grads(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in SHAPES.items()} for _ in range(n)]


def _owned(state):
  """The OwnerStacks of a (possibly nested) optimizer state."""
  stacks = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, grouped.OwnerStacks))
            if isinstance(x, grouped.OwnerStacks)]
  assert len(stacks) == 1, stacks
  return stacks[0]


@pytest.mark.parametrize('mode,kw,layout', [
    ('soap', {}, 'sharded'), ('soap', {}, 'replicated'),
    ('shampoo', {}, 'sharded'), ('shampoo', {}, 'replicated'),
    ('shampoo', {'graft': 'none'}, 'sharded')])
def test_updates_equal_single_device_over_refreshes(mode, kw, layout):
  mesh = _mesh()
  grads = _grads(5)
  ref_tx = ol.kron_precondition(mode, dims=DIMS, precondition_frequency=2,
                                **kw)
  tx = ol.kron_precondition(
      mode, dims=DIMS, precondition_frequency=2,
      distribute=ol.PolarSharding(mesh, layout=layout), **kw)
  ref_s = ref_tx.init(grads[0])
  state = ol.sharded_init(tx.init, _put(grads[0], mesh, layout))
  assert ref_s.owned is None
  owned = _owned(state)
  # tall, wide, stacked, square: the bias (no preconditioned side) is local.
  assert state.stats_l['bias'].shape == (1, 1)
  for k in ('tall', 'wide', 'stacked', 'square'):
    assert state.mu[k].shape == state.stats_l[k].shape == (1,)
  # Shampoo runs tall matrices transposed: 24 x 8 and 8 x 24 share a group.
  n_groups = 3 if mode == 'shampoo' else 4
  assert len(owned.groups) == n_groups, owned
  ref_up, up = jax.jit(ref_tx.update), jax.jit(tx.update)
  for g in grads:
    ref_u, ref_s = ref_up(g, ref_s)
    u, state = up(_put(g, mesh, layout), state)
    for k in SHAPES:
      # The stacked leaf's slices run one per device here and as one
      # (3, ·, ·) batch on one device: float32 round-off of the batched
      # kernels, amplified by SOAP's Adam division, reaches 2.7e-5 there
      # (the single-device step's own error against float64 is 2e-5 to
      # 1e-4 on these leaves); single leaves agree to round-off.
      tol = 1e-4 if k == 'stacked' else 1e-5
      assert u[k].shape == ref_u[k].shape and u[k].dtype == ref_u[k].dtype
      np.testing.assert_allclose(np.asarray(u[k]), np.asarray(ref_u[k]),
                                 rtol=tol, atol=tol, err_msg=k)
    # The local (bias) leaf's state is the single-device one.
    np.testing.assert_allclose(state.mu['bias'], ref_s.mu['bias'],
                               rtol=1e-6, atol=1e-7)
  assert int(state.count) == 5
  for k in ('tall', 'wide', 'stacked'):
    assert float(jnp.abs(u[k]).max()) > 0


def _check_split(owned):
  arrays = jax.tree.leaves(owned)
  assert arrays
  for x in arrays:
    assert x.shape[0] % 8 == 0
    shard = x.addressable_shards[0].data
    assert shard.shape == (x.shape[0] // 8,) + x.shape[1:], (
        x.shape, shard.shape)


@pytest.mark.parametrize('mode,kw', MODES)
def test_owner_resident_state_stays_split(mode, kw):
  """The per-matrix state is split along axis 0 of its OwnerStacks after
  ``sharded_init`` and after a jitted step whose ``out_shardings`` come from
  ``state_shardings``; ``tree_map_params`` maps it."""
  mesh = _mesh()
  params = _put(_grads(1, seed=3)[0], mesh, 'sharded')
  g = _put(_grads(1, seed=4)[0], mesh, 'sharded')
  tx = ol.kron_precondition(mode, dims=DIMS, distribute=mesh, **kw)
  state = ol.sharded_init(tx.init, params)
  owned = _owned(state)
  # Every per-matrix field is resident: 8 for SOAP, 6 (5 without grafting)
  # for Shampoo, per group.
  n_fields = {'soap': 8, 'shampoo': 6 if kw.get('graft') != 'none' else 5}
  assert all(len(grp) == n_fields[mode] for grp in owned.groups)
  _check_split(owned)
  shardings = ol.linalg.distributed.state_shardings(
      jax.eval_shape(tx.init, params), params)
  step = jax.jit(tx.update, out_shardings=(
      jax.tree.map(lambda x: x.sharding, g), shardings))
  u, state = step(g, state)
  _check_split(_owned(state))
  u, state = step(g, state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: p, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)


@pytest.mark.parametrize('name', ['soap', 'shampoo'])
def test_named_optimizer_state_resident(name):
  """``ol.soap`` / ``ol.shampoo`` (matrix leaves + AdamW rest): the matrices'
  state is resident and split after a step, and ``tree_map_params`` works on
  the nested state (equality with one device: the shared multidevice
  test)."""
  mesh = _mesh()
  params = _put(params_tree(), mesh, 'sharded')
  g = _put(grad_stream(params_tree(), 1, scale=0.3)[0], mesh, 'sharded')
  tx = make(name, distribute=mesh)
  state = ol.sharded_init(tx.init, params)
  _check_split(_owned(state))
  shardings = ol.linalg.distributed.state_shardings(
      jax.eval_shape(tx.init, params), params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p_sh = jax.tree.map(lambda x: x.sharding, params)
  params, state = jax.jit(step, out_shardings=(p_sh, shardings))(
      params, state, g)
  _check_split(_owned(state))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: p, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)


def test_single_device_state_still_runs_distributed():
  """A state made without ``distribute`` (``owned=None``) still steps under
  a distributed transform (its state moves to the owners each step) and
  gives the owner-resident update."""
  mesh = _mesh()
  g = _grads(1, seed=7)[0]
  ref_tx = ol.kron_precondition('shampoo', dims=DIMS)
  tx = ol.kron_precondition('shampoo', dims=DIMS, distribute=mesh)
  gs = _put(g, mesh, 'sharded')
  update = jax.jit(tx.update)
  res_u, _ = update(gs, ol.sharded_init(tx.init, gs))
  ref_u, _ = jax.jit(ref_tx.update)(g, ref_tx.init(g))
  u, state = update(gs, ref_tx.init(g))
  assert state.owned is None
  for k in ('tall', 'wide', 'square'):
    assert float(jnp.abs(ref_u[k]).max()) > 0
    np.testing.assert_allclose(np.asarray(u[k]), np.asarray(res_u[k]),
                               rtol=1e-6, atol=1e-6, err_msg=k)
    # float32 round-off of the (-1/4)-root of an ill-conditioned 16 x 16
    # Gram matrix: 2.5e-5 on 'square' for both distributed paths.
    np.testing.assert_allclose(np.asarray(u[k]), np.asarray(ref_u[k]),
                               rtol=1e-4, atol=1e-4, err_msg=k)


def test_orbax_checkpoint_of_resident_state(tmp_path):
  """The owner-resident state saves and restores with orbax, sharded as it
  was, and the next step is bit-identical."""
  ocp = pytest.importorskip('orbax.checkpoint')
  mesh = _mesh()
  g = _put(_grads(1)[0], mesh, 'sharded')
  tx = ol.kron_precondition('soap', dims=DIMS, distribute=mesh)
  update = jax.jit(tx.update)
  _, state = update(g, ol.sharded_init(tx.init, g))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'state', state)
  ckptr.wait_until_finished()
  back = ckptr.restore(tmp_path / 'state', jax.tree.map(
      ocp.utils.to_shape_dtype_struct, state))
  ckptr.close()
  assert isinstance(back.owned, grouped.OwnerStacks)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(update(g, back)),
                  jax.tree.leaves(update(g, state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
