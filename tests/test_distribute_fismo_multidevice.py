"""``fisher_whiten(distribute=)`` / ``fismo(distribute=)`` on 8 host devices.

Beyond the shared ``tests/test_distribute_multidevice.py`` (two steps of the
named optimizer): the whole state (factors, cached roots, momentum) after
several steps with cached and warm-started roots, on tall, wide, stacked
(``[layers, in, out]``) and one-sided (``max_factor_size``) leaves, equals
the single-device one (updates and inner state; the factors live on their
owners, ``OwnerStacks`` split over the devices), and a ``distribute=None``
state runs under the mesh. With an :class:`OwnerInner` (``fismo``'s
momentum and polar factor) the whole per-matrix step runs in one grouped
call: only the gradient goes to the owner and the update comes back (one
collective in and one out per shape group under FSDP, one all-gather under
data parallelism). Run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lite as ol
from conftest import host_mesh
from optax_lite.linalg import grouped
from optax_lite.optimizers.fismo import _momentum_polar
from optax_lite.transforms.fisher_whiten import fisher_whiten
from optax_lite.transforms.orthogonalize import polar_kernel
from optax_lite.transforms.owner_inner import OwnerInner

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                'benchmarks'))
from distributed import collectives  # noqa: E402

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


def _inner(distribute=None, dims=DIMS):
  return optax.chain(ol.momentum(0.9, ema=True, nesterov=False),
                     ol.orthogonalize(dims=dims, distribute=distribute))


def _owner_inner(distribute=None, dims=DIMS):
  """The same inner step, with its slice-wise form (as ``fismo`` builds)."""
  return _momentum_polar(_inner(distribute, dims), decay=0.9, nesterov=False,
                         ema=True, mu_dtype=None,
                         polar=polar_kernel('polar_express', 6, 1e-7, None),
                         steps=6)


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('kw', [
    {'root_method': 'newton_warm', 'root_every': 2},
    pytest.param({'root_method': 'eigh', 'max_factor_size': 32},
                 marks=pytest.mark.slow),
])
def test_state_equals_single_device_after_several_steps(kw, fused):
  mesh = _mesh()
  params = _tree()
  grads = [_tree(k, scale=0.3) for k in range(1, 4)]
  tx = fisher_whiten(_inner(), dims=DIMS, **kw)
  make = _owner_inner if fused else _inner
  dtx = fisher_whiten(make(mesh), dims=DIMS, distribute=mesh, **kw)
  update, dupdate = jax.jit(tx.update), jax.jit(dtx.update)
  ref_u, ref_s = _steps(update, tx.init(params), grads)
  out_u, out_s = _steps(dupdate, dtx.init(params),
                        [_fsdp(g, mesh) for g in grads])
  for a, b in zip(out_u, ref_u):
    _close(a, b, 1e-5)
  if fused:
    # The momentum of the matrix leaves lives on the owners (masked in the
    # plain inner state); the vector leaf's stays per leaf.
    mu, ref_mu = out_s.inner_state[0].mu, ref_s.inner_state[0].mu
    for name in ('tall', 'wide', 'square', 'stacked'):
      assert isinstance(mu[name], optax.MaskedNode)
    _close(mu['vec'], ref_mu['vec'], 1e-5)
    # per group: the stored sides' factors (and cached roots), the momentum
    n_res = [len(g) for g in out_s.owned.groups]
    assert sorted(n_res) == ([2, 2, 3, 3] if 'max_factor_size' in kw
                             else [5, 5, 5, 5]), n_res
  else:
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
  if not fused:
    _close(s1.inner_state, s2.inner_state, 1e-5)
  # A per-leaf state (distribute=None's) still runs under the mesh (the
  # factors then travel); an owner-resident one needs its mesh.
  u3, s3 = dupdate(_fsdp(grads[0], mesh), ref_s)
  _close(u1, u3, 1e-5)
  _close(s1, s3, 1e-5)
  with pytest.raises(ValueError, match='distribute'):
    update(grads[0], out_s)


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('kw', [{}, {'root_every': 2}])
def test_owner_resident_factors(kw, fused):
  """The factors (and cached roots, and with an ``OwnerInner`` the
  momentum) are split along the first axis of ``OwnerStacks`` after
  ``sharded_init`` and after a jitted step with ``state_shardings``;
  ``tree_map_params`` runs."""
  mesh = _mesh()
  # default dims (a dims dict does not fit tree_map_params's placeholder)
  mats = lambda t: {k: v for k, v in t.items() if k != 'vec'}
  sp = _fsdp(mats(_tree()), mesh)
  inner = (_owner_inner if fused else _inner)(mesh, dims=None)
  tx = fisher_whiten(inner, distribute=mesh, root_method='eigh', **kw)
  state = ol.sharded_init(tx.init, sp)

  def check(s):
    arrays = jax.tree.leaves(s.owned)
    # 4 shape groups (tall, wide, square, stacked), P and Q each (and the
    # two cached roots with root_every=2, and the momentum when fused)
    assert len(arrays) == 4 * (2 * (2 if kw else 1) + fused)
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


def _compiled_collectives(update, *args):
  return collectives(jax.jit(update).lower(*args).compile().as_text())


@pytest.mark.parametrize('layout', ['sharded', 'replicated'])
def test_fused_moves_the_gradient_in_and_the_update_out(layout):
  """With an ``OwnerInner`` the compiled step has one grouped call: per
  shape group one all-to-all in and one out (FSDP), or one all-gather of
  every device's results (data parallelism), about the matrices' bytes;
  the three-call path (plain inner transform) moves about three times as
  much. The update equals the single-device one."""
  mesh = _mesh()
  mats = lambda t: {k: v for k, v in t.items() if k != 'vec'}
  dims = {k: v for k, v in DIMS.items() if k != 'vec'}
  put = (_fsdp if layout == 'sharded' else
         lambda t, m: jax.device_put(t, NamedSharding(m, P())))
  spec = ol.PolarSharding(mesh, layout=layout)
  params = put(mats(_tree()), mesh)
  g = put(mats(_tree(1, 0.3)), mesh)
  pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  got = {}
  for fused in (False, True):
    inner = (_owner_inner if fused else _inner)(spec, dims)
    tx = fisher_whiten(inner, dims=dims, distribute=spec,
                       root_method='eigh')
    got[fused] = _compiled_collectives(tx.update, g, tx.init(params))
  groups = 4  # tall, wide, square, stacked
  if layout == 'sharded':
    # one in and one out per group (+ XLA's resharding of the stacked
    # leaf, FSDP on its 16-axis, to the split on its 24-axis and back)
    assert set(got[True]['by_op']) == {'all-to-all'}, got
    assert 2 * groups <= got[True]['count'] <= 2 * groups + 2, got
  else:
    assert got[True]['by_op'] == {'all-gather': 1}, got
    # every device's results once, padded to the most loaded device's
    # (LPT: at most the mean load plus one matrix; this tree has fewer
    # matrices than devices, so the padding is large here)
    largest = max(x[0].size * x.dtype.itemsize
                  for x in jax.tree.leaves(params))
    assert got[True]['bytes'] <= pbytes + 8 * largest, (got, pbytes)
  assert got[True]['bytes'] * 2 <= got[False]['bytes'], got
  # The single-device reference, jitted (eager, op by op, it compiled each
  # operation of the whitening for each shape group separately).
  ref = fisher_whiten(_inner(dims=dims), dims=dims, root_method='eigh')
  u_ref, _ = jax.jit(ref.update)(g, ref.init(params))
  u, _ = jax.jit(tx.update)(g, tx.init(params))
  _close(u, u_ref, 1e-5)


def test_fismo_fused_with_injected_hyperparams():
  """``optax.inject_hyperparams(ol.fismo)`` with ``distribute``: traced
  momentum and factor EMA in the owner-resident step; equals the plain
  single-device fismo."""
  mesh = _mesh()
  params = _tree()
  grads = [_tree(k, scale=0.3) for k in range(1, 4)]
  kw = dict(learning_rate=0.02, momentum=0.9, gamma=0.8, nesterov=True,
            dims=DIMS)
  ref = ol.fismo(**kw)
  # a Mesh is callable (a context manager): static, not a schedule
  tx = optax.inject_hyperparams(ol.fismo, static_args=('distribute',))(
      distribute=mesh, **kw)
  state = tx.init(_fsdp(params, mesh))
  found = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, grouped.OwnerStacks))
           if isinstance(x, grouped.OwnerStacks)]
  assert len(found) == 1  # factors and momentum on the owners
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  ref_state = ref.init(params)
  for g in grads:
    u, state = update(_fsdp(g, mesh), state, _fsdp(params, mesh))
    u_ref, ref_state = ref_update(g, ref_state, params)
    _close(u, u_ref, 1e-5)
  # the momentum is a live hyperparameter of the owner-resident step
  other = state._replace(hyperparams={**state.hyperparams,
                                      'momentum': jnp.asarray(0.5)})
  a, _ = update(_fsdp(grads[0], mesh), state, _fsdp(params, mesh))
  b, _ = update(_fsdp(grads[0], mesh), other, _fsdp(params, mesh))
  assert float(jnp.max(jnp.abs(a['wide'] - b['wide']))) > 1e-4


def test_owner_inner_is_checked():
  with pytest.raises(TypeError, match='inner'):
    fisher_whiten('momentum')
  assert isinstance(_owner_inner(), OwnerInner)


@pytest.mark.parametrize('layout', ['sharded', 'replicated'])
def test_fismo_lite_fused_equals_single_device(layout):
  """``fismo_lite(distribute=)``: the whitening, the Muon-LITE step (with
  its momentum and threshold state on the owner, bound to the LITE step
  count for the χ/β₂ schedules) and the map back in one grouped call;
  equals one device over 4 steps (refreshes and cached warm roots)."""
  mesh = _mesh()
  params = _tree()
  grads = [_tree(k, scale=0.3) for k in range(1, 5)]
  kw = dict(variant='lite_h', dims=DIMS, root_method='newton_warm',
            root_every=2)
  put = (_fsdp if layout == 'sharded' else
         lambda t, m: jax.device_put(t, NamedSharding(m, P())))
  tx = ol.fismo_lite(0.1, **kw)
  dtx = ol.fismo_lite(0.1, distribute=ol.PolarSharding(mesh, layout=layout),
                      **kw)
  state, dstate = tx.init(params), dtx.init(put(params, mesh))
  found = [x for x in jax.tree.leaves(
      dstate, is_leaf=lambda x: isinstance(x, grouped.OwnerStacks))
           if isinstance(x, grouped.OwnerStacks)]
  # fisher_whiten's: P, Q, two cached roots, momentum, threshold per group
  assert [len(g) for g in found[0].groups] == [6] * 4
  assert all(not g.groups for g in found[1:])  # LITE's own: empty
  update, dupdate = jax.jit(tx.update), jax.jit(dtx.update)
  for g in grads:
    u, state = update(g, state, params)
    du, dstate = dupdate(put(g, mesh), dstate, put(params, mesh))
    _close(du, u, 1e-5)
