"""Cautious weight decay: the transform's rule and every named optimizer.

Rule (dion ``muon_update_post_orthogonalize`` / ``adamw_update`` with
``cautious_wd=True``): with ``u`` the direction before the learning rate,
the decay ``λw`` is added only where ``u·w ≥ 0``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
import optimizer_zoo as zoo

LR, WD = 0.01, 0.5


def test_rule_against_numpy():
  rng = np.random.default_rng(0)
  u = rng.standard_normal((6, 7))
  w = rng.standard_normal((6, 7))
  u[0, :3] = 0.0   # u·w = 0 counts as agreeing (dion: sign + 1, min 1)
  w[1, :2] = 0.0
  tx = ol.add_cautious_decayed_weights(0.3)
  got, _ = tx.update({'a': jnp.asarray(u, jnp.float32)}, tx.init(None),
                     {'a': jnp.asarray(w, jnp.float32)})
  mask = np.minimum(np.sign(u * w) + 1, 1)      # dion's expression
  want = u + 0.3 * mask * w
  np.testing.assert_allclose(got['a'], want, rtol=1e-6, atol=1e-7)
  assert 0 < mask.mean() < 1


def test_rule_masked_and_needs_params():
  tx = ol.add_cautious_decayed_weights(0.3, mask={'a': True, 'b': False})
  p = {'a': jnp.ones(3), 'b': jnp.ones(3)}
  u = {'a': jnp.ones(3), 'b': jnp.ones(3)}
  got, _ = tx.update(u, tx.init(p), p)
  np.testing.assert_allclose(got['a'], 1.3)
  np.testing.assert_allclose(got['b'], 1.0)
  with pytest.raises(ValueError, match='params'):
    ol.add_cautious_decayed_weights(0.3).update(u, optax.EmptyState())
  with pytest.raises(ValueError, match='weight_decay'):
    ol.add_cautious_decayed_weights(-0.1)


NAMES = zoo.NAMED + ['adamw_lite']
# The LITE optimizers' extra decay along flat directions is a separate
# (reference-code) term, left plain; switch it off to isolate the rule.
NO_FLAT = {'flat_weight_decay': False}


def _make(name, **kw):
  if name.endswith('_lite'):
    kw = {**NO_FLAT, **kw}
  if name in zoo.SMALL:
    return zoo.make(name, learning_rate=LR, **kw)
  return getattr(ol, name)(LR, **kw)


def _params(name):
  if name == 'adamw_lite':
    return {'e': jax.random.normal(jax.random.PRNGKey(0), (20, 5))}
  return zoo.params_tree()


@pytest.mark.parametrize('name', NAMES)
def test_decay_exactly_on_agreeing_coordinates(name):
  """``cautious`` minus ``weight_decay=0``: ``−η λ w`` exactly where the
  direction ``−u₀/η`` and ``w`` agree in sign, zero elsewhere. Second
  step (SOAP's first only builds statistics), same state on both sides
  (the decay is decoupled: it never reaches the state)."""
  params = _params(name)
  plain = _make(name, weight_decay=0.0)
  cautious = _make(name, weight_decay=WD, cautious_weight_decay=True)
  grads = zoo.grad_stream(params, 2)
  sp, sc = plain.init(params), cautious.init(params)
  for g in grads:
    u0, sp = jax.jit(plain.update)(g, sp, params)
    uc, sc = jax.jit(cautious.update)(g, sc, params)
  n_decayed = n_kept = 0
  decayed_leaves = []
  for path, a, b, w in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(u0), jax.tree.leaves(uc), jax.tree.leaves(params)):
    a, b, w = (np.asarray(x, np.float64) for x in (a, b, w))
    diff = b - a
    if not np.any(np.abs(diff) > 1e-9):
      continue  # a leaf without decay (muonh's matrices)
    decayed_leaves.append(jax.tree_util.keystr(path[0]))
    agree = -a * w >= 0
    # Near the boundary the sign of u₀ is round-off; leave those out.
    clear = np.abs(a) > 1e-4 * np.max(np.abs(a))
    np.testing.assert_allclose(diff[agree & clear],
                               -LR * WD * w[agree & clear], rtol=1e-3,
                               atol=1e-8)
    # No decay: zero up to the round-off of two differently fused programs
    # (1.3e-8 measured, FISMO-LITE with OPTAX_LITE_FAST_COMPILE). A decay
    # where it does not belong is at least η·λ·min|w| = 7.1e-6 on these
    # trees (min |w| = 1.4e-3), so 1e-7 misses none that 1e-8 caught.
    np.testing.assert_allclose(diff[~agree & clear], 0.0, atol=1e-7)
    n_decayed += int(np.sum(agree & clear & (w != 0)))
    n_kept += int(np.sum(~agree & clear & (w != 0)))
  assert n_decayed > 0 and n_kept > 0, (n_decayed, n_kept)
  if name == 'muonh':   # only the AdamW leaves are decayed
    assert set(decayed_leaves) == {"['embed']['embedding']",
                                   "['head']['kernel']", "['ln']['scale']"}
  elif name != 'adamw_lite':
    assert "['layer0']['kernel']" in decayed_leaves, decayed_leaves


@pytest.mark.parametrize('name', NAMES)
def test_cautious_flag_is_validated(name):
  with pytest.raises(TypeError, match='cautious_weight_decay'):
    _make(name, cautious_weight_decay=1)
