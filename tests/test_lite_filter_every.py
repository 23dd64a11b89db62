"""Muon-LITE's amortised filter: ``filter_every = k`` (issue 24, point 4).

With ``k = 1`` the state and the program are today's; with ``k > 1`` the
sharp filter is recomputed on steps ``0, k, 2k, ...`` (``count % k == 0``)
and the cached one (and the threshold ratio) is held in between, inside a
``lax.cond`` whose other branch runs no matrix product. The multi-device
placements are in ``test_lite_filter_every_multidevice.py``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import polar as polar_lib
from optax_lite.linalg import subspace
from optax_lite.transforms import lite as lite_tx
from optax_lite.transforms.lite_muon import (MuonCachedGeometryState,
                                             MuonGeometryState)

DIMS = {'wide': ol.MatrixDims(), 'tall': ol.MatrixDims(),
        'stack': ol.MatrixDims(1, 2)}
COEFS = dict(chi=2.0, beta1=-0.25, beta2=1.0)
MOMENTUM = 0.95


def _params():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return {'wide': jax.random.normal(ks[0], (8, 12)),
          'tall': jax.random.normal(ks[1], (12, 6)),
          'stack': jax.random.normal(ks[2], (2, 6, 6))}


def _grads(k, params):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(100 + k), p.shape),
      params)


def _boost(every, route='small_side', **kw):
  return ol.lite_flat_boost(
      ol.muon_geometry(filter_every=every, filter_route=route), dims=DIMS,
      momentum=MOMENTUM, **COEFS, **kw)


def _run(tx, params, steps, state=None):
  """Updates and states after each of ``steps`` jitted steps."""
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  updates, states = [], []
  for k in range(steps):
    u, state = update(_grads(k, params), state)
    updates.append(u)
    states.append(state)
  return updates, states


def _to_k1(state):
  """A ``filter_every > 1`` state without its cached filter."""
  return state._replace(
      geometry=MuonGeometryState(state.geometry.threshold_ratio))


def _max_gap(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                             strict=True))


# --------------------------------------------------------------------------
# k = 1: today's state and program
# --------------------------------------------------------------------------


def test_default_is_one_and_adds_no_state():
  assert ol.muon_geometry().state_type is MuonGeometryState
  assert ol.muon_geometry(filter_every=1).state_type is MuonGeometryState
  assert MuonGeometryState._fields == ('threshold_ratio',)
  assert ol.muon_geometry(filter_every=2).state_type is (
      MuonCachedGeometryState)
  params = _params()
  s1 = _boost(1).init(params)
  assert isinstance(s1.geometry, MuonGeometryState)
  s3 = _boost(3).init(params)
  assert isinstance(s3.geometry, MuonCachedGeometryState)
  assert len(jax.tree.leaves(s3)) == len(jax.tree.leaves(s1)) + 3
  # The named optimizers: the default state equals filter_every=1's.
  for name in ('muon_lite', 'normuon_lite', 'fismo_lite'):
    make = getattr(ol, name)
    a = jax.eval_shape(make(0.01).init, params)
    b = jax.eval_shape(make(0.01, filter_every=1).init, params)
    c = jax.eval_shape(make(0.01, filter_every=2).init, params)
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    assert len(jax.tree.leaves(c)) > len(jax.tree.leaves(a)), name


@pytest.mark.parametrize('route', ['small_side', 'reference'])
def test_k1_program_has_no_conditional_and_k3_has_one_per_shape(route):
  params = _params()
  g = _grads(0, params)
  for every, want in ((1, 0), (3, 3)):
    tx = _boost(every, route)
    hlo = jax.jit(tx.update).lower(g, tx.init(params)).compile().as_text()
    assert hlo.count(' conditional(') == want, (every, route)


def _old_muon_geometry(route):
  """``muon_geometry``'s code before ``filter_every`` (a76cb02), with its
  defaults: the k=1 program must be this one."""
  def polar(x):
    return polar_lib.polar_by_method(x, 'polar_express', 6)

  def init(view, param):
    b, rows, cols = view.matrix_shape
    dtype = jnp.promote_types(param.dtype, jnp.float32)
    return MuonGeometryState(
        jnp.full((b,), 1.0 / math.sqrt(min(rows, cols)), dtype))

  def directions(view, m_term, g, leaf_state, count, need_g):
    del count
    (ratio,) = leaf_state
    b, rows, cols = view.matrix_shape
    m = view.to_matrix(m_term)
    if need_g:
      both = polar(jnp.concatenate([m, view.to_matrix(g)], axis=0))
      o, h = both[:b], both[b:]
    else:
      o, h = polar(m), None
    mf = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(mf * mf, axis=(-2, -1)))
    tau = (ratio * norm + 1e-9).astype(m.dtype)
    mm = lambda x, y: matmul_lib.matmul(x, y, kernel='lite_project')
    if route == 'reference':
      t = subspace.filter_from_polar(m, o, tau, method='polar_express',
                                     steps=6)
      measure, tt = t, jnp.swapaxes(t, -1, -2)
      sharp = lambda x: mm(t, mm(tt, x.astype(t.dtype)))
    else:
      p = subspace.small_side_projector(m, o, tau, method='polar_express',
                                        steps=6)
      measure, ot = p, jnp.swapaxes(o, -1, -2)
      if rows <= cols:
        sharp = lambda x: mm(p, x.astype(p.dtype))
      else:
        sharp = lambda x: mm(o, mm(p, mm(ot, x.astype(o.dtype))))
    d_s = lite_tx.sharp_dim(0.1, rows, cols, 'reference')
    mes = measure.astype(jnp.promote_types(measure.dtype, jnp.float32))
    rank = jnp.sqrt(jnp.sum(jnp.square(mes), axis=(-2, -1)))
    new_ratio = subspace.adapt_threshold(ratio, rank.astype(ratio.dtype),
                                         math.sqrt(d_s), 1.05, 1.0, 0.0)
    new_ratio = jnp.where(norm > 0, new_ratio, ratio).astype(ratio.dtype)
    return lite_tx.LeafDirections(
        o, h, lambda x: x - sharp(x), view.from_matrix,
        lambda w: view.to_matrix(w).astype(o.dtype),
        MuonGeometryState(new_ratio))

  return lite_tx.Geometry(init, directions, state_type=MuonGeometryState)


@pytest.mark.parametrize('route', ['small_side', 'reference'])
def test_k1_is_bit_identical_to_the_old_code_path(route):
  params = _params()
  old = ol.lite_flat_boost(_old_muon_geometry(route), dims=DIMS,
                           momentum=MOMENTUM, **COEFS)
  u_old, s_old = _run(old, params, 4)
  u_new, s_new = _run(_boost(1, route), params, 4)
  assert jax.tree.structure(s_new[-1]) == jax.tree.structure(s_old[-1])
  for a, b in zip(u_new + s_new, u_old + s_old, strict=True):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dots(jaxpr) -> int:
  """Matrix products in a jaxpr, sub-jaxprs included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'dot_general'
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          n += _dots(getattr(inner, 'jaxpr', inner))
  return n


def _conds(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'cond':
      out.append(eqn)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          out += _conds(getattr(inner, 'jaxpr', inner))
  return out


@pytest.mark.parametrize('route', ['small_side', 'reference'])
def test_held_steps_skip_the_sign_iteration(route):
  """The cond's held branch has no matrix product; its refresh branch has
  the sign iteration's (a loop body of Polar Express steps, counted once,
  and for the small side the product ``H = M̃ Oᵀ``)."""
  params = _params()
  tx = _boost(3, route)
  jaxpr = jax.make_jaxpr(tx.update)(_grads(0, params), tx.init(params))
  conds = _conds(jaxpr.jaxpr)
  assert len(conds) == 3  # one per leaf
  for eqn in conds:
    held, fresh = (_dots(b.jaxpr) for b in eqn.params['branches'])
    assert held == 0 and fresh >= 3, (held, fresh)


# --------------------------------------------------------------------------
# k = 3: refresh on steps 0 and 3, reuse on 1, 2
# --------------------------------------------------------------------------


def _fresh_filter(route, m, ratio):
  """The filter and ratio of a refresh step, recomputed from the momentum
  term ``m`` with the k=1 route's functions (wide / tall matrices)."""
  m = m[None]
  o = polar_lib.polar_by_method(m, 'polar_express', 6)
  norm = jnp.sqrt(jnp.sum(m * m, axis=(-2, -1)))
  tau = ratio * norm + 1e-9
  if route == 'reference':
    return subspace.filter_from_polar(m, o, tau, method='polar_express',
                                      steps=6)
  return subspace.small_side_projector(m, o, tau, method='polar_express',
                                       steps=6)


@pytest.mark.parametrize('route', ['small_side', 'reference'])
def test_refresh_and_reuse_steps(route):
  params = _params()
  tx3 = _boost(3, route)
  u3, s3 = _run(tx3, params, 5)
  geo = [s.geometry for s in s3]
  # Steps 1 and 2 reuse step 0's filter and hold its ratio, exactly.
  for k in (1, 2):
    for name in params:
      np.testing.assert_array_equal(geo[k].sharp_filter[name],
                                    geo[0].sharp_filter[name])
      np.testing.assert_array_equal(geo[k].threshold_ratio[name],
                                    geo[0].threshold_ratio[name])
  # Step 3 refreshes: a new filter, the ratio moved by one controller step.
  for name in params:
    assert float(jnp.max(jnp.abs(geo[3].sharp_filter[name]
                                 - geo[2].sharp_filter[name]))) > 1e-3
    r2, r3 = geo[2].threshold_ratio[name], geo[3].threshold_ratio[name]
    ratio = r3 / r2
    assert bool(jnp.all((jnp.abs(ratio - 1.05) < 1e-5)
                        | (jnp.abs(ratio - 0.95) < 1e-5)
                        | (r3 == 1.0))), (name, r2, r3)
  np.testing.assert_array_equal(geo[4].sharp_filter['wide'],
                                geo[3].sharp_filter['wide'])
  # A refresh step is the k=1 step from the same state (steps 0 and 3).
  tx1 = _boost(1, route)
  for k, before in ((0, tx1.init(params)), (3, _to_k1(s3[2]))):
    u1, s1 = jax.jit(tx1.update)(_grads(k, params), before)
    assert _max_gap(u1, u3[k]) <= 1e-6, k
    assert _max_gap(s1.geometry, geo[k].threshold_ratio) <= 1e-7, k
    assert _max_gap(s1.mu, s3[k].mu) == 0.0
  # The cached filter is the one computed from that step's momentum term.
  for name in ('wide', 'tall'):
    mu2 = s3[2].mu[name]
    g3 = _grads(3, params)[name]
    m_new = MOMENTUM * mu2 + g3
    m_term = MOMENTUM * m_new + g3  # Nesterov
    want = _fresh_filter(route, m_term, geo[2].threshold_ratio[name])
    np.testing.assert_allclose(geo[3].sharp_filter[name], want, atol=2e-5)


def test_held_step_uses_the_cached_projector():
  """Step 1 of k=3 is the LITE combination with step 0's ``P`` and the
  current polar factors (wide: ``P`` on the fan-in side; tall: carried
  through the current ``O``)."""
  params = _params()
  tx3 = _boost(3)
  u3, s3 = _run(tx3, params, 2)
  g1 = _grads(1, params)
  chi, b1, b2 = COEFS['chi'], COEFS['beta1'], COEFS['beta2']
  hi = jax.lax.Precision.HIGHEST
  for name in ('wide', 'tall'):
    p = s3[0].geometry.sharp_filter[name][0]
    m_new = s3[1].mu[name]
    m_term = MOMENTUM * m_new + g1[name]
    o = polar_lib.polar_by_method(m_term, 'polar_express', 6)
    h = polar_lib.polar_by_method(g1[name], 'polar_express', 6)
    rows, cols = m_term.shape

    def sharp(x, p=p, o=o, rows=rows, cols=cols):
      if rows <= cols:
        return jnp.matmul(p, x, precision=hi)
      return o @ jnp.matmul(p, jnp.matmul(o.T, x, precision=hi),
                            precision=hi)

    flat = lambda x, sharp=sharp: x - sharp(x)
    u = o + b1 * h + (b2 - b1) * flat(h)
    u = u + (chi - 1.0) * flat(u)
    np.testing.assert_allclose(u3[1][name], u, atol=2e-4, rtol=1e-4)
  # ... and differs from a fresh filter at that step (the cache matters).
  u1, _ = jax.jit(_boost(1).update)(g1, _to_k1(s3[0]))
  assert _max_gap(u1, u3[1]) > 1e-4


def test_stack_by_shape_equals_per_leaf():
  params = _params()
  a, sa = _run(_boost(3), params, 4)
  b, sb = _run(_boost(3, stack_by_shape=True), params, 4)
  # Batched and per-leaf float32 polar factors differ by round-off: 1.2e-6
  # measured (fast-compile CI flags), 10 ulp of the O(1) entries.
  for k in range(4):
    assert _max_gap(a[k], b[k]) <= 1e-5
  assert _max_gap(sa[-1].geometry, sb[-1].geometry) <= 1e-5


def test_normuon_and_fismo_lite_carry_the_cache():
  params = {'w': jax.random.normal(jax.random.PRNGKey(1), (8, 12))}
  labels = {'w': 'matrix'}
  for name in ('normuon_lite', 'fismo_lite', 'muon_lite'):
    tx = getattr(ol, name)(0.01, filter_every=3, labels=labels)
    found = []
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(4):
      _, state = update(_grads(k, params), state, params)
      found.append([x for x in jax.tree.leaves(state)
                    if x.shape == (1, 8, 8)])
    assert len(found[0]) == 1, name
    np.testing.assert_array_equal(found[1][0], found[0][0])
    np.testing.assert_array_equal(found[2][0], found[0][0])
    assert float(jnp.max(jnp.abs(found[3][0] - found[0][0]))) > 1e-4, name


# --------------------------------------------------------------------------
# Training: a small least-squares problem
# --------------------------------------------------------------------------


def _least_squares_losses(every, steps=10):
  ks = jax.random.split(jax.random.PRNGKey(7), 3)
  x = jax.random.normal(ks[0], (64, 16))
  w_true = jax.random.normal(ks[1], (16, 24))
  y = x @ w_true + 0.1 * jax.random.normal(ks[2], (64, 24))
  loss = lambda p: jnp.mean((x @ p['w'] - y) ** 2)
  params = {'w': jnp.zeros((16, 24))}
  tx = ol.muon_lite(0.1, filter_every=every, labels={'w': 'matrix'},
                    weight_decay=0.0)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  losses = [float(loss(params))]
  for _ in range(steps):
    params, state = step(params, state)
    losses.append(float(loss(params)))
  return losses


def test_training_stays_close_to_every_step_filter():
  base = _least_squares_losses(1)
  lagged = _least_squares_losses(3)
  drop1, drop3 = base[0] - base[-1], lagged[0] - lagged[-1]
  assert drop1 > 0.3 * base[0]  # the problem is being solved
  assert drop3 > 0 and drop1 / 2 <= drop3 <= 2 * drop1, (base, lagged)


# --------------------------------------------------------------------------
# Bad input and inject_hyperparams
# --------------------------------------------------------------------------


@pytest.mark.parametrize('bad, err', [(0, ValueError), (-2, ValueError),
                                      (2.0, TypeError), (True, TypeError),
                                      ('3', TypeError)])
def test_bad_filter_every_is_named(bad, err):
  with pytest.raises(err, match='filter_every'):
    ol.muon_geometry(filter_every=bad)
  for name in ('muon_lite', 'normuon_lite', 'fismo_lite'):
    with pytest.raises(err, match='filter_every'):
      getattr(ol, name)(0.01, filter_every=bad)


def test_filter_every_is_structural():
  """A concrete integer array is read as its int; a traced one (jit) is
  refused naming ``static_args``, in the geometry and the optimizers."""
  assert ol.muon_geometry(filter_every=jnp.asarray(3)).state_type is (
      MuonCachedGeometryState)
  with pytest.raises(TypeError, match='filter_every.*static_args'):
    jax.jit(lambda k: ol.muon_geometry(filter_every=k).state_type and k)(
        jnp.asarray(3))
  params = _params()
  with pytest.raises(TypeError, match='filter_every.*static_args'):
    optax.inject_hyperparams(ol.muon_lite)(
        learning_rate=0.01, filter_every=3).init(params)


def test_inject_hyperparams_with_static_filter_every():
  params = {'w': jax.random.normal(jax.random.PRNGKey(1), (8, 12))}
  kw = dict(labels={'w': 'matrix'}, filter_every=3)
  plain = ol.muon_lite(0.01, **kw)
  inj = optax.inject_hyperparams(ol.muon_lite, static_args=(
      'filter_every',))(learning_rate=0.01, **kw)
  sp, si = plain.init(params), inj.init(params)
  up, ui = jax.jit(plain.update), jax.jit(inj.update)
  for k in range(4):
    g = _grads(k, params)
    a, sp = up(g, sp, params)
    b, si = ui(g, si, params)
    assert _max_gap(a, b) <= 1e-6 * float(jnp.max(jnp.abs(a['w']))), k
  # Injecting the default (filter_every=None) leaves it alone.
  default = optax.inject_hyperparams(ol.muon_lite)(learning_rate=0.01,
                                                   labels={'w': 'matrix'})
  assert 'filter_every' not in default.init(params).hyperparams


def test_names_stay_importable_from_lite():
  assert lite_tx.muon_geometry is ol.muon_geometry
  assert lite_tx.MuonGeometryState is MuonGeometryState
  assert lite_tx.FILTER_ROUTES == ('small_side', 'reference')
  assert lite_tx.sharp_dim(0.1, 64, 32, 'reference') == 4
  assert ol.transforms.Geometry is lite_tx.Geometry


def test_bfloat16_leaves_keep_their_dtype_with_a_cached_filter():
  """bfloat16 parameters, gradients and momentum (jitted, 4 steps with two
  refreshes): updates stay bfloat16 and finite, and the cached filter is
  what the geometry's init made (its dtype and shape), not recast."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  tx = _boost(3, mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  held = jax.tree.leaves(state.geometry)
  update = jax.jit(tx.update)
  for k in range(4):
    g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(k, params))
    u, state = update(g, state)
    for leaf in jax.tree.leaves(u):
      assert leaf.dtype == jnp.bfloat16
      assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
  for a, b in zip(jax.tree.leaves(state.geometry), held):
    assert (a.dtype, a.shape) == (b.dtype, b.shape)


def test_tree_map_params_runs_on_a_cached_filter_state():
  """``optax.tree_utils.tree_map_params`` on a k > 1 state keeps its
  structure and maps the momenta."""
  tx = ol.muon_lite(0.01, filter_every=3)
  params = _params()
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: p + 1.0, state, transform_non_params=lambda x: x)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  moved = [bool(jnp.any(a != b)) for a, b in
           zip(jax.tree.leaves(mapped), jax.tree.leaves(state))]
  assert sum(moved) >= len(jax.tree.leaves(params))  # the momenta at least
