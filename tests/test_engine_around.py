"""``engine.step_around`` on a toy method, against a NumPy transcription.

The toy method per matrix ``G`` (``m × n``), with a momentum ``M`` shaped
like the parameter, a per-column sum of squares ``s`` (stored with the
leaf's batch shape in front) and a static scale per leaf (its key)::

  M ← M/2 + G,  s ← s + Σ_rows G²,  W = scale·M,  r = 1/(1 + √s)
  U = 2·W (the tree-level middle),  Δ = U · r (per column)

``r`` is the carry: computed by the first map, used by the second. The
same numbers must come out leaf by leaf (with and without a budget),
stacked, and (``test_engine_around_multidevice.py``) on owners.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lite.linalg import engine
from optax_lite.linalg.matrices import MatrixDims, matrix_view

SHAPES = {'a': (4, 6), 'b': (6, 4), 'c': (4, 6), 'stack': (2, 4, 6),
          'vec': (5,)}
DIMS = {'a': MatrixDims(), 'b': MatrixDims(), 'c': MatrixDims(),
        'stack': MatrixDims(1, 2), 'vec': None}
SCALE = {'a': 1.0, 'b': 1.0, 'c': 3.0, 'stack': 1.0}


def method(**kw):
  return engine.MatrixMethod(
      names=('m', 's'), active=(0, 1), leaf_shaped=(0,), batch_shaped=(1,),
      keyed=True, item_bytes=lambda view, arrays: 1e3,
      after_bytes=lambda view, arrays: 1e3, **kw)


def before(g, m, s, key):
  m = 0.5 * m + g
  s = s + jnp.sum(g * g, axis=-2)
  return key * m, m, s, 1.0 / (1.0 + jnp.sqrt(s))


def after(u, r, key):
  del key
  return u * r[:, None, :]


def local_before(leaf):
  return (leaf.g,) + tuple(leaf.state)


def grads(step):
  rng = np.random.default_rng(step)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in SHAPES.items()}


def init_state():
  out = {}
  for k, shape in SHAPES.items():
    view = None if DIMS[k] is None else matrix_view(shape, DIMS[k])
    out[k] = (np.zeros(shape, np.float32),
              np.zeros((view.batch_shape + (view.cols,)) if view
                       else (1,), np.float32))
  return out


def leaves_of(g, state):
  out = []
  for k in SHAPES:
    view = None if DIMS[k] is None else matrix_view(SHAPES[k], DIMS[k])
    out.append(engine.Leaf(jnp.asarray(g[k]), view,
                           tuple(jnp.asarray(x) for x in state[k]),
                           view is not None,
                           key=SCALE.get(k)))
  return out


def step(placement, g, state, owned=None, m=None):
  out, owned = engine.step_around(
      m or method(), before, lambda ws: [2.0 * w for w in ws], after,
      placement, leaves_of(g, state), owned,
      local=(local_before, lambda leaf: -leaf.g))
  return ({k: o[0] for k, o in zip(SHAPES, out)},
          {k: tuple(o[1:]) for k, o in zip(SHAPES, out)}, owned)


def reference(steps):
  """The toy method in NumPy, matrix by matrix; per step the updates."""
  state = {k: [np.asarray(x, np.float64) for x in v]
           for k, v in init_state().items()}
  out = []
  for t in range(steps):
    g = grads(t)
    upd = {}
    for k, shape in SHAPES.items():
      if DIMS[k] is None:
        upd[k] = -2.0 * g[k]
        continue
      x = g[k].astype(np.float64).reshape((-1,) + shape[-2:])
      mm = state[k][0].reshape(x.shape)
      ss = state[k][1].reshape((x.shape[0], x.shape[-1]))
      mm = 0.5 * mm + x
      ss = ss + np.sum(x * x, axis=-2)
      u = 2.0 * SCALE[k] * mm / (1.0 + np.sqrt(ss))[:, None, :]
      state[k] = [mm.reshape(shape), ss.reshape(state[k][1].shape)]
      upd[k] = u.reshape(shape)
    out.append(upd)
  return out, state


def check(got, want, rtol=1e-6):
  for k in SHAPES:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-6,
                               err_msg=k)


@pytest.mark.parametrize('placement', [
    engine.Placement('per_leaf'),
    engine.Placement('per_leaf', None, 1.5e3),  # packs of one leaf
    engine.Placement('stacked'),
    engine.Placement('stacked', None, 1.0),     # one matrix per call
])
def test_step_around_one_device_matches_numpy(placement):
  want, want_state = reference(2)
  state = init_state()
  run = jax.jit(lambda g, s: step(placement, g, s)[:2])
  for t in range(2):
    upd, state = run(grads(t), state)
    check(upd, want[t])
  for k in SHAPES:
    if DIMS[k] is not None:
      assert state[k][1].shape == want_state[k][1].shape
      np.testing.assert_allclose(state[k][1], want_state[k][1], rtol=1e-6)
      np.testing.assert_allclose(state[k][0], want_state[k][0], rtol=1e-6)


def test_step_around_local_leaves_take_the_local_maps():
  upd, state, _ = step(engine.Placement('stacked'), grads(0), init_state())
  np.testing.assert_array_equal(upd['vec'], -2.0 * grads(0)['vec'])
  np.testing.assert_array_equal(state['vec'][0], init_state()['vec'][0])
