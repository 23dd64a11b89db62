"""SOAP's eigenbases: their first computation, the QR power-step refresh,
and the per-matrix :class:`SoapBasis` API shared with SOAP-LITE.

See :mod:`optax_lite.transforms.kron_precondition` for the math.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_lite.linalg import eigenbasis as eig_lib

from optax_lite.transforms.kron_common import (
    _HIGHEST, _energies, _factor, _mm, _t, has_side, rotate, update_factors)
from optax_lite.transforms.kron_roundoff import (
    NULL_THRESHOLD, _above_floor, _mark_null, _no_energy, energetic,
    roundoff_level, roundoff_weight, shared_moment)


def soap_init_bases(stats_l: jax.Array, stats_r: jax.Array,
                    g: jax.Array | None = None, *,
                    null_threshold=NULL_THRESHOLD, precision=_HIGHEST
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Exact eigenbases (descending eigenvalues) of ``L`` and ``R`` by eigh.

  Returns ``(q_l, q_r, lam_l, lam_r)``: bases and their eigenvalues
  (``(B, m)``, ``(B, n)``; ``(B, 1)`` zeros on identity sides), exactly 0
  on the null columns (see :func:`energetic`). Null columns: with ``g``
  (``(B, m, n)``, the only gradient in ``L`` and ``R``, as at SOAP's first
  step) those whose rotated gradient is round-off in amplitude,
  ``‖(Q_lᵀ G Q_r)[i, :]‖ <= τ‖G‖_F`` (rows; columns likewise); without it,
  those whose eigenvalue is at the Gram round-off, ``λ <= τ·λ_max``.
  ``τ``: :func:`roundoff_level` of ``null_threshold``.
  """
  out = []
  for s in (stats_l, stats_r):
    if has_side(s):
      q, lam = eig_lib.eigenbasis_init(s)
      out.append([q.astype(s.dtype), lam.astype(s.dtype)])
    else:
      out.append([s, _no_energy(s)])
  (q_l, lam_l), (q_r, lam_r) = out
  tau = roundoff_level(null_threshold, stats_l.dtype)
  if g is None:
    keep_l, keep_r = _above_floor(lam_l, tau), _above_floor(lam_r, tau)
  else:
    g_rot = jnp.square(rotate(g.astype(q_l.dtype), q_l, q_r,
                              precision=precision))
    e_l, e_r = jnp.sum(g_rot, axis=-1), jnp.sum(g_rot, axis=-2)
    total = jnp.sum(e_l, axis=-1, keepdims=True)
    floor = tau * tau * total
    keep_l = (e_l > floor) | (total <= 0) | (tau <= 0)
    keep_r = (e_r > floor) | (total <= 0) | (tau <= 0)
  if has_side(stats_l):
    lam_l = _mark_null(lam_l, keep_l)
  if has_side(stats_r):
    lam_r = _mark_null(lam_r, keep_r)
  return q_l, q_r, lam_l, lam_r


def _transport(q_old: jax.Array, q_new: jax.Array, keep_old: jax.Array
               ) -> jax.Array:
  """``(B, k_new, k_old)`` weights ``(q_newⱼᵀ q_oldᵢ)²``, old null columns 0.

  Carries a second moment that is diagonal in the old basis over to the
  new one (exact when it is diagonal in both).
  """
  overlap = jnp.square(_mm(_t(q_new), q_old, None))
  return overlap * keep_old[..., None, :]


def _refresh_side(stats, q, lam, threshold, nu, axis):
  """One side's refresh: ``(q, lam, nu)``, the rotated second moment ``nu``
  carried over to the new basis along ``axis``."""
  q_qr, perm = eig_lib.eigenbasis_refresh(stats, q)
  keep_old = energetic(lam, threshold)
  redo = ~jnp.all(keep_old, axis=-1)  # (B,): a null column to re-derive
  lam_qr = eig_lib.rayleigh_eigenvalues(stats, q_qr)
  if axis == -2:
    permuted = jnp.take_along_axis(nu, perm[..., :, None], axis=-2)
  else:
    permuted = jnp.take_along_axis(nu, perm[..., None, :], axis=-1)

  def rederive():
    # ``eigh`` and the carried ``V`` for the matrices with a null column.
    q_e, lam_e = eig_lib.eigenbasis_init(stats)
    w = _transport(q.astype(q_e.dtype), q_e, keep_old).astype(nu.dtype)
    carried = (_mm(w, nu, None) if axis == -2 else _mm(nu, _t(w), None))
    return (jnp.where(redo[..., None, None], q_e, q_qr),
            jnp.where(redo[..., None], lam_e, lam_qr),
            jnp.where(redo[..., None, None], carried, permuted))

  # ``eigh`` runs only at a refresh that has a null column to re-derive. The
  # predicate reads the stored energies (state), not fresh round-off; with
  # ``distribute=`` each owner decides alone, and without it every refresh
  # is a conditional anyway (docs/multi_device.md: collectives in control
  # flow with several CPU processes).
  q_new, lam_new, nu = jax.lax.cond(jnp.any(redo), rederive,
                                    lambda: (q_qr, lam_qr, permuted))
  return q_new.astype(q.dtype), lam_new.astype(lam.dtype), nu


def soap_refresh_bases(stats_l: jax.Array, stats_r: jax.Array,
                       q_l: jax.Array, q_r: jax.Array, nu: jax.Array,
                       lam_l: jax.Array | None = None,
                       lam_r: jax.Array | None = None,
                       null_threshold: float = 0.0
                       ) -> tuple[jax.Array, ...]:
  """One QR power step per side; ``V`` is permuted with the sorted columns.

  Returns ``(q_l, q_r, nu, lam_l, lam_r)``; see
  :func:`optax_lite.linalg.eigenbasis.eigenbasis_refresh`. ``nu`` is
  ``(B, m, n)``; ``lam_*`` are the energies of the new columns (Rayleigh
  quotients ``diag(Qᵀ L Q)``; ``(B, 1)`` zeros on identity sides).

  A basis that still has null columns (``lam`` exactly 0, given ``lam_l`` /
  ``lam_r``) is recomputed by ``eigh`` instead: its null columns
  are an arbitrary basis chosen by rounding, and a power step from them
  would carry that arbitrariness into the directions that have gained
  energy since. ``V`` is then carried over by the squared overlaps of the
  old (energetic) and new columns, ``V ← W V`` with ``W = (Q_newᵀ Q_old)²``
  (the null columns' ``V`` is dropped). The new columns' energies are 0
  where neither ``L`` (``λ <= τ·λ_max``) nor the carried ``V`` (row
  energy ``<= τ²·Σ V``) shows any (``τ``: :func:`roundoff_level` of
  ``null_threshold``; ``0``, the default here, marks none).
  """
  out_lam = [_no_energy(stats_l), _no_energy(stats_r)]
  if has_side(q_l):
    lam = _no_energy(stats_l) if lam_l is None else lam_l
    q_l, out_lam[0], nu = _refresh_side(stats_l, q_l, lam, null_threshold,
                                        nu, -2)
  if has_side(q_r):
    lam = _no_energy(stats_r) if lam_r is None else lam_r
    q_r, out_lam[1], nu = _refresh_side(stats_r, q_r, lam, null_threshold,
                                        nu, -1)
  # A column is null when neither the Gram factor (round-off ~ε·λ_max,
  # linear in ε) nor the rotated second moment carried over (amplitudes:
  # round-off ~ε·‖G‖, so energies ~ε²·‖G‖²) shows energy in it.
  tau = roundoff_level(null_threshold, nu.dtype)
  floor = tau * tau * jnp.sum(nu, axis=(-2, -1))[..., None]
  for i, (q, axis) in enumerate(((q_l, -1), (q_r, -2))):
    if has_side(q):
      moment = jnp.sum(nu, axis=axis).astype(out_lam[i].dtype)
      out_lam[i] = _mark_null(out_lam[i], _above_floor(out_lam[i], tau)
                              | (moment > floor.astype(moment.dtype)))
  return q_l, q_r, nu, out_lam[0], out_lam[1]


class SoapBasis(NamedTuple):
  """SOAP's basis upkeep for one leaf in matrix form (see :class:`SoapState`).

  ``stats_*``: ``L``, ``R``; ``q_*``: their eigenbases; ``lam_*``: each
  column's energy when the basis was computed. Identity sides hold
  ``(B, 1)`` placeholders (:func:`optax_lite.transforms._tree
  .identity_placeholder`).
  """
  stats_l: jax.Array
  stats_r: jax.Array
  q_l: jax.Array
  q_r: jax.Array
  lam_l: jax.Array
  lam_r: jax.Array


def soap_basis_init(batch: int, m: int, n: int, *, left: bool, right: bool,
                    dtype=jnp.float32) -> SoapBasis:
  """Zero statistics and identity bases for a ``(batch, m, n)`` leaf.

  ``left`` / ``right``: whether each side is preconditioned (else the
  identity, stored as a placeholder).
  """
  return SoapBasis(_factor(batch, m, left, dtype), _factor(batch, n, right,
                                                           dtype),
                   _factor(batch, m, left, dtype, eye=True),
                   _factor(batch, n, right, dtype, eye=True),
                   _energies(batch, m, left, dtype),
                   _energies(batch, n, right, dtype))


def soap_basis_sides(basis: SoapBasis) -> tuple[bool, bool]:
  """Whether each side is preconditioned (static)."""
  return has_side(basis.q_l), has_side(basis.q_r)


def soap_step_index(count: jax.Array, basis: SoapBasis,
                    skip_first_update: bool = True
                    ) -> tuple[jax.Array, jax.Array | None]:
  """``(t, first)``: Adam's step index and the statistics-only flag.

  With ``skip_first_update`` on a leaf with a preconditioned side, call 1
  only builds the statistics (``first`` is then the traced ``count == 1``)
  and ``t = count − 1`` counts the real steps; otherwise ``t = count`` and
  ``first`` is None. ``t`` is an int32 scalar ``>= 0``.
  """
  if skip_first_update and any(soap_basis_sides(basis)):
    return count - 1, count == 1
  return count, None


def soap_basis_update(basis: SoapBasis, g: jax.Array, count: jax.Array, *,
                      shampoo_beta, null_threshold=NULL_THRESHOLD,
                      precision=_HIGHEST) -> SoapBasis:
  """Accumulates ``L``, ``R`` from ``g`` (``(B, m, n)``); ``eigh`` at call 1
  (null columns: :func:`soap_init_bases` with ``g``).

  Returns the basis to use for this step (in the computing dtype, float32
  or wider); :func:`soap_basis_refresh` runs after the step.
  """
  sdt = jnp.promote_types(basis.stats_l.dtype, jnp.float32)
  b = SoapBasis(*(x.astype(sdt) for x in basis))
  stats_l, stats_r = update_factors(b.stats_l, b.stats_r, g.astype(sdt),
                                    shampoo_beta, precision=precision)
  q_l, q_r, lam_l, lam_r = b.q_l, b.q_r, b.lam_l, b.lam_r
  if any(soap_basis_sides(basis)):
    q_l, q_r, lam_l, lam_r = jax.lax.cond(
        count == 1,
        lambda: soap_init_bases(stats_l, stats_r, g.astype(sdt),
                                null_threshold=null_threshold,
                                precision=precision),
        lambda: (q_l, q_r, lam_l, lam_r))
  return SoapBasis(stats_l, stats_r, q_l, q_r, lam_l, lam_r)


def soap_basis_refresh(basis: SoapBasis, nu: jax.Array, t: jax.Array, *,
                       precondition_frequency, null_threshold=NULL_THRESHOLD
                       ) -> tuple[SoapBasis, jax.Array]:
  """After real step ``t``: one QR power step when ``t mod k = 0``.

  ``nu`` (``(B, m, n)``, any statistic held in the rotated basis) is
  carried over to the new basis; see :func:`soap_refresh_bases`.
  """
  if not any(soap_basis_sides(basis)):
    return basis, nu
  q_l, q_r, nu, lam_l, lam_r = jax.lax.cond(
      (t > 0) & (t % precondition_frequency == 0),
      lambda: soap_refresh_bases(basis.stats_l, basis.stats_r, basis.q_l,
                                 basis.q_r, nu, basis.lam_l, basis.lam_r,
                                 null_threshold),
      lambda: (basis.q_l, basis.q_r, nu, basis.lam_l, basis.lam_r))
  return basis._replace(q_l=q_l, q_r=q_r, lam_l=lam_l, lam_r=lam_r), nu


def _side_energies(basis: SoapBasis):
  left, right = soap_basis_sides(basis)
  return (basis.lam_l if left else None), (basis.lam_r if right else None)


def soap_shared_moment(basis: SoapBasis, nu_hat: jax.Array,
                       null_threshold=NULL_THRESHOLD) -> jax.Array:
  """``V̂`` with each null cluster sharing its mean
  (``kron_roundoff.shared_moment``)."""
  return shared_moment(nu_hat, *_side_energies(basis), null_threshold)


def soap_keep(basis: SoapBasis, null_threshold, nu_hat: jax.Array
              ) -> jax.Array:
  """Weights in ``[0, 1]`` of the rotated basis's coordinates from ``nu_hat``
  (``V̂``, null clusters shared: :func:`soap_shared_moment`): the round-off
  weight (:func:`roundoff_weight`; 0 on round-off, in a null cluster too
  until a gradient reaches it)."""
  return roundoff_weight(nu_hat, null_threshold, *_side_energies(basis)
                         ).astype(basis.lam_l.dtype)
