"""The Fisher whitening on owner devices (``distribute=``).

Owner-computes with the factors travelling, with them resident on their
owners, and fused with an :class:`~optax_lite.transforms.OwnerInner` (the
whole per-matrix step in one grouped call); see
:mod:`optax_lite.transforms.fisher_whiten`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.transforms import _tree
from optax_lite.transforms import owner_inner as owner_inner_lib
from optax_lite.transforms.fisher_factors import (
    FisherWhitenState, _Config, _Factors, _Pair, _compute_dtype, _is_identity,
    _sandwich, _step_factors)


# ----------------------------------------------------------------------------
# Owner-computes (``distribute=``): the same per-leaf steps, on stacks of
# same-shape matrices, each computed whole on one device.


def _root_weight(cfg: _Config) -> float:
  """Flops of one inverse root of a ``d × d`` factor, in units of ``d³``."""
  if cfg.root_method == 'eigh':
    return 10.0
  iters = cfg.root_iters if isinstance(cfg.root_iters, int) else 30
  if cfg.root_method == 'newton_warm':
    iters = cfg.warm_iters if isinstance(cfg.warm_iters, int) else 3
  return 6.0 * iters


def _whiten_cost(cfg: _Config):
  """Cost of one item whose first array is the ``r × c`` matrix ``X`` (or
  ``U``): ``≈ 3·r·c·(r + c)`` matmul flops plus three roots, ``d³`` each.

  Read from ``X``'s shape only, so that the whitening and the map back
  assign every matrix to the same owner (the roots stay there in between).
  """
  weight = 1.5 * _root_weight(cfg)

  def cost(shapes):
    r, c = shapes[0][-2:]
    return float(6 * r * c * (r + c) + weight * (r ** 3 + c ** 3))
  return cost


def _leaf_sides(view, p, q):
  """``(has P, has Q)`` of one leaf (``None`` view: neither)."""
  if view is None:
    return False, False
  return not _is_identity(p), not _is_identity(q)


def _whiten_kernel(refresh, cfg: _Config, resident: bool):
  """Batched whitening of stacked items for :func:`grouped_map`.

  Inputs ``(X, [P], [Q], [P cache], [Q cache])`` as stored (``X`` in the
  gradient's dtype, factors in ``factor_dtype``, leading batch axis), then,
  with ``resident``, the owner-resident root buffers ``[P^{-1/2}],
  [Q^{-1/2}]`` (overwritten). Returns ``{"w": G̃, "p": P_t, "q": Q_t,
  "p_root": P^{-1/2}, "q_root": Q^{-1/2}}`` (only the stored sides; the
  roots used this step, which are also the ones to cache); with
  ``resident``, the pair ``(that dict, the roots)``, and the dict has the
  roots only when the state caches them.
  """
  ct = _compute_dtype(cfg)

  def fn(x_in, *arrays, key):
    has_p, has_q, cache = key
    it = iter(arrays)
    take = lambda flag: next(it).astype(ct) if flag else None
    x = x_in.astype(ct)
    prev = _Pair(take(has_p), take(has_q))
    cached = _Pair(take(has_p), take(has_q)) if cache else None
    f = _step_factors(x, prev, cached, refresh, cfg)
    out = {'w': _sandwich(x, f.isqrt, cfg).astype(x_in.dtype)}
    roots = []
    for name, flag, new, root in (('p', has_p, f.new.p, f.isqrt.p),
                                  ('q', has_q, f.new.q, f.isqrt.q)):
      if flag:
        out[name] = new.astype(cfg.factor_dtype)
        roots.append(root.astype(cfg.factor_dtype))
        if cache or not resident:
          out[name + '_root'] = roots[-1]
    return (out, tuple(roots)) if resident else out
  return fn


def _unwhiten_kernel(cfg: _Config, resident: bool):
  """Batched map back ``Q^{-1/2} U P^{-1/2}`` of stacked ``(U, [P^{-1/2}],
  [Q^{-1/2}])`` items for :func:`grouped_map` (with ``resident`` the roots
  are the owner-resident buffers, returned unchanged)."""
  ct = _compute_dtype(cfg)

  def fn(u_in, *roots, key):
    has_p, has_q = key[:2]
    it = iter(roots)
    isqrt = _Pair(next(it).astype(ct) if has_p else None,
                  next(it).astype(ct) if has_q else None)
    out = _sandwich(u_in.astype(ct), isqrt, cfg).astype(u_in.dtype)
    return (out, roots) if resident else out
  return fn


def _update_distributed(updates, state: FisherWhitenState, *, inner,
                        cfg: _Config, dims, root_every, spec):
  """:func:`_update` with owner-computes: two :func:`grouped_map` calls
  (whitening: factor update, roots, ``G̃``; map back: ``Q^{-1/2} U
  P^{-1/2}``), the inner transform on the whole tree in between. On several
  devices the roots stay on their owner between the two calls
  (:func:`optax_lite.linalg.grouped.owner_stacks`; both calls assign the
  same owners). The state has the same structure, shapes and dtypes as
  :func:`_update`'s."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  p_l, q_l, pc_l, qc_l = (treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt))
  sides = [_leaf_sides(v, p, q) for v, p, q in zip(views, p_l, q_l)]
  todo = [i for i, s in enumerate(sides) if any(s)]
  cache = any(not (_is_identity(pc_l[i]) and _is_identity(qc_l[i]))
              for i in todo)
  resident = spec.num_shards() > 1
  cost = _whiten_cost(cfg)

  def matrices(i, *leaves):
    """Stored ``(batch_shape, d, d)`` factors -> ``(b, d, d)``."""
    b = views[i].matrix_shape[0]
    return tuple(x.reshape((b,) + x.shape[-2:]) for x in leaves)

  def on_sides(i, p, q):
    return [f for f, flag in zip((p, q), sides[i]) if flag]

  items, keys = [], []
  for i in todo:
    stored = on_sides(i, p_l[i], q_l[i])
    if cache:
      stored += on_sides(i, pc_l[i], qc_l[i])
    items.append((views[i].to_matrix(g_leaves[i]),) + matrices(i, *stored))
    keys.append(sides[i] + (cache,))
  kernel = _whiten_kernel(refresh, cfg, resident)
  if resident:  # root buffers on the owners, written by the whitening
    buffers = [tuple(jnp.zeros_like(f) for f in it[1:1 + sum(sides[i])])
               for i, it in zip(todo, items)]
    roots = grouped_lib.owner_stacks(items, buffers, spec=spec, cost=cost,
                                     keys=keys)
    outs, roots = grouped_lib.grouped_map(kernel, items, spec=spec,
                                          keys=keys, cost=cost,
                                          resident=roots)
  else:
    outs = grouped_lib.grouped_map(kernel, items, spec=spec, keys=keys,
                                   cost=cost)

  ct = _compute_dtype(cfg)
  white = list(g_leaves)
  for i, v in enumerate(views):  # no stored side: as _whiten_leaf casts
    if v is not None and i not in todo:
      white[i] = g_leaves[i].astype(ct).astype(g_leaves[i].dtype)
  new_p, new_q, new_pc, new_qc = list(p_l), list(q_l), list(pc_l), list(qc_l)
  root_p, root_q = list(p_l), list(q_l)  # the roots used (to map back)
  leaf = lambda m, like: m.reshape(like.shape)
  for i, out in zip(todo, outs):
    white[i] = views[i].from_matrix(out['w'])
    if 'p' in out:
      new_p[i] = leaf(out['p'], p_l[i])
    if 'q' in out:
      new_q[i] = leaf(out['q'], q_l[i])
    if 'p_root' in out:
      root_p[i] = leaf(out['p_root'], p_l[i])
      if cache:
        new_pc[i] = root_p[i]
    if 'q_root' in out:
      root_q[i] = leaf(out['q_root'], q_l[i])
      if cache:
        new_qc[i] = root_q[i]
  inner_updates, inner_state = inner.update(
      treedef.unflatten(white), state.inner_state, None)

  u_leaves = treedef.flatten_up_to(inner_updates)
  kernel = _unwhiten_kernel(cfg, resident)
  if resident:
    # The same groups as the whitening (same shapes, sides and gradient
    # dtype; ``U`` in the group's common dtype, cast back after), so the
    # same owners, which hold the roots.
    keys2 = [k + (jnp.dtype(g_leaves[i].dtype).name, views[i].rows,
                  views[i].cols) for i, k in zip(todo, keys)]
    common = {}
    for i, k in zip(todo, keys2):
      common[k] = jnp.promote_types(common.get(k, u_leaves[i].dtype),
                                    u_leaves[i].dtype)
    items = [(views[i].to_matrix(u_leaves[i]).astype(common[k]),)
             for i, k in zip(todo, keys2)]
    backs, _ = grouped_lib.grouped_map(kernel, items, spec=spec, keys=keys2,
                                       cost=cost, resident=roots)
  else:
    items = [(views[i].to_matrix(u_leaves[i]),) + matrices(
        i, *on_sides(i, root_p[i], root_q[i])) for i in todo]
    backs = grouped_lib.grouped_map(kernel, items, spec=spec,
                                    keys=[sides[i] for i in todo])
  new_u = list(u_leaves)
  for i, v in enumerate(views):
    if v is not None and i not in todo:
      new_u[i] = u_leaves[i].astype(ct).astype(u_leaves[i].dtype)
  for i, back in zip(todo, backs):
    new_u[i] = views[i].from_matrix(back).astype(u_leaves[i].dtype)
  unflat = treedef.unflatten
  return unflat(new_u), FisherWhitenState(
      count=optax.safe_increment(state.count), p=unflat(new_p),
      q=unflat(new_q), inner_state=inner_state, p_isqrt=unflat(new_pc),
      q_isqrt=unflat(new_qc), owned=state.owned)


def _static_sides(view, max_factor_size):
  """``(has P, has Q)`` of one leaf from its shape, as :func:`_init_leaf`
  decides (the owner-resident state keeps placeholders per leaf)."""
  if view is None:
    return False, False
  fits = lambda d: max_factor_size is None or d <= max_factor_size
  return fits(view.cols), fits(view.rows)


def _owned_items(leaves, views, sides, cfg: _Config):
  """The moving items of the owner-resident update: per matrix leaf with a
  stored side, its ``(B, rows, cols)`` matrix in the compute dtype (the
  same shapes and dtypes for the gradient ``X`` and the inner update
  ``U``, so both calls form the groups and owners :func:`_owner_init`
  fixed)."""
  ct = _compute_dtype(cfg)
  return [(views[i].to_matrix(x).astype(ct),)
          for i, x in enumerate(leaves) if any(sides[i])]


def _owner_init(state: FisherWhitenState, params, *, cfg: _Config, dims,
                max_factor_size, cache: bool, spec) -> FisherWhitenState:
  """Moves the matrix leaves' factors (and cached roots) to their owners;
  their per-leaf entries become one-element placeholders."""
  leaves, treedef, views = _tree.matrix_views(params, dims, 'params')
  if not leaves:
    # No leaves: optax.tree_utils.tree_map_params's placeholder params. A
    # leaf here (not a subtree) lets its non-params rule take OwnerStacks.
    return state._replace(owned=jnp.zeros((), jnp.int32))
  sides = [_static_sides(v, max_factor_size) for v in views]
  todo = [i for i, s in enumerate(sides) if any(s)]
  paths = resident_lib.leaf_paths(params)
  fields = [treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt)]
  structs = [tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in item)
             for item in _owned_items(leaves, views, sides, cfg)]
  per_leaf = [_stored_factors(fields, sides[i], cache, i,
                              views[i].matrix_shape[0]) for i in todo]
  owned = grouped_lib.owner_stacks(
      structs, per_leaf, spec=spec, cost=_whiten_cost(cfg),
      keys=[sides[i] + (cache,) for i in todo],
      homes=[_stored_homes(fields, sides[i], cache, i, paths[i])
             for i in todo])
  p, q, pc, qc = _placeholders(fields, todo, treedef, cfg)
  return state._replace(p=p, q=q, p_isqrt=pc, q_isqrt=qc, owned=owned)


def _stored_factors(fields, sides, cache: bool, i: int, batch: int):
  """Leaf ``i``'s stored factors (then cached roots) as ``(B, d, d)``."""
  stored = [f[i] for f, flag in zip(fields[:2], sides) if flag]
  if cache:
    stored += [f[i] for f, flag in zip(fields[2:], sides) if flag]
  return tuple(x.reshape((batch,) + x.shape[-2:]) for x in stored)


def _stored_homes(fields, sides, cache: bool, i: int, key) -> tuple:
  """Where :func:`_stored_factors`' arrays live in the one-device state
  (``key``: leaf ``i``'s key path)."""
  names = ('p', 'q', 'p_isqrt', 'q_isqrt')
  flags = tuple(sides) + (tuple(sides) if cache else (False, False))
  return tuple(resident_lib.Home((name,), key, tuple(f[i].shape))
               for name, f, flag in zip(names, fields, flags) if flag)


def _inner_homes(fused, view, leaf_shape, arrays, key) -> tuple:
  """Where an :class:`OwnerInner`'s per-matrix arrays of leaf ``i`` live in
  the one-device state (its plain transform's, under ``inner_state``)."""
  homes = []
  for j, x in enumerate(arrays):
    path, matrix_form = fused.locate(j)
    homes.append(resident_lib.Home(
        ('inner_state',) + tuple(path), key,
        tuple(leaf_shape) if matrix_form else tuple(x.shape),
        view if matrix_form else None))
  return tuple(homes)


def _placeholders(fields, todo, treedef, cfg: _Config):
  """The per-leaf ``p, q, p_isqrt, q_isqrt`` trees with the owned leaves
  replaced by one-element placeholders."""
  empty = _tree.identity_placeholder(cfg.factor_dtype)
  for f in fields:
    for i in todo:
      f[i] = empty
  return tuple(treedef.unflatten(f) for f in fields)


def _read_factors(res, key, ct):
  """An owner kernel's resident arrays: the stored factors, the cached roots
  (if ``key`` says so) in ``ct``, and an iterator over the rest."""
  has_p, has_q, cached_roots = key
  it = iter(res)
  take = lambda flag: next(it).astype(ct) if flag else None
  prev = _Pair(take(has_p), take(has_q))
  cached = _Pair(take(has_p), take(has_q)) if cached_roots else None
  return prev, cached, it


def _update_owned(updates, state: FisherWhitenState, *, inner, cfg: _Config,
                  dims, root_every, max_factor_size, spec):
  """:func:`_update` with the factors (and cached roots) resident on their
  owners (``state.owned``): only ``X`` travels to the owner and ``G̃``
  back, then ``U`` and ``Δ``; the owners keep this step's roots between
  the two grouped calls."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  sides = [_static_sides(v, max_factor_size) for v in views]
  todo = [i for i, s in enumerate(sides) if any(s)]
  items = _owned_items(g_leaves, views, sides, cfg)
  # Whether the roots are cached, read from the resident layout (per group:
  # the stored sides' factors, then as many cached roots).
  n_sides = sum(sum(k[1]) for k in grouped_lib.group_items(
      items, [sides[i] for i in todo]))
  n_res = len(jax.tree.leaves(state.owned))
  if n_res not in (n_sides, 2 * n_sides):
    raise ValueError(f'state: its owner-resident factors ({n_res} arrays) '
                     f'do not match these updates ({n_sides} stored sides); '
                     'create the state with this transform\'s init.')
  cache = n_sides > 0 and n_res == 2 * n_sides
  keys = [sides[i] + (cache,) for i in todo]
  cost = _whiten_cost(cfg)
  resident = state.owned
  if not cache:  # this step's roots: buffers on the owners
    buffers = grouped_lib.owner_stacks(items, [
        tuple(jnp.zeros((it[0].shape[0], d, d), cfg.factor_dtype)
              for d, flag in zip((views[i].cols, views[i].rows), sides[i])
              if flag) for i, it in zip(todo, items)],
        spec=spec, cost=cost, keys=keys)
    resident = resident.replace_groups(
        tuple(a + b for a, b in zip(resident.groups, buffers.groups)))
  ct = _compute_dtype(cfg)

  def whiten(x, *res, key):
    has_p, has_q, _ = key
    prev, cached, _ = _read_factors(res, key, ct)
    f = _step_factors(x, prev, cached, refresh, cfg)
    new = [m.astype(cfg.factor_dtype) for m, flag in zip(
        (f.new.p, f.new.q, f.isqrt.p, f.isqrt.q), (has_p, has_q) * 2)
           if flag]
    return (_sandwich(x, f.isqrt, cfg),), tuple(new)

  def unwhiten(u, *res, key):
    has_p, has_q = key[:2]
    it = iter(res[len(res) - has_p - has_q:])  # the roots used this step
    isqrt = _Pair(next(it).astype(ct) if has_p else None,
                  next(it).astype(ct) if has_q else None)
    return (_sandwich(u, isqrt, cfg),), res

  outs, resident = grouped_lib.grouped_map(whiten, items, spec=spec,
                                           keys=keys, cost=cost,
                                           resident=resident)
  white = list(g_leaves)
  for i, v in enumerate(views):  # no stored side: as _whiten_leaf casts
    if v is not None and i not in todo:
      white[i] = g_leaves[i].astype(ct).astype(g_leaves[i].dtype)
  for i, (w,) in zip(todo, outs):
    white[i] = views[i].from_matrix(w).astype(g_leaves[i].dtype)
  inner_updates, inner_state = inner.update(
      treedef.unflatten(white), state.inner_state, None)

  u_leaves = treedef.flatten_up_to(inner_updates)
  backs, resident = grouped_lib.grouped_map(
      unwhiten, _owned_items(u_leaves, views, sides, cfg), spec=spec,
      keys=keys, cost=cost, resident=resident)
  if not cache:  # drop the root buffers
    resident = resident.replace_groups(
        tuple(g[:len(g) // 2] for g in resident.groups))
  new_u = list(u_leaves)
  for i, v in enumerate(views):
    if v is not None and i not in todo:
      new_u[i] = u_leaves[i].astype(ct).astype(u_leaves[i].dtype)
  for i, (back,) in zip(todo, backs):
    new_u[i] = views[i].from_matrix(back).astype(u_leaves[i].dtype)
  return treedef.unflatten(new_u), state._replace(
      count=optax.safe_increment(state.count), inner_state=inner_state,
      owned=resident)


# ----------------------------------------------------------------------------
# Fused owner-computes: with an ``OwnerInner`` over several devices, the
# whitening, the inner step and the map back run in one grouped call; the
# factors, cached roots and the inner per-matrix state (FISMO: the momentum)
# all live on the owner, so per matrix only ``X`` travels in and ``Δ`` out.


def _fused_cost(cfg: _Config, fused: owner_inner_lib.OwnerInner):
  """:func:`_whiten_cost` plus the inner step's flops (``X``'s shape)."""
  whiten = _whiten_cost(cfg)
  inner = fused.cost or (lambda r, c: 0.0)

  def cost(shapes):
    r, c = shapes[0][-2:]
    return whiten(shapes) + float(inner(r, c))
  return cost


def _masked(treedef, leaves, todo):
  """The tree with the leaves in ``todo`` replaced by ``optax.MaskedNode``
  (what the plain inner transform sees next to the fused matrices)."""
  skip = set(todo)
  return treedef.unflatten([optax.MaskedNode() if i in skip else x
                            for i, x in enumerate(leaves)])


def _fused_init(state: FisherWhitenState, params, *, fused, cfg: _Config,
                dims, max_factor_size, cache: bool, spec
                ) -> FisherWhitenState:
  """Every matrix leaf's factors, cached roots and inner state
  (``fused.init``) on its owner; the plain inner transform's state covers
  the other leaves (the matrix leaves are ``optax.MaskedNode`` in it)."""
  leaves, treedef, views = _tree.matrix_views(params, dims, 'params')
  if not leaves:
    # No leaves: optax.tree_utils.tree_map_params's placeholder params. A
    # leaf here (not a subtree) lets its non-params rule take OwnerStacks.
    return state._replace(inner_state=fused.transform.init(params),
                          owned=jnp.zeros((), jnp.int32))
  sides = [_static_sides(v, max_factor_size) for v in views]
  todo = [i for i, v in enumerate(views) if v is not None]
  ct = _compute_dtype(cfg)
  paths = resident_lib.leaf_paths(params)
  fields = [treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt)]
  structs, per_leaf, homes = [], [], []
  for i in todo:
    x = views[i].to_matrix(leaves[i])
    structs.append((jax.ShapeDtypeStruct(x.shape, ct),))
    inner = tuple(fused.init(x))
    per_leaf.append(_stored_factors(fields, sides[i], cache, i, x.shape[0])
                    + inner)
    homes.append(_stored_homes(fields, sides[i], cache, i, paths[i])
                 + (_inner_homes(fused, views[i], leaves[i].shape, inner,
                                 paths[i])
                    if fused.locate is not None else ()))
  owned = grouped_lib.owner_stacks(
      structs, per_leaf, spec=spec, cost=_fused_cost(cfg, fused),
      keys=[sides[i] + (cache,) for i in todo],
      homes=homes if fused.locate is not None else None)
  p, q, pc, qc = _placeholders(fields, todo, treedef, cfg)
  inner_state = fused.transform.init(_masked(treedef, leaves, todo))
  return state._replace(p=p, q=q, p_isqrt=pc, q_isqrt=qc,
                        inner_state=inner_state, owned=owned)


def _fused_kernel(step, refresh, cfg: _Config):
  """Whitening, the inner ``step`` and the map back of stacked ``X`` (compute
  dtype) next to the resident ``([P], [Q], [P cache], [Q cache], *inner
  state)``; returns ``((Δ,), new resident arrays)``.

  The same arithmetic as the one-device path (:func:`_whiten_leaf`, the
  inner transform, :func:`_unwhiten_leaf`); the roots that map back are
  rounded to ``factor_dtype`` as that path stores them.
  """
  ct = _compute_dtype(cfg)
  fd = cfg.factor_dtype

  def fn(x, *res, key):
    has_p, has_q, cached_roots = key
    prev, cached, it = _read_factors(res, key, ct)
    inner_state = tuple(it)
    if has_p or has_q:
      f = _step_factors(x, prev, cached, refresh, cfg)
    else:  # both sides identity: only the inner step
      f = _Factors(prev, prev)
    y, new_inner = step(_sandwich(x, f.isqrt, cfg), *inner_state)
    stored = lambda m: None if m is None else m.astype(fd).astype(ct)
    delta = _sandwich(y.astype(ct), _Pair(stored(f.isqrt.p),
                                          stored(f.isqrt.q)), cfg)
    new = [m.astype(fd) for m, flag in zip((f.new.p, f.new.q),
                                           (has_p, has_q)) if flag]
    if cached_roots:
      new += [m.astype(fd) for m, flag in zip((f.isqrt.p, f.isqrt.q),
                                              (has_p, has_q)) if flag]
    return (delta,), tuple(new) + tuple(new_inner)
  return fn


def _resident_sides(factors, rows: int, cols: int):
  """``(has P, has Q, cached roots)`` of one group of the fused layout, read
  from its resident factor arrays (``[P], [Q], [P cache], [Q cache]``, each
  ``(N, d, d)``; ``P`` is ``cols × cols``) as :func:`_fused_init` stored
  them, so the update needs no (possibly traced) ``max_factor_size``.
  ``None`` when the layout does not fit; ``cached roots`` is ``None`` for a
  group without stored sides."""
  d = [a.shape[-1] for a in factors]
  if not d:
    return False, False, None
  if d == [cols, rows, cols, rows]:
    return True, True, True
  if len(d) == 2 and d == [cols, rows] and (rows == cols or d[0] != d[1]):
    return True, True, False
  if (len(d) in (1, 2) and rows != cols and len(set(d)) == 1
      and d[0] in (rows, cols)):
    return d[0] == cols, d[0] == rows, len(d) == 2
  return None


def _update_fused(updates, state: FisherWhitenState, *, fused, cfg: _Config,
                  dims, root_every, spec):
  """One grouped call per step: ``X`` goes to its owner, which updates the
  factors, whitens, runs ``fused.step`` with the resident inner state and
  maps back; ``Δ`` comes back. Leaves without a matrix view get the plain
  inner transform (with the matrix leaves masked)."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  todo = [i for i, v in enumerate(views) if v is not None]
  ct = _compute_dtype(cfg)
  items = [(views[i].to_matrix(g_leaves[i]).astype(ct),) for i in todo]
  # The stored sides and whether the roots are cached, per group, read from
  # the resident layout. The groups are those of init: its keys (the sides,
  # fixed by the shape, and the uniform cache flag) split no shape group.
  groups = list(grouped_lib.group_items(items).items())
  resident = state.owned
  if len(resident.groups) != len(groups):
    raise ValueError(f'state: its owner-resident arrays form '
                     f'{len(resident.groups)} groups, these updates '
                     f'{len(groups)}; create the state with this '
                     'transform\'s init.')
  layouts, cache = [], set()
  for (gkey, _), arrays in zip(groups, resident.groups):
    shape = gkey[0][0][0]
    n_inner = len(jax.eval_shape(fused.init, jax.ShapeDtypeStruct(
        (1,) + shape, ct)))
    layout = (_resident_sides(arrays[:len(arrays) - n_inner], *shape[-2:])
              if len(arrays) >= n_inner else None)
    if layout is None:
      raise ValueError(f'state: owner-resident arrays of shapes '
                       f'{[a.shape for a in arrays]} do not fit {shape} '
                       f'matrices with {n_inner} inner state arrays; create '
                       'the state with this transform\'s init.')
    layouts.append(layout)
    if layout[2] is not None:
      cache.add(layout[2])
  if len(cache) > 1:
    raise ValueError('state: some groups cache their roots, others do not; '
                     'create the state with this transform\'s init.')
  cache = bool(cache and cache.pop())
  keys = [None] * len(items)
  for (_, idx), (has_p, has_q, _) in zip(groups, layouts):
    for j in idx:
      keys[j] = (has_p, has_q, cache)
  outs, resident = grouped_lib.grouped_map(
      _fused_kernel(fused.step_for(state.inner_state), refresh, cfg), items,
      spec=spec, keys=keys,
      cost=_fused_cost(cfg, fused), resident=resident)
  # The other leaves (no matrix view): the plain inner transform, unwhitened.
  inner_updates, inner_state = fused.transform.update(
      _masked(treedef, g_leaves, todo), state.inner_state, None)
  new_u = treedef.flatten_up_to(inner_updates)
  for i, (delta,) in zip(todo, outs):
    new_u[i] = views[i].from_matrix(delta).astype(g_leaves[i].dtype)
  return treedef.unflatten(new_u), state._replace(
      count=optax.safe_increment(state.count), inner_state=inner_state,
      owned=resident)
