"""optax.inject_hyperparams on every named optimizer (optax's own habit).

For each named optimizer (and ``adamw_lite``): the injected optimizer equals
the plain one step for step, and the learning rate stored in
``opt_state.hyperparams`` is the one the next step uses.
"""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lite
import optimizer_zoo as zoo

NAMES = zoo.NAMED + ['adamw_lite']
LR = 1e-2
# The learning rate enters MuonH's projection back to the sphere, so its
# matrix updates are not proportional to it.
NOT_PROPORTIONAL = ('muonh',)


def _make(name, **kw):
  if name in zoo.SMALL:
    return zoo.make(name, **kw)
  return getattr(optax_lite, name)(**kw)


def _injected(name):
  small = zoo.SMALL.get(name, {})
  return optax.inject_hyperparams(
      lambda learning_rate: _make(name, learning_rate=learning_rate,
                                  **small))(learning_rate=LR)


def _grads(params, k):
  key = jax.random.PRNGKey(100 + k)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      tree, [jax.random.normal(kk, p.shape, p.dtype)
             for kk, p in zip(keys, leaves, strict=True)])


@pytest.mark.parametrize('name', NAMES)
def test_injected_learning_rate_matches_plain_and_is_used(name):
  params = zoo.params_tree()
  plain, inj = _make(name, learning_rate=LR), _injected(name)
  step_plain, step_inj = jax.jit(plain.update), jax.jit(inj.update)
  s_plain, s_inj = plain.init(params), inj.init(params)
  for k in range(3):
    g = _grads(params, k)
    u_plain, s_plain = step_plain(g, s_plain, params)
    u_inj, s_inj = step_inj(g, s_inj, params)
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
  # The stored learning rate drives the next step: a tripled rate gives a
  # different step (exactly 3x on every leaf, since every update ends in
  # -learning_rate and decay is decoupled inside it).
  g = _grads(params, 3)
  u_base, _ = step_inj(g, s_inj, params)
  s_inj.hyperparams['learning_rate'] = jnp.asarray(3 * LR)
  u_fast, _ = step_inj(g, s_inj, params)
  if name in NOT_PROPORTIONAL:
    # The plain optimizer built with 3·LR, from the same state.
    fast = _make(name, learning_rate=3 * LR)
    want, _ = jax.jit(fast.update)(g, s_inj.inner_state, params)
  else:
    want = jax.tree.map(lambda u: 3 * u, u_base)
  chex.assert_trees_all_close(u_fast, want, rtol=1e-4, atol=1e-7)
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: jnp.max(jnp.abs(a - b)), u_fast, u_base))
  assert max(float(m) for m in moved) > 0
