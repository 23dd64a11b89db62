r"""``lite_flat_boost``: LITE's flat-direction boost around any preconditioner.

LITE (Zhu et al. 2026, Algorithm 1) splits each step into the *sharp* and
*flat* subspaces of the preconditioner's geometry and treats them apart:

.. math::
   u_k = (I - Q_k) F^{-1}(m_k + β_1 g_k) + χ\,Q_k F^{-1}(m_k + β_2 g_k),

where ``Q_k`` projects onto the flat directions, ``χ ≥ 1`` boosts the step
along them and ``β₂ ≥ β₁`` is their Hessian damping (Nesterov) coefficient.
With ``χ = 1`` and ``β₁ = β₂ = 0`` it is exactly the base optimizer.

This transform owns the momentum ``m_k`` and delegates everything that
depends on the preconditioner to a :class:`Geometry`, which for one leaf
returns ``F⁻¹(momentum term)``, ``F⁻¹ g`` (in its own coordinates), the map
``x ↦ Q x`` onto the flat directions in those coordinates, the map back to
parameter space, and the flat projection of the weights (for the optional
extra decay along flat directions). The combination is then

.. math::
   u = D_m + β_1 D_g + (β_2 - β_1)\,Q D_g, \qquad u \leftarrow u + (χ - 1)\,Q u,

which equals Algorithm 1 because ``Q`` is a projector (or, for the soft
masks, an element-wise weight). Geometries in the library:

* :func:`muon_geometry` – Muon-LITE, eq. (5): ``D_m = polar(M̃)``,
  ``D_g = polar(G)``, sharp subspace from the spectral filter on ``M̃``
  (Appendix B.1), threshold controller eq. (13); in
  :mod:`optax_lite.transforms.lite_muon`.
* :func:`diagonal_geometry` – AdamW-LITE (embedding / norm leaves): Adam's
  ``m̂ / (√v̂ + ε)`` with the soft mask of eq. (16) on ``v`` (Appendix B.2
  with ``Q_l = Q_r = I``).
* :func:`optax_lite.transforms.lite_geometries.soap_geometry` (SOAP-LITE)
  and :func:`~optax_lite.transforms.lite_geometries.row_norm_geometry`
  (RMNP-LITE). FISMO-LITE needs no geometry of its own: it is
  ``fisher_whiten(lite_flat_boost(muon_geometry(...)))``, Muon-LITE in the
  whitened space.

References:
  Zhu et al., `Accelerating LLM Pre-Training through Flat-Direction Dynamics
  Enhancement <https://arxiv.org/abs/2602.22681>`_, 2026.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import engine
from optax_lite.linalg import grouped
from optax_lite.linalg import polar as polar_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.linalg import subspace
from optax_lite.transforms import _tree
# The geometry interface and Muon-LITE's geometry live in their own modules;
# their names stay importable from here.
from optax_lite.transforms.lite_muon import (  # noqa: F401 (re-exported)
    FILTER_ROUTES, MuonCachedGeometryState, MuonGeometryState, muon_geometry)
from optax_lite.transforms.lite_types import (  # noqa: F401 (re-exported)
    Geometry, LeafDirections, sharp_dim)
from optax_lite.transforms.owner_inner import OwnerInner
from optax_lite.transforms.scaling import SCALING_MODES, shape_factor


class LiteState(NamedTuple):
  """State of :func:`lite_flat_boost`.

  With ``distribute=`` over several devices, the momentum and geometry
  state of every matrix leaf live in ``owned`` on the device that computes
  that matrix (:class:`optax_lite.linalg.grouped.OwnerStacks`), and their
  entries in ``mu`` and ``geometry`` are one-element placeholders.
  """
  count: jax.Array     # int32 scalar
  mu: optax.Updates    # momentum, shaped like params (mu_dtype)
  geometry: tuple      # Geometry.state_type of trees shaped like params
  owned: Any = None    # None, or OwnerStacks (distribute=)


class DiagonalGeometryState(NamedTuple):
  """Per-leaf state of :func:`diagonal_geometry`."""
  nu: jax.Array       # Adam's second moment, shaped like the leaf
  l_sharp: jax.Array  # sharp threshold factor l_s of eq. (16–17)
  l_smooth: jax.Array  # smooth threshold factor of eq. (16, 18)


# --------------------------------------------------------------------------
# Diagonal (Adam) geometry: AdamW-LITE for embedding and norm leaves
# --------------------------------------------------------------------------


def smooth_fraction(sharp_ratio, smooth_ratio):
  """``min(1 − r_s, smooth)``: the transitional fraction of eq. (16–18).

  Traced ratios (``optax.inject_hyperparams``) give a traced result.
  """
  if (_checks.is_static_number(sharp_ratio) and
      _checks.is_static_number(smooth_ratio)):
    return min(1.0 - float(sharp_ratio), float(smooth_ratio))
  return jnp.minimum(1.0 - sharp_ratio, smooth_ratio)


def check_mask_args(sharp_ratio, smooth_ratio, threshold_rate=None, *,
                    names=('sharp_ratio', 'smooth_ratio')) -> None:
  """The soft mask's ratios, ``r_s`` in (0, 1) and ``smooth`` in [0, 1],
  and its controller's rate in (1, 2), checked under ``names`` (the LITE
  optimizers pass the names their users gave, e.g. ``emb_sharp_ratio``)."""
  _checks.check_number(names[0], sharp_ratio, low=0.0, high=1.0,
                       low_open=True, high_open=True)
  _checks.check_number(names[1], smooth_ratio, low=0.0, high=1.0)
  if threshold_rate is not None:
    _checks.check_number('threshold_rate', threshold_rate, low=1.0,
                         low_open=True, high=2.0, high_open=True)


def diagonal_geometry(*, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                      sharp_ratio: float = 0.1, smooth_ratio: float = 0.1,
                      threshold_rate: float = 1.05) -> Geometry:
  """Adam's diagonal geometry with the soft sharp mask of eq. (16).

  ``F⁻¹x = x̂ / (√v̂ + ε)`` with Adam's bias corrections; the sharp mask is
  1 where ``v ≥ l_s·mean(v)``, 0 below ``l_smooth·mean(v)``, linear between;
  ``l_s`` (init 1.0) and ``l_smooth`` (init 0.5) follow eq. (17–18) towards
  ``d_s = r_s·numel`` sharp and ``d_smooth = min(1 − r_s, smooth)·numel``
  transitional coordinates. With ``χ = 1`` this is exactly ``optax.adamw``'s
  direction (the momentum must be EMA with decay ``b1``; the LITE
  transform sets that up).
  """
  _checks.check_decay('b1', b1)
  _checks.check_decay('b2', b2)
  _checks.check_positive('eps', eps)
  check_mask_args(sharp_ratio, smooth_ratio, threshold_rate)
  smooth = smooth_fraction(sharp_ratio, smooth_ratio)

  def init(view, param):
    del view
    # zeros_like keeps the parameter's sharding.
    dtype = jnp.promote_types(param.dtype, jnp.float32)
    return DiagonalGeometryState(jnp.zeros_like(param, dtype=dtype),
                                 jnp.ones([], jnp.float32),
                                 jnp.full([], 0.5, jnp.float32))

  def directions(view, m_term, g, leaf_state, count, need_g):
    del view
    nu, l_s, l_m = leaf_state
    gf = g.astype(nu.dtype)
    b2c = jnp.asarray(b2, nu.dtype)  # 1 − β₂ as for an injected β₂
    nu = b2c * nu + (1 - b2c) * gf * gf
    t = count.astype(jnp.float32)
    denom = jnp.sqrt(nu / (1 - b2c ** t)) + eps
    d_m = (m_term.astype(nu.dtype) / (1 - b1 ** t)) / denom
    d_g = gf / denom if need_g else None
    n = max(1, nu.size)
    if nu.size:
      s = subspace.soft_mask(nu, l_s, l_m)
      new_s, new_m = subspace.adapt_mask_thresholds(
          nu, l_s, l_m, sharp_ratio * n, smooth * n, rate=threshold_rate)
    else:
      s, new_s, new_m = nu, l_s, l_m

    def flat(x):
      return (1.0 - s) * x

    return LeafDirections(d_m, d_g, flat, lambda x: x,
                          lambda w: w.astype(nu.dtype),
                          DiagonalGeometryState(nu, new_s, new_m))

  return Geometry(init, directions, needs_matrix=False, momentum_ema=True,
                  state_type=DiagonalGeometryState)


# --------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------


def lite_flat_boost(geometry: Geometry, *, chi: optax.ScalarOrSchedule = 2.0,
                    beta1: float = 0.0, beta2: optax.ScalarOrSchedule = 0.0,
                    momentum: float = 0.95, nesterov: bool = True,
                    mu_dtype=None, dims: _tree.DimsSpec = None,
                    scaling: str = 'none', rms: float = 0.2,
                    flat_weight_decay: optax.ScalarOrSchedule = 0.0,
                    distribute=None, owner_inner: bool = False,
                    memory_budget: float | str | None = 'auto',
                    stack_by_shape: bool = False
                    ) -> optax.GradientTransformation | OwnerInner:
  r"""LITE around ``geometry``; see the module docstring for the math.

  Args:
    geometry: a :class:`Geometry` (e.g. :func:`muon_geometry`).
    chi: ``χ ≥ 1``, the step boost along flat directions (float or schedule
      of the step count).
    beta1: ``β₁``, Hessian damping of the sharp directions.
    beta2: ``β₂ ≥ β₁``, Hessian damping of the flat directions (float or
      schedule).
    momentum: momentum decay ``θ = 1 − α`` in ``[0, 1)``.
    nesterov: use the Nesterov momentum ``M̃`` as the momentum term (Muon);
      ``False`` uses ``M`` (SOAP, Adam).
    mu_dtype: momentum dtype.
    dims: matrix view of leaves (for geometries that need one).
    scaling: shape scaling of the output (``"rms"`` for Muon-type leaves).
    rms: target RMS for ``scaling="rms"``.
    flat_weight_decay: ``λ_f``; adds ``λ_f·(χ − 1)·Q W`` to the update, the
      reference code's extra decoupled decay along flat directions (the
      learning rate multiplies it later in the chain). Needs ``params``.
    memory_budget: on one device, the working set of the matrix leaves
      stepped together, as a fraction of the updates' bytes (``"auto"``:
      0.1): the leaves run in packs whose estimated working sets fit it,
      one pack after another
      (:func:`optax_lite.linalg.grouped.sequential_calls`); same values.
      ``None``: every leaf at once, as XLA schedules it (Muon-LITE's
      temporaries on the 34M tree of ``docs/benchmarks.md``, memory:
      0.25x the parameter bytes at the default, 3.25x with ``None``).
    distribute: ``None`` (one device) or a :class:`optax_lite.PolarSharding`
      / ``Mesh`` / ``(mesh, axes)``: owner-computes. Every matrix slice's
      whole LITE step (the geometry's polar factors, filter, rotations and
      refreshes, the boost) runs on one device chosen by cost
      (:func:`optax_lite.linalg.grouped.grouped_map`); its gradient (and
      parameter, for the flat weight decay) goes there and its update
      comes back in one ``all_to_all`` each, none inside an iteration; its
      momentum and geometry state stay on that device (``LiteState.owned``,
      split along its first axis; ``optax_lite.sharded_init`` and
      ``state_shardings`` know). Same math, up to round-off. Only
      geometries with ``needs_matrix`` use it. A one-device mesh stacks
      each shape's matrices into one call; a state made without
      ``distribute`` steps on the owners, its state travelling each step
      (the placements of :mod:`optax_lite.linalg.engine`).
    owner_inner: return an :class:`optax_lite.transforms.OwnerInner`
      instead (the transform, plus its per-matrix step on a stack of
      matrices bound to the transform's step count), for
      :func:`optax_lite.transforms.fisher_whiten` to run that step on each
      matrix's owner inside its whitening call (FISMO-LITE); needs a
      matrix geometry and no ``flat_weight_decay``.
    stack_by_shape: on one device, the matrix leaves of each distinct shape
      (and state layout) stacked into one call of the step (the engine's
      ``"stacked"`` placement, in calls that fit ``memory_budget``): one
      compiled step per shape instead of one per leaf, so the compile time
      does not grow with the depth. Off by default: a batched ``eigh`` / QR
      (SOAP's geometry) differs from per-leaf calls in round-off. In a
      process with several CPU devices (plain GSPMD) a step with an
      ``eigh`` / QR runs one matrix at a time (``docs/multi_device.md``).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LiteState` (an
    ``OwnerInner`` around it with ``owner_inner=True``).
  """
  _checks.check_number('chi', chi, low=1.0, allow_schedule=True)
  _checks.check_number('beta1', beta1)
  _checks.check_number('beta2', beta2, allow_schedule=True)
  if (_checks.is_static_number(beta2) and _checks.is_static_number(beta1)
      and float(beta2) < float(beta1)):
    raise ValueError(f'beta2 must be >= beta1, got beta2={beta2} < '
                     f'beta1={beta1}.')
  _checks.check_decay('momentum', momentum)
  _checks.check_choice('scaling', scaling, SCALING_MODES)
  _checks.check_positive('rms', rms)
  _checks.check_flag('nesterov', nesterov)
  _checks.check_flag('owner_inner', owner_inner)
  if not isinstance(stack_by_shape, bool):
    raise TypeError('stack_by_shape must be a bool (static), got '
                    f'{type(stack_by_shape).__name__}.')
  _checks.check_number('flat_weight_decay', flat_weight_decay, low=0.0,
                       allow_schedule=True)
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  spec = distributed_lib.check_distribute(distribute)
  memory_budget = grouped.check_memory_budget(memory_budget)
  if not geometry.needs_matrix:
    spec = None  # elementwise geometries: nothing super-linear to spread
  ema = geometry.momentum_ema
  need_g = not (_checks.is_static_number(beta1) and float(beta1) == 0.0 and
                _checks.is_static_number(beta2) and float(beta2) == 0.0)
  use_wd = not (_checks.is_static_number(flat_weight_decay) and
                float(flat_weight_decay) == 0.0)
  leaf_dims = dims if geometry.needs_matrix else _tree._DEFAULT

  state_type = geometry.state_type

  def n_fields(per_leaf, like):
    if state_type is not None:
      return len(state_type._fields)
    flat = jax.tree.structure(like).flatten_up_to(per_leaf)
    return len(flat[0]) if flat else 0

  def pack(fields):
    return state_type(*fields) if state_type is not None else tuple(fields)

  def init_fn(params):
    if _tree.is_params_placeholder(params):
      return _placeholder_state(geometry, params, spec, pack)
    # zeros_like keeps each parameter's sharding (jnp.zeros would not).
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype),
                      params)
    if geometry.needs_matrix:
      _require_matrix_views(params, leaf_dims)
    per_leaf = _tree.map_leaves(lambda v, p: geometry.init(v, p), params,
                                dims=leaf_dims, name='params')
    n = n_fields(per_leaf, params)
    geom = pack(_tree.unzip(per_leaf, n, params)) if n else pack(())
    state = LiteState(jnp.zeros([], jnp.int32), mu, geom)
    if spec is None or spec.num_shards() == 1:
      return state
    return _owner_init(state, params, spec, leaf_dims, use_wd, pack)

  def make_leaf(state_count):
    """The new step count and the per-leaf step after ``state_count``."""
    count = optax.safe_increment(state_count)
    # Schedules see the pre-increment count (0 on the first step), as optax's
    # learning-rate schedules and the reference's iteration counter do; the
    # geometry gets the step number (1 on the first step, for bias
    # corrections).
    chi_t = _checks.resolve(chi, state_count)
    b2_t = _checks.resolve(beta2, state_count)
    wd_t = _checks.resolve(flat_weight_decay, state_count)

    def leaf(view, g, m, p, *geom_leaf):
      _checks.check_float_leaf('updates', g)
      ct = jnp.promote_types(g.dtype, jnp.float32)
      gf, mf = g.astype(ct), m.astype(ct)
      mom = jnp.asarray(momentum, ct)  # 1 − β₁ as for an injected β₁
      m_new = mom * mf + ((1 - mom) if ema else 1.0) * gf
      if nesterov:
        m_term = mom * m_new + ((1 - mom) if ema else 1.0) * gf
      else:
        m_term = m_new
      out = geometry.directions(view, m_term, gf, pack(geom_leaf), count,
                                need_g)
      if out.keep_momentum is not None:
        m_new = jnp.where(out.keep_momentum, mf, m_new)
      u = out.d_m
      if need_g:
        u = u + beta1 * out.d_g + (b2_t - beta1) * out.flat(out.d_g)
      scale = (1.0 if view is None else
               shape_factor(view.rows, view.cols, scaling, rms))
      # s·u + (χ−1)·Q(s·u) + λ_f(χ−1)·Q W with one application of Q (linear).
      boost = (chi_t - 1.0) * scale * u
      if use_wd:
        boost = boost + wd_t * (chi_t - 1.0) * out.to_coords(p)
      u = out.finish(scale * u + out.flat(boost))
      return (u.astype(g.dtype), m_new.astype(m.dtype)) + tuple(out.state)
    return count, leaf

  def update_fn(updates, state, params=None):
    if use_wd and params is None:
      raise ValueError('params: lite_flat_boost with flat_weight_decay > 0 '
                       'needs params in update().')
    count, leaf = make_leaf(state.count)
    params_tree = params if use_wd else jax.tree.map(lambda _: None, updates)

    owned = isinstance(state.owned, grouped.OwnerStacks)
    placement = engine.placement_for(
        spec, resident=owned, stacked=stack_by_shape,
        memory_budget=grouped.budget_bytes(
            memory_budget if geometry.needs_matrix else None, updates))
    return _engine_update(leaf, placement, updates, state, count,
                          params_tree, leaf_dims, pack, geometry.wait_state)

  transform = optax.GradientTransformation(
      init_fn, distributed_lib.layout_stable(update_fn))
  if not owner_inner:
    return transform
  if use_wd or not geometry.needs_matrix:
    raise ValueError('owner_inner: needs a matrix geometry and no '
                     'flat_weight_decay (the per-matrix step sees no '
                     'parameters).')

  return _lite_owner_inner(transform, geometry, make_leaf, mu_dtype)


def _require_matrix_views(params, dims):
  """A matrix geometry needs every leaf as a matrix: a leaf without a view
  (``dims`` ``None`` for it, or no entries) gets an error naming it, not an
  ``AttributeError`` from inside the geometry."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  _, _, views = _tree.matrix_views(params, dims, 'params')
  for (path, x), view in zip(flat, views):
    if view is None:
      raise ValueError(
          f'params{jax.tree_util.keystr(path)}: shape {tuple(x.shape)} has '
          'no matrix view (its dims are None, or it has no entries), but '
          "this LITE geometry needs one; send it to another transform (the "
          "named optimizers label empty leaves 'other', for AdamW).")


def _stack_view(x):
  """The view of a ``(B, rows, cols)`` stack: ``B`` matrices."""
  return _tree.matrix_view(x.shape, _tree.MatrixDims(1, 2))


def _lite_owner_inner(transform, geometry, make_leaf, mu_dtype
                      ) -> OwnerInner:
  """``lite_flat_boost``'s per-matrix form: the momentum and the geometry's
  state of a stack of matrices, and the step at the transform's count
  (``make_leaf(count) -> (new count, leaf step)``)."""
  def owner_init(x):
    return ((jnp.zeros_like(x, dtype=mu_dtype or x.dtype),)
            + tuple(geometry.init(_stack_view(x), x)))

  def bind(state):
    _, leaf = make_leaf(state.count)

    def step(x, m, *geom_leaf):
      out = leaf(_stack_view(x), x, m, None, *geom_leaf)
      return out[0], tuple(out[1:])
    return step

  def cost(rows, cols):  # about three polar factors of 6 steps each
    return 3 * polar_lib.flops(rows, cols, 6)

  def locate(j):  # owner_init's arrays: the momentum, then the geometry's
    return (('mu',), True) if j == 0 else (('geometry', j - 1), False)

  return OwnerInner(transform, owner_init, None, cost, bind, locate)


def _compute_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _method(n_geom: int, wait_state: bool = False) -> engine.MatrixMethod:
  """The engine's view of a LITE leaf's state: the momentum (shaped like the
  parameter), then the geometry's fields (``LiteState.geometry[j]``)."""
  names = ('mu',) + tuple(('geometry', j) for j in range(n_geom))
  return engine.MatrixMethod(names=names, active=tuple(range(1 + n_geom)),
                             leaf_shaped=(0,), item_bytes=_item_bytes,
                             leaf_form=True, wait_state=wait_state)


def _item_bytes(view, arrays) -> float:
  """One leaf's working set for the one-device budget: its matrix and
  every array next to it (:func:`_tree.view_bytes`); 0 without a view."""
  return 0.0 if view is None else _tree.view_bytes(view, *arrays)


def _placeholder_state(geometry, params, spec, pack):
  """``init`` on ``tree_map_params``'s stand-in ``params``: the momentum and
  the geometry fields shaped like the parameter stand in for it, the other
  fields and ``owned`` are leaves (:func:`_tree.placeholder_fields`)."""
  like = _tree.params_like_outputs(geometry.init)
  owned = _tree.not_params() if spec is not None and spec.num_shards() > 1 \
      else None
  return LiteState(jnp.zeros([], jnp.int32), params,
                   pack(_tree.placeholder_fields(params, like)), owned)


def _owner_init(state, params, spec, dims, use_wd, pack):
  """Moves the matrix leaves' momentum and geometry state to their owners.

  Their places in ``mu`` / ``geometry`` keep one-element placeholders.
  """
  p_leaves, treedef, views = _tree.matrix_views(params, dims, 'params')
  if not p_leaves:
    # No leaves (every one masked: FISMO-LITE's fused step owns them). A
    # leaf here, as for tree_map_params's stand-in.
    return state._replace(owned=_tree.not_params())
  mu = treedef.flatten_up_to(state.mu)
  geom = [treedef.flatten_up_to(t) for t in state.geometry]
  leaves = [engine.Leaf(p, v, (mu[i],) + tuple(t[i] for t in geom),
                        v is not None, (p,) if use_wd else ())
            for i, (p, v) in enumerate(zip(p_leaves, views))]
  per_leaf, owned = engine.own_leaves(
      _method(len(geom)), engine.placement_for(spec, resident=True), leaves,
      resident_lib.leaf_paths(params),
      lambda x: _tree.identity_placeholder(x.dtype))
  fields = [treedef.unflatten([t[j] for t in per_leaf])
            for j in range(1 + len(geom))]
  return LiteState(state.count, fields[0], pack(fields[1:]), owned)


def _engine_update(leaf, placement, updates, state, count, params_tree, dims,
                   pack, wait_state=False):
  """``lite_flat_boost``'s step on the matrix engine, under ``placement``.

  Leaf by leaf (``"per_leaf"``), ``leaf`` runs on every leaf as stored,
  through its view (the engine's ``leaf_form``). Otherwise every matrix
  leaf is one work item: ``leaf`` runs on stacks of same-shape ``(B, rows,
  cols)`` gradients (and parameters), momenta and geometry states, seen
  through a plain ``(K, rows, cols)`` view (``"stacked"``; ``"owner"``
  and ``"owner_resident"`` on each item's owner, the latter next to its
  resident state); leaves without a matrix view (all of them with an
  element-wise geometry, whose ``dims`` is ``_tree._DEFAULT``) take the
  local path.
  """
  if dims is _tree._DEFAULT:
    g_leaves, treedef = jax.tree.flatten(updates)
    views = [None] * len(g_leaves)
  else:
    g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  p_all = treedef.flatten_up_to(params_tree)
  use_p = any(p is not None for p in p_all)
  mu = treedef.flatten_up_to(state.mu)
  geom = [treedef.flatten_up_to(t) for t in state.geometry]

  def kernel(g, *rest):
    p, rest = (rest[0], rest[1:]) if use_p else (None, rest)
    k, rows, cols = g.shape
    view = _tree.MatrixView((0, 1, 2), (k,), rows, cols, (k, rows, cols))
    return leaf(view, g, rest[0], p, *rest[1:])

  def local(lf):  # the leaf as stored, through its view (None: none)
    p = lf.extras[0] if lf.extras else None
    return leaf(lf.view, lf.g, lf.state[0], p, *lf.state[1:])

  leaves = [engine.Leaf(g, v, (mu[i],) + tuple(t[i] for t in geom),
                        v is not None, (p_all[i],) if use_p else ())
            for i, (g, v) in enumerate(zip(g_leaves, views))]
  out = engine.step_leaves(
      _method(len(geom), wait_state), kernel, placement, leaves,
      state.owned, local)
  # ``owned`` as it came unless resident (None, or the int placeholder of a
  # params-less init), so that the state keeps its tree structure.
  out, owned = (out if placement.kind == 'owner_resident'
                else (out, state.owned))
  fields = [treedef.unflatten([t[j] for t in out])
            for j in range(2 + len(geom))]
  return fields[0], LiteState(count, fields[1], pack(fields[2:]), owned)
