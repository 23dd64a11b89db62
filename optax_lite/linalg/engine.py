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
  call per shape (:func:`optax_lite.linalg.grouped.grouped_map`; a kernel
  with a LAPACK call maps over the matrices one at a time when the process
  has several CPU devices);
* ``"owner"``: several devices, each matrix computed by one owner device,
  its state travelling there and back each step;
* ``"owner_resident"``: several devices, the state living on the owner
  (:class:`~optax_lite.linalg.resident.OwnerStacks`, made by
  :func:`own_leaves`, with its layout as static metadata), only the
  gradient and the update travelling.

:func:`step_around` runs a tree-level step (an inner transform) between
two per-matrix maps, whatever the first hands the second (FISMO's roots)
staying where the matrix is computed. Every matrix transform of
:mod:`optax_lite.transforms` places its work through these functions:
Muon's polar factor, RMNP, NorMuon, SOAP, Shampoo, the LITE geometries'
owner step and FISMO's whitening.

Everything here is pure JAX (no optax) and jit-safe.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

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
  ``resident`` or not), else one device (``stacked`` or leaf by leaf).

  A one-device mesh stacks; the budget then bounds only a method that
  stacks anyway (``stacked``), the others run each shape in one call.
  """
  if spec is not None and spec.num_shards() > 1:
    return Placement('owner_resident' if resident else 'owner', spec)
  if spec is not None or stacked:
    return Placement('stacked', None, memory_budget if stacked else None)
  return Placement('per_leaf', None, memory_budget)


class MatrixMethod(NamedTuple):
  """How a method's one-device per-leaf state maps onto its kernel (static).

  Attributes:
    names: the per-leaf state fields, in the state's order (each a tree
      like the parameters in the state): a field name, or a path of names
      and indices for a field nested in another; ``None``: the resident
      state records no homes (it cannot move to another placement).
    active: indices of the fields the kernel steps, in its argument order
      (the others are kept as they are); a leaf may step a subset of its
      own (:attr:`Leaf.active`).
    leaf_shaped: the active fields shaped like the parameter; the kernel
      gets them in matrix form.
    transpose_tall: tall matrices run as their transpose, so that ``m × n``
      and ``n × m`` leaves share a kernel; the active fields after the
      leaf-shaped ones then come in left/right pairs that it swaps.
    cost: ``cost(per-slice shapes of an item) -> float`` for the balance
      over devices (``None``: :func:`~optax_lite.linalg.grouped.matrix_cost`).
    resident_cost: the same for an owner-resident item (only its gradient
      moves; ``None``: ``cost``).
    item_bytes: ``item_bytes(view, arrays) -> float``, one leaf's working
      set for the ``"per_leaf"`` budget (``arrays``: the gradient, the
      extras and the state fields as stored; ``view``: ``None`` on a leaf
      without one; ``None``: unbounded).
    batch_shaped: the active fields stored as ``view.batch_shape + s``
      (one ``s`` per matrix of the leaf); the kernel gets them as
      ``(B,) + s``.
    compute_dtype: the dtype the moving arrays travel in to owner-resident
      state (``None``: theirs, at least float32).
    keyed: the kernel takes ``key=``, the leaf's static :attr:`Leaf.key`
      (leaves with different keys are not stacked together).
    after_bytes: :func:`step_around`'s ``item_bytes`` for its second map
      (``arrays``: the inner update and the carry).
    carry_in_state: :func:`step_around`'s carry is the last new active
      fields (e.g. roots that are also cached): with ``"owner_resident"``
      the second map reads it from the resident state, no buffers.
    leaf_form: ``"per_leaf"`` runs :func:`step_leaves`'s ``local(leaf)`` on
      every leaf, items too, on the arrays as stored (a method whose step
      reads any layout through the leaf's view, as LITE's geometries do):
      the program of a plain map over the leaves, whose fusions (and so
      round-off) a matrix-form call would change.
    wait_state: under a ``"per_leaf"`` budget, a pack's state (not only its
      gradient) waits for the previous pack
      (:func:`~optax_lite.linalg.budget.sequential_calls`): for a kernel
      with work that reads only the state, which XLA:CPU's scheduler would
      otherwise run for every leaf at once (SOAP's and Shampoo's kept
      bases). It costs a copy of the state of one pack.
  """
  names: tuple | None
  active: tuple[int, ...]
  leaf_shaped: tuple[int, ...]
  transpose_tall: bool = False
  cost: Callable | None = None
  resident_cost: Callable | None = None
  item_bytes: Callable | None = None
  batch_shaped: tuple[int, ...] = ()
  compute_dtype: Any = None
  keyed: bool = False
  after_bytes: Callable | None = None
  carry_in_state: bool = False
  leaf_form: bool = False
  wait_state: bool = False


class Leaf(NamedTuple):
  """One leaf of a step: its gradient, view, state fields, whether it is a
  matrix item (``False``: it stays on its leaf, e.g. an element-wise leaf
  under owner-computes), arrays shaped like it that travel with the
  gradient (e.g. the parameter; the kernel gets them after ``g``), its
  static key (with :attr:`MatrixMethod.keyed`) and the fields it steps
  (``None``: the method's ``active``)."""
  g: jax.Array
  view: Any
  state: tuple
  is_item: bool
  extras: tuple = ()
  key: Hashable = None
  active: tuple[int, ...] | None = None


def _active(method: MatrixMethod, leaf: Leaf) -> tuple[int, ...]:
  return method.active if leaf.active is None else leaf.active


def _moving(method: MatrixMethod, leaf: Leaf, compute: bool = False
            ) -> tuple:
  """The gradient and the extras in matrix form (``compute``: cast to the
  compute dtype)."""
  out = tuple(leaf.view.to_matrix(x) for x in (leaf.g,) + tuple(leaf.extras))
  if not compute:
    return out
  return tuple(x.astype(method.compute_dtype or
                        jnp.promote_types(x.dtype, jnp.float32)) for x in out)


def _to_kernel(method: MatrixMethod, leaf: Leaf) -> tuple:
  """The active fields of ``leaf`` in the kernel's (matrix) form."""
  out = []
  for j in _active(method, leaf):
    x = leaf.state[j]
    if j in method.leaf_shaped:
      x = leaf.view.to_matrix(x)
    elif j in method.batch_shaped:
      x = x.reshape(leaf.view.matrix_shape[:1]
                    + x.shape[len(leaf.view.batch_shape):])
    out.append(x)
  return tuple(out)


def _from_kernel(method: MatrixMethod, leaf: Leaf, u, new) -> tuple:
  """``(update, *state fields)`` of ``leaf`` from the kernel's outputs."""
  state = list(leaf.state)
  for j, x in zip(_active(method, leaf), new):
    if j in method.leaf_shaped:
      x = leaf.view.from_matrix(x)
    elif j in method.batch_shaped:
      x = x.reshape(tuple(leaf.view.batch_shape) + x.shape[1:])
    state[j] = x
  return (leaf.view.from_matrix(u).astype(leaf.g.dtype),) + tuple(state)


def _n_mats(method: MatrixMethod, leaf: Leaf, n_moving: int) -> int:
  """The moving arrays and the leaf-shaped active fields: what a
  transposed item has transposed."""
  return n_moving + sum(j in method.leaf_shaped
                        for j in _active(method, leaf))


def _transposed(arrays: Sequence, n_mats: int) -> tuple:
  """An item (or its result) of ``Gᵀ``: the first ``n_mats`` arrays (the
  gradient or update and the leaf-shaped fields) transposed, the factor
  pairs after them swapped (left ↔ right). Its own inverse."""
  mats = tuple(jnp.swapaxes(x, -1, -2) for x in arrays[:n_mats])
  rest = tuple(arrays[n_mats:])
  return mats + tuple(rest[j ^ 1] for j in range(len(rest)))


def _is_tall(method: MatrixMethod, leaf: Leaf) -> bool:
  return method.transpose_tall and leaf.view.rows > leaf.view.cols


def _call(method: MatrixMethod, kernel: Callable, key, *xs):
  return kernel(*xs, key=key) if method.keyed else kernel(*xs)


def _keys(method: MatrixMethod, leaves: Sequence[Leaf], todo) -> list | None:
  return [leaves[i].key for i, _ in todo] if method.keyed else None


def _items(method: MatrixMethod, leaves: Sequence[Leaf], local, out,
           resident: bool = False):
  """The work items (matrix form, tall ones transposed; with ``resident``
  only the moving arrays, in the compute dtype) and ``[(leaf index,
  tall)]``; the other leaves' results, ``local(leaf)``, go into ``out``."""
  items, todo = [], []
  for i, leaf in enumerate(leaves):
    if not leaf.is_item:
      out[i] = local(leaf)
      continue
    tall = _is_tall(method, leaf)
    xs = _moving(method, leaf, compute=resident)
    if resident:
      items.append(tuple(jnp.swapaxes(x, -1, -2) for x in xs) if tall
                   else xs)
    else:
      item = xs + _to_kernel(method, leaf)
      items.append(_transposed(item, _n_mats(method, leaf, len(xs))) if tall
                   else item)
    todo.append((i, tall))
  return items, todo


def step_leaves(method: MatrixMethod, kernel: Callable,
                placement: Placement, leaves: Sequence[Leaf],
                owned: OwnerStacks | None = None,
                local: Callable[[Leaf], tuple] | None = None):
  """One step of every leaf: ``[(update, *state fields)]`` (and the new
  stacks with ``"owner_resident"``).

  ``kernel(g, *extras, *active) -> (u, *new active)`` on ``(B, m, n)``
  stacks. Leaves that are not items (with :attr:`MatrixMethod.leaf_form`
  and ``"per_leaf"``, every leaf) run ``local(leaf)`` (default: the kernel
  on the leaf alone).
  """
  local = local or functools.partial(_local, method, kernel)
  kind = placement.kind
  if kind == 'owner_resident':
    return _step_resident(method, kernel, placement, leaves, owned, local)
  if kind == 'per_leaf':
    return _leaf_calls(
        lambda leaf: (_local(method, kernel, leaf)
                      if leaf.is_item and not method.leaf_form
                      else local(leaf)),
        leaves, placement.memory_budget, method.item_bytes,
        method.wait_state)
  out = [None] * len(leaves)
  items, todo = _items(method, leaves, local, out)
  meshes = [_leaf_mesh(leaves[i]) for i, _ in todo]
  items = [_whole(item, mesh) for item, mesh in zip(items, meshes)]
  results = grouped.grouped_map(
      lambda *xs, **key: tuple(kernel(*xs, **key)), items,
      spec=placement.spec, cost=method.cost,
      memory_budget=placement.memory_budget,
      keys=_keys(method, leaves, todo))
  for (i, tall), res, mesh in zip(todo, results, meshes):
    res = (_transposed(tuple(res), _n_mats(method, leaves[i], 1)) if tall
           else tuple(res))
    out[i] = _from_kernel(method, leaves[i], *_whole((res[0], res[1:]),
                                                    mesh))
  return out


def _local(method: MatrixMethod, kernel: Callable, leaf: Leaf) -> tuple:
  u, *new = _call(method, kernel, leaf.key, *_moving(method, leaf),
                  *_to_kernel(method, leaf))
  return _from_kernel(method, leaf, u, new)


def _leaf_calls(run: Callable[[Leaf], Any], leaves: Sequence[Leaf],
                budget, item_bytes, wait_state: bool = False) -> list:
  """``run(leaf)`` leaf by leaf; with a budget in packs that fit it, one
  after another (every leaf's size is ``item_bytes(view, (g, *extras,
  *state))``; its gradient, and with ``wait_state`` its extras and state,
  wait for the previous pack)."""
  run = _on_every_device(run)
  if budget is None or item_bytes is None:
    return [run(leaf) for leaf in leaves]

  def call(leaf):
    n = len(leaf.extras)
    return (lambda g, *rest: run(leaf._replace(
        g=g, extras=tuple(rest[:n]), state=tuple(rest[n:]))),
            (leaf.g,) + tuple(leaf.extras) + tuple(leaf.state))

  calls = [call(leaf) for leaf in leaves]
  sizes = [item_bytes(leaf.view, args) for leaf, (_, args)
           in zip(leaves, calls)]
  return budget_lib.sequential_calls(calls, sizes, budget,
                                    every=wait_state)


def gathers_plain_kernels() -> bool:
  """Whether one-device placements gather sharded matrices first (see
  :func:`_on_every_device`): with several processes on XLA:CPU."""
  return jax.process_count() > 1 and jax.default_backend() == 'cpu'


def _leaf_mesh(leaf: Leaf):
  """The (abstract) mesh of a leaf's arrays when its kernel must run on
  whole copies (:func:`gathers_plain_kernels`), else ``None``."""
  if not gathers_plain_kernels():
    return None
  for x in (leaf.g,) + tuple(leaf.extras) + tuple(leaf.state):
    mesh = getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
    if mesh is not None and not mesh.empty and mesh.size > 1:
      return mesh
  return None


def _whole(tree, mesh):
  """Every array of ``tree`` whole on every device of ``mesh`` (``None``:
  as it is)."""
  if mesh is None:
    return tree
  whole = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, whole), tree)


def _on_every_device(run: Callable[[Leaf], Any]) -> Callable[[Leaf], Any]:
  """``run(leaf)`` on whole copies of the leaf's arrays, its results whole
  too (when :func:`gathers_plain_kernels`; else ``run``).

  A one-device placement on sharded arrays (plain FSDP) leaves XLA's
  partitioner to split the kernel's matrix products, with collectives
  inside the kernel's loops and conditionals. XLA:CPU orders those against
  the step's other collectives by a scheduling edge only, so two processes
  can issue them in different orders and deadlock (docs/multi_device.md).
  With the inputs and the results whole, each matrix's kernel runs one
  device's arithmetic on every device, and every collective of the step is
  a gather at its top level, where XLA:CPU issues them in one order.
  """
  def go(leaf):
    mesh = _leaf_mesh(leaf)
    if mesh is None:
      return run(leaf)
    return _whole(run(leaf._replace(
        g=_whole(leaf.g, mesh), extras=_whole(tuple(leaf.extras), mesh),
        state=_whole(tuple(leaf.state), mesh))), mesh)
  return go


def _step_resident(method, kernel, placement, leaves, owned, local):
  """Only the gradient (and the extras) travel to the owner, where the
  kernel runs next to the resident state; the update comes back, the state
  stays."""
  out = [None] * len(leaves)
  items, todo = _items(method, leaves, local, out, resident=True)

  def fn(*xs, **key):
    u, *new = kernel(*xs, **key)
    return (u,), tuple(new)

  results, owned = grouped.grouped_map(
      fn, items, spec=placement.spec,
      cost=method.resident_cost or method.cost, resident=owned,
      keys=_keys(method, leaves, todo))
  for (i, tall), (u,) in zip(todo, results):
    leaf = leaves[i]
    u = jnp.swapaxes(u, -1, -2) if tall else u
    out[i] = ((leaf.view.from_matrix(u).astype(leaf.g.dtype),)
              + tuple(leaf.state))
  return out, owned


def item_groups(method: MatrixMethod, leaves: Sequence[Leaf]
                ) -> list[list[int]]:
  """The leaves (indices) of each group of an owner-resident step with
  these leaves, in the step's order of groups (that of its stacks)."""
  out = [None] * len(leaves)
  items, todo = _items(method, leaves, lambda leaf: None, out,
                       resident=True)
  groups = grouped.group_items(items, _keys(method, leaves, todo))
  return [[todo[k][0] for k in idx] for idx in groups.values()]


def _path(name) -> tuple:
  return tuple(name) if isinstance(name, tuple) else (name,)


def _homes(method: MatrixMethod, leaf: Leaf, path) -> tuple:
  return tuple(Home(_path(method.names[j]), path,
                    tuple(leaf.state[j].shape),
                    leaf.view if j in method.leaf_shaped else None)
               for j in _active(method, leaf))


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
  structs, state, homes, out, keys = [], [], [], [], []
  for leaf, path in zip(leaves, paths):
    if not leaf.is_item:
      out.append(tuple(leaf.state))
      continue
    b, m, n = leaf.view.matrix_shape
    st = _to_kernel(method, leaf)
    home = None if method.names is None else _homes(method, leaf, path)
    if _is_tall(method, leaf):
      m, n = n, m
      n_mats = _n_mats(method, leaf, 0)
      st = _transposed(st, n_mats)
      home = home and transposed_homes(home, n_mats)
    structs.append(tuple(
        jax.ShapeDtypeStruct((b, m, n), method.compute_dtype or
                             jnp.promote_types(x.dtype, jnp.float32))
        for x in (leaf.g,) + tuple(leaf.extras)))
    state.append(st)
    homes.append(home)
    keys.append(leaf.key)
    out.append(tuple(placeholder(x) for x in leaf.state))
  owned = grouped.owner_stacks(
      structs, state, spec=placement.spec,
      cost=method.resident_cost or method.cost,
      keys=keys if method.keyed else None,
      homes=None if method.names is None else homes)
  return out, owned


def step_around(method: MatrixMethod, before: Callable, middle: Callable,
                after: Callable, placement: Placement,
                leaves: Sequence[Leaf], owned: OwnerStacks | None = None,
                local: tuple[Callable, Callable] | None = None):
  """A step whose tree-level ``middle`` runs between two per-matrix maps.

  ``before(g, *active) -> (w, *new active, *carry)`` on every item, then
  ``middle([w of every leaf]) -> [u of every leaf]`` (e.g. an inner
  transform on the whole tree), then ``after(u, *carry) -> Δ`` on every
  item (both with ``key=`` when the method is keyed). The carry (e.g. the
  roots a whitening used, for its map back) stays where the item is
  computed: under ``"owner"`` and ``"owner_resident"`` in buffers on the
  owner, next to the resident state, for this step only. ``local =
  (before_local(leaf) -> (w, *state), after_local(leaf) -> Δ)`` for the
  leaves that are not items (``leaf.g`` is ``u`` for the second). No
  extras, no transposition.

  Returns ``([(Δ, *state fields)], owned)`` (the new stacks with
  ``"owner_resident"``, else ``owned`` as given).
  """
  if placement.kind == 'per_leaf':
    return _around_per_leaf(method, before, middle, after, placement,
                            leaves, local), owned
  out = [None] * len(leaves)
  first = _around_first(method, before, placement, leaves, owned, local[0],
                        out)
  us = middle([res[0] for res in out])
  stacks = _around_second(method, after, placement, leaves, us, first, out,
                          local[1])
  return out, stacks if placement.kind == 'owner_resident' else owned


def _around_per_leaf(method, before, middle, after, placement, leaves,
                     local):
  """:func:`step_around` leaf by leaf (each map in packs that fit the
  budget)."""
  def first(leaf):
    if not leaf.is_item:
      return local[0](leaf), ()
    ys = _call(method, before, leaf.key, *_moving(method, leaf),
               *_to_kernel(method, leaf))
    n = 1 + len(_active(method, leaf))
    return _from_kernel(method, leaf, ys[0], ys[1:n]), tuple(ys[n:])

  def second(leaf):
    if not leaf.is_item:
      return local[1](leaf)
    delta = _call(method, after, leaf.key, leaf.view.to_matrix(leaf.g),
                  *leaf.state)
    return leaf.view.from_matrix(delta).astype(leaf.g.dtype)

  firsts = _leaf_calls(first, leaves, placement.memory_budget,
                       method.item_bytes)
  us = middle([res[0] for res, _ in firsts])
  deltas = _leaf_calls(
      second, [leaf._replace(g=u, state=carry if leaf.is_item else ())
               for leaf, u, (_, carry) in zip(leaves, us, firsts)],
      placement.memory_budget, method.after_bytes)
  return [(d,) + res[1:] for d, (res, _) in zip(deltas, firsts)]


class _First(NamedTuple):
  """What :func:`step_around`'s second map needs of its first."""
  todo: list       # [(leaf index, tall)] of the items
  keys: list       # per item: (its key, carry arrays, carry buffers)
  group: list      # per item: its group
  carry: list      # per item: its carry (``"stacked"``; else on owners)
  stacks: Any      # the resident state and the carry buffers, or None


def _around_first(method, before, placement, leaves, owned, local, out):
  """:func:`step_around`'s first map, stacked or on the owners; the
  carry buffers (``"owner"``, ``"owner_resident"`` unless the carry is
  resident state) are made here."""
  kind = placement.kind
  resident = kind == 'owner_resident'
  items, todo = _items(method, leaves, local, out, resident=resident)
  groups = list(grouped.group_items(
      items, _keys(method, leaves, todo)).items())
  group, keys, buffers = [0] * len(items), [None] * len(items), []
  for g, ((_, key), idx) in enumerate(groups):
    xs = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
          for x in items[idx[0]] + (owned.groups[g] if resident else ())]
    kw = {'key': key} if method.keyed else {}
    carry = jax.eval_shape(functools.partial(before, **kw), *xs)[len(xs):]
    if kind == 'stacked' or (resident and method.carry_in_state):
      carry_buffers = ()
    else:
      carry_buffers = carry
    for k in idx:
      group[k], keys[k] = g, (key, len(carry), len(carry_buffers))
      buffers.append((k, tuple(jnp.zeros(items[k][0].shape[:1] + c.shape[1:],
                                         c.dtype) for c in carry_buffers)))
  cost = method.resident_cost or method.cost if resident else method.cost
  stacks = owned if resident else None
  if any(n_b for _, _, n_b in keys):
    scratch = grouped.owner_stacks(
        items, [b for _, b in sorted(buffers, key=lambda kb: kb[0])],
        spec=placement.spec, cost=cost, keys=keys)
    stacks = scratch if not resident else owned.replace_groups(tuple(
        a + b for a, b in zip(owned.groups, scratch.groups)))

  def fn(*xs, key):
    ins = xs[:len(xs) - key[2]]
    ys = tuple(_call(method, before, key[0], *ins))
    if stacks is None:
      return ys
    if resident:  # w goes back; the new state (and the carry) stay
      return ys[:1], ys[1:len(ins)] + (ys[len(ins):] if key[2] else ())
    return ys[:len(ins)], ys[len(ins):]  # w and the new state go back

  res = grouped.grouped_map(fn, items, spec=placement.spec, cost=cost,
                            keys=keys, resident=stacks,
                            memory_budget=placement.memory_budget)
  results, stacks = (res, None) if stacks is None else res
  carry = []
  for (i, _), ys in zip(todo, results):
    leaf = leaves[i]
    n = 1 + len(_active(method, leaf))
    if resident:
      out[i] = (leaf.view.from_matrix(ys[0]).astype(leaf.g.dtype),
                ) + tuple(leaf.state)
    else:
      out[i] = _from_kernel(method, leaf, ys[0], ys[1:n])
    carry.append(tuple(ys[n:]))
  return _First(todo, keys, group, carry, stacks)


def _around_second(method, after, placement, leaves, us, first: _First,
                   out, local):
  """:func:`step_around`'s second map: next to the carry (stacked, or on
  the owners that made it, which keep it; ``U`` cast to its group's common
  dtype so that the groups and owners are the first map's)."""
  kind = placement.kind
  for i, leaf in enumerate(leaves):
    if not leaf.is_item:
      out[i] = (local(leaf._replace(g=us[i])),) + tuple(out[i][1:])
  mats = [leaves[i].view.to_matrix(us[i]) for i, _ in first.todo]
  if first.stacks is None:  # the carry came back with the items
    results = grouped.grouped_map(
        lambda *xs, key: (_call(method, after, key[0], *xs),),
        [(u,) + c for u, c in zip(mats, first.carry)], spec=placement.spec,
        keys=first.keys, cost=method.cost,
        memory_budget=placement.memory_budget)
    stacks = None
  else:
    common = {}
    for u, g in zip(mats, first.group):
      common[g] = (method.compute_dtype or jnp.promote_types(u.dtype,
                                                             jnp.float32)
                   if kind == 'owner_resident' else
                   jnp.promote_types(common.get(g, u.dtype), u.dtype))

    def fn(*xs, key):  # the carry: the last arrays next to the item
      (k, n_c, _), _ = key
      delta = _call(method, after, k, xs[0], *xs[len(xs) - n_c:])
      return (delta,), tuple(xs[1:])

    results, stacks = grouped.grouped_map(
        fn, [(u.astype(common[g]),) for u, g in zip(mats, first.group)],
        spec=placement.spec, keys=list(zip(first.keys, first.group)),
        cost=(method.resident_cost or method.cost
              if kind == 'owner_resident' else method.cost),
        resident=first.stacks)
    n_buffers = {g: n_b for g, (_, _, n_b) in zip(first.group, first.keys)}
    stacks = stacks.replace_groups(tuple(
        grp[:len(grp) - n_buffers.get(g, 0)]
        for g, grp in enumerate(stacks.groups)))
  for (i, _), (delta,) in zip(first.todo, results):
    out[i] = ((leaves[i].view.from_matrix(delta).astype(us[i].dtype),)
              + tuple(out[i][1:]))
  return stacks
