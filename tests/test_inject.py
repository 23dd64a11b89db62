"""optax.inject_hyperparams on every named optimizer (optax's own habit).

For each named optimizer (and ``adamw_lite``): the injected optimizer equals
the plain one step for step, and the learning rate stored in
``opt_state.hyperparams`` is the one the next step uses.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
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


def _relative_gap(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)


# 1e-6 is a round-off-sized bound (it caught XLA folding FISMO's constants
# into other fused multiply-adds, 1.6e-6): it holds for the default
# compiler's fusion, not another's (1.4e-6, OPTAX_LITE_FAST_COMPILE=1).
@pytest.mark.default_compiler
@pytest.mark.parametrize('name', zoo.NAMED)
def test_every_hyperparameter_injected_equals_plain_states_included(name):
  """``optax.inject_hyperparams(ol.X)(learning_rate=…)`` injects every
  numeric argument, defaults included (betas become float32 arrays); the
  updates and the whole inner state equal the plain optimizer's within
  1e-6 after 3 steps (SOAP-LITE's structural
  ``precondition_frequency`` in ``static_args``, as documented). Dtype
  arguments stay static: no array reaches ``jnp.dtype`` (a
  DeprecationWarning, an error in future JAX), and ``1 − β`` of a
  float32 β equals that of the Python float (issue 23: Shampoo's factors
  were 1.3e-5 apart, ``1 − 0.999`` in float32; FISMO's updates 1.6e-6,
  XLA folding a constant γ, ν into other fused multiply-adds)."""
  params = zoo.params_tree()
  small = zoo.SMALL[name]
  static = {'soap_lite': ('precondition_frequency',)}.get(name, ())
  tol = 1e-6
  with warnings.catch_warnings():
    warnings.simplefilter('error', DeprecationWarning)
    plain = zoo.get(name)(learning_rate=LR, **small)
    inj = optax.inject_hyperparams(zoo.get(name), static_args=static)(
        learning_rate=LR, **small)
    s_plain, s_inj = plain.init(params), inj.init(params)
    step_plain, step_inj = jax.jit(plain.update), jax.jit(inj.update)
    for k in range(3):
      g = _grads(params, k)
      u_plain, s_plain = step_plain(g, s_plain, params)
      u_inj, s_inj = step_inj(g, s_inj, params)
      for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_inj),
                      strict=True):
        assert _relative_gap(a, b) <= tol, (name, k, a.shape)
  paths = jax.tree_util.tree_flatten_with_path(s_plain)[0]
  for (path, a), b in zip(paths, jax.tree.leaves(s_inj.inner_state),
                          strict=True):
    assert _relative_gap(a, b) <= tol, (name, jax.tree_util.keystr(path))


@pytest.mark.parametrize('name', ['soap', 'shampoo', 'soap_lite'])
def test_dtype_class_injected_is_refused_naming_it(name):
  """A dtype class is callable, so inject_hyperparams takes it for a
  schedule and passes an array: refused naming the parameter; as a string
  or in ``static_args`` it is static and kept."""
  params = {'w': jnp.ones((4, 3))}
  inj = optax.inject_hyperparams(zoo.get(name))(
      learning_rate=LR, precond_dtype=jnp.bfloat16)
  with pytest.raises(TypeError, match='precond_dtype'):
    inj.init(params)
  for inj in (optax.inject_hyperparams(zoo.get(name))(
      learning_rate=LR, precond_dtype='bfloat16'),
              optax.inject_hyperparams(zoo.get(name), static_args=(
                  'precond_dtype',))(learning_rate=LR,
                                     precond_dtype=jnp.bfloat16)):
    state = inj.init(params)
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(state)}


@pytest.mark.parametrize('name', ['muon', 'soap'])
def test_mesh_as_distribute_needs_static_args(name):
  """A ``Mesh`` is callable, so ``inject_hyperparams`` hands the optimizer
  a schedule in its place: the error says what to do, and with
  ``static_args=('distribute',)`` the mesh arrives as given."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('fsdp',))
  params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros((4,))}
  tx = optax.inject_hyperparams(zoo.get(name))(learning_rate=1e-2,
                                                distribute=mesh)
  with pytest.raises(TypeError, match=r"distribute.*static_args"):
    tx.init(params)
  tx = optax.inject_hyperparams(zoo.get(name), static_args=('distribute',))(
      learning_rate=1e-2, distribute=mesh)
  u, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
