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
  (Appendix B.1), threshold controller eq. (13).
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

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import polar as polar_lib
from optax_lite.linalg import subspace
from optax_lite.transforms import _tree
from optax_lite.transforms.scaling import SCALING_MODES, shape_factor


class LeafDirections(NamedTuple):
  """What a geometry returns for one leaf at one step.

  ``flat`` must be linear; the transform applies it once to the sum of the
  boost and the flat weight-decay terms.
  """
  d_m: jax.Array                      # F⁻¹(momentum term), own coordinates
  d_g: jax.Array | None               # F⁻¹ g, or None when not needed
  flat: Callable[[jax.Array], jax.Array]       # Q·x in own coordinates
  finish: Callable[[jax.Array], jax.Array]     # own coordinates -> leaf
  to_coords: Callable[[jax.Array], jax.Array]  # parameter leaf -> own coords
  state: tuple                        # the geometry's new per-leaf state
  # True on a warm-up step of the base method (SOAP's first step only builds
  # its statistics): the momentum is left unchanged on that step.
  keep_momentum: jax.Array | None = None


class Geometry(NamedTuple):
  """A preconditioner seen by LITE.

  Attributes:
    init: ``(view, param) -> tuple of arrays`` (per-leaf state).
    directions: ``(view, m_term, g, leaf_state, count, need_g) ->
      LeafDirections``. ``view`` is the leaf's MatrixView (None when
      ``needs_matrix`` is False).
    needs_matrix: whether leaves must be seen as matrices (``dims``).
    momentum_ema: the geometry expects EMA momentum ``θm + (1−θ)g`` (Adam,
      SOAP) rather than heavy-ball ``θm + g`` (Muon); only matters for
      geometries that are not scale-invariant.
  """
  init: Callable
  directions: Callable
  needs_matrix: bool = True
  momentum_ema: bool = False


class LiteState(NamedTuple):
  count: jax.Array     # int32 scalar
  mu: optax.Updates    # momentum, shaped like params (mu_dtype)
  geometry: tuple      # tuple of trees shaped like params (per-leaf state)


def sharp_dim(ratio: float, rows: int, cols: int, rule: str) -> int:
  """Target number of sharp directions ``d_s`` of a ``rows × cols`` matrix.

  ``rule="reference"``: ``min(⌊r·min(m,n)⌋ + 1, min(m,n) − 1)`` (LITE code);
  ``rule="paper"``: ``max(1, round(r·min(m,n)))``.
  """
  k = min(rows, cols)
  if rule == 'reference':
    return max(1, min(int(ratio * k) + 1, k - 1))
  return max(1, int(round(ratio * k)))


# --------------------------------------------------------------------------
# Muon geometry (Muon-LITE, eq. 5 and Appendix B.1)
# --------------------------------------------------------------------------


def muon_geometry(*, sharp_ratio: float = 0.1, method: str = 'polar_express',
                  steps: int | None = None, threshold_rate: float = 1.05,
                  threshold_cap: float | None = 1.0,
                  sharp_dim_rule: str = 'reference',
                  threshold_deadband: float = 0.0, precision=None
                  ) -> Geometry:
  """Muon's geometry: polar factors, sharp subspace from the momentum.

  The sharp subspace is the top singular subspace of ``M̃`` on the fan-in
  side (rows of the ``(fan_in, fan_out)`` view; the *input* side of the
  PyTorch weight, as in the reference code): singular values above
  ``τ = l·‖M̃‖_F``. It is computed matmul-only, as eq. (12–15), but with
  the second sign function taken on the small symmetric factor of the polar
  decomposition (:func:`optax_lite.linalg.subspace.small_side_projector`),
  which has the same eigen-structure as ``M̃/τ − polar(M̃)`` and costs a
  third of the flops on a 1:4 matrix. ``l``
  starts at ``1/√min(m, n)`` and follows eq. (13) towards ``d_s`` sharp
  directions.

  Args:
    sharp_ratio: ``r_s`` in ``d_s`` (see :func:`sharp_dim`), in (0, 1).
    method, steps: polar method (Polar Express, 6 steps by default).
    threshold_rate: controller rate (>1): ×rate / ×(2−rate) per step.
    threshold_cap: upper bound of ``l`` (reference: 1.0); ``None``: none.
    sharp_dim_rule: ``"reference"`` or ``"paper"`` rounding of ``d_s``.
    threshold_deadband: hold ``l`` while ``|‖P‖_F² − d_s| <`` this (0: the
      paper's eq. (13); see :func:`optax_lite.linalg.subspace.adapt_threshold`).
  """
  steps = polar_lib.check_method(method, steps)
  _checks.check_number('sharp_ratio', sharp_ratio, low=0.0, high=1.0,
                       low_open=True, high_open=True)
  _checks.check_number('threshold_rate', threshold_rate, low=1.0,
                       low_open=True, high=2.0, high_open=True)
  _checks.check_choice('sharp_dim_rule', sharp_dim_rule,
                       ('reference', 'paper'))
  _checks.check_positive('threshold_deadband', threshold_deadband,
                         allow_zero=True)

  def polar(x):
    if method == 'svd':
      return polar_lib.polar_svd(x)
    return polar_lib.newton_schulz(
        x, polar_lib.coefficients(method, steps),
        norm_factor=polar_lib._NORM_FACTOR[method], precision=precision)

  def init(view, param):
    b, rows, cols = view.matrix_shape
    del param
    return (jnp.full((b,), 1.0 / math.sqrt(min(rows, cols)), jnp.float32),)

  def directions(view, m_term, g, leaf_state, count, need_g):
    del count
    (ratio,) = leaf_state
    b, rows, cols = view.matrix_shape
    m = view.to_matrix(m_term)
    if need_g:
      # polar(M̃) and polar(G) in one batched call (same shapes).
      both = polar(jnp.concatenate([m, view.to_matrix(g)], axis=0))
      o, h = both[:b], both[b:]
    else:
      o, h = polar(m), None
    mf = m.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(mf * mf, axis=(-2, -1)))
    tau = ratio * norm + 1e-9
    # Sharp projector on the small side (see subspace.small_side_projector):
    # the fan-in side itself when fan_in <= fan_out, else the fan-out side,
    # carried to the fan-in side through O (T Tᵀ = O P Oᵀ).
    p = subspace.small_side_projector(m, o, tau.astype(m.dtype),
                                      method=method, steps=steps,
                                      precision=precision)
    d_s = sharp_dim(sharp_ratio, rows, cols, sharp_dim_rule)
    rank = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32)),
                            axis=(-2, -1)))
    new_ratio = subspace.adapt_threshold(
        ratio, rank, math.sqrt(d_s), threshold_rate, threshold_cap,
        threshold_deadband)
    # A zero momentum carries no geometry: keep the ratio unchanged.
    new_ratio = jnp.where(norm > 0, new_ratio, ratio)

    if rows <= cols:
      def sharp(x):
        return jnp.matmul(p, x.astype(p.dtype), precision=precision)
    else:
      ot = jnp.swapaxes(o, -1, -2)

      def sharp(x):
        x = x.astype(o.dtype)
        inner = jnp.matmul(p, jnp.matmul(ot, x, precision=precision),
                           precision=precision)
        return jnp.matmul(o, inner, precision=precision)

    def flat(x):  # (I − P) x on the fan-in side
      return x - sharp(x)

    def to_coords(w):
      return view.to_matrix(w).astype(o.dtype)

    return LeafDirections(o, h, flat, view.from_matrix, to_coords,
                          (new_ratio,))

  return Geometry(init, directions, needs_matrix=True, momentum_ema=False)


# --------------------------------------------------------------------------
# Diagonal (Adam) geometry: AdamW-LITE for embedding and norm leaves
# --------------------------------------------------------------------------


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
  _checks.check_number('sharp_ratio', sharp_ratio, low=0.0, high=1.0,
                       low_open=True, high_open=True)
  _checks.check_number('smooth_ratio', smooth_ratio, low=0.0, high=1.0)
  _checks.check_number('threshold_rate', threshold_rate, low=1.0,
                       low_open=True, high=2.0, high_open=True)
  smooth = min(1.0 - sharp_ratio, smooth_ratio)

  def init(view, param):
    del view
    return (jnp.zeros(param.shape, jnp.float32), jnp.ones([], jnp.float32),
            jnp.full([], 0.5, jnp.float32))

  def directions(view, m_term, g, leaf_state, count, need_g):
    del view
    nu, l_s, l_m = leaf_state
    gf = g.astype(jnp.float32)
    nu = b2 * nu + (1 - b2) * gf * gf
    t = count.astype(jnp.float32)
    denom = jnp.sqrt(nu / (1 - b2 ** t)) + eps
    d_m = (m_term.astype(jnp.float32) / (1 - b1 ** t)) / denom
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
                          lambda w: w.astype(jnp.float32), (nu, new_s, new_m))

  return Geometry(init, directions, needs_matrix=False, momentum_ema=True)


# --------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------


def lite_flat_boost(geometry: Geometry, *, chi: optax.ScalarOrSchedule = 2.0,
                    beta1: float = 0.0, beta2: optax.ScalarOrSchedule = 0.0,
                    momentum: float = 0.95, nesterov: bool = True,
                    mu_dtype=None, dims: _tree.DimsSpec = None,
                    scaling: str = 'none', rms: float = 0.2,
                    flat_weight_decay: optax.ScalarOrSchedule = 0.0
                    ) -> optax.GradientTransformation:
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

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LiteState`.
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
  _checks.check_number('flat_weight_decay', flat_weight_decay, low=0.0,
                       allow_schedule=True)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  ema = geometry.momentum_ema
  need_g = not (_checks.is_static_number(beta1) and float(beta1) == 0.0 and
                _checks.is_static_number(beta2) and float(beta2) == 0.0)
  use_wd = not (_checks.is_static_number(flat_weight_decay) and
                float(flat_weight_decay) == 0.0)
  leaf_dims = dims if geometry.needs_matrix else _tree._DEFAULT

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype),
                      params)
    per_leaf = _tree.map_leaves(lambda v, p: geometry.init(v, p), params,
                                dims=leaf_dims, name='params')
    flat = jax.tree.structure(params).flatten_up_to(per_leaf)
    n = len(flat[0]) if flat else 0
    geom = _tree.unzip(per_leaf, n, params) if n else ()
    return LiteState(jnp.zeros([], jnp.int32), mu, geom)

  def update_fn(updates, state, params=None):
    if use_wd and params is None:
      raise ValueError('params: lite_flat_boost with flat_weight_decay > 0 '
                       'needs params in update().')
    count = optax.safe_increment(state.count)
    chi_t = _checks.resolve(chi, count)
    b2_t = _checks.resolve(beta2, count)
    wd_t = _checks.resolve(flat_weight_decay, count)
    params_tree = params if use_wd else jax.tree.map(lambda _: None, updates)

    def leaf(view, g, m, p, *geom_leaf):
      _checks.check_float_leaf('updates', g)
      ct = jnp.promote_types(g.dtype, jnp.float32)
      gf, mf = g.astype(ct), m.astype(ct)
      m_new = momentum * mf + ((1 - momentum) if ema else 1.0) * gf
      if nesterov:
        m_term = momentum * m_new + ((1 - momentum) if ema else 1.0) * gf
      else:
        m_term = m_new
      out = geometry.directions(view, m_term, gf, tuple(geom_leaf), count,
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

    res = _tree.map_leaves(leaf, updates, state.mu, params_tree,
                           *state.geometry, dims=leaf_dims)
    parts = _tree.unzip(res, 2 + len(state.geometry), updates)
    return parts[0], LiteState(count, parts[1], tuple(parts[2:]))

  return optax.GradientTransformation(init_fn, update_fn)
