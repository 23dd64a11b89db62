"""``engine.step_around`` on 8 host devices: the toy method of
``test_engine_around.py`` with its state travelling to the owners
(``"owner"``) and resident there (``"owner_resident"``, made by
``own_leaves``), against the NumPy transcription; and a carry that is
resident state (``carry_in_state``) against the same method leaf by
leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_engine_around as toy
from conftest import host_mesh
from optax_lite.linalg import engine
from optax_lite.linalg import resident
from optax_lite.linalg.placement import PolarSharding

pytestmark = pytest.mark.multidevice


def _paths():
  return resident.leaf_paths(toy.SHAPES)


def _owned(placement):
  leaves = toy.leaves_of(toy.grads(0), toy.init_state())
  per_leaf, owned = engine.own_leaves(
      toy.method(), placement, leaves, _paths(),
      lambda x: jnp.zeros((1,), x.dtype))
  return {k: tuple(s) for k, s in zip(toy.SHAPES, per_leaf)}, owned


@pytest.mark.parametrize('layout', ['sharded', 'replicated'])
@pytest.mark.parametrize('kind', ['owner', 'owner_resident'])
def test_step_around_on_owners_matches_numpy(kind, layout):
  placement = engine.placement_for(
      PolarSharding(host_mesh(), layout=layout),
      resident=kind == 'owner_resident')
  assert placement.kind == kind
  want, want_state = toy.reference(2)
  state, owned = toy.init_state(), None
  if kind == 'owner_resident':
    state, owned = _owned(placement)
  run = jax.jit(lambda g, s, o: toy.step(placement, g, s, o))
  for t in range(2):
    upd, state, owned = run(toy.grads(t), state, owned)
    toy.check(upd, want[t], rtol=1e-5)
  if kind == 'owner':
    assert owned is None
    for k in ('a', 'b', 'stack'):
      np.testing.assert_allclose(state[k][1], want_state[k][1], rtol=1e-5)
  else:  # the state stays on the owners, the carry buffers are gone
    assert state['a'][1].shape == (1,)
    assert [len(g) for g in owned.groups] == [2] * len(owned.groups)
    got = resident.unstack(owned)
    np.testing.assert_allclose(got[0][1], want_state['a'][1][None],
                               rtol=1e-5)


def _before_s(g, m, s, key):  # the carry is the new s itself
  w, m, s, _ = toy.before(g, m, s, key)
  return w, m, s, s


def _after_s(u, s, key):
  del key
  return u / (1.0 + jnp.sqrt(s))[:, None, :]


def test_carry_in_state_is_read_from_the_resident_state():
  mesh = host_mesh()
  res = engine.placement_for(PolarSharding(mesh), resident=True)
  method = toy.method(carry_in_state=True)
  state, owned = _owned(res)
  ref_state = toy.init_state()

  def run(placement, g, s, o):
    out, o = engine.step_around(
        method, _before_s, lambda ws: [2.0 * w for w in ws], _after_s,
        placement, toy.leaves_of(g, s), o,
        local=(toy.local_before, lambda leaf: -leaf.g))
    return [x[0] for x in out], {k: tuple(x[1:]) for k, x in
                                 zip(toy.SHAPES, out)}, o

  for t in range(2):
    upd, state, owned = jax.jit(
        lambda g, s, o: run(res, g, s, o))(toy.grads(t), state, owned)
    ref, ref_state, _ = jax.jit(lambda g, s: run(
        engine.Placement('per_leaf'), g, s, None))(toy.grads(t), ref_state)
    for a, b in zip(upd, ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # no buffers were added: each group keeps its momentum and its s
  assert [len(g) for g in owned.groups] == [2] * len(owned.groups)
