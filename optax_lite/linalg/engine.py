r"""The matrix engine: where a per-matrix kernel runs, and its state lives.

A matrix method (SOAP, Shampoo, ...) is a **kernel** on one stack of
matrices and their per-matrix state,

.. math::
   (U, s') = \mathrm{kernel}(G, s), \qquad G, U: (B, m, n),

slice-wise (row ``i`` of every output depends only on row ``i`` of the
inputs) and knowing nothing of devices, stacking or leaves; plus a
:class:`MatrixMethod` that says, statically, how a leaf's one-device state
maps onto the kernel's: which fields it steps, which of them are shaped
like the parameter (matrix form through the leaf's
:class:`~optax_lite.linalg.MatrixView`), how a transposed (tall) matrix
swaps its factor pairs, what an item costs.

:func:`step_leaves` runs a step under a :class:`Placement`, chosen once:

* ``"per_leaf"``: one device, leaf by leaf (in packs that fit a memory
  budget, one after another);
* ``"stacked"``: one device, same-shape matrices stacked into one kernel
  call per shape (:func:`optax_lite.linalg.grouped.grouped_map`);
* ``"owner"``: several devices, each matrix computed by one owner device,
  its state travelling there and back each step;
* ``"owner_resident"``: several devices, the state living on the owner
  (:class:`~optax_lite.linalg.resident.OwnerStacks`, made by
  :func:`own_leaves`, with its layout as static metadata), only the
  gradient and the update travelling.

Everything here is pure JAX (no optax) and jit-safe.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from optax_lite.linalg import budget as budget_lib
from optax_lite.linalg import grouped
from optax_lite.linalg.placement import PolarSharding
from optax_lite.linalg.resident import Home, OwnerStacks, transposed_homes

PLACEMENTS = ('per_leaf', 'stacked', 'owner', 'owner_resident')


class Placement(NamedTuple):
  """Where a step runs (static).

  Attributes:
    kind: one of :data:`PLACEMENTS`.
    spec: the devices of ``"owner"`` / ``"owner_resident"`` (``None``
      otherwise).
    memory_budget: bytes for the leaves stepped together (``"per_leaf"``)
      or for one kernel call (``"stacked"``); ``None``: no bound.
  """
  kind: str
  spec: PolarSharding | None = None
  memory_budget: float | None = None


def placement_for(spec: PolarSharding | None, *, resident: bool,
                  stacked: bool = False, memory_budget=None) -> Placement:
  """The placement of a step: several devices in ``spec`` (owner-computes,
  ``resident`` or not), else one device (``stacked`` or leaf by leaf)."""
  if spec is not None and spec.num_shards() > 1:
    return Placement('owner_resident' if resident else 'owner', spec)
  if spec is not None:  # a one-device mesh: stacked, each shape in one call
    return Placement('stacked')
  if stacked:
    return Placement('stacked', None, memory_budget)
  return Placement('per_leaf', None, memory_budget)


class MatrixMethod(NamedTuple):
  """How a method's one-device per-leaf state maps onto its kernel (static).

  Attributes:
    names: the per-leaf state fields, in the state's order (each a tree
      like the parameters in the state): a field name, or a path of names
      and indices for a field nested in another.
    active: indices of the fields the kernel steps, in its argument order
      (the others are kept as they are).
    leaf_shaped: the active fields shaped like the parameter; the kernel
      gets them in matrix form.
    n_swapped: with ``transpose_tall``, the active fields after the
      leaf-shaped ones come in left/right pairs that a transposed (tall)
      matrix swaps; ``0``: none.
    transpose_tall: tall matrices run as their transpose, so that ``m × n``
      and ``n × m`` leaves share a kernel.
    cost: ``cost(per-slice shapes of an item) -> float`` for the balance
      over devices (``None``: :func:`~optax_lite.linalg.grouped.matrix_cost`).
    resident_cost: the same for an owner-resident item (only its gradient
      moves; ``None``: ``cost``).
    item_bytes: ``item_bytes(arrays) -> float``, one leaf's working set
      for the ``"per_leaf"`` budget (``None``: unbounded).
  """
  names: tuple
  active: tuple[int, ...]
  leaf_shaped: tuple[int, ...]
  transpose_tall: bool = False
  cost: Callable | None = None
  resident_cost: Callable | None = None
  item_bytes: Callable | None = None


class Leaf(NamedTuple):
  """One leaf of a step: its gradient, view, state fields, whether it is a
  matrix item (``False``: it stays on its leaf, e.g. an element-wise leaf
  under owner-computes), and arrays shaped like it that travel with the
  gradient (e.g. the parameter; the kernel gets them after ``g``)."""
  g: jax.Array
  view: Any
  state: tuple
  is_item: bool
  extras: tuple = ()


def _moving(leaf: Leaf, compute: bool = False) -> tuple:
  """The gradient and the extras in matrix form (``compute``: cast to the
  compute dtype, at least float32)."""
  out = tuple(leaf.view.to_matrix(x) for x in (leaf.g,) + tuple(leaf.extras))
  if not compute:
    return out
  return tuple(x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in out)


def _to_kernel(method: MatrixMethod, leaf: Leaf) -> tuple:
  """The active fields of ``leaf`` in the kernel's (matrix) form."""
  return tuple(leaf.view.to_matrix(leaf.state[j])
               if j in method.leaf_shaped else leaf.state[j]
               for j in method.active)


def _from_kernel(method: MatrixMethod, leaf: Leaf, u, new) -> tuple:
  """``(update, *state fields)`` of ``leaf`` from the kernel's outputs."""
  state = list(leaf.state)
  for j, x in zip(method.active, new):
    state[j] = leaf.view.from_matrix(x) if j in method.leaf_shaped else x
  return (leaf.view.from_matrix(u).astype(leaf.g.dtype),) + tuple(state)


def _transposed(arrays: Sequence, n_mats: int) -> tuple:
  """An item (or its result) of ``Gᵀ``: the first ``n_mats`` arrays (the
  gradient or update and the leaf-shaped fields) transposed, the factor
  pairs after them swapped (left ↔ right). Its own inverse."""
  mats = tuple(jnp.swapaxes(x, -1, -2) for x in arrays[:n_mats])
  rest = tuple(arrays[n_mats:])
  return mats + tuple(rest[j ^ 1] for j in range(len(rest)))


def _is_tall(method: MatrixMethod, leaf: Leaf) -> bool:
  return method.transpose_tall and leaf.view.rows > leaf.view.cols


def step_leaves(method: MatrixMethod, kernel: Callable,
                placement: Placement, leaves: Sequence[Leaf],
                owned: OwnerStacks | None = None,
                local: Callable[[Leaf], tuple] | None = None):
  """One step of every leaf: ``[(update, *state fields)]`` (and the new
  stacks with ``"owner_resident"``).

  ``kernel(g, *extras, *active) -> (u, *new active)`` on ``(B, m, n)``
  stacks. Leaves that are not items run ``local(leaf)`` (default: the
  kernel on the leaf alone).
  """
  local = local or functools.partial(_local, method, kernel)
  kind = placement.kind
  if kind == 'owner_resident':
    return _step_resident(method, kernel, placement, leaves, owned, local)
  if kind == 'per_leaf':
    return _step_per_leaf(method, kernel, placement, leaves)
  out, items, todo = [None] * len(leaves), [], []
  for i, leaf in enumerate(leaves):
    if not leaf.is_item:
      out[i] = local(leaf)
      continue
    n_mats = 1 + len(leaf.extras) + len(method.leaf_shaped)
    item = _moving(leaf) + _to_kernel(method, leaf)
    tall = _is_tall(method, leaf)
    todo.append((i, tall))
    items.append(_transposed(item, n_mats) if tall else item)
  results = grouped.grouped_map(
      lambda *xs: tuple(kernel(*xs)), items, spec=placement.spec,
      cost=method.cost, memory_budget=placement.memory_budget)
  for (i, tall), res in zip(todo, results):
    n_out = 1 + len(method.leaf_shaped)  # the update, then the state
    res = _transposed(tuple(res), n_out) if tall else tuple(res)
    out[i] = _from_kernel(method, leaves[i], res[0], res[1:])
  return out


def _local(method: MatrixMethod, kernel: Callable, leaf: Leaf) -> tuple:
  u, *new = kernel(*_moving(leaf), *_to_kernel(method, leaf))
  return _from_kernel(method, leaf, u, new)


def _step_per_leaf(method, kernel, placement, leaves):
  """Leaf by leaf; with a budget in packs that fit it, one after another."""
  if placement.memory_budget is None or method.item_bytes is None:
    return [_local(method, kernel, leaf) for leaf in leaves]
  calls = [(lambda g, *st, leaf=leaf: _local(
      method, kernel, leaf._replace(g=g, state=st)), (leaf.g,) + leaf.state)
           for leaf in leaves]
  sizes = [method.item_bytes((leaf.g,) + leaf.state) for leaf in leaves]
  return budget_lib.sequential_calls(calls, sizes, placement.memory_budget)


def _step_resident(method, kernel, placement, leaves, owned, local):
  """Only the gradient (and the extras) travel to the owner, where the
  kernel runs next to the resident state; the update comes back, the state
  stays."""
  out, items, todo = [None] * len(leaves), [], []
  for i, leaf in enumerate(leaves):
    if not leaf.is_item:
      out[i] = local(leaf)
      continue
    xs = _moving(leaf, compute=True)
    tall = _is_tall(method, leaf)
    items.append(tuple(jnp.swapaxes(x, -1, -2) for x in xs) if tall else xs)
    todo.append((i, tall))

  def fn(*xs):
    u, *new = kernel(*xs)
    return (u,), tuple(new)

  results, owned = grouped.grouped_map(
      fn, items, spec=placement.spec,
      cost=method.resident_cost or method.cost, resident=owned)
  for (i, tall), (u,) in zip(todo, results):
    leaf = leaves[i]
    u = jnp.swapaxes(u, -1, -2) if tall else u
    out[i] = ((leaf.view.from_matrix(u).astype(leaf.g.dtype),)
              + tuple(leaf.state))
  return out, owned


def _path(name) -> tuple:
  return tuple(name) if isinstance(name, tuple) else (name,)


def own_leaves(method: MatrixMethod, placement: Placement,
               leaves: Sequence[Leaf], paths: Sequence[tuple],
               placeholder: Callable[[Any], jax.Array]):
  """Moves every item's active state to its owner device.

  ``leaves``: the parameters (``g``: each parameter, for the shapes) with
  their one-device state; ``paths``: each parameter's key path (the
  stacks' layout records where every resident array lives, so the state
  can move to another placement). Returns ``(per-leaf states with
  placeholder(field) in every field of an item, OwnerStacks)``, the
  groups and owners those of :func:`step_leaves` with the same leaves.
  """
  structs, state, homes, out = [], [], [], []
  for leaf, path in zip(leaves, paths):
    if not leaf.is_item:
      out.append(tuple(leaf.state))
      continue
    b, m, n = leaf.view.matrix_shape
    st = _to_kernel(method, leaf)
    home = tuple(Home(_path(method.names[j]), path,
                      tuple(leaf.state[j].shape),
                      leaf.view if j in method.leaf_shaped else None)
                 for j in method.active)
    if _is_tall(method, leaf):
      m, n = n, m
      st = _transposed(st, len(method.leaf_shaped))
      home = transposed_homes(home, len(method.leaf_shaped))
    structs.append(tuple(
        jax.ShapeDtypeStruct((b, m, n), jnp.promote_types(x.dtype,
                                                          jnp.float32))
        for x in (leaf.g,) + tuple(leaf.extras)))
    state.append(st)
    homes.append(home)
    out.append(tuple(placeholder(x) for x in leaf.state))
  owned = grouped.owner_stacks(
      structs, state, spec=placement.spec,
      cost=method.resident_cost or method.cost, homes=homes)
  return out, owned
