"""``optax.tree_utils.tree_map_params`` sees exactly the parameter-shaped
state: the optax way to derive a state's shardings from the parameters'.

``tree_map_params(tx, f, state, *rest)`` calls ``tx.init`` with a stand-in
for the parameters and applies ``f`` to the state's subtrees that come back
as the stand-in, with ``rest`` (e.g. the parameters' ``PartitionSpec``s)
beside them. A field keyed like the parameters but not shaped like them (a
Kronecker factor, a per-matrix scalar, a stacked array) must go to
``transform_non_params`` instead, or the derived shardings are wrong.
"""

from __future__ import annotations

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from optimizer_zoo import NAMED, make, params_tree


def _param_shaped_leaves(state, params) -> int:
  """State leaves at a parameter's key path with that parameter's shape."""
  shapes = {tuple(k.key for k in path): x.shape for path, x in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  count = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = tuple(getattr(k, 'key', None) for k in path)
    if any(keys[-len(p):] == p and x.shape == s for p, s in shapes.items()):
      count += 1
  return count


def _mapped(tx, state, params):
  """(whether each leaf given to ``f`` had its parameter's shape, count)."""
  seen = []

  def f(x, ref):
    if isinstance(x, optax.MaskedNode):
      return x
    seen.append(x.shape == ref.shape)
    return x

  optax.tree_utils.tree_map_params(
      tx, f, state, params, transform_non_params=lambda x: x,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return seen


@pytest.mark.parametrize('name', NAMED)
def test_tree_map_params_maps_exactly_the_parameter_shaped_state(name):
  """Every leaf ``f`` sees has its parameter's shape, and every state leaf
  that is a parameter-shaped entry (momenta, Adam moments) is seen. The
  tree has no square matrix, so a factor cannot pass for a parameter."""
  params = params_tree()
  tx = make(name)
  state = tx.init(params)
  seen = _mapped(tx, state, params)
  assert all(seen), f'{name}: a leaf not shaped like its parameter was mapped'
  assert len(seen) == _param_shaped_leaves(state, params) > 0


def test_the_oracle_on_optax_adamw():
  """The same count on optax's own AdamW (two moments per parameter)."""
  params = params_tree()
  tx = optax.adamw(1e-2)
  state = tx.init(params)
  seen = _mapped(tx, state, params)
  assert all(seen) and len(seen) == 2 * len(jax.tree.leaves(params))
  assert _param_shaped_leaves(state, params) == len(seen)


@pytest.mark.parametrize('name', ['soap', 'fismo_lite', 'muonh'])
def test_state_specs_from_parameter_specs(name):
  """The optax recipe for a state's ``PartitionSpec``s: parameter-shaped
  entries take their parameter's spec, the rest ``None`` (replicated)."""
  params = params_tree()
  specs = jax.tree.map(lambda x: P(*([None] * x.ndim)), params)
  tx = make(name)
  state = tx.init(params)
  keep_masked = lambda x, s: x if isinstance(x, optax.MaskedNode) else s
  state_specs = optax.tree_utils.tree_map_params(
      tx, keep_masked, state, specs,
      transform_non_params=lambda x: jax.tree.map(lambda _: None, x),
      is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))
  keystr = jax.tree_util.keystr
  spec_at = {keystr(k): s for k, s in jax.tree_util.tree_flatten_with_path(
      state_specs, is_leaf=lambda x: isinstance(x, P) or x is None)[0]}
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  specs_of_leaves = [spec_at[keystr(k)] for k, _ in leaves]
  assert all(s is None or len(s) == x.ndim
             for (_, x), s in zip(leaves, specs_of_leaves))
  assert sum(isinstance(s, P) for s in specs_of_leaves) > 0
