r"""LITE geometries of the Kronecker and diagonal-row preconditioners.

Each function returns a :class:`optax_lite.transforms.lite.Geometry` for
:func:`optax_lite.lite_flat_boost`; see that module for the combination rule
``u = D_m + β₁D_g + (β₂−β₁)Q D_g;  u ← u + (χ−1)Q u``.

* :func:`soap_geometry` – SOAP-LITE (Zhu et al. 2026, §5.2 and Appendix B.2).
  SOAP's preconditioner is ``F = (Q_r⊗Q_l) diag(V)^{1/2} (Q_r⊗Q_l)ᵀ``: its
  eigenvectors are the rotated coordinates and its eigenvalues are ``V``. The
  sharp directions are the rotated coordinates with large ``V``, selected by
  the soft mask of eq. (16) with the adaptive thresholds of eq. (17–18)
  (``d_s = r_s·mn``, ``d_smooth = 0.1·mn`` per matrix). In the rotated basis

  .. math::
     U = Q_l\big(V^{-1/2}⊙(β_1P + χβ_2(1-P))⊙G_{rot}
         + V^{-1/2}⊙(P + χ(1-P))⊙M_{rot}\big)Q_r^\top .

  The statistics, bases and ``V`` are exactly SOAP's, from its public
  pieces (:func:`~optax_lite.transforms.kron_precondition.soap_basis_update`,
  ``soap_second_moment``, ``soap_basis_refresh``), so with ``χ = 1, β = 0``
  this is SOAP.

* :func:`row_norm_geometry` – RMNP-LITE, beyond the paper. RMNP's
  preconditioner is ``F = diag(V Vᵀ)^{1/2} ⊗ I`` (one scale per output unit,
  PyTorch rows = Flax columns): its eigenvalues are the squared row norms
  of the momentum, its eigenvectors the output units. Sharp = the output
  units whose momentum has the largest norm, by the same soft mask over
  ``‖V_j‖²`` (``d_s = r_s·fan_out`` units); ``D_m = RN(M̃)``,
  ``D_g = RN(G)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_lite import _checks
from optax_lite.linalg import subspace
from optax_lite.transforms.lite import (Geometry, LeafDirections,
                                        check_mask_args, smooth_fraction)
from optax_lite.transforms.kron_precondition import (
    NULL_THRESHOLD, SoapBasis, check_soap_args, rotate, rotate_back,
    soap_basis_init, soap_basis_refresh, soap_basis_update, soap_keep,
    soap_second_moment, soap_shared_moment, soap_step_index)
from optax_lite.transforms.row_normalize import AXES, normalize_matrix



def _mask_state(batch):
  return (jnp.ones((batch,), jnp.float32), jnp.full((batch,), 0.5,
                                                    jnp.float32))


class SoapGeometryState(NamedTuple):
  """Per-leaf state of :func:`soap_geometry` (matrix form ``(B, ·, ·)``).

  ``nu``: SOAP's second moment ``V`` in the rotated basis; ``stats_*``,
  ``q_*``, ``lam_*``: SOAP's basis upkeep
  (:class:`~optax_lite.transforms.kron_precondition.SoapBasis`);
  ``l_sharp``, ``l_smooth``: the mask's thresholds (eq. 16–18).
  """
  nu: jax.Array
  stats_l: jax.Array
  stats_r: jax.Array
  q_l: jax.Array
  q_r: jax.Array
  lam_l: jax.Array
  lam_r: jax.Array
  l_sharp: jax.Array
  l_smooth: jax.Array


def soap_geometry(*, b1: float = 0.95, b2: float = 0.99,
                  shampoo_beta: float = 0.95, eps: float = 1e-8,
                  precondition_frequency: int = 10,
                  max_precond_dim: int = 4096, skip_first_update: bool = True,
                  precond_dtype='float32', sharp_ratio: float = 0.2,
                  smooth_ratio: float = 0.1, threshold_rate: float = 1.05,
                  null_threshold: float | None = NULL_THRESHOLD,
                  precision=jax.lax.Precision.HIGHEST) -> Geometry:
  """SOAP's eigenbasis with the soft sharp mask on ``V`` (SOAP-LITE).

  Arguments up to ``precond_dtype`` are SOAP's (see
  :func:`optax_lite.transforms.kron_precondition.scale_by_soap`); ``b1`` is
  the first-moment decay used for bias correction (the momentum itself is
  owned by ``lite_flat_boost``, which must use ``momentum=b1``). The mask:
  ``sharp_ratio`` = ``r_s`` (``d_s = r_s·mn``), ``smooth_ratio`` (``d_smooth
  = min(1 − r_s, smooth)·mn``), ``threshold_rate`` of eq. (17–18).
  ``null_threshold``: as SOAP's; coordinates without gradient energy get a
  zero ``D_m`` and ``D_g`` and count as ``V̂ = 0`` in the mask.
  """
  precondition_frequency, max_precond_dim = check_soap_args(
      b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim)
  check_mask_args(sharp_ratio, smooth_ratio, threshold_rate)
  _checks.check_flag('skip_first_update', skip_first_update)
  smooth = smooth_fraction(sharp_ratio, smooth_ratio)
  pdt = _checks.dtype_argument('precond_dtype', precond_dtype)

  def init(view, param):
    del param
    b, m, n = view.matrix_shape
    basis = soap_basis_init(b, m, n, left=m <= max_precond_dim,
                            right=n <= max_precond_dim, dtype=pdt)
    return SoapGeometryState(jnp.zeros((b, m, n), pdt), *basis,
                             *_mask_state(b))

  def directions(view, m_term, g, leaf_state, count, need_g):
    st = SoapGeometryState(*leaf_state)
    basis = soap_basis_update(SoapBasis(*st[1:7]), view.to_matrix(g), count,
                              shampoo_beta=shampoo_beta,
                              null_threshold=null_threshold,
                              precision=precision)
    ct = basis.stats_l.dtype
    t, first = soap_step_index(count, basis, skip_first_update)
    g_rot = rotate(view.to_matrix(g).astype(ct), basis.q_l, basis.q_r,
                   precision=precision)
    nu, v_hat = soap_second_moment(st.nu.astype(ct), g_rot, t, first, b2=b2)
    v_hat = soap_shared_moment(basis, v_hat, null_threshold)
    # Weights in [0, 1]: 0 on round-off coordinates.
    keep = soap_keep(basis, null_threshold, v_hat)
    if first is not None:  # zero update on the statistics-only step
      keep = jnp.where(first, 0.0, keep)
    tf = jnp.maximum(t, 1).astype(ct)
    num = rotate(view.to_matrix(m_term).astype(ct) / (1.0 - b1 ** tf),
                 basis.q_l, basis.q_r, precision=precision)
    den = jnp.sqrt(v_hat) + eps
    # 0·x where masked: a non-finite gradient stays visible.
    d_m = jnp.where(keep > 0, keep * (num / den), 0.0 * num)
    d_g = (jnp.where(keep > 0, keep * (g_rot / den), 0.0 * g_rot)
           if need_g else None)
    v_hat = keep * v_hat  # SOAP's eigenvalues, for the mask
    mn = view.rows * view.cols
    l_s, l_m = st.l_sharp, st.l_smooth
    s = subspace.soft_mask(v_hat, l_s, l_m, axes=(-2, -1))
    new_s, new_m = subspace.adapt_mask_thresholds(
        v_hat, l_s, l_m, sharp_ratio * mn, smooth * mn, axes=(-2, -1),
        rate=threshold_rate)
    if first is not None:  # no statistics yet: keep the thresholds
      new_s = jnp.where(first, l_s, new_s)
      new_m = jnp.where(first, l_m, new_m)
    new_basis, nu = soap_basis_refresh(
        basis, nu, t, precondition_frequency=precondition_frequency,
        null_threshold=null_threshold)

    def flat(x):
      return (1.0 - s) * x

    def finish(x):
      return view.from_matrix(rotate_back(x, basis.q_l, basis.q_r,
                                          precision=precision))

    def to_coords(w):
      w = rotate(view.to_matrix(w).astype(ct), basis.q_l, basis.q_r,
                 precision=precision)
      # No flat weight decay on the statistics-only first step either.
      return w if first is None else jnp.where(first, 0.0, w)

    state = SoapGeometryState(
        nu.astype(st.nu.dtype),
        *(x.astype(y.dtype) for x, y in zip(new_basis, st[1:7])),
        new_s, new_m)
    return LeafDirections(d_m, d_g, flat, finish, to_coords, state,
                          keep_momentum=first)

  return Geometry(init, directions, needs_matrix=True, momentum_ema=True,
                  state_type=SoapGeometryState, wait_state=True)


class RowNormGeometryState(NamedTuple):
  """Per-leaf state of :func:`row_norm_geometry` (thresholds of eq. 16–18)."""
  l_sharp: jax.Array   # (batch,): sharp threshold factor l_s
  l_smooth: jax.Array  # (batch,): smooth threshold factor


def row_norm_geometry(*, axis: str = 'input', eps: float = 1e-12,
                      sharp_ratio: float = 0.1, smooth_ratio: float = 0.1,
                      threshold_rate: float = 1.05) -> Geometry:
  """RMNP's diagonal row geometry with a soft mask over output units.

  ``axis`` as in :func:`optax_lite.row_normalize` (``"input"``: one unit
  vector per output unit). The per-unit "eigenvalue" is the squared norm of
  the momentum's slice; the mask is eq. (16) over those, with
  ``d_s = r_s·units`` (at least one unit).
  """
  _checks.check_choice('axis', axis, AXES)
  _checks.check_positive('eps', eps)
  check_mask_args(sharp_ratio, smooth_ratio, threshold_rate)
  smooth = smooth_fraction(sharp_ratio, smooth_ratio)
  red = -2 if axis == 'input' else -1

  def init(view, param):
    del param
    return RowNormGeometryState(*_mask_state(view.matrix_shape[0]))

  def directions(view, m_term, g, leaf_state, count, need_g):
    del count
    l_s, l_m = leaf_state
    m = view.to_matrix(m_term)
    d_m = normalize_matrix(m, axis, eps)
    d_g = normalize_matrix(view.to_matrix(g), axis, eps) if need_g else None
    mf = m.astype(jnp.float32)
    unit_sq = jnp.sum(mf * mf, axis=red, keepdims=True)  # one per unit
    units = unit_sq.shape[-1] if axis == 'input' else unit_sq.shape[-2]
    s = subspace.soft_mask(unit_sq, l_s, l_m, axes=(-2, -1))
    new_s, new_m = subspace.adapt_mask_thresholds(
        unit_sq, l_s, l_m, jnp.maximum(1.0, sharp_ratio * units),
        smooth * units,
        axes=(-2, -1), rate=threshold_rate)

    def flat(x):
      return (1.0 - s) * x

    def to_coords(w):
      return view.to_matrix(w).astype(jnp.float32)

    return LeafDirections(d_m, d_g, flat, view.from_matrix, to_coords,
                          RowNormGeometryState(new_s, new_m))

  return Geometry(init, directions, needs_matrix=True, momentum_ema=False,
                  state_type=RowNormGeometryState)
