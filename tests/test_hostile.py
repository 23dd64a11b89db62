"""Hostile input for every named optimizer.

Documented behaviour (checked below):

* **NaN / Inf in a gradient.** The optimizers do not sanitise input: a
  non-finite entry in a matrix leaf makes that leaf's update non-finite (the
  polar factor / preconditioner of a NaN matrix is NaN) and poisons that
  leaf's state; *other* leaves stay finite. Wrap the optimizer in
  ``optax.apply_if_finite(tx, max_consecutive_errors)``: a step whose
  gradient has any NaN/Inf is then skipped (zero update), the inner state is
  kept bit-for-bit, and the next finite step continues exactly as if the bad
  step had never happened.
* **All-zero gradients** (on zero parameters, so weight decay adds nothing)
  give finite updates that are exactly zero.
* **Rank-1 matrices, 1×n, n×1 (1:200; 1:1000 in the slow test), scalar
  leaves** give finite updates of the right shape and dtype.
* **bfloat16 parameters and gradients with float32 state** (``mu_dtype``):
  updates are bfloat16 and finite, the momentum is float32.
* **Empty pytrees** init and update to empty trees; **empty leaves** (a
  0 × n matrix, an empty embedding or gain) step as AdamW's no-op beside
  the others.
* **A gradient tree that does not match the state** raises ``ValueError``
  (structure) or ``TypeError`` (shape) naming the mismatch.

``python tests/test_hostile.py`` prints the table of what each optimizer
produced for each input (used in the project notes).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import param_mirrors
from optimizer_zoo import (FACTOR_DTYPE, NAMED, cached, get, grads_like, make,
                           params_tree, state_dtype_kw)


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float32))))
             for x in jax.tree.leaves(tree))


def _identical(a, b):
  la, da = jax.tree.flatten(a)
  lb, db = jax.tree.flatten(b)
  assert da == db
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _poison(g, value):
  g = jax.tree.map(lambda x: x, g)
  g['layer0']['kernel'] = g['layer0']['kernel'].at[1, 2].set(value)
  return g


def _step(tx):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u
  return step


@pytest.mark.parametrize('value', [np.nan, np.inf])
@pytest.mark.parametrize('name', NAMED)
def test_nonfinite_unguarded_stays_in_its_leaf(name, value):
  tx, step, _ = cached(name)
  p = params_tree()
  s = tx.init(p)
  # One clean step first: SOAP skips its first update (eigh initialisation).
  _, s, _ = step(p, s, grads_like(p, key=5))
  _, s_bad, u = step(p, s, _poison(grads_like(p), value))
  assert not _finite(u['layer0']['kernel']), (
      f'{name}: a {value} gradient was silently turned into a finite step')
  for k in ('layer1', 'conv', 'embed', 'head', 'ln'):
    assert _finite(u[k]), f'{name}: {value} in layer0 leaked into {k}'


def _guard(tx):
  return optax.apply_if_finite(tx, max_consecutive_errors=3)


@pytest.mark.parametrize('value', [np.nan, np.inf])
@pytest.mark.parametrize('name', NAMED)
def test_apply_if_finite_skips_and_keeps_state(name, value):
  tx, step, _ = cached(name, wrap=_guard)
  p0 = params_tree()
  g1, g2, g3 = (grads_like(p0, key=k, scale=0.5) for k in (1, 2, 3))

  p, s, _ = step(p0, tx.init(p0), g1)
  p_bad, s_bad, u_bad = step(p, s, _poison(g2, value))
  # Skipped: zero update, parameters and inner state bit-identical.
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u_bad))
  _identical(p_bad, p)
  _identical(s_bad.inner_state, s.inner_state)
  assert int(s_bad.notfinite_count) == 1 and int(s_bad.total_notfinite) == 1
  assert _finite(s_bad.inner_state)
  # The next finite step equals (bit for bit, same compiled step) a run that
  # never saw the bad gradient.
  p_next, s_next, _ = step(p_bad, s_bad, g3)
  q, t, _ = step(p0, tx.init(p0), g1)
  q, t, _ = step(q, t, g3)
  _identical(p_next, q)
  _identical(s_next.inner_state, t.inner_state)
  assert int(s_next.notfinite_count) == 0


# Optimizers whose matrices must be non-zero at init (MuonH: the radius of
# each matrix's sphere is its norm at init; dion refuses zero matrices too).
NONZERO_MATRICES = ('muonh',)


@pytest.mark.parametrize('name', NAMED)
def test_all_zero_gradients(name):
  # Zero parameters too (a zero-initialised layer), so that weight decay adds
  # nothing and the update must be exactly zero; same compiled step as above.
  tx, step, _ = cached(name)
  p = jax.tree.map(jnp.zeros_like, params_tree())
  if name in NONZERO_MATRICES:
    _all_zero_gradients_on_a_sphere(name, p)
    return
  s = tx.init(p)
  zeros = jax.tree.map(jnp.zeros_like, p)
  for _ in range(3):  # through a preconditioner refresh
    p2, s, u = step(p, s, zeros)
    assert _finite(u) and _finite(s), name
    for x in jax.tree.leaves(u):
      np.testing.assert_array_equal(np.asarray(x), 0.0)
  # And a real gradient afterwards still gives a finite, non-zero step.
  _, s, u = step(p, s, grads_like(p))
  assert _finite(u) and _finite(s)
  assert np.any(np.asarray(u['layer0']['kernel']))


def _all_zero_gradients_on_a_sphere(name, zero_params):
  """Zero matrices are refused at init, naming ``params``; on non-zero
  matrices (no decay) zero gradients keep every matrix where it is (to
  round-off: the projection back to the sphere) and every other leaf
  exactly; a real gradient then moves the matrices."""
  tx, step, _ = cached(name, weight_decay=0.0)
  with pytest.raises(ValueError, match='params'):
    tx.init(zero_params)
  p = params_tree()
  for k in ('embed', 'head', 'ln'):
    p[k] = jax.tree.map(jnp.zeros_like, p[k])
  s = tx.init(p)
  zeros = jax.tree.map(jnp.zeros_like, p)
  for _ in range(3):
    _, s, u = step(p, s, zeros)
    assert _finite(u) and _finite(s), name
    for k in ('layer0', 'layer1', 'conv'):
      np.testing.assert_allclose(u[k]['kernel'], 0.0,
                                 atol=1e-6 * float(jnp.max(jnp.abs(
                                     p[k]['kernel']))))
    for k in ('embed', 'head', 'ln'):
      for x in jax.tree.leaves(u[k]):
        np.testing.assert_array_equal(np.asarray(x), 0.0)
  _, s, u = step(p, s, grads_like(p))
  assert _finite(u) and _finite(s)
  assert float(jnp.max(jnp.abs(u['layer0']['kernel']))) > 1e-3


def _odd_params():
  # 1×n and n×1 at a 1:200 aspect (a new leaf shape is a new compile, so one
  # of each), a square leaf for the rank-1 gradients, a scalar.
  k = jax.random.split(jax.random.PRNGKey(3), 6)
  return {
      'wide': {'kernel': jax.random.normal(k[2], (1, 200)) * 0.03},
      'tall': {'kernel': jax.random.normal(k[3], (200, 1)) * 0.03},
      'sq': {'kernel': jax.random.normal(k[4], (6, 6))},
      'scalar': {'s': jnp.asarray(0.5)},
  }


def _rank1_grads(params, key=7):
  def one(x, k):
    if x.ndim < 2:
      return jax.random.normal(k, x.shape)
    ka, kb = jax.random.split(k)
    a = jax.random.normal(ka, (x.shape[0], 1))
    b = jax.random.normal(kb, (1, x.shape[1]))
    return a @ b
  leaves, td = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.PRNGKey(key), len(leaves))
  return jax.tree.unflatten(td, [one(x, kk) for x, kk in zip(leaves, ks)])


@pytest.mark.parametrize('name', NAMED)
def test_degenerate_shapes_rank1_and_scalars(name):
  tx, step, _ = cached(name)
  p = _odd_params()
  s = tx.init(p)
  for i in range(3):
    g = _rank1_grads(p, key=i) if i % 2 else grads_like(p, key=i)
    p_new, s, u = step(p, s, g)
    assert _finite(u) and _finite(s) and _finite(p_new), name
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(p)):
      assert x.shape == y.shape and x.dtype == y.dtype
    p = p_new
  assert p['scalar']['s'].shape == ()


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMED)
def test_aspect_1_to_1000_large(name):
  tx = make(name)
  p = {'a': {'kernel': jnp.ones((3, 3000)) * 0.01},
       'b': {'kernel': jnp.ones((3000, 3)) * 0.01},
       'c': {'kernel': jnp.ones((1, 1000)) * 0.01},
       'd': {'kernel': jnp.ones((1000, 1)) * 0.01}}
  s = tx.init(p)
  step = _step(tx)
  for i in range(3):
    p, s, u = step(p, s, grads_like(p, key=i))
    assert _finite(u) and _finite(s)


@pytest.mark.parametrize('name', NAMED)
def test_bf16_params_with_f32_state(name):
  tx, step, _ = cached(name, mu_dtype=jnp.float32)
  p = params_tree(dtype=jnp.bfloat16)
  s = tx.init(p)
  for i in range(3):
    p_new, s, u = step(p, s, grads_like(p, key=i))
    assert _finite(u) and _finite(s)
    # Parameters stay bfloat16. Matrix updates are bfloat16; the AdamW
    # leaves' updates come out in float32 (optax's scale_by_adam computes in
    # mu's dtype) and apply_updates casts them back.
    for x in jax.tree.leaves(p_new):
      assert x.dtype == jnp.bfloat16
    for x in jax.tree.leaves(u):
      assert x.dtype in (jnp.bfloat16, jnp.float32)
    for k in ('layer0', 'layer1', 'conv'):
      assert u[k]['kernel'].dtype == jnp.bfloat16, (name, k)
    p = p_new
  # The momentum of every matrix leaf is kept in float32.
  _assert_state_dtype(s, p, jnp.float32)


def _param_shaped(state, params):
  """(param path, state leaf) for state leaves that mirror a parameter.

  A state leaf mirrors parameter ``q`` when its path ends with ``q``'s path
  and it has ``q``'s number of elements (SOAP keeps its momentum in the
  ``(batch, fan_in, fan_out)`` matrix view of the leaf).
  """
  return [(jax.tree_util.keystr(ppath), leaf)
          for _, ppath, leaf, _ in param_mirrors(state, params, by_size=True)]


def _assert_state_dtype(state, params, dtype):
  pairs = _param_shaped(state, params)
  have = {}
  for key, leaf in pairs:
    have.setdefault(key, set()).add(jnp.dtype(leaf.dtype))
  for key in ("['layer0']['kernel']", "['layer1']['kernel']",
              "['conv']['kernel']"):
    assert jnp.dtype(dtype) in have.get(key, set()), (
        f'no {jnp.dtype(dtype).name} momentum for {key}: {have.get(key)}')


@pytest.mark.parametrize('name', NAMED)
def test_mu_dtype_honoured(name):
  """mu_dtype (and the Kronecker factor dtype) reach the stored state."""
  # The state dtype arguments are exactly mu_dtype and the factor dtype named
  # above: a renamed or new one fails here instead of going untested.
  # (``ns_dtype`` is the polar iteration's compute dtype, not stored state.)
  sig = inspect.signature(get(name)).parameters
  factor = FACTOR_DTYPE.get(name)
  assert 'mu_dtype' in sig, f'{name} has no mu_dtype argument'
  state_dtypes = {k for k in sig if k.endswith('dtype')} - {'mu_dtype',
                                                            'ns_dtype'}
  assert state_dtypes == ({factor} if factor else set()), (name, state_dtypes)
  tx, step, _ = cached(name, **state_dtype_kw(name, jnp.bfloat16))
  p = params_tree()
  s = tx.init(p)
  _, s, u = step(p, s, grads_like(p))
  assert _finite(u)
  _assert_state_dtype(s, p, jnp.bfloat16)
  for x in jax.tree.leaves(u):
    assert x.dtype == jnp.float32
  if factor:
    # Square non-parameter-shaped state (Kronecker factors / bases) follows
    # the factor dtype.
    shaped = {id(l) for _, l in _param_shaped(s, p)}
    squares = [l for l in jax.tree.leaves(s) if id(l) not in shaped and
               l.ndim >= 2 and l.shape[-1] == l.shape[-2] and l.shape[-1] > 1
               and jnp.issubdtype(l.dtype, jnp.floating)]
    assert squares, f'{name}: no square factor state found'
    assert all(l.dtype == jnp.bfloat16 for l in squares), [
        (l.shape, l.dtype) for l in squares]


@pytest.mark.parametrize('name', NAMED)
def test_empty_pytrees(name):
  tx = make(name)
  for empty in ({}, [], {'a': {}}):
    s = tx.init(empty)
    u, s2 = tx.update(empty, s, empty)
    assert jax.tree.leaves(u) == []
    assert jax.tree.structure(u) == jax.tree.structure(empty)
    u, _ = cached(name)[2](empty, s2, empty)
    assert jax.tree.leaves(u) == []


def _with_empty_leaves():
  """A tree with leaves that have no entries: a 0 × 4 and a 4 × 0 hidden
  matrix, an empty embedding and an empty norm gain, beside a real one."""
  return {'a': {'kernel': jnp.zeros((0, 4))},
          'b': {'kernel': jnp.zeros((4, 0))},
          'embed': {'embedding': jnp.zeros((0, 8))},
          'norm': {'scale': jnp.zeros((0,))},
          'dense': {'kernel': jnp.ones((8, 6)) * 0.1}}


@pytest.mark.parametrize('name', NAMED + ['adamw_lite'])
def test_empty_leaves_step_beside_the_others(name):
  """An empty matrix has no direction: the labels send it to AdamW (no
  division by its zero side, no reduction over nothing), and the other
  leaves step as they would without it."""
  import optax_lite as ol
  tx = ol.adamw_lite(1e-2) if name == 'adamw_lite' else make(name)
  p = _with_empty_leaves()
  s = tx.init(p)
  step = _step(tx)
  for i in range(2):
    p, s, u = step(p, s, grads_like(p, key=i))
    assert _finite(u) and _finite(s), name
  assert u['a']['kernel'].shape == (0, 4) and u['norm']['scale'].shape == (0,)
  assert float(jnp.abs(u['dense']['kernel']).max()) > 0


def test_transforms_step_empty_matrices():
  """Used directly, the matrix transforms pass an empty leaf through as a
  non-matrix leaf; LITE's matrix geometries refuse it by path."""
  import optax_lite as ol
  p = {'a': jnp.zeros((0, 4)), 'b': jnp.ones((3, 5))}
  for tx in (ol.orthogonalize(), ol.row_normalize(), ol.scale_by_soap(),
             ol.scale_by_shampoo(), ol.fisher_whiten(ol.orthogonalize()),
             ol.lite_flat_boost(ol.diagonal_geometry())):
    s = tx.init(p)
    for _ in range(2):
      u, s = jax.jit(tx.update)(p, s, p)
    assert _finite(u) and u['a'].shape == (0, 4)
  with pytest.raises(ValueError, match=r"params\['a'\]: shape \(0, 4\)"):
    ol.lite_flat_boost(ol.muon_geometry()).init(p)


@pytest.mark.parametrize('name', NAMED)
def test_mismatched_gradient_tree_raises(name):
  tx = cached(name)[0]
  p = params_tree()
  s = tx.init(p)
  g = grads_like(p)
  missing = {k: v for k, v in g.items() if k != 'conv'}
  with pytest.raises((ValueError, TypeError),
                     match='(?i)(structure|mismatch|key|tree)'):
    tx.update(missing, s, p)
  extra = dict(g, extra={'kernel': jnp.ones((4, 4))})
  with pytest.raises((ValueError, TypeError),
                     match='(?i)(structure|mismatch|key|tree)'):
    tx.update(extra, s, p)
  transposed = jax.tree.map(lambda x: x, g)
  transposed['layer0']['kernel'] = g['layer0']['kernel'].T
  with pytest.raises((ValueError, TypeError), match='(?i)shape'):
    jax.block_until_ready(tx.update(transposed, s, p))


@pytest.mark.parametrize('name', NAMED)
def test_integer_leaf_is_a_clear_type_error(name):
  """An integer matrix leaf is rejected by name, not silently updated."""
  tx = make(name)
  params = {'w': jnp.ones((4, 6), jnp.int32), 'v': jnp.ones((4, 6))}
  with pytest.raises(TypeError, match='floating'):
    state = tx.init(params)
    tx.update(params, state, params)


# ----------------------------------------------------------------------------
# The behaviour table for the notes: python tests/test_hostile.py


def describe(names=NAMED):
  cases = {
      'nan in layer0': lambda p: _poison(grads_like(p), np.nan),
      'inf in layer0': lambda p: _poison(grads_like(p), np.inf),
      'all zero': lambda p: jax.tree.map(jnp.zeros_like, p),
      'huge 1e30': lambda p: grads_like(p, scale=1e30),
      'tiny 1e-30': lambda p: grads_like(p, scale=1e-30),
  }
  rows = []
  for name in names:
    try:
      tx = make(name)
    except Exception as e:  # not there yet
      rows.append((name, 'n/a', f'{type(e).__name__}: {e}'))
      continue
    for case, gf in cases.items():
      p = params_tree()
      try:
        u, s = jax.jit(tx.update)(gf(p), tx.init(p), p)
        bad = sorted({jax.tree_util.keystr(k[:1]) for k, x in
                      jax.tree_util.tree_flatten_with_path(u)[0]
                      if not np.all(np.isfinite(np.asarray(x)))})
        mx = max(float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(x), x, 0))))
                 for x in jax.tree.leaves(u))
        what = ((f'non-finite update in {",".join(bad)}' if bad else 'finite')
                + f'; max|finite u|={mx:.3g}; state finite: {_finite(s)}')
      except Exception as e:
        what = f'raises {type(e).__name__}: {str(e)[:80]}'
      rows.append((name, case, what))
    p = _odd_params()
    try:
      u, s = jax.jit(tx.update)(_rank1_grads(p), tx.init(p), p)
      rows.append((name, 'rank-1, 1xn, nx1, 1:1000, scalar',
                   'finite' if _finite(u) and _finite(s) else 'NON-FINITE'))
    except Exception as e:
      rows.append((name, 'rank-1, 1xn, nx1, 1:1000, scalar',
                   f'raises {type(e).__name__}: {str(e)[:80]}'))
  for r in rows:
    print(' | '.join(r))


if __name__ == '__main__':
  describe()

