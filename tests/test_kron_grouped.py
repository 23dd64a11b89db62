"""SOAP / Shampoo on one device: same-shape matrices share one kernel call.

``distribute=None`` stacks the preconditioned matrices of equal shapes (the
slices of a ``[B, m, n]`` leaf with them) and runs the per-matrix step once
per shape group, so the compiled program does not grow its ``eigh`` / QR
count with the depth of the model; the state keeps its per-leaf layout.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lite.linalg.matrices import MatrixDims
from optax_lite.transforms import kron_precondition as kp

# A mixed tree: same-shape matrices (and a stacked leaf of that shape), a
# tall one, a one-sided one (cols > max_precond_dim), one with no side
# (Adam / momentum), a vector and a ``dims=None`` leaf.
_SHAPES = {'a': (6, 4), 'b': (6, 4), 'c': (3, 6, 4), 'd': (9, 4),
           'one_sided': (3, 30), 'no_side': (25, 30), 'v': (5,),
           'plain': (4, 4)}
_DIMS = {'a': MatrixDims(0, 1), 'b': MatrixDims(0, 1), 'c': MatrixDims(1, 2),
         'd': MatrixDims(0, 1), 'one_sided': MatrixDims(0, 1),
         'no_side': MatrixDims(0, 1), 'v': None, 'plain': None}
_MODES = [('soap', {}), ('shampoo', {}), ('shampoo', {'graft': 'none'}),
          ('shampoo', {'root_method': 'newton', 'exponent': 0.25})]


def _make(mode, dims, **kw):
  return kp.kron_precondition(mode, dims=dims, precondition_frequency=2,
                              max_precond_dim=20, **kw)


def _pick(tree, key):
  """The per-leaf fields of a state (or an update tree) for one key."""
  if isinstance(tree, dict):
    return {key: tree[key]}
  return type(tree)(*(
      _pick(f, key) if isinstance(f, dict) else f for f in tree))


@pytest.mark.parametrize('mode,kw', _MODES)
def test_grouped_equals_each_leaf_alone(mode, kw):
  """The update and state of the whole tree equal those of each leaf run
  through the transform on its own (a one-leaf tree: no stacking), over
  steps with refreshes (k = 2), within float32 round-off."""
  rng = np.random.default_rng(3)
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in _SHAPES.items()} for _ in range(5)]
  tx = _make(mode, _DIMS, **kw)
  alone = {k: _make(mode, {k: d}, **kw) for k, d in _DIMS.items()}
  state = tx.init(grads[0])
  states = {k: t.init({k: grads[0][k]}) for k, t in alone.items()}
  assert state.owned is None
  for g in grads:
    u, state = jax.jit(tx.update)(g, state)
    for k, t in alone.items():
      uk, states[k] = jax.jit(t.update)({k: g[k]}, states[k])
      mine = jax.tree.leaves((_pick(u, k), _pick(state, k)))
      theirs = jax.tree.leaves((uk, states[k]))
      assert len(mine) == len(theirs)
      for x, y in zip(mine, theirs):
        assert x.shape == y.shape and x.dtype == y.dtype, k
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=k)
  for k in ('a', 'c', 'd', 'one_sided', 'no_side', 'v'):
    assert float(jnp.abs(u[k]).max()) > 0, k


def _custom_calls(tx, n):
  """Custom calls (eigh / QR / ... kernels) of the compiled update on a
  tree with ``n`` same-shape matrices, a stacked leaf and a tall one."""
  rng = np.random.default_rng(0)
  tree = {f'w{i}': jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)
          for i in range(n)}
  tree['stack'] = jnp.asarray(rng.standard_normal((2, 6, 10)), jnp.float32)
  tree['tall'] = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
  tree['bias'] = jnp.ones((5,), jnp.float32)
  text = jax.jit(tx.update).lower(tree, tx.init(tree)).compile().as_text()
  return len(re.findall(r'custom_call_target=', text))


@pytest.mark.parametrize('mode', ['soap', 'shampoo'])
def test_kernel_count_independent_of_depth(mode):
  """One device: the compiled step has as many eigh / QR calls for 2 as
  for 6 same-shape matrices (leaf by leaf, the count grew with them)."""
  tx = kp.kron_precondition(mode, precondition_frequency=2)
  few, many = _custom_calls(tx, 2), _custom_calls(tx, 6)
  assert few > 0
  assert few == many
