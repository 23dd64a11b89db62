"""The optimizer state is a fixed point of a jitted, donated update.

A pretraining step is compiled once and then run for days with its state
donated. For every named optimizer, plain and with ``distribute=``: three
steps of one ``jax.jit(tx.update, donate_argnums=1)`` compile once, raise no
"donated buffers were not usable" warning, reuse every donated state buffer
(each input leaf is deleted by the call), and return every state leaf with
the sharding it came in with. On 8 host devices (``multidevice``) the
parameters are FSDP-sharded with the explicit specs Flax writes
(``P('fsdp', None)``, ``P(None)``) and the state comes from
``ol.sharded_init``, whose shardings (``ol.state_shardings``) must be the
ones every update returns. On one device: parameters committed to it and
the state from ``ol.sharded_init``, or uncommitted parameters and an eager
``tx.init(params)``.
"""

import inspect
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_lite as ol
from conftest import host_mesh
from optax_lite.linalg import distributed
from optimizer_zoo import NAMED, SMALL, get

# Every named optimizer: the zoo's list and AdamW-LITE (no matrix work).
OPTIMIZERS = list(NAMED) + ['adamw_lite']
STEPS = 3


def _accepts_distribute(name):
  return 'distribute' in inspect.signature(get(name)).parameters


CASES = [(n, m) for n in OPTIMIZERS for m in ('plain', 'distribute')
         if m == 'plain' or _accepts_distribute(n)]


def _make(name, mesh, mode):
  kw = dict(SMALL.get(name, {}))
  if mode == 'distribute':
    kw['distribute'] = mesh
  return get(name)(learning_rate=1e-2, **kw)


def _params():
  """Embedding, a norm and two blocks (up, down): rows divisible by 8."""
  ks = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  n = lambda s: jax.random.normal(next(ks), s) / np.sqrt(s[0])
  p = {'embed': {'embedding': n((16, 8))}, 'norm': {'scale': jnp.ones((8,))}}
  for i in range(2):
    p[f'block{i}'] = {'up': {'kernel': n((8, 16))},
                      'down': {'kernel': n((16, 8))}}
  return p


def _grads(params, k):
  """Gradients placed like ``params`` (committed where they are)."""
  def grad(x):
    g = 0.1 * jax.random.normal(jax.random.PRNGKey(k), x.shape)
    return jax.device_put(g, x.sharding) if x.committed else g
  return jax.tree.map(grad, params)


def _canonical(sharding):
  """``sharding`` with its spec's trailing ``None`` entries dropped."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  parts = list(sharding.spec)
  while parts and parts[-1] is None:
    parts.pop()
  return NamedSharding(sharding.mesh, P(*parts))


def _run_donated(tx, params, state):
  """Three steps of one jitted, donated update; returns what was seen."""
  update = jax.jit(tx.update, donate_argnums=1)
  want = jax.tree.map(lambda x: x.sharding, state)
  kept, reused = True, True
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for k in range(STEPS):
      old = state
      _, state = update(_grads(params, k), state, params)
      jax.block_until_ready(state)
      reused &= all(x.is_deleted() for x in jax.tree.leaves(old))
      got = jax.tree.map(lambda x: x.sharding, state)
      kept &= all(_canonical(a) == _canonical(b) for a, b in
                  zip(jax.tree.leaves(want), jax.tree.leaves(got)))
  donation = [str(w.message) for w in caught
              if 'donated buffers' in str(w.message)]
  return types.SimpleNamespace(compiles=update._cache_size(), kept=kept,
                               reused=reused, donation=donation, state=state)


def _check(seen):
  assert seen.compiles == 1, f'{seen.compiles} compiles in {STEPS} steps'
  assert seen.kept, 'a state leaf changed its sharding'
  assert seen.reused, 'a donated state buffer was not reused'
  assert not seen.donation, seen.donation


def test_every_named_optimizer_is_covered():
  exported = {n for n, f in vars(ol.optimizers).items()
              if inspect.isfunction(f)
              and 'learning_rate' in inspect.signature(f).parameters}
  assert exported == set(OPTIMIZERS)


@pytest.mark.parametrize('name,mode', CASES)
def test_one_device_state_is_a_fixed_point(name, mode):
  """Parameters committed to one device, state from ``sharded_init``."""
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('fsdp',))
  params = jax.device_put(_params(), jax.devices()[0])
  tx = _make(name, mesh, mode)
  state = ol.sharded_init(tx.init, params)
  assert all(x.committed for x in jax.tree.leaves(state))
  _check(_run_donated(tx, params, state))


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_one_device_eager_init_is_a_fixed_point(name):
  """Uncommitted parameters (as a model's init returns them) and an eager
  ``tx.init``: its leaves are separate buffers, so all can be donated."""
  params = _params()
  tx = _make(name, None, 'plain')
  _check(_run_donated(tx, params, tx.init(params)))


def _fsdp(tree, mesh):
  """FSDP with Flax's explicit specs: ``P('fsdp', None)``, ``P(None)``."""
  def put(x):
    spec = P('fsdp', None) if x.ndim == 2 else P(None)
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(put, tree)


@pytest.mark.multidevice
@pytest.mark.parametrize('name,mode', CASES)
def test_eight_devices_state_is_a_fixed_point(name, mode):
  mesh = host_mesh()
  params = _fsdp(_params(), mesh)
  tx = _make(name, mesh, mode)
  state = ol.sharded_init(tx.init, params)
  given = ol.state_shardings(state, params)
  seen = _run_donated(tx, params, state)
  _check(seen)
  # The shardings after the updates are exactly state_shardings' (same
  # objects' specs, so one jit cache key for the state).
  for a, b in zip(jax.tree.leaves(given),
                  jax.tree.leaves(jax.tree.map(lambda x: x.sharding,
                                               seen.state))):
    assert a == b, (a, b)


@pytest.mark.multidevice
def test_canonical_parameter_specs():
  """With canonical parameter specs (``P('fsdp')``, ``P()``) as well."""
  mesh = host_mesh()
  params = jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(
          mesh, P('fsdp') if x.ndim == 2 else P())), _params())
  tx = _make('soap', mesh, 'plain')
  _check(_run_donated(tx, params, ol.sharded_init(tx.init, params)))


def test_canonical_spec():
  assert distributed.canonical_spec(P('fsdp', None)) == P('fsdp')
  assert distributed.canonical_spec(P(None, 'fsdp', None)) == P(None, 'fsdp')
  assert distributed.canonical_spec(P(None)) == P()
