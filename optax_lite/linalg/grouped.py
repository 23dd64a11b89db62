r"""Owner-computes: run a per-matrix kernel once per shape, spread over devices.

Matrix optimizers apply a super-linear kernel to every hidden matrix of a
step: a polar factor (Newton–Schulz, ``≈ 2·s²·l`` flops per step for an
``s × l`` matrix, ``s ≤ l``), an ``eigh`` or a QR (``≈ s³``), inverse roots.
Traced leaf by leaf, the compiled program grows with the depth of the model,
and under SPMD sharding every matmul of an iteration on a sharded matrix needs
collectives. :func:`grouped_map` instead

1. splits every leaf ``(B_i, ...)`` into ``B_i`` *work items* (the matrices
   of a stacked ``[layers, in, out]`` or ``[experts, in, out]`` leaf are
   separate items) and groups the items by their shapes and dtypes (and an
   optional static key);
2. **one device** (``spec=None``): stacks each group and calls the kernel
   once per group, so the program has one kernel per *distinct shape*
   however deep the model is (with ``memory_budget``, in chunks whose
   working set fits it, run one after another);
3. **several devices** (``spec`` a :class:`PolarSharding`): assigns whole
   items to the ``D`` devices of the chosen mesh axes by their cost
   (longest-processing-time greedy: items sorted by cost, each given to the
   least-loaded device), brings every group's stack to every device in one
   collective per group (an all-gather; none when the inputs are already
   replicated, as under data parallelism), and runs under ``jax.shard_map``
   a conditional on the device index: device ``d`` executes only the branch
   that computes *its* items (a gather by a constant index table, one
   batched kernel call per group; on CPU meshes a kernel with a LAPACK call
   is mapped over the items instead, see :func:`_calls_lapack`), and
   writes them into a per-group output buffer of ``K_g = max_d k_{g,d}``
   slots. The buffers leave in one all-gather each and the items are put
   back into leaf order.

On one device a kernel with a LAPACK call runs one item at a time too
when the process has several CPU devices (the stack may be sharded over
them by plain GSPMD, and the same pool is shared).

Why a conditional: SPMD requires every device to run the same shapes, so
splitting each group's stack evenly pads each group to a multiple of ``D``
and wastes up to ``(D − 1)/D`` of a small group's work. With the device
index selecting a branch, each device computes exactly its own items; only
the distinct per-device count vectors are compiled (usually two or three),
and XLA's cost analysis counts the most expensive branch. Balance is the LPT
bound: max load ``≤ (4/3 − 1/(3D))·optimum``, and ``≤ mean + max item``.

There is no communication inside the kernel (Newton–Schulz iterations,
``eigh``) — only the all-gathers before and after it. The kernel must be
*slice-wise*: output row ``i`` depends only on input row ``i`` (every
batched ``jnp.linalg`` function and :func:`optax_lite.linalg.newton_schulz`
are).

Everything here is pure JAX (no optax) and jit-safe.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# The budget's helpers, re-exported: the transforms reach them here.
from optax_lite.linalg.budget import DEFAULT_MEMORY_BUDGET  # noqa: F401
from optax_lite.linalg.budget import _budgeted, _concat, _split
from optax_lite.linalg.budget import budget_bytes  # noqa: F401
from optax_lite.linalg.budget import check_memory_budget  # noqa: F401
from optax_lite.linalg.budget import chunk_size
from optax_lite.linalg.budget import matrix_bytes
from optax_lite.linalg.budget import sequential_calls  # noqa: F401
from optax_lite.linalg.budget import wait_for
from optax_lite.linalg.placement import check_polar_sharding
from optax_lite.linalg.resident import Home
from optax_lite.linalg.resident import OwnerStacks  # noqa: F401 (re-export)
from optax_lite.linalg.resident import owner_layout

Item = tuple  # a tuple of arrays sharing their leading (batch) axis


def matrix_cost(shapes: Sequence[tuple[int, ...]]) -> float:
  """Default cost of one item: ``s²·l`` of its first input (``s ≤ l``).

  That is the flop count of one Newton–Schulz Gram product for an
  ``s × l`` matrix, and within a constant of ``eigh`` / QR / inverse roots
  of an ``s × s`` matrix (``s³``). Only ratios matter for the balance.
  """
  shape = shapes[0]
  if len(shape) < 2:
    return float(max(1, math.prod(shape)))
  m, n = shape[-2:]
  s, l = min(m, n), max(m, n)
  return float(s * s * l * max(1, math.prod(shape[:-2])))


def _key(item: Item, extra: Hashable) -> tuple:
  return (tuple((tuple(x.shape[1:]), jnp.dtype(x.dtype).name) for x in item),
          extra)


def group_items(leaves: Sequence[Item], keys: Sequence[Hashable] | None = None
                ) -> dict[tuple, list[int]]:
  """Leaf indices grouped by (per-slice shapes and dtypes, static key)."""
  groups: dict[tuple, list[int]] = {}
  for i, item in enumerate(leaves):
    if not isinstance(item, tuple) or not item:
      raise TypeError(f'leaves[{i}] must be a non-empty tuple of arrays, '
                      f'got {type(item).__name__}.')
    b = item[0].shape[0] if item[0].ndim else None
    for x in item:
      if x.ndim < 1 or x.shape[0] != b:
        raise ValueError(f'leaves[{i}]: every array needs the same leading '
                         f'(batch) axis, got shapes '
                         f'{[tuple(y.shape) for y in item]}.')
    groups.setdefault(_key(item, None if keys is None else keys[i]),
                      []).append(i)
  return groups


class Assignment(NamedTuple):
  """Which device computes which item of each group.

  Attributes:
    device: per group, an int array ``(N_g,)``: the device of each item.
    slot: per group, an int array ``(N_g,)``: its slot on that device.
    counts: ``(D, G)`` items of each group per device.
    loads: ``(D,)`` total cost per device.
  """
  device: list[np.ndarray]
  slot: list[np.ndarray]
  counts: np.ndarray
  loads: np.ndarray


def assign_lpt(sizes: Sequence[int], costs: Sequence[float],
               num_devices: int) -> Assignment:
  """Longest-processing-time greedy assignment of items to devices.

  Args:
    sizes: number of items ``N_g`` of each group.
    costs: cost of one item of each group.
    num_devices: ``D``.

  Returns:
    An :class:`Assignment`. Deterministic: ties go to the lower device index,
    items of a group are taken in order.
  """
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}.')
  g_count = len(sizes)
  order = sorted(range(g_count), key=lambda g: (-costs[g], g))
  heap = [(0.0, d) for d in range(num_devices)]
  device = [np.zeros(n, np.int32) for n in sizes]
  slot = [np.zeros(n, np.int32) for n in sizes]
  counts = np.zeros((num_devices, g_count), np.int64)
  loads = np.zeros(num_devices)
  for g in order:
    for r in range(sizes[g]):
      load, d = heapq.heappop(heap)
      device[g][r] = d
      slot[g][r] = counts[d, g]
      counts[d, g] += 1
      loads[d] = load + costs[g]
      heapq.heappush(heap, (loads[d], d))
  return Assignment(device, slot, counts, loads)


def grouped_map(fn: Callable[..., Any], leaves: Sequence[Item], *,
                spec=None, cost: Callable[[Sequence[tuple]], float] | None
                = None, keys: Sequence[Hashable] | None = None,
                resident: "OwnerStacks | None" = None,
                memory_budget: float | None = None,
                item_bytes: Callable[..., float] | None = None):
  """Applies a slice-wise batched kernel to every item, one call per shape.

  Args:
    fn: ``fn(*arrays) -> pytree of arrays``; every input and output has a
      leading batch axis, and output row ``i`` depends only on input row
      ``i``. Called once per group (and, with ``spec``, once per group per
      compiled branch).
    leaves: a list of tuples of arrays; the arrays of one tuple share their
      leading axis ``B_i`` (e.g. ``(G,)`` for a stacked gradient
      ``(B, m, n)``, or ``(G, L, R)`` with Kronecker factors ``(B, m, m)``,
      ``(B, n, n)``).
    spec: ``None`` (one device: group and stack only) or a
      :class:`optax_lite.linalg.placement.PolarSharding` (or a ``Mesh`` /
      ``(mesh, axes)``): spread the items over the devices of its axes.
    cost: ``cost(per_slice_shapes) -> float`` of one item, for the balance;
      default :func:`matrix_cost`.
    keys: optional static hashable per leaf; only leaves with equal keys are
      stacked together (e.g. a per-leaf setting the kernel reads).

    resident: optional :class:`OwnerStacks` made by :func:`owner_stacks`
      for the same leaves, keys, cost and ``spec`` (several devices only):
      per-item state that lives on its owner device. ``fn`` then takes the
      resident arrays after the moving ones, ``fn(*arrays, *resident)``,
      and returns ``(output pytree, tuple of new resident arrays)``; the new
      resident state stays on the owners (no collective) and is returned.
    memory_budget: bytes for one kernel call's working set, or ``None``
      (each group in one call); one device only (with ``spec`` over several
      devices each device's share runs in one call). A group of
      ``N`` items whose item needs ``w`` bytes (``item_bytes``) runs in
      calls of ``max(1, memory_budget // w)`` items, one after another: a
      ``lax.map`` over the chunks of a stacked leaf (one compiled
      kernel), and calls over packs of separate leaves, each waiting for
      the previous one's outputs (no copy of the whole group into one
      stack; :func:`optax_lite.linalg.budget.wait_for`).
    item_bytes: ``item_bytes(shapes, dtypes)`` of one item's per-slice
      inputs: its working set; default :func:`matrix_bytes`.

  Returns:
    A list, per leaf, of ``fn``'s output pytree with leading axis ``B_i``;
    with ``resident``, the pair ``(that list, new OwnerStacks)``.
    With ``keys``, ``fn`` is called as ``fn(*arrays, key=key)``.
  """
  spec = check_polar_sharding(spec, 'distribute')
  groups = group_items(leaves, keys)
  out: list[Any] = [None] * len(leaves)
  if resident is not None and (spec is None or spec.num_shards() == 1):
    raise ValueError('resident: owner-resident state needs a distribute '
                     'spec over more than one device.')
  if not groups:
    return out if resident is None else (out, resident)
  call = ((lambda key, *xs: fn(*xs)) if keys is None else
          (lambda key, *xs: fn(*xs, key=key)))
  glist = list(groups.items())
  stacks, sizes = [], []
  for _, idx in glist:
    k = len(leaves[idx[0]])
    stacks.append(tuple(_concat([leaves[i][j] for i in idx])
                        for j in range(k)))
    sizes.append([leaves[i][0].shape[0] for i in idx])

  if spec is None or spec.num_shards() == 1:
    # With a budget, each group waits for the previous one (wait_for): the
    # groups' temporaries then share memory, as the chunks' do.
    prev = None
    for (gkey, idx), stack, sz in zip(glist, stacks, sizes):
      chunk = chunk_size(memory_budget, _item_bytes(item_bytes, gkey),
                         stack[0].shape[0])
      lapack = _lapack_on_cpu_devices(call, gkey[1], stack)
      if not lapack and chunk < stack[0].shape[0]:
        pieces = _budgeted(call, gkey[1], [leaves[i] for i in idx], chunk,
                           prev)
      else:  # prev is None without a budget: the stack is unchanged
        stack = wait_for(stack, prev)
        pieces = _split(_one_item_at_a_time(call, gkey[1], stack) if lapack
                        else call(gkey[1], *stack), sz)
      for i, piece in zip(idx, pieces):
        out[i] = piece
      prev = pieces if memory_budget is not None else None
    return out

  plan = _plan(glist, sizes, cost, spec)
  if resident is not None and len(resident.groups) != len(glist):
    raise ValueError(f'resident: {len(resident.groups)} groups, but the '
                     f'leaves form {len(glist)}; build it with owner_stacks '
                     'from the same leaves.')
  # No budget on the owners: chunking a device's items in a lax.map measured
  # more per-device temporaries than one call (2.3x against 1.5x the
  # per-device parameter bytes for muon, 8 host devices, FSDP; the chunk
  # stacks and the exchange buffers add up), and each device already holds
  # 1/D of the groups.
  res = _owner_computes(call, glist, stacks, sizes, plan, spec, out,
                        None if resident is None else resident.groups)
  if resident is None:
    return res
  out, new_groups = res
  return out, resident.replace_groups(new_groups)


class _Plan(NamedTuple):
  asg: Assignment
  kmax: list[int]
  perms: list[np.ndarray]   # per group: (D·K_g,) item index of each row
  n_items: list[int]


def _item_bytes(item_bytes, gkey) -> float:
  """The working set of one item of the group ``gkey`` (shapes, dtypes)."""
  shapes = [s for s, _ in gkey[0]]
  dtypes = [d for _, d in gkey[0]]
  return float((item_bytes or matrix_bytes)(shapes, dtypes))


def _plan(glist, sizes, cost, spec) -> _Plan:
  """The owner assignment of the grouped items (deterministic)."""
  cost = cost or matrix_cost
  n_items = [sum(sz) for sz in sizes]
  costs = [float(cost([s for s, _ in gkey[0]])) for gkey, _ in glist]
  num = spec.num_shards()
  asg = assign_lpt(n_items, costs, num)
  kmax = [max(1, int(k)) for k in asg.counts.max(axis=0)]
  perms = []
  for g in range(len(glist)):
    perm = np.full(num * kmax[g], n_items[g], np.int64)  # pads: row N_g
    perm[asg.device[g].astype(np.int64) * kmax[g] + asg.slot[g]] = (
        np.arange(n_items[g]))
    perms.append(perm)
  return _Plan(asg, kmax, perms, n_items)


def _owner_order(x, perm):
  """Rows of ``x`` in owner order (row ``d·K + k`` = item (d, k)); pad rows
  are zeros."""
  x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
  return jnp.take(x, jnp.asarray(perm, np.int32), axis=0)


def owner_stacks(leaves: Sequence[Item], state: Sequence[Item], *, spec,
                 cost: Callable[[Sequence[tuple]], float] | None = None,
                 keys: Sequence[Hashable] | None = None,
                 homes: Sequence[Sequence[Home]] | None = None
                 ) -> OwnerStacks:
  """Per-leaf state arrays stacked on their owner devices.

  Args:
    leaves: the items exactly as :func:`grouped_map` will get them (arrays
      or ``jax.ShapeDtypeStruct``s: only shapes and dtypes are read), which
      fixes the groups and the owner of every item.
    state: per leaf, a tuple of arrays with the same leading axis ``B_i``
      (the state of each of its items).
    spec, cost, keys: as for :func:`grouped_map`.
    homes: per leaf, a :class:`~optax_lite.linalg.resident.Home` for each
      of its state arrays: where it lives in the one-device state. Stored
      in the stacks' static :class:`~optax_lite.linalg.resident.OwnerLayout`
      so that the state can move to another placement
      (:func:`optax_lite.portable_state`).
  """
  spec = check_polar_sharding(spec, 'distribute')
  if spec is None or spec.num_shards() == 1:
    raise ValueError('distribute: owner_stacks needs a spec over more than '
                     'one device.')
  glist = list(group_items(leaves, keys).items())
  sizes = [[leaves[i][0].shape[0] for i in idx] for _, idx in glist]
  plan = _plan(glist, sizes, cost, spec)
  axes = spec.axis_names()
  sh = OwnerStacks((), spec.mesh, axes).sharding()
  groups = []
  for g, (_, idx) in enumerate(glist):
    k = len(state[idx[0]])
    groups.append(tuple(
        jax.lax.with_sharding_constraint(
            _owner_order(_concat([state[i][j] for i in idx]),
                         plan.perms[g]), sh)
        for j in range(k)))
  members = [[(i, sizes[g][r]) for r, i in enumerate(idx)]
             for g, (_, idx) in enumerate(glist)]
  rows = [plan.asg.device[g].astype(np.int64) * plan.kmax[g]
          + plan.asg.slot[g] for g in range(len(glist))]
  layout = owner_layout(members, rows, homes)
  return OwnerStacks(tuple(groups), spec.mesh, axes, layout)


def _split_axis(shape: tuple[int, ...], num: int) -> int | None:
  """The per-slice axis to split over ``num`` devices (largest divisible)."""
  best = None
  for a, n in enumerate(shape):
    if n % num == 0 and (best is None or n > shape[best]):
      best = a
  return best


def _packing(out_struct, counts):
  """Layout of each device's results packed flat, one buffer per dtype.

  Returns ``(dtype names, {dtype: buffer length}, offsets)`` with
  ``offsets[d][(g, j)]`` the start of device ``d``'s ``counts[d, g]`` items
  of output leaf ``j`` of group ``g`` in its buffer of that leaf's dtype.
  The length is the largest device's total, so the padding is bounded by
  the load imbalance, not by the per-group counts.
  """
  leaves = [jax.tree.leaves(st) for st in out_struct]
  dts = sorted({jnp.dtype(o.dtype).name for ls in leaves for o in ls})
  length = {dt: 1 for dt in dts}
  offsets = []
  for row in counts:
    pos = {dt: 0 for dt in dts}
    off = {}
    for g, ls in enumerate(leaves):
      for j, o in enumerate(ls):
        dt = jnp.dtype(o.dtype).name
        off[(g, j)] = pos[dt]
        pos[dt] += int(row[g]) * math.prod(o.shape[1:])
    for dt in dts:
      length[dt] = max(length[dt], pos[dt])
    offsets.append(off)
  return dts, length, offsets


def _pack(res, vec, dts, length):
  """One device's results (per group, ``vec[g]`` real rows) packed flat."""
  parts = {dt: [] for dt in dts}
  for g, y in enumerate(res):
    if vec[g]:
      for o in jax.tree.leaves(y):
        parts[jnp.dtype(o.dtype).name].append(o[:vec[g]].reshape(-1))
  packed = []
  for dt in dts:
    flat = (jnp.concatenate(parts[dt]) if parts[dt] else
            jnp.zeros((0,), dt))
    pad = length[dt] - flat.shape[0]
    packed.append(jnp.concatenate([flat, jnp.zeros((pad,), dt)]) if pad
                  else flat)
  return packed


def _unpack(bufs, out_struct, counts, kmax, dts, length, offsets):
  """Per group, the ``(D·K_g, ...)`` owner-ordered results from the gathered
  packed buffers (pad rows: zeros)."""
  by_dt = dict(zip(dts, bufs))
  groups = []
  for g, st in enumerate(out_struct):
    leaves, treedef = jax.tree.flatten(st)
    arrays = []
    for j, o in enumerate(leaves):
      dt, shape = jnp.dtype(o.dtype).name, tuple(o.shape[1:])
      size = math.prod(shape)
      blocks = []
      for d, row in enumerate(counts):
        c = int(row[g])
        if c:
          start = d * length[dt] + offsets[d][(g, j)]
          blocks.append(by_dt[dt][start:start + c * size].reshape(
              (c,) + shape))
        if kmax[g] > c:
          blocks.append(jnp.zeros((kmax[g] - c,) + shape, o.dtype))
      arrays.append(_concat(blocks))
    groups.append(treedef.unflatten(arrays))
  return groups


# Primitives that XLA:CPU runs as jaxlib LAPACK calls (jax.lax.linalg).
_LAPACK_PRIMITIVES = frozenset((
    'cholesky', 'cholesky_update', 'eig', 'eigh', 'geqp3', 'geqrf',
    'hessenberg', 'householder_product', 'lu', 'ormqr', 'qr', 'schur', 'svd',
    'triangular_solve', 'tridiagonal', 'tridiagonal_solve'))


def _calls_lapack(jaxpr) -> bool:
  """Whether a (closed) jaxpr or any jaxpr nested in it has a LAPACK call.

  Why the owners call such a kernel one item at a time on CPU: XLA:CPU runs
  the programs of all ``D`` host devices on one intra-op thread pool of
  ``max(cores, D)`` threads, and a device waiting in a collective holds its
  thread until every device has arrived. jaxlib's CPU LAPACK kernels split
  a *batch* of matrices into tasks on that same pool and block their own
  thread until the tasks are done. Devices that reach the result exchange
  early plus owners blocked in a batched ``eigh`` / ``qr`` can hold every
  thread: the queued tasks never run and the rendezvous aborts after 40 s
  (``docs/multi_device.md``). A batch of one runs inline.
  """
  stack = [getattr(jaxpr, 'jaxpr', jaxpr)]
  while stack:
    jp = stack.pop()
    for eqn in jp.eqns:
      if eqn.primitive.name in _LAPACK_PRIMITIVES:
        return True
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          sub = getattr(sub, 'jaxpr', sub)
          if hasattr(sub, 'eqns'):
            stack.append(sub)
  return False


def _lapack_on_cpu_devices(call, key, stack) -> bool:
  """Whether a one-device group's kernel must run one item at a time: it
  calls LAPACK and this process has several CPU devices, over which the
  stack may be sharded (plain GSPMD; see :func:`_calls_lapack`). One CPU
  device: never (no collective can block the pool), nothing traced."""
  if jax.default_backend() != 'cpu' or jax.local_device_count() < 2:
    return False
  one = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype) for x in stack]
  return _calls_lapack(jax.make_jaxpr(lambda *xs: call(key, *xs))(*one))


def _one_item_at_a_time(call, key, args):
  """``call(key, *args)`` for a slice-wise kernel, one row at a time."""
  def one(row):
    y = call(key, *(a[None] for a in row))
    return jax.tree.map(lambda o: o[0], y)
  return jax.lax.map(one, args)


def _owner_computes(call, glist, stacks, sizes, plan, spec, out,
                    resident=None):
  """The multi-device half of :func:`grouped_map`.

  Per group, the items are put in owner order (device 0's items, padded
  with zero items to ``K_g``, then device 1's, ...) by a gather along the
  unsharded item axis.

  ``spec.layout == "sharded"`` (FSDP / TP parameters): each array is split
  over the devices along one per-slice axis (the largest one divisible by
  ``D``), which for an FSDP parameter is its own layout; one ``all_to_all``
  inside ``shard_map`` then gives every device its ``K_g`` whole items
  (``≈ |group| / D`` bytes received). ``"replicated"`` (data parallelism):
  the arrays enter replicated and each device slices its own rows, no
  collective. Either way the device's branch computes the first
  ``k_{g,d}`` items; the reverse ``all_to_all`` returns the results split
  along one axis (arrays with no divisible axis: gathered), or, for
  ``"replicated"``, every device packs its results of all groups into one
  flat buffer per dtype (padded to the largest device's total) and one
  ``all_gather`` per dtype gives every device every result.
  """
  num = spec.num_shards()
  gather_in = spec.layout == 'replicated'
  asg, kmax = plan.asg, plan.kmax
  res_in = resident or [()] * len(glist)
  axes = spec.axis_names()
  ax = axes if len(axes) > 1 else axes[0]
  vectors = sorted({tuple(int(c) for c in row) for row in asg.counts})
  branch_of = np.asarray([vectors.index(tuple(int(c) for c in row))
                          for row in asg.counts], np.int32)
  out_struct, one_at_a_time = _trace_kernels(call, glist, stacks, res_in,
                                             resident is not None, spec)
  flat_in, in_specs, in_axes = _owner_inputs(stacks, plan, spec, ax,
                                             gather_in)
  n_moving = len(flat_in)
  res_specs = []
  for rs in res_in:
    for r in rs:
      flat_in.append(r)
      res_specs.append(_pspec(r.ndim, 0, ax))
  out_axes = [jax.tree.map(lambda o: _split_axis(o.shape[1:], num), st)
              for st in out_struct]
  packing = _packing(out_struct, asg.counts) if gather_in else None
  groups = _Groups(glist, stacks, res_in, kmax, out_struct, one_at_a_time,
                   resident is not None, packing)
  branches = [_branch(call, groups, v) for v in vectors]

  def body(dev, *xs):
    d = dev[0]
    xs, res_local = xs[:n_moving], xs[n_moving:]
    local = []
    for x, axis in zip(xs, in_axes):
      if axis is None:  # replicated: take this device's K rows
        k = x.shape[0] // num
        local.append(jax.lax.dynamic_slice_in_dim(x, d * k, k, axis=0))
      else:
        local.append(jax.lax.all_to_all(x, ax, 0, axis, tiled=True))
    if len(branches) == 1:
      res, new_res = branches[0](*local, *res_local)
    else:
      res, new_res = jax.lax.switch(jnp.asarray(branch_of)[d], branches,
                                    *local, *res_local)
    if gather_in:  # one all-gather per dtype of every device's results
      return ([jax.lax.all_gather(b, ax, axis=0, tiled=True) for b in res],
              list(new_res))

    def back(y, a):
      if a is None:
        return y  # (K, ...) block of the (D*K, ...) output
      return jax.lax.all_to_all(y, ax, a + 1, 0, tiled=True)
    return ([jax.tree.map(back, r, oa) for r, oa in zip(res, out_axes)],
            list(new_res))

  if gather_in:
    out_specs = [P()] * len(packing[0])
  else:
    out_specs = [jax.tree.map(
        lambda o, a: _pspec(o.ndim, 0 if a is None else a + 1, ax), st, oa)
        for st, oa in zip(out_struct, out_axes)]
  mapped = jax.shard_map(body, mesh=spec.mesh,
                         in_specs=(P(ax),) + tuple(in_specs)
                         + tuple(res_specs),
                         out_specs=(out_specs, res_specs), check_vma=False)
  dev_ids = jax.lax.with_sharding_constraint(
      jnp.arange(num, dtype=jnp.int32), NamedSharding(spec.mesh, P(ax)))
  bufs, new_flat = mapped(dev_ids, *flat_in)
  if gather_in:
    bufs = _unpack(bufs, out_struct, asg.counts, kmax, *packing)
  new_groups, pos = [], 0
  for rs in res_in:
    new_groups.append(tuple(new_flat[pos:pos + len(rs)]))
    pos += len(rs)
  for g, ((_, idx), sz) in enumerate(zip(glist, sizes)):
    inv = (asg.device[g].astype(np.int64) * kmax[g] + asg.slot[g])
    res = jax.tree.map(lambda y, inv=inv: jnp.take(
        y, jnp.asarray(inv, np.int32), axis=0), bufs[g])
    for i, piece in zip(idx, _split(res, sz)):
      out[i] = piece
  return out if resident is None else (out, new_groups)


def _pspec(ndim: int, axis: int | None, ax) -> P:
  """A spec splitting ``axis`` (``None``: nothing) over the mesh axes."""
  parts = [None] * ndim
  if axis is not None:
    parts[axis] = ax
  return P(*parts)


def _trace_kernels(call, glist, stacks, res_in, resident: bool, spec):
  """Per group: the kernel's output structure for one item, and whether it
  must run one item at a time (a LAPACK call on CPU devices)."""
  out_struct, one_at_a_time = [], []
  on_cpu = all(d.platform == 'cpu' for d in spec.mesh.devices.flat)
  for (gkey, _), stack, rs in zip(glist, stacks, res_in):
    one = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
           for x in stack + tuple(rs)]
    jaxpr, st = jax.make_jaxpr(lambda *xs, k=gkey[1]: call(k, *xs),
                               return_shape=True)(*one)
    out_struct.append(st[0] if resident else st)
    one_at_a_time.append(on_cpu and _calls_lapack(jaxpr))
  return out_struct, one_at_a_time


def _owner_inputs(stacks, plan, spec, ax, gather_in: bool):
  """The moving arrays in owner order (row ``d·K + k`` is item ``(d, k)``;
  pads read a zero row), each split along one per-slice axis (``"sharded"``
  layout) or replicated; with their specs and split axes."""
  num = spec.num_shards()
  flat_in, in_specs, in_axes = [], [], []
  for g, stack in enumerate(stacks):
    for x in stack:
      x = _owner_order(x, plan.perms[g])
      a = None if gather_in else _split_axis(x.shape[1:], num)
      axis = None if a is None else a + 1
      sh = _pspec(x.ndim, axis, ax)
      flat_in.append(jax.lax.with_sharding_constraint(
          x, NamedSharding(spec.mesh, sh)))
      in_specs.append(sh)
      in_axes.append(axis)
  return flat_in, in_specs, in_axes


class _Groups(NamedTuple):
  """What one device's branch needs to know of every shape group."""
  glist: list
  stacks: list
  res_in: list
  kmax: list
  out_struct: list
  one_at_a_time: list
  resident: bool
  packing: tuple | None  # (dtypes, lengths, offsets) with gathered results


def _branch(call, groups: _Groups, vec):
  """Device branch for per-group item counts ``vec``: runs the kernel on
  its first ``vec[g]`` items of each group, pads to ``K_g`` slots (the pad
  slots keep their old resident state), packs the results when every
  device gathers them."""
  def branch(*ls):
    n_local = sum(len(st) for st in groups.stacks)
    ls, rl = ls[:n_local], ls[n_local:]
    res, new_res, pos, rpos = [], [], 0, 0
    for g, (gkey, _) in enumerate(groups.glist):
      k_in, k_res = len(groups.stacks[g]), len(groups.res_in[g])
      grp, rgrp = ls[pos:pos + k_in], rl[rpos:rpos + k_res]
      pos, rpos = pos + k_in, rpos + k_res
      c, kg = vec[g], groups.kmax[g]
      if c == 0:
        res.append(jax.tree.map(
            lambda o, kg=kg: jnp.zeros((kg,) + o.shape[1:], o.dtype),
            groups.out_struct[g]))
        new_res.extend(rgrp)
        continue
      args = tuple(x[:c] for x in grp) + tuple(r[:c] for r in rgrp)
      y = (_one_item_at_a_time(call, gkey[1], args)
           if groups.one_at_a_time[g] and c > 1 else call(gkey[1], *args))
      if groups.resident:
        y, ry = y
        new_res.extend(
            (n.astype(r.dtype) if kg == c else
             jnp.concatenate([n.astype(r.dtype), r[c:]]))
            for n, r in zip(ry, rgrp))
      if kg > c:
        y = jax.tree.map(lambda o, pad=kg - c: jnp.concatenate(
            [o, jnp.zeros((pad,) + o.shape[1:], o.dtype)]), y)
      res.append(y)
    if groups.packing is not None:  # this device's results, packed
      dts, length, _ = groups.packing
      return _pack(res, vec, dts, length), new_res
    return res, new_res
  return branch
