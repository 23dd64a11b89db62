"""The one shared list of named optimizers used by the integration tests.

``NAMED`` is strict: tests parametrize over it, and a name that the library
does not export fails (``make`` raises ``AttributeError``), so nothing is
silently skipped.

``make(name, **kw)`` builds ``optax_lite.<name>(learning_rate=..., ...)`` with
small settings so that every code path runs within a few steps (SOAP /
Shampoo refresh their bases every 2 steps). The small settings are listed per
optimizer and passed as is, so a parameter renamed in the library is a
``TypeError`` here, never a silently dropped setting; ``kw`` always wins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import optax_lite

NAMED = ['muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite', 'soap_lite',
         'rmnp_lite', 'fismo_lite', 'normuon', 'normuon_lite', 'muonh']

# Per-optimizer small settings: refresh the Kronecker bases every 2 steps so
# that the refresh branches run in a handful of steps. Every name in NAMED has
# an entry and every key is passed as is, so a renamed or removed parameter
# fails every test that builds that optimizer (TypeError) instead of silently
# falling back to its default. (FISMO refreshes its roots every step by
# default, ``root_every=1``, so it needs nothing.)
SMALL = {
    'muon': {},
    'rmnp': {},
    'fismo': {},
    'soap': {'precondition_frequency': 2},
    'shampoo': {'precondition_frequency': 2},
    'muon_lite': {},
    'soap_lite': {'precondition_frequency': 2},
    'rmnp_lite': {},
    'fismo_lite': {},
    'normuon': {},
    'normuon_lite': {},
    'muonh': {},
}

# The dtype argument of each optimizer's Kronecker factors / bases (the others
# keep no such state).
FACTOR_DTYPE = {'fismo': 'factor_dtype', 'fismo_lite': 'factor_dtype',
                'soap': 'precond_dtype', 'shampoo': 'precond_dtype',
                'soap_lite': 'precond_dtype'}


def state_dtype_kw(name: str, dtype) -> dict:
  """``mu_dtype`` and the factor dtype (where there is one) set to ``dtype``."""
  kw = {'mu_dtype': dtype}
  if name in FACTOR_DTYPE:
    kw[FACTOR_DTYPE[name]] = dtype
  return kw


def get(name: str):
  """The optimizer factory ``optax_lite.<name>`` (AttributeError if missing)."""
  return getattr(optax_lite, name)


def make(name: str, learning_rate=1e-2, **kw):
  """``optax_lite.<name>(learning_rate, **SMALL[name], **kw)``; ``kw`` wins."""
  return get(name)(learning_rate=learning_rate, **{**SMALL[name], **kw})


def params_tree(key=0, dtype=jnp.float32):
  """A small model-like tree: hidden matrices, a conv kernel, vectors, head."""
  ks = jax.random.split(jax.random.PRNGKey(key), 8)
  n = lambda k, s: (jax.random.normal(k, s) / jnp.sqrt(s[0])).astype(dtype)
  return {
      'embed': {'embedding': n(ks[0], (16, 8))},
      'layer0': {'kernel': n(ks[1], (8, 12)), 'bias': jnp.zeros((12,), dtype)},
      'layer1': {'kernel': n(ks[2], (12, 8)), 'bias': jnp.zeros((8,), dtype)},
      'conv': {'kernel': n(ks[3], (3, 3, 2, 4))},
      'ln': {'scale': jnp.ones((8,), dtype)},
      'head': {'kernel': n(ks[4], (8, 5))},
  }


def grads_like(params, key=1, scale=1.0):
  """Deterministic random gradients shaped like ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.PRNGKey(key), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, x.shape)).astype(x.dtype)
      for k, x in zip(ks, leaves)])


def grad_stream(params, n, seed=1, scale=1.0):
  return [grads_like(params, key=seed + i, scale=scale) for i in range(n)]


def update_trajectory(tx, params, steps):
  """The updates of ``steps`` steps of ``tx`` from ``params``; gradient
  ``i`` is standard normal from ``PRNGKey(i)``."""
  import optax
  state, update, outs = tx.init(params), jax.jit(tx.update), []
  for i in range(steps):
    g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i),
                                                      p.shape), params)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    outs.append(u)
  return outs


def run_steps(tx, params, grads_list, state=None, jit=True):
  """Applies ``tx`` to a list of gradients; returns ``(params, state)``."""
  import optax
  if state is None:
    state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  for g in grads_list:
    params, state = step(params, state, g)
  return params, state


_CACHE = {}


def _freeze(kw):
  return tuple(sorted((k, repr(v)) for k, v in kw.items()))


def cached(name: str, wrap=None, **kw):
  """``(tx, step, update)`` built once per (name, wrap, kw) and reused.

  ``step(p, s, g) -> (p, s, u)`` and ``update(g, s, p)`` are jitted; reusing
  them across tests (and test files: ``test_hostile``, ``test_checkpoint``)
  avoids recompiling the same optimizer on the same shapes, which is most of
  the suite's time on a CPU. ``wrap`` (e.g. ``optax.apply_if_finite``) is
  applied to the tx.
  """
  import optax
  key = (name, getattr(wrap, '__name__', repr(wrap)), _freeze(kw))
  if key not in _CACHE:
    tx = make(name, **kw)
    if wrap is not None:
      tx = wrap(tx)

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, u

    _CACHE[key] = (tx, jax.jit(step), jax.jit(tx.update))
  return _CACHE[key]
