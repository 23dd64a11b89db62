"""Orbax save/restore of every named optimizer's state.

A run checkpointed after ``k`` steps, restored from disk into a fresh process
state and continued must produce bit-for-bit the same parameters and state
as an uninterrupted run (CPU, same jitted step function).
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from optimizer_zoo import (NAMED, cached, grad_stream, params_tree,
                           state_dtype_kw)

TOTAL, SPLIT = 6, 3


def _stepper(name, **kw):
  """``tx`` and a jitted ``step(p, s, g) -> (p, s)``, compiled once per
  optimizer and shared with ``test_hostile`` (same settings, same shapes)."""
  tx, step, _ = cached(name, **kw)
  return tx, lambda p, s, g: step(p, s, g)[:2]


def _assert_identical(a, b):
  la, da = jax.tree.flatten(a)
  lb, db = jax.tree.flatten(b)
  assert da == db, f'tree structures differ:\n{da}\n{db}'
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _save_restore(path, tree):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  restored = ckptr.restore(path, abstract)
  ckptr.close()
  return restored


@pytest.mark.parametrize('name', NAMED)
def test_resume_is_bit_identical(name, tmp_path):
  tx, step = _stepper(name)
  params = params_tree()
  grads = grad_stream(params, TOTAL, scale=0.5)

  # Uninterrupted run.
  p, s = params, tx.init(params)
  for g in grads:
    p, s = step(p, s, g)

  # Interrupted run: checkpoint after SPLIT steps, restore, continue.
  q, t = params, tx.init(params)
  for g in grads[:SPLIT]:
    q, t = step(q, t, g)
  restored = _save_restore(tmp_path / 'ckpt', {'params': q, 'opt_state': t})
  # The restored state has the same structure (NamedTuples, MaskedNodes) and
  # the same values as the one saved.
  _assert_identical(restored, {'params': q, 'opt_state': t})
  # Continue from the restored values. Orbax returns arrays committed to the
  # device; as host copies they are uncommitted like those of the
  # uninterrupted run, so the same compiled step serves both (a committed
  # argument would compile the step a second time). Same bits either way.
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
  q, t = restored['params'], restored['opt_state']
  for g in grads[SPLIT:]:
    q, t = step(q, t, g)

  _assert_identical(q, p)
  _assert_identical(t, s)
  # The run did move the parameters (a no-op optimizer would pass trivially).
  assert not np.array_equal(np.asarray(p['layer0']['kernel']),
                            np.asarray(params['layer0']['kernel']))


@pytest.mark.parametrize('name', NAMED)
def test_restore_bf16_state(name, tmp_path):
  """A bfloat16 state (``mu_dtype`` and any factor dtype) round-trips with
  its dtypes intact."""
  tx, step = _stepper(name, **state_dtype_kw(name, jnp.bfloat16))
  params = params_tree()
  p, s = params, tx.init(params)
  for g in grad_stream(params, 2):
    p, s = step(p, s, g)
  restored = _save_restore(tmp_path / 'ckpt', s)
  _assert_identical(restored, s)
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(restored))


@pytest.mark.parametrize('name,kw', [
    ('soap', dict(max_precond_dim=8)), ('shampoo', dict(max_precond_dim=8)),
    ('soap_lite', dict(max_precond_dim=8)),
    ('fismo', dict(max_factor_size=8)), ('fismo', dict(root_every=2))])
def test_identity_side_placeholders_checkpoint(name, kw, tmp_path):
  """Sides over the size limit (and unused caches) are stored as small
  placeholders, never zero-size arrays, which orbax refuses to save."""
  import optax_lite as ol
  tx = getattr(ol, name)(1e-2, **kw)
  params = {'w': jnp.ones((16, 4)), 'v': jnp.ones((4, 4))}
  state = tx.init(params)
  assert all(np.asarray(x).size > 0 for x in jax.tree.leaves(state))
  restored = _save_restore(tmp_path / 'ckpt', state)
  _assert_identical(restored, state)
