"""Every named optimizer under jit with NamedSharding'd parameters (8 devices).

Run in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``./run test`` does).
Fewer than 8 devices is a failure, not a skip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_lite as ol
from optax_lite.linalg import distributed
from optax_lite.transforms.kron_precondition import (NULL_THRESHOLD,
                                                     SoapState, energetic,
                                                     has_side,
                                                     null_coordinates)
from optax_lite.transforms.lite import LiteState
from optax_lite.transforms.lite_geometries import SoapGeometryState
from conftest import param_mirrors
from optimizer_zoo import NAMED, grad_stream, make

pytestmark = pytest.mark.multidevice

STEPS = 3


def _mesh():
  devices = jax.devices()
  assert len(devices) >= 8, (
      f'multidevice tests need 8 devices, got {len(devices)}: run with '
      'XLA_FLAGS=--xla_force_host_platform_device_count=8')
  return Mesh(np.asarray(devices[:8]).reshape(4, 2), ('data', 'model'))


def _params(square=False):
  """Model-like params; ``square``: every hidden matrix is square.

  Every optimizer runs on the rectangular ones: SOAP / Shampoo give the
  null space of their rank-deficient statistics (where the gradient is
  round-off) no update, so their step is continuous in the gradient and a
  sharded run matches a single-device one there too.
  """
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  n = lambda k, s: jax.random.normal(k, s) / np.sqrt(s[0])
  wide, tall = ((16, 16), (16, 16)) if square else ((16, 32), (32, 16))
  conv = (2, 2, 4, 16) if square else (3, 3, 4, 8)
  return {
      'embed': {'embedding': n(ks[0], (32, 16))},
      'layer0': {'kernel': n(ks[1], wide), 'bias': jnp.zeros((wide[1],))},
      'layer1': {'kernel': n(ks[2], tall), 'bias': jnp.zeros((tall[1],))},
      'layer2': {'kernel': n(ks[3], wide)},
      'conv': {'kernel': n(ks[4], conv)},
      'ln': {'scale': jnp.ones((16,))},
      'head': {'kernel': n(ks[5], (16, 10))},
  }


KRONECKER = ('soap', 'shampoo', 'soap_lite')

def _spec(x, mesh):
  """Shard axis 0 over 'data' and the last axis over 'model' when divisible."""
  spec = [None] * x.ndim
  if x.ndim >= 1 and x.shape[0] % mesh.shape['data'] == 0:
    spec[0] = 'data'
  if x.ndim >= 2 and x.shape[-1] % mesh.shape['model'] == 0:
    spec[-1] = 'model'
  return NamedSharding(mesh, P(*spec))


def _shard(tree, mesh):
  return jax.tree.map(lambda x: jax.device_put(x, _spec(x, mesh)), tree)


def _run(tx, params, grads, state=None):
  step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
  s = tx.init(params) if state is None else state
  for g in grads:
    params, s = step(params, s, g)
  return params, s


def _apply(tx, p, s, g):
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), atol=tol, rtol=tol)


def _mask_null(q_l, q_r, lam_l, lam_r, nu):
  """Zero the null-space columns of q and the matching entries of nu."""
  sides = (has_side(q_l), has_side(q_r))
  if not any(sides):
    return q_l, q_r, nu
  keep = null_coordinates(lam_l, lam_r, NULL_THRESHOLD, sides=sides)
  b = q_l.shape[0]
  n = q_r.shape[-1] if sides[1] else nu.size // (b * q_l.shape[-1])
  nu_m = jnp.where(keep, nu.reshape(b, -1, n), 0.0).reshape(nu.shape)
  if sides[0]:
    q_l = q_l * energetic(lam_l, NULL_THRESHOLD)[:, None, :]
  if sides[1]:
    q_r = q_r * energetic(lam_r, NULL_THRESHOLD)[:, None, :]
  return q_l, q_r, nu_m


def _without_null_space(state):
  """``state`` with SOAP's null-space basis columns (and V there) zeroed."""
  def fix(rec):
    if isinstance(rec, SoapState):
      out = jax.tree.map(_mask_null, rec.q_l, rec.q_r, rec.lam_l, rec.lam_r,
                         rec.nu)
      q_l, q_r, nu = (jax.tree.map(lambda t, i=i: t[i], out,
                                   is_leaf=lambda t: type(t) is tuple)
                      for i in range(3))
      return rec._replace(q_l=q_l, q_r=q_r, nu=nu)
    geo = rec.geometry
    if not isinstance(geo, SoapGeometryState):
      return rec
    out = jax.tree.map(_mask_null, geo.q_l, geo.q_r, geo.lam_l, geo.lam_r,
                       geo.nu)
    q_l, q_r, nu = (jax.tree.map(lambda t, i=i: t[i], out,
                                 is_leaf=lambda t: type(t) is tuple)
                    for i in range(3))
    return rec._replace(geometry=geo._replace(q_l=q_l, q_r=q_r, nu=nu))

  is_rec = lambda x: isinstance(x, (SoapState, LiteState))
  return jax.tree.map(lambda x: fix(x) if is_rec(x) else x, state,
                      is_leaf=is_rec)


def test_eight_devices():
  mesh = _mesh()
  assert mesh.devices.size == 8 and mesh.shape == {'data': 4, 'model': 2}


# SOAP-LITE's 1e-5 is the default compiler's round-off on its guard's ramp:
# the suite's compiler (OPTAX_LITE_FAST_COMPILE=1) puts one coordinate just
# past it (1.08e-5 of a 1.07e-5 bound), so it runs under XLA's default one.
@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.default_compiler)
    if n == 'soap_lite' else n for n in NAMED])
def test_sharded_equals_single_device(name):
  mesh = _mesh()
  tx = make(name)
  params = _params()
  grads = grad_stream(params, STEPS, scale=0.3)

  ref_p, ref_s = _run(tx, params, grads)

  sp = _shard(params, mesh)
  sg = [_shard(g, mesh) for g in grads]
  state = distributed.sharded_init(tx.init, sp)
  out_p, out_s = _run(tx, sp, sg, state)

  _close(out_p, ref_p)
  # Eigenbases from eigh / QR are as precise as the eigengaps allow: a 1e-7
  # rounding difference in a factor moves an eigenvector by ~1e-7 / gap.
  # On a rank-deficient factor eigh's basis of the null space is arbitrary
  # (rounding picks it): compare SOAP's state without it.
  _close(_without_null_space(out_s), _without_null_space(ref_s),
         tol=1e-4 if name in KRONECKER else 1e-5)
  # Parameters keep their sharding through the jitted steps.
  for x, r in zip(jax.tree.leaves(out_p), jax.tree.leaves(sp)):
    assert x.sharding.is_equivalent_to(r.sharding, x.ndim), (x.sharding,
                                                             r.sharding)
  # State leaves that mirror a parameter are sharded like it, both after
  # sharded_init and after jitted steps with no out_shardings given.
  for st in (state, out_s):
    pairs = param_mirrors(st, sp)
    assert len(pairs) >= 4, f'{name}: no parameter-shaped state found'
    for path, _, leaf, p in pairs:
      assert leaf.sharding.is_equivalent_to(p.sharding, leaf.ndim), (
          name, jax.tree_util.keystr(path), leaf.sharding, p.sharding)


def test_sharded_init_shardings():
  mesh = _mesh()
  tx = ol.muon(1e-2)
  sp = _shard(_params(), mesh)
  state = distributed.sharded_init(tx.init, sp)
  pairs = param_mirrors(state, sp)
  # Momentum of the 4 hidden matrices (3 kernels + conv) + Adam mu and nu of
  # the 5 other leaves (embedding, head, 2 biases, norm scale).
  assert len(pairs) == 4 + 2 * 5
  for _, _, leaf, p in pairs:
    assert leaf.sharding == p.sharding


@pytest.mark.parametrize('axes', [None, 'data', ('data', 'model')])
@pytest.mark.parametrize('method', ['polar_express', 'svd'])
def test_shard_polar_matches_per_leaf(axes, method):
  mesh = _mesh()
  params = _params()
  # Matrix leaves only; the 3 (16, 32)/(32, 16) matrices form one group, the
  # conv kernel (36, 8) and head (16, 10) groups need padding to 8 / 4.
  mats = {k: v for k, v in params.items() if k != 'ln'}
  mats = {k: {kk: vv for kk, vv in v.items() if vv.ndim >= 2}
          for k, v in mats.items()}
  g = _shard(grad_stream(mats, 1)[0], mesh)
  base = ol.orthogonalize(method)
  spread = ol.orthogonalize(method, shard_polar=ol.PolarSharding(mesh, axes))
  ref, _ = jax.jit(base.update)(g, base.init(g))
  out, _ = jax.jit(spread.update)(g, spread.init(g))
  _close(out, ref, tol=1e-5)
  for x, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert x.shape == r.shape and x.dtype == r.dtype


def test_shard_polar_distributes_work():
  """Each device computes only its own matrices, chosen by cost (LPT)."""
  mesh = _mesh()
  seen = []

  def polar_fn(x):
    seen.append(x.shape)
    return ol.linalg.newton_schulz(x, ol.linalg.coefficients('polar_express'))

  mats = [jnp.ones((3, 8, 16)), jnp.ones((2, 16, 8)), jnp.ones((1, 4, 4))]
  out = jax.jit(lambda ms: distributed.sharded_polar(
      ms, polar_fn, distributed.PolarSharding(mesh)))(mats)
  # Group (8, 16): 5 matrices on 5 devices, one each; (4, 4): the 6th
  # device; 2 devices idle. No group is padded to 8: the branches compute 1
  # matrix each (the first two calls are shape inference with batch 1).
  assert sorted(seen[2:]) == [(1, 4, 4), (1, 8, 16)]
  assert [o.shape for o in out] == [m.shape for m in mats]


def test_shard_polar_in_muon_chain_matches_muon():
  mesh = _mesh()
  params = _params()
  mats = {k: {'kernel': v['kernel']} for k, v in params.items()
          if k.startswith('layer')}
  grads = grad_stream(mats, STEPS)
  chain = lambda sp: optax.chain(
      ol.momentum(0.95), ol.orthogonalize(shard_polar=sp),
      ol.scale_by_shape(), optax.scale_by_learning_rate(1e-2))
  ref_p, _ = _run(chain(None), mats, grads)
  sp = _shard(mats, mesh)
  out_p, _ = _run(chain(mesh), sp, [_shard(g, mesh) for g in grads])
  _close(out_p, ref_p)


def test_shard_polar_bad_spec():
  mesh = _mesh()
  with pytest.raises(ValueError, match='shard_polar'):
    ol.orthogonalize(shard_polar=ol.PolarSharding(mesh, 'nope'))
  with pytest.raises(TypeError, match='shard_polar'):
    ol.orthogonalize(shard_polar='data')


@pytest.mark.parametrize('name', ['muon', 'rmnp'])
def test_plain_init_keeps_parameter_sharding(name):
  """``tx.init`` outside jit: the momentum takes each parameter's sharding."""
  mesh = _mesh()
  sp = _shard(_params(), mesh)
  state = make(name).init(sp)
  pairs = param_mirrors(state, sp)
  assert len(pairs) >= 4
  for path, _, leaf, p in pairs:
    assert leaf.sharding == p.sharding, (jax.tree_util.keystr(path),
                                         leaf.sharding, p.sharding)
