"""The Fisher whitening on the matrix engine (:mod:`optax_lite.linalg.engine`).

One per-matrix whitening kernel (factor updates, roots, ``G̃``), one map
back, and, with an :class:`~optax_lite.transforms.OwnerInner`, one fused
kernel (the whole per-matrix step); the engine places them: leaf by leaf
on one device, stacked, or on owner devices with the factors travelling or
resident there. See :mod:`optax_lite.transforms.fisher_whiten`.
"""

from __future__ import annotations

import jax
import optax

from optax_lite.linalg import engine
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.transforms import _tree
from optax_lite.transforms import owner_inner as owner_inner_lib
from optax_lite.transforms.fisher_factors import (
    FisherWhitenState, _Config, _Factors, _Pair, _compute_dtype, _is_identity,
    _sandwich, _step_factors)

# The per-leaf fields of FisherWhitenState that a matrix steps: its factors,
# then its cached roots (each ``batch_shape + (d, d)``; a side is present
# where its factor is stored, see ``_fields``).
_NAMES = ('p', 'q', 'p_isqrt', 'q_isqrt')


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


def _fused_cost(cfg: _Config, fused: owner_inner_lib.OwnerInner):
  """:func:`_whiten_cost` plus the inner step's flops (``X``'s shape)."""
  whiten = _whiten_cost(cfg)
  inner = fused.cost or (lambda r, c: 0.0)

  def cost(shapes):
    r, c = shapes[0][-2:]
    return whiten(shapes) + float(inner(r, c))
  return cost


def _fields(sides, cache: bool) -> tuple[int, ...]:
  """The stored fields of a leaf with ``sides = (has P, has Q)``."""
  flags = tuple(sides) + (tuple(sides) if cache else (False, False))
  return tuple(j for j, flag in enumerate(flags) if flag)


def _leaf_sides(view, p, q):
  """``(has P, has Q)`` of one leaf, from its state (``None`` view:
  neither)."""
  if view is None:
    return False, False
  return not _is_identity(p), not _is_identity(q)


def _static_sides(view, max_factor_size):
  """``(has P, has Q)`` of one leaf from its shape, as :func:`_init_leaf`
  decides (the owner-resident state keeps placeholders per leaf)."""
  if view is None:
    return False, False
  fits = lambda d: max_factor_size is None or d <= max_factor_size
  return fits(view.cols), fits(view.rows)


def _method(cfg: _Config, n_inner: int = 0, fused=None
            ) -> engine.MatrixMethod:
  """The engine's view of a leaf's factors and cached roots (stored with
  the leaf's batch shape in front), then, fused, an ``OwnerInner``'s
  per-matrix state (its ``init`` arrays, in matrix form where ``locate``
  says so)."""
  inner = range(len(_NAMES), len(_NAMES) + n_inner)
  located = fused is not None and fused.locate is not None
  if fused is None:
    names = _NAMES
  elif located:  # where the inner arrays live in the plain inner state
    names = _NAMES + tuple(('inner_state',) + tuple(fused.locate(j)[0])
                           for j in range(n_inner))
  else:  # unknown: the stacks record no homes
    names = None
  placeholder = jax.ShapeDtypeStruct((1,), cfg.factor_dtype)

  def item_bytes(view, arrays):
    return 0.0 if view is None else _tree.view_bytes(view, *arrays)

  def after_bytes(view, arrays):  # (U, *roots): absent roots as stored
    pads = (placeholder,) * (1 + len(_NAMES) // 2 - len(arrays))
    return item_bytes(view, tuple(arrays) + pads)

  return engine.MatrixMethod(
      names=names,
      active=tuple(range(len(_NAMES))) + tuple(inner),
      leaf_shaped=tuple(j for j in inner if located
                        and fused.locate(j - len(_NAMES))[1]),
      batch_shaped=tuple(range(len(_NAMES))),
      cost=(_whiten_cost(cfg) if fused is None
            else _fused_cost(cfg, fused)),
      item_bytes=item_bytes, compute_dtype=_compute_dtype(cfg), keyed=True,
      after_bytes=after_bytes)


def _read_factors(res, key, ct):
  """A kernel's stored arrays: the factors, the cached roots (if ``key``
  says so) in ``ct``, and an iterator over the rest."""
  has_p, has_q, cached_roots = key
  it = iter(res)
  take = lambda flag: next(it).astype(ct) if flag else None
  prev = _Pair(take(has_p), take(has_q))
  cached = _Pair(take(has_p), take(has_q)) if cached_roots else None
  return prev, cached, it


def _whiten_kernel(refresh, cfg: _Config):
  """Steps 4–6 of Algorithm 1 on a stack: ``(X, [P], [Q], [P cache],
  [Q cache]) -> (G̃, *new stored, *the roots used)`` (``key``: the stored
  sides and whether the roots are cached; ``X`` in the gradient's dtype,
  ``G̃`` too, the rest in ``factor_dtype``)."""
  ct, fd = _compute_dtype(cfg), cfg.factor_dtype

  def fn(x_in, *arrays, key):
    has_p, has_q, cache = key
    prev, cached, _ = _read_factors(arrays, key, ct)
    x = x_in.astype(ct)  # = paper Gᵀ
    f = _step_factors(x, prev, cached, refresh, cfg)
    new = [m.astype(fd) for m, flag in zip((f.new.p, f.new.q),
                                           (has_p, has_q)) if flag]
    roots = [m.astype(fd) for m, flag in zip((f.isqrt.p, f.isqrt.q),
                                             (has_p, has_q)) if flag]
    w = _sandwich(x, f.isqrt, cfg).astype(x_in.dtype)
    return (w, *new, *(roots if cache else ()), *roots)
  return fn


def _unwhiten_kernel(cfg: _Config):
  """Step 8's map back ``Q^{-1/2} U P^{-1/2}`` of a stack ``U`` with the
  roots the whitening used."""
  ct = _compute_dtype(cfg)

  def fn(u_in, *roots, key):
    has_p, has_q = key[:2]
    it = iter(roots)
    isqrt = _Pair(next(it).astype(ct) if has_p else None,
                  next(it).astype(ct) if has_q else None)
    return _sandwich(u_in.astype(ct), isqrt, cfg).astype(u_in.dtype)
  return fn


def _fused_kernel(step, refresh, cfg: _Config):
  """Whitening, the inner ``step`` and the map back of stacked ``X`` next to
  its ``([P], [Q], [P cache], [Q cache], *inner state)``; returns ``(Δ,
  *new arrays)``.

  The same arithmetic as the unfused path (:func:`_whiten_kernel`, the
  inner transform, :func:`_unwhiten_kernel`); the roots that map back are
  rounded to ``factor_dtype`` as that path stores them, ``G̃`` and ``Δ`` to
  ``X``'s dtype (the owners get ``X`` in the compute dtype).
  """
  ct = _compute_dtype(cfg)
  fd = cfg.factor_dtype

  def fn(x_in, *res, key):
    has_p, has_q, cached_roots = key
    prev, cached, it = _read_factors(res, key, ct)
    inner_state = tuple(it)
    x = x_in.astype(ct)
    if has_p or has_q:
      f = _step_factors(x, prev, cached, refresh, cfg)
    else:  # both sides identity: only the inner step
      f = _Factors(prev, prev)
    # G̃ and Δ in X's dtype, as the one-device path rounds them (no-ops
    # for X in the compute dtype, as it comes to the owners).
    y, new_inner = step(_sandwich(x, f.isqrt, cfg).astype(x_in.dtype),
                        *inner_state)
    stored = lambda m: None if m is None else m.astype(fd).astype(ct)
    delta = _sandwich(y.astype(ct), _Pair(stored(f.isqrt.p),
                                          stored(f.isqrt.q)), cfg
                      ).astype(y.dtype)
    new = [m.astype(fd) for m, flag in zip((f.new.p, f.new.q),
                                           (has_p, has_q)) if flag]
    if cached_roots:
      new += [m.astype(fd) for m, flag in zip((f.isqrt.p, f.isqrt.q),
                                              (has_p, has_q)) if flag]
    return (delta,) + tuple(new) + tuple(new_inner)
  return fn


def _state_fields(state: FisherWhitenState, treedef) -> list[list]:
  """The per-leaf ``p, q, p_isqrt, q_isqrt`` leaves."""
  return [treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt)]


def _unflatten_fields(treedef, per_leaf, n: int) -> list:
  return [treedef.unflatten([t[j] for t in per_leaf]) for j in range(n)]


def _owned_cache(owned, views, sides) -> bool:
  """Whether the owner-resident factors come with cached roots, read from
  the number of resident arrays (per group: the stored sides' factors,
  then as many cached roots)."""
  groups = {(v.rows, v.cols, s) for v, s in zip(views, sides) if any(s)}
  n_sides = sum(sum(s) for _, _, s in groups)
  n_res = len(jax.tree.leaves(owned))
  if n_res not in (n_sides, 2 * n_sides):
    raise ValueError(f'state: its owner-resident factors ({n_res} arrays) '
                     f'do not match these updates ({n_sides} stored sides); '
                     'create the state with this transform\'s init.')
  return n_sides > 0 and n_res == 2 * n_sides


def update_whiten(updates, state: FisherWhitenState, *, inner, cfg: _Config,
                  dims, root_every, max_factor_size, spec, memory_budget):
  """The whitening, ``inner`` on the whole tree, the map back: one engine
  step around the inner transform (:func:`engine.step_around`), leaf by
  leaf (``spec=None``), stacked, or on owners, which keep the roots
  between the two maps (and, for a state made with ``distribute`` over
  several devices, the factors)."""
  owned = isinstance(state.owned, grouped_lib.OwnerStacks)
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  fields = _state_fields(state, treedef)
  if owned:
    sides = [_static_sides(v, max_factor_size) for v in views]
    cache = [_owned_cache(state.owned, views, sides)] * len(views)
  else:
    sides = [_leaf_sides(v, p, q) for v, p, q in zip(views, *fields[:2])]
    cache = [not (_is_identity(pc) and _is_identity(qc))
             for pc, qc in zip(*fields[2:])]
  leaves = [engine.Leaf(g, v, tuple(f[i] for f in fields), any(sides[i]),
                        key=sides[i] + (cache[i],),
                        active=_fields(sides[i], cache[i]))
            for i, (g, v) in enumerate(zip(g_leaves, views))]
  ct = _compute_dtype(cfg)
  cast = lambda leaf: (leaf.g if leaf.view is None
                       else leaf.g.astype(ct).astype(leaf.g.dtype))
  inner_state = []

  def middle(whitened):
    out, new_state = inner.update(treedef.unflatten(whitened),
                                  state.inner_state, None)
    inner_state.append(new_state)
    return treedef.flatten_up_to(out)

  # Cached roots are the roots used: resident, the map back reads them there.
  method = _method(cfg)._replace(carry_in_state=owned and cache[0])
  out, owned_out = engine.step_around(
      method, _whiten_kernel(refresh, cfg), middle,
      _unwhiten_kernel(cfg),
      engine.placement_for(spec, resident=owned, memory_budget=(
          grouped_lib.budget_bytes(memory_budget, updates))),
      leaves, state.owned if owned else None,
      local=(lambda leaf: (cast(leaf),) + tuple(leaf.state), cast))
  new_updates, p, q, pc, qc = _unflatten_fields(treedef, out, 5)
  return new_updates, FisherWhitenState(
      count=optax.safe_increment(state.count), p=p, q=q,
      inner_state=inner_state[0], p_isqrt=pc, q_isqrt=qc,
      owned=owned_out if owned else state.owned)


def _placeholder(cfg: _Config):
  return lambda _: _tree.identity_placeholder(cfg.factor_dtype)


def owner_init(state: FisherWhitenState, params, *, cfg: _Config, dims,
               max_factor_size, cache: bool, spec) -> FisherWhitenState:
  """Moves the matrix leaves' factors (and cached roots) to their owners;
  their per-leaf entries become one-element placeholders."""
  leaves, treedef, views = _tree.matrix_views(params, dims, 'params')
  if not leaves:
    # No leaves: optax.tree_utils.tree_map_params's placeholder params. A
    # leaf here (not a subtree) lets its non-params rule take OwnerStacks.
    return state._replace(owned=_tree.not_params())
  sides = [_static_sides(v, max_factor_size) for v in views]
  fields = _state_fields(state, treedef)
  per_leaf, owned = engine.own_leaves(
      _method(cfg), engine.placement_for(spec, resident=True),
      [engine.Leaf(x, v, tuple(f[i] for f in fields), any(sides[i]),
                   key=sides[i] + (cache,), active=_fields(sides[i], cache))
       for i, (x, v) in enumerate(zip(leaves, views))],
      resident_lib.leaf_paths(params), _placeholder(cfg))
  p, q, pc, qc = _unflatten_fields(treedef, per_leaf, 4)
  return state._replace(p=p, q=q, p_isqrt=pc, q_isqrt=qc, owned=owned)


# ----------------------------------------------------------------------------
# Fused: with an ``OwnerInner`` over several devices, the whitening, the
# inner step and the map back are one kernel; the factors, cached roots and
# the inner per-matrix state (FISMO: the momentum) all live on the owner, so
# per matrix only ``X`` travels in and ``Δ`` out.


def _masked(treedef, leaves, todo):
  """The tree with the leaves in ``todo`` replaced by ``optax.MaskedNode``
  (what the plain inner transform sees next to the fused matrices)."""
  skip = set(todo)
  return treedef.unflatten([optax.MaskedNode() if i in skip else x
                            for i, x in enumerate(leaves)])


def _n_inner(fused, rows: int, cols: int, ct) -> int:
  """The number of ``fused.init`` arrays of a ``rows × cols`` matrix."""
  return len(jax.eval_shape(fused.init, jax.ShapeDtypeStruct(
      (1, rows, cols), ct)))


def fused_init(state: FisherWhitenState, params, *, fused, cfg: _Config,
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
                          owned=_tree.not_params())
  todo = [i for i, v in enumerate(views) if v is not None]
  fields = _state_fields(state, treedef)
  n_inner = max((_n_inner(fused, views[i].rows, views[i].cols,
                          _compute_dtype(cfg)) for i in todo), default=0)
  method = _method(cfg, n_inner, fused)
  matrix_leaves = []
  for i, (x, v) in enumerate(zip(leaves, views)):
    st = tuple(f[i] for f in fields)
    if v is None:
      matrix_leaves.append(engine.Leaf(x, v, st, False))
      continue
    inner = tuple(fused.init(v.to_matrix(x)))
    inner = tuple(v.from_matrix(a) if len(_NAMES) + j in method.leaf_shaped
                  else a for j, a in enumerate(inner))
    s = _static_sides(v, max_factor_size)
    matrix_leaves.append(engine.Leaf(
        x, v, st + inner, True, key=s + (cache,),
        active=_fields(s, cache) + tuple(range(len(_NAMES),
                                               len(_NAMES) + len(inner)))))
  per_leaf, owned = engine.own_leaves(
      method, engine.placement_for(spec, resident=True), matrix_leaves,
      resident_lib.leaf_paths(params), _placeholder(cfg))
  p, q, pc, qc = _unflatten_fields(treedef, per_leaf, 4)
  return state._replace(p=p, q=q, p_isqrt=pc, q_isqrt=qc,
                        inner_state=fused.transform.init(
                            _masked(treedef, leaves, todo)),
                        owned=owned)


def _resident_sides(factors, rows: int, cols: int):
  """``(has P, has Q, cached roots)`` of one group of the fused layout, read
  from its resident factor arrays (``[P], [Q], [P cache], [Q cache]``, each
  ``(N, d, d)``; ``P`` is ``cols × cols``) as :func:`fused_init` stored
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


def _fused_layouts(owned, groups, views, fused, ct):
  """Per group of the resident step: ``(has P, has Q, n_inner)`` and the
  state's one cache flag, read from the resident arrays."""
  if len(owned.groups) != len(groups):
    raise ValueError(f'state: its owner-resident arrays form '
                     f'{len(owned.groups)} groups, these updates '
                     f'{len(groups)}; create the state with this '
                     'transform\'s init.')
  layouts, cache = [], set()
  for idx, arrays in zip(groups, owned.groups):
    shape = views[idx[0]].matrix_shape[1:]
    n_inner = _n_inner(fused, *shape, ct)
    layout = (_resident_sides(arrays[:len(arrays) - n_inner], *shape)
              if len(arrays) >= n_inner else None)
    if layout is None:
      raise ValueError(f'state: owner-resident arrays of shapes '
                       f'{[a.shape for a in arrays]} do not fit {shape} '
                       f'matrices with {n_inner} inner state arrays; create '
                       'the state with this transform\'s init.')
    layouts.append(layout[:2] + (n_inner,))
    if layout[2] is not None:
      cache.add(layout[2])
  if len(cache) > 1:
    raise ValueError('state: some groups cache their roots, others do not; '
                     'create the state with this transform\'s init.')
  return layouts, bool(cache and cache.pop())


def update_fused(updates, state: FisherWhitenState, *, fused, cfg: _Config,
                 dims, root_every, spec):
  """One engine step: ``X`` goes to its owner, which updates the factors,
  whitens, runs ``fused.step`` with the resident inner state and maps
  back; ``Δ`` comes back. Leaves without a matrix view get the plain inner
  transform (with the matrix leaves masked)."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  todo = [i for i, v in enumerate(views) if v is not None]
  ct = _compute_dtype(cfg)
  leaves = [engine.Leaf(g, v, (), v is not None)
            for g, v in zip(g_leaves, views)]
  groups = engine.item_groups(_method(cfg)._replace(keyed=False), leaves)
  layouts, cache = _fused_layouts(state.owned, groups, views, fused, ct)
  for idx, (has_p, has_q, n_inner) in zip(groups, layouts):
    for i in idx:
      leaves[i] = leaves[i]._replace(
          key=(has_p, has_q, cache), active=_fields((has_p, has_q), cache)
          + tuple(range(len(_NAMES), len(_NAMES) + n_inner)))
  out, owned = engine.step_leaves(
      _method(cfg, max((n for _, _, n in layouts), default=0), fused),
      _fused_kernel(fused.step_for(state.inner_state), refresh, cfg),
      engine.placement_for(spec, resident=True), leaves, state.owned,
      local=lambda leaf: (leaf.g,))
  # The other leaves (no matrix view): the plain inner transform, unwhitened.
  inner_updates, inner_state = fused.transform.update(
      _masked(treedef, g_leaves, todo), state.inner_state, None)
  new_u = treedef.flatten_up_to(inner_updates)
  for i in todo:
    new_u[i] = out[i][0]
  return treedef.unflatten(new_u), state._replace(
      count=optax.safe_increment(state.count), inner_state=inner_state,
      owned=owned)


# ----------------------------------------------------------------------------
# Fused on one device: with an ``OwnerInner`` whose arrays are ``locate``d,
# each matrix's whitening, inner step and map back run as one kernel call,
# leaf by leaf in packs that fit the memory budget, so only a pack's
# intermediates (G̃, the inner step's, Δ) are alive at a time instead of the
# whole tree's. The state is the unfused path's: the inner arrays are read
# from and written back to the plain inner transform's state.


def fuses_locally(fused, state: FisherWhitenState, spec, cfg: _Config
                  ) -> bool:
  """Whether :func:`update_fused_local` steps ``state``: one device, an
  ``OwnerInner`` whose per-matrix arrays it finds in the inner state, each
  the leaf in matrix form (FISMO's momentum; a LITE geometry's per-leaf
  fields are not batched as its ``init``'s are)."""
  if (fused is None or fused.locate is None or spec is not None
      or isinstance(state.owned, grouped_lib.OwnerStacks)):
    return False
  ct = _compute_dtype(cfg)
  return all(fused.locate(j)[1] for j in range(_n_inner(fused, 1, 1, ct)))


def update_fused_local(updates, state: FisherWhitenState, *, fused,
                       cfg: _Config, dims, root_every, memory_budget):
  """One device: every matrix's whole step (factor updates, roots, ``G̃``,
  ``fused.step`` on its arrays of the inner state, the map back) in one
  engine call per leaf, in packs that fit ``memory_budget``; the other
  leaves get the plain inner transform (the matrix leaves masked). Values
  and state those of :func:`update_whiten` with ``fused.transform``."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  todo = [i for i, v in enumerate(views) if v is not None]
  fields = _state_fields(state, treedef)
  paths = [tuple(fused.locate(j)[0])
           for j in range(_n_inner(fused, 1, 1, _compute_dtype(cfg)))]
  inner = [treedef.flatten_up_to(_tree.get_at(state.inner_state, path))
           for path in paths]
  leaves = []
  for i, (g, v) in enumerate(zip(g_leaves, views)):
    st = tuple(f[i] for f in fields) + tuple(a[i] for a in inner)
    sides = _leaf_sides(v, *st[:2])
    cache = not (_is_identity(st[2]) and _is_identity(st[3]))
    leaves.append(engine.Leaf(
        g, v, st, v is not None, key=sides + (cache,),
        active=_fields(sides, cache) + tuple(
            range(len(_NAMES), len(_NAMES) + len(paths)))))
  out = engine.step_leaves(
      _method(cfg, len(paths), fused),
      _fused_kernel(fused.step_for(state.inner_state), refresh, cfg),
      engine.placement_for(None, resident=False, memory_budget=(
          grouped_lib.budget_bytes(memory_budget, updates))),
      leaves, local=lambda leaf: (leaf.g,) + tuple(leaf.state))
  # The other leaves: the plain inner transform, unwhitened; the matrix
  # leaves' inner arrays go back where they were read.
  masked_state = state.inner_state
  for path, arrays in zip(paths, inner):
    masked_state = _tree.set_at(masked_state, path,
                             _masked(treedef, arrays, todo))
  inner_updates, inner_state = fused.transform.update(
      _masked(treedef, g_leaves, todo), masked_state, None)
  new_u = treedef.flatten_up_to(inner_updates)
  for j, path in enumerate(paths):
    arrays = treedef.flatten_up_to(_tree.get_at(inner_state, path))
    for i in todo:
      arrays[i] = out[i][1 + len(_NAMES) + j]
    inner_state = _tree.set_at(inner_state, path, treedef.unflatten(arrays))
  for i in todo:
    new_u[i] = out[i][0]
  p, q, pc, qc = _unflatten_fields(treedef, [o[1:] for o in out], 4)
  return treedef.unflatten(new_u), state._replace(
      count=optax.safe_increment(state.count), p=p, q=q, p_isqrt=pc,
      q_isqrt=qc, inner_state=inner_state)
