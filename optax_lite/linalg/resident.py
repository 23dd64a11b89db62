r"""Owner-resident state and its layout, as static metadata.

Under ``distribute=`` over several devices a matrix optimizer keeps each
matrix's state (momenta, Kronecker factors, bases) on the device that
computes that matrix: an :class:`OwnerStacks`, one tuple of arrays per shape
group, each ``(D·K_g, ...)`` in owner order and split over the mesh axes.

Where every row came from is static metadata of the stacks (an
:class:`OwnerLayout`, part of the pytree's treedef like the mesh): per group
the items stacked in it and the owner-order row of each of their slices,
and per item a :class:`Home` for each of its arrays, i.e. the field and the
parameter whose entry that array is in the one-device state (where the
resident state leaves a one-element placeholder, or an
``optax.MaskedNode``). With it a state can be moved between placements
without knowing which optimizer made it: :func:`unstack` returns every
item's arrays in stacking order, :func:`stack` builds the stacks of another
layout from per-item arrays, and :func:`from_stored` / :func:`to_stored`
map one array between its resident form (a ``(B, ...)`` stack, possibly in
matrix form and transposed) and its one-device form.
:mod:`optax_lite.transforms.portable` walks whole optimizer states with
these.

Everything here is pure JAX (no optax) and jit-safe.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from optax_lite.linalg.matrices import MatrixView


class Home(NamedTuple):
  """Where one resident array of one item lives in the one-device state.

  Attributes:
    path: field names (NamedTuple fields, dict keys) and indices (tuples)
      from the state node that holds the :class:`OwnerStacks` to a tree
      shaped like the parameters.
    leaf: the parameter's key path in the parameter tree (as
      ``jax.tree_util.tree_flatten_with_path`` gives it), which is its key
      path in that tree too.
    shape: the array's shape there.
    view: ``None``: the resident array is the value reshaped to its
      stack's slice shape; a :class:`~optax_lite.linalg.MatrixView`: it is
      ``view.to_matrix(value)``.
    transposed: the resident array has its last two axes swapped (tall
      matrices stored wide).
  """
  path: tuple
  leaf: tuple
  shape: tuple[int, ...]
  view: MatrixView | None = None
  transposed: bool = False


class OwnerLayout(NamedTuple):
  """Which rows of an :class:`OwnerStacks` hold which item (static).

  Attributes:
    members: per group, ``(item index, batch size)`` of each item stacked
      in it, in stacking order (the items' slices are consecutive rows of
      the group's stack before the owner permutation).
    rows: per group, the owner-order row of each stacked slice (so
      ``stack[rows[g]]`` lists the slices in stacking order); the other
      rows are pads.
    homes: per item (``None`` if unknown), one :class:`Home` per resident
      array, in the order of the group's arrays. Arrays after them (e.g.
      per-step buffers an update appends) have no home.
  """
  members: tuple[tuple[tuple[int, int], ...], ...]
  rows: tuple[tuple[int, ...], ...]
  homes: tuple[tuple[Home, ...], ...] | None = None


@jax.tree_util.register_pytree_node_class
class OwnerStacks:
  """Per-item state that lives on its owner device (owner-computes).

  ``groups``: one tuple of arrays per shape group of
  :func:`optax_lite.linalg.grouped.grouped_map`, each ``(D·K_g, ...)`` in
  owner order (device ``d`` holds rows ``d·K_g`` to ``(d+1)·K_g − 1``: its
  items, then zero pads), sharded over the mesh axes ``axes`` along axis
  0. A pytree whose static data are the mesh, the axes and the
  :class:`OwnerLayout`, so
  :func:`optax_lite.linalg.distributed.state_shardings` gives its leaves
  exactly that sharding (``jax.jit(tx.init, out_shardings=...)``, orbax
  checkpoints) and :mod:`optax_lite.transforms.portable` can move it to
  another placement.
  """

  def __init__(self, groups, mesh, axes, layout: OwnerLayout | None = None):
    self.groups = tuple(tuple(g) for g in groups)
    self.mesh = mesh
    self.axes = tuple(axes)
    self.layout = layout

  def sharding(self):
    ax = self.axes if len(self.axes) > 1 else self.axes[0]
    return NamedSharding(self.mesh, P(ax))

  def replace_groups(self, groups) -> 'OwnerStacks':
    """The same mesh, axes and layout with other arrays."""
    return OwnerStacks(groups, self.mesh, self.axes, self.layout)

  def tree_flatten(self):
    return (self.groups,), (self.mesh, self.axes, self.layout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.groups, (obj.mesh, obj.axes, obj.layout) = children[0], aux
    return obj

  def __repr__(self):
    shapes = [[tuple(getattr(x, 'shape', ())) for x in g]
              for g in self.groups]
    return f'OwnerStacks(axes={self.axes}, groups={shapes})'


def owner_layout(members, inverse_rows, homes=None) -> OwnerLayout:
  """An :class:`OwnerLayout` from Python/NumPy data (made hashable)."""
  return OwnerLayout(
      tuple(tuple((int(i), int(b)) for i, b in grp) for grp in members),
      tuple(tuple(int(r) for r in np.asarray(rows)) for rows in
            inverse_rows),
      None if homes is None else tuple(
          None if h is None else tuple(h) for h in homes))


def unstack(owned: OwnerStacks) -> dict[int, tuple]:
  """Every item's resident arrays (those with a home), in stacking order.

  Returns ``{item index: (array, ...)}``, each array ``(B_i, ...)``: the
  item's slices gathered from the owner-ordered stacks.
  """
  layout = owned.layout
  if layout is None or layout.homes is None:
    raise ValueError('state: these owner-resident stacks carry no layout '
                     '(made by an older version); they cannot be moved.')
  out = {}
  for grp, members, rows in zip(owned.groups, layout.members, layout.rows):
    if not members:
      continue
    n_home = len(layout.homes[members[0][0]])
    idx = jnp.asarray(np.asarray(rows, np.int32))
    in_order = [jnp.take(x, idx, axis=0) for x in grp[:n_home]]
    start = 0
    for item, batch in members:
      out[item] = tuple(x[start:start + batch] for x in in_order)
      start += batch
  return out


def stack(per_item: dict[int, tuple], like: OwnerStacks) -> OwnerStacks:
  """:func:`unstack`'s inverse: ``like``'s stacks filled from ``per_item``.

  ``like`` gives the layout, the shapes and dtypes (it may hold
  shape-dtype structs); the pad rows are zeros, as
  :func:`optax_lite.linalg.grouped.owner_stacks` makes them.
  """
  layout = like.layout
  groups = []
  for grp, members, rows in zip(like.groups, layout.members, layout.rows):
    if not members:
      groups.append(tuple(jnp.zeros(x.shape, x.dtype) for x in grp))
      continue
    arrays = []
    for j, x in enumerate(grp):
      parts = [per_item[item][j].astype(x.dtype) for item, _ in members]
      in_order = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
      out = jnp.zeros(x.shape, x.dtype)
      arrays.append(out.at[jnp.asarray(np.asarray(rows, np.int32))].set(
          in_order))
    groups.append(tuple(arrays))
  return like.replace_groups(groups)


def from_stored(x: jax.Array, home: Home) -> jax.Array:
  """One resident array ``(B, ...)`` in its one-device form."""
  if home.transposed:
    x = jnp.swapaxes(x, -1, -2)
  if home.view is not None:
    return home.view.from_matrix(x)
  return x.reshape(home.shape)


def to_stored(x: jax.Array, home: Home, slice_shape: Sequence[int]
              ) -> jax.Array:
  """One array of the one-device state in its resident form
  ``(B, *slice_shape)`` (:func:`from_stored`'s inverse)."""
  if home.view is not None:
    x = home.view.to_matrix(x)
  else:
    x = x.reshape((-1,) + tuple(slice_shape))
  return jnp.swapaxes(x, -1, -2) if home.transposed else x


def transposed_homes(homes: Sequence[Home], n_mats: int) -> tuple:
  """The homes of an item stored as its transpose: the first ``n_mats``
  (matrices) transposed, the factor pairs after them swapped (left ↔
  right), as :func:`optax_lite.transforms.kron_precondition` stores a
  tall matrix's state."""
  mats = tuple(h._replace(transposed=not h.transposed)
               for h in homes[:n_mats])
  rest = tuple(homes[n_mats:])
  return mats + tuple(rest[j ^ 1] for j in range(len(rest)))


def leaf_paths(tree: Any) -> list[tuple]:
  """The key path of every leaf of ``tree``, in leaf order."""
  return [tuple(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]
