r"""Optimizer states that move between placements (checkpoints, resharding).

With ``distribute=`` over several devices the per-matrix state of SOAP,
Shampoo, FISMO and the LITE optimizers lives on the device that computes
each matrix (:class:`optax_lite.linalg.resident.OwnerStacks`): its arrays
are stacked by shape, in an order that depends on the device count, and
the per-parameter fields keep one-element placeholders. Such a state
belongs to its mesh. :func:`portable_state` turns any state of any
placement into the **portable** form, the state the same optimizer has on
one device without ``distribute`` (every per-matrix array back in its
parameter's entry, no stacks), whose tree structure and values do not
depend on the placement; :func:`place_state` builds the state of any
optimizer ``tx`` (any device count, mesh or ``distribute``) from it. Save
the portable form and restore it anywhere::

  portable = ol.portable_state(tx, state, params)
  ckpt.save(path, portable)
  ...                                  # another mesh, another tx placement
  like = ol.portable_state(tx2, jax.eval_shape(tx2.init, params2), params2)
  state2 = ol.place_state(tx2, ckpt.restore(path, like), params2)

Nothing here knows an optimizer: the stacks carry their layout as static
metadata (which item each row holds, and for each resident array the field
and parameter it belongs to, :class:`~optax_lite.linalg.resident.Home`),
and the walk visits every state node that holds stacks in a field named
``owned``. Both functions are pure and jit-compatible (``place_state``
returns the state with :func:`optax_lite.state_shardings`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.transforms import _tree


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _has_owned(node) -> bool:
  return (isinstance(node, tuple) and hasattr(node, '_fields')
          and 'owned' in node._fields)


def _children(node):
  """One level of ``node``: its children and a function rebuilding it;
  ``None`` for a leaf (an array, or an object that is not a pytree node)."""
  children, treedef = jax.tree.flatten(node, is_leaf=lambda y: y is not node)
  if len(children) == 1 and children[0] is node:
    return None
  return children, treedef.unflatten


def _set_homes(node, homes_values):
  """``node`` with each ``(home, value)`` written at its home."""
  by_path: dict[tuple, list] = {}
  for home, value in homes_values:
    by_path.setdefault(tuple(home.path), []).append((home.leaf, value))
  for path, entries in by_path.items():
    sub = _tree.get_at(node, path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        sub, is_leaf=_is_masked)
    position = {tuple(key): k for k, (key, _) in enumerate(flat)}
    leaves = [leaf for _, leaf in flat]
    for key, value in entries:
      if key not in position:
        raise ValueError(f'state: no parameter {jax.tree_util.keystr(key)}'
                         f' under {path}; the owner-resident layout does '
                         'not fit this state.')
      leaves[position[key]] = value
    node = _tree.set_at(node, path, treedef.unflatten(leaves))
  return node


def _unplace(node):
  """The portable form of one state node (children first)."""
  level = _children(node)
  if level is None or isinstance(node, resident_lib.OwnerStacks):
    return node
  children, rebuild = level
  out = rebuild([_unplace(c) for c in children])
  if not _has_owned(out):
    return out
  owned = out.owned
  if isinstance(owned, resident_lib.OwnerStacks):
    per_item = resident_lib.unstack(owned)
    homes = owned.layout.homes
    out = _set_homes(out, [
        (home, resident_lib.from_stored(x, home))
        for item, arrays in per_item.items()
        for home, x in zip(homes[item], arrays)])
  # ``owned``: the stacks, or the scalar placeholder of a transform that
  # was initialised on no matrix (an inner transform whose matrices live
  # in its wrapper's stacks); on one device it is ``None``.
  return out._replace(owned=None)


def _place(target, portable):
  """The state shaped like ``target`` (shapes, possibly abstract) with the
  values of ``portable``."""
  if isinstance(target, resident_lib.OwnerStacks):
    raise ValueError('state: owner-resident stacks outside a state node '
                     'with an "owned" field.')
  if _is_masked(target):
    return target
  level = _children(target)
  if level is None:
    return _leaf(target, portable)
  if _has_owned(target):
    return _place_node(target, portable)
  return _place_children(target, portable)


def _place_children(target, portable):
  """``_place`` on every child of the node ``target``."""
  t_children, rebuild = _children(target)
  p_level = _children(portable)
  p_children = [] if p_level is None else p_level[0]
  if p_level is None or len(t_children) != len(p_children):
    raise ValueError(f'portable: a {type(target).__name__} with '
                     f'{len(t_children)} entries expected, got '
                     f'{type(portable).__name__} with {len(p_children)}.')
  return rebuild([_place(t, p) for t, p in zip(t_children, p_children)])


def _leaf(target, value):
  if target is None:
    return None
  shape = tuple(getattr(target, 'shape', ()))
  if value is None or tuple(jnp.shape(value)) != shape:
    raise ValueError(f'portable: an array of shape {shape} expected, got '
                     f'{None if value is None else jnp.shape(value)}; '
                     'it was saved from another optimizer or parameter '
                     'tree.')
  return jnp.asarray(value, getattr(target, 'dtype', None))


def _zeros_like(x):
  if x is None or _is_masked(x) or isinstance(x, resident_lib.OwnerStacks):
    return x
  return jnp.zeros(x.shape, x.dtype)


def _place_node(target, portable):
  """One state node with an ``owned`` field: its stacks filled from the
  portable entries, the entries replaced by the target's placeholders."""
  owned = target.owned
  inner = target._replace(owned=None)
  if isinstance(owned, resident_lib.OwnerStacks):
    layout = owned.layout
    if layout is None or layout.homes is None:
      raise ValueError('tx: its owner-resident state carries no layout; '
                       'it cannot be placed.')
    # Take the resident arrays before the placeholders overwrite them.
    per_item = {}
    for members, grp in zip(layout.members, owned.groups):
      for item, _ in members:
        per_item[item] = tuple(
            resident_lib.to_stored(
                _get_leaf(portable, home), home, x.shape[1:])
            for home, x in zip(layout.homes[item], grp))
    stacks = resident_lib.stack(per_item, owned)
    placeholders = [
        (home, _zeros_like(_get_leaf(inner, home)))
        for item in per_item for home in layout.homes[item]]
    # The portable entries at the homes are arrays where the target holds
    # placeholders or masked nodes: place with the target's there.
    portable = _set_homes(portable, placeholders)
  else:
    stacks = jax.tree.map(_zeros_like, owned)
  placed = _place_children(inner, portable._replace(owned=None))
  return placed._replace(owned=stacks)


def _get_leaf(node, home):
  flat, _ = jax.tree_util.tree_flatten_with_path(_tree.get_at(node, home.path),
                                                 is_leaf=_is_masked)
  for key, leaf in flat:
    if tuple(key) == home.leaf:
      return leaf
  raise ValueError(f'portable: no parameter '
                   f'{jax.tree_util.keystr(home.leaf)} under {home.path}.')


def portable_state(tx: optax.GradientTransformation, state: Any,
                   params: Any = None) -> Any:
  """``state`` in a form that does not depend on its placement.

  Args:
    tx: the optimizer that made ``state`` (checked against it when
      ``params`` is given).
    state: its state, on any placement (one device, a mesh, with or
      without ``distribute=``); arrays, or the shape structs of
      ``jax.eval_shape(tx.init, params)`` for the abstract portable form
      (with ``params``, each with the sharding the portable state gets on
      these parameters' devices: the target of an orbax restore).
    params: the parameters (optional; with them the state's tree structure
      is checked against ``tx.init(params)``).

  Returns:
    The state ``tx`` would have on one device without ``distribute``: the
    same tree for every placement of the same optimizer and parameters,
    with the same values (each per-matrix array back in its parameter's
    entry; the arrays keep their shardings where they did not move).
  """
  if params is not None:
    expected = jax.tree.structure(jax.eval_shape(tx.init, params))
    if jax.tree.structure(state) != expected:
      raise ValueError('state: its tree structure is not that of '
                       'tx.init(params); pass the state this optimizer '
                       'made for these parameters.')
  if _is_abstract(state):
    like = jax.eval_shape(_unplace, state)
    if params is None:
      return like
    # With the parameters' shardings: an orbax restore target.
    shardings = distributed_lib.state_shardings(like, params)
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        like, shardings)
  return jax.jit(_unplace)(state)


def place_state(tx: optax.GradientTransformation, portable: Any,
                params: Any) -> Any:
  """The state of ``tx`` for ``params`` holding ``portable``'s values.

  Args:
    tx: the optimizer to continue with: the same method and settings as the
      one that made ``portable``, on any placement (``distribute=`` over
      any mesh, or none).
    portable: a :func:`portable_state` (e.g. restored from a checkpoint).
    params: the parameters, placed as they will be trained (their
      shardings decide the state's, :func:`optax_lite.state_shardings`).

  Returns:
    The state, as ``tx.init(params)`` would lay it out (owner-resident
    stacks built for this mesh), sharded like
    :func:`optax_lite.sharded_init`'s.
  """
  target = jax.eval_shape(tx.init, params)
  like = jax.eval_shape(_unplace, target)
  if jax.tree.structure(like) != jax.tree.structure(portable):
    raise ValueError('portable: its tree structure is not that of this '
                     'optimizer\'s portable state for these parameters; '
                     'it was saved from another optimizer or parameter '
                     'tree.')
  # The portable arrays may live on other devices (a checkpoint restored
  # elsewhere, a state from another mesh): first onto these parameters'
  # devices, laid out as a one-device state would be sharded here.
  portable = jax.device_put(
      portable, distributed_lib.state_shardings(like, params))
  shardings = distributed_lib.state_shardings(target, params)
  return jax.jit(lambda p: _place(target, p), out_shardings=shardings)(
      portable)


def _is_abstract(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct)
                              for x in leaves)
