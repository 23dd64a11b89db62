r"""SOAP's and Shampoo's round-off guard: which rotated coordinates and
eigen-directions carry signal.

In float32 a Kronecker factor's eigenvalues below about ``ε·λ_max`` and a
rotated coordinate's amplitude below about ``ε·‖G‖_F`` are round-off, and
Adam's ratio (or an inverse root) would turn them into full-size steps.
Amplitudes are compared with ``τ = ROUNDOFF_ULPS·ε`` of the computing dtype
(energies with ``τ²``); coordinates near the bound get an update weight
that ramps to 1 instead of a hard switch (:func:`roundoff_weight`). The
columns found null when a basis was computed form one cluster whose basis
is arbitrary: its coordinates share one second moment
(:func:`shared_moment`) and count as one in the neighbour leak. Pure
functions on ``(B, m, n)`` stacks, shared by SOAP, Shampoo and
SOAP-LITE.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_lite.transforms.kron_common import _HIGHEST

# ``null_threshold`` default: ``None`` is ROUNDOFF_ULPS·ε of the computing
# dtype (see :func:`roundoff_level` and scale_by_soap's ``null_threshold``).
NULL_THRESHOLD = None
ROUNDOFF_ULPS = 16
# Neighbour leak of roundoff_coordinates: band and cap of θ.
LEAK_BAND = 4
LEAK_CAP = 0.1
# roundoff_weight: a rotated coordinate's update weight rises linearly from
# 0 at the round-off bound δ to 1 at ROUNDOFF_RAMP·δ.
ROUNDOFF_RAMP = 512.0


def roundoff_level(null_threshold, dtype) -> Any:
  """``τ``, the relative round-off level: ``null_threshold`` or, for
  ``None``, ``ROUNDOFF_ULPS · ε`` of ``dtype`` widened to float32 (the
  computing dtype): 1.9e-6 in float32, 3.6e-15 in float64."""
  if null_threshold is None:
    wide = jnp.promote_types(dtype, jnp.float32)
    return ROUNDOFF_ULPS * float(jnp.finfo(wide).eps)
  return null_threshold


def _above_floor(lam: jax.Array, tau) -> jax.Array:
  """``lam > τ·max(lam)`` per column (a Gram eigenvalue's round-off is
  ``~ε·λ_max``); everything when ``τ <= 0`` or the factor has no energy."""
  top = jnp.max(lam, axis=-1, keepdims=True)
  return (lam > tau * top) | (top <= 0) | (tau <= 0)


def _mark_null(lam: jax.Array, keep: jax.Array) -> jax.Array:
  """The stored energies: ``lam`` where kept, exactly 0 on null columns."""
  return jnp.where(keep, jnp.maximum(lam, jnp.finfo(lam.dtype).tiny), 0.0)


def _no_energy(stats: jax.Array) -> jax.Array:
  """Energies of an identity side: the ``(B, 1)`` placeholder."""
  return jnp.zeros(stats.shape[:1] + (1,), stats.dtype)


def energetic(lam: jax.Array, threshold=NULL_THRESHOLD) -> jax.Array:
  """Stored column energies ``lam`` (``(B, k)``) → the non-null columns.

  The null columns were set to exactly 0 when the basis was computed
  (:func:`soap_init_bases`, :func:`soap_refresh_bases`). True everywhere
  when ``threshold <= 0`` (the rule off) or when the factor has no energy
  at all (a zero factor: its basis is the identity, as the reference's).
  """
  tau = roundoff_level(threshold, lam.dtype)
  top = jnp.max(lam, axis=-1, keepdims=True)
  return (lam > 0) | (top <= 0) | (tau <= 0)


def _masked_sum(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """``Σ`` of ``x`` over the ``mask``ed columns along ``axis`` (keeping the
  axis), as a product with the mask: a masked sum (a reduction) split
  XLA:CPU's fusion of :func:`_neighbour_leak`'s neighbour slices into a
  buffer per slice (5.96 -> 9.59 d_ff² floats on a 1024 × 2816 SOAP
  leaf)."""
  m = mask.astype(x.dtype)
  if axis == -1:
    return jnp.einsum('...mn,...n->...m', x, m, precision=_HIGHEST)[
        ..., :, None]
  return jnp.einsum('...mn,...m->...n', x, m, precision=_HIGHEST)[
      ..., None, :]


def _neighbour_leak(amp: jax.Array, lam: jax.Array, tau, axis: int
                    ) -> jax.Array:
  """How much of its neighbours a basis vector computed with round-off
  ``τ`` takes in, along ``axis`` (see :func:`roundoff_coordinates`)::

    sqrt(Σ_d (θᵢ,ᵢ₊d · amp[i+d])² + θ₀ᵢ² · Σ_{k null} amp[k]²)

  over the ``LEAK_BAND`` nearest non-null columns on each side (columns
  are sorted by energy), with ``θ = τ·λ_max / |λᵢ − λᵢ₊d|`` where at most
  ``LEAK_CAP`` (0 beyond), and the null columns (``lam`` exactly 0) as
  one cluster, ``θ₀ᵢ = τ·λ_max / λᵢ``. A root sum of squares, not a sum:
  the leak is ``Σₖ Eᵢₖ amp[k] / (λᵢ − λₖ)`` with a round-off row ``‖Eᵢ‖
  <= τ·λ_max``, bounded by Cauchy–Schwarz; so it does not change when the
  basis of a degenerate cluster turns, and the null cluster's basis is
  arbitrary (``eigh`` on another CPU, or batched, picks another)."""
  k = lam.shape[-1]
  band = min(LEAK_BAND, k - 1)
  if band < 1:
    return jnp.zeros_like(amp)
  top = jnp.max(lam, axis=-1, keepdims=True)
  tiny = jnp.finfo(lam.dtype).tiny
  null = lam <= 0
  idx = jnp.arange(k)

  def expand(v):  # a per-column (B, k) quantity along ``axis`` of amp
    return (v[..., :, None] if axis == -2 else v[..., None, :]).astype(
        amp.dtype)

  energy = amp * amp
  # The null cluster: θ₀ times the RSS of its coordinates, so that any
  # basis of the cluster gives the same leak.
  theta0 = tau * top / jnp.maximum(lam, tiny)
  theta0 = jnp.where(~null & (theta0 <= LEAK_CAP), theta0, 0.0)
  out = expand(theta0 * theta0) * _masked_sum(energy, null, axis)
  # Neighbours are slices of one zero-padded copy (rolls would each be a
  # buffer of amp's size; slices of one pad fuse into the sum).
  pad = [(0, 0)] * amp.ndim
  pad[axis] = (band, band)
  energy_pad = jnp.pad(energy, pad)
  lam_pad = jnp.pad(lam, [(0, 0)] * (lam.ndim - 1) + [(band, band)])
  for d in range(1, band + 1):
    for step in (d, -d):
      near = jax.lax.slice_in_dim(lam_pad, band + step, band + step + k,
                                  axis=-1)
      gap = jnp.abs(lam - near)
      theta = tau * top / jnp.maximum(gap, tiny)
      # θ > c: the pair is not resolved (a degenerate cluster, whose basis
      # is arbitrary but whose coordinates carry signal): no leak counted.
      # A null coordinate's own amplitude is its cluster's (shared_moment):
      # none of its neighbours' leak, which would depend on its index.
      theta = jnp.where((idx + step >= 0) & (idx + step < k) & (near > 0)
                        & ~null & (theta <= LEAK_CAP), theta, 0.0)
      shifted = jax.lax.slice_in_dim(energy_pad, band + step,
                                     band + step + k, axis=axis % amp.ndim)
      out = out + expand(theta * theta) * shifted
  return jnp.sqrt(out)


def roundoff_coordinates(nu_hat: jax.Array, threshold=NULL_THRESHOLD,
                         lam_l: jax.Array | None = None,
                         lam_r: jax.Array | None = None) -> jax.Array:
  """``(B, m, n)`` booleans: False where a rotated coordinate is round-off.

  ``A = sqrt(V̂)`` is each coordinate's RMS amplitude and
  ``sqrt(Σᵢⱼ V̂ᵢⱼ)`` the RMS of ``‖G‖_F`` (the rotation is orthogonal).
  Coordinate ``(i, j)`` is round-off when ``Aᵢⱼ <= δᵢⱼ`` with::

    δᵢⱼ = τ·sqrt(Σ V̂) + sqrt(Σₖ (θˡᵢₖ Aₖⱼ)²) + sqrt(Σₖ (θʳⱼₖ Aᵢₖ)²),
    θᵢₖ = τ·λ_max / |λᵢ − λₖ|   (0 where above c)

  The first term is the rotation's own round-off (``~ε‖G‖`` per entry);
  the others are what a basis vector computed with relative round-off
  ``τ`` takes in from its neighbours (first-order perturbation:
  ``δqᵢ ≈ Σₖ Eᵢₖ/(λᵢ−λₖ) qₖ`` with ``‖Eᵢ‖ <= τλ_max``, bounded by
  Cauchy–Schwarz), over the ``LEAK_BAND`` nearest non-null columns on
  each side and the null columns as one cluster (see
  :func:`_neighbour_leak`): a bound that no turn of a degenerate
  cluster's basis changes. A pair with ``θ > c = LEAK_CAP`` is not
  resolved by the arithmetic at all (a degenerate cluster: its basis is
  arbitrary, but its coordinates carry the gradient's energy in that
  subspace), so it counts no leak: the guard never freezes a cluster.
  ``lam_*``: the column energies (``None``: identity side). All True when
  ``τ <= 0``.
  """
  return roundoff_weight(nu_hat, threshold, lam_l, lam_r) > 0


def _roundoff_bound(nu_hat, tau, lam_l, lam_r):
  """``(A, δ, δ₀)``: the amplitudes, round-off bounds (see
  :func:`roundoff_coordinates`) and their first term ``δ₀ = τ·sqrt(Σ V̂)``
  (per matrix)."""
  amp = jnp.sqrt(nu_hat)
  floor = tau * jnp.sqrt(jnp.sum(nu_hat, axis=(-2, -1), keepdims=True))
  delta = floor
  if lam_l is not None:
    delta = delta + _neighbour_leak(amp, lam_l.astype(amp.dtype), tau, -2)
  if lam_r is not None:
    delta = delta + _neighbour_leak(amp, lam_r.astype(amp.dtype), tau, -1)
  return amp, delta, floor


def roundoff_weight(nu_hat: jax.Array, threshold=NULL_THRESHOLD,
                    lam_l: jax.Array | None = None,
                    lam_r: jax.Array | None = None) -> jax.Array:
  """``(B, m, n)`` update weights in ``[0, 1]``: 0 on round-off.

  With ``A``, ``δ`` of :func:`roundoff_coordinates`, ``δ₀ = τ·sqrt(Σ V̂)``
  (``τ`` times the RMS of ``‖G‖_F``) and ``ρ = ROUNDOFF_RAMP``::

    w = clip((A − δ) / ((ρ − 1)·δ₀), 0, 1)

  0 up to the round-off bound, 1 from ``δ + (ρ − 1)·δ₀`` on (about
  ``1e-3‖G‖_F`` in float32), linear between. A coordinate's amplitude is
  only known to about ``ε‖G‖_F`` (the rotation's own round-off, and the
  basis computed from a gradient that differs by round-off), so near ``δ``
  Adam's ratio, ``±1`` whatever the amplitude, is decided by round-off. A
  hard threshold there let the mean of four micro-batches
  (``optax.MultiSteps``), 2.6e-7 from the batch's gradient, move a 64 × 64
  kernel by 0.17 of the distance travelled after the first real step; the
  ramp moves a coordinate by ``ΔA / ((ρ − 1)δ₀) ≈ 1e-4`` of a step
  instead. All 1 when ``τ <= 0``.
  """
  tau = roundoff_level(threshold, nu_hat.dtype)
  amp, delta, floor = _roundoff_bound(nu_hat, tau, lam_l, lam_r)
  width = (ROUNDOFF_RAMP - 1.0) * floor
  ramp = (amp - delta) / jnp.maximum(width, jnp.finfo(amp.dtype).tiny)
  w = jnp.where(amp > delta + width, 1.0,
                jnp.where(amp > delta, jnp.clip(ramp, 0.0, 1.0), 0.0))
  return jnp.where(tau <= 0, 1.0, w).astype(nu_hat.dtype)


def _cluster_mean(x: jax.Array, null: jax.Array, axis: int) -> jax.Array:
  """``x`` with its entries in the ``null`` columns (``axis``) replaced by
  their mean over those columns."""
  count = jnp.maximum(jnp.sum(null.astype(x.dtype), axis=-1), 1.0)
  inside = null[..., None, :] if axis == -1 else null[..., :, None]
  return jnp.where(inside, _masked_sum(x, null, axis)
                   / count[..., None, None], x)


def shared_moment(nu: jax.Array, lam_l: jax.Array | None,
                  lam_r: jax.Array | None, threshold=NULL_THRESHOLD
                  ) -> jax.Array:
  """``(B, m, n)`` second moment with each null cluster's coordinates
  sharing their mean (per row over the null columns, per column over the
  null rows; both: the block's mean).

  The basis of a null cluster is whatever ``eigh`` picked from rounding, so
  a coordinate of it means nothing alone; the cluster as a subspace is
  well defined. Adam with one second moment over the cluster steps along
  the projection of the momentum onto that subspace, the same for any basis
  of it, so the step stays continuous in the gradient while the cluster
  moves as soon as a gradient reaches it (instead of staying frozen until
  the next refresh). ``lam_*``: column energies (``None``: identity side).
  """
  if lam_r is not None:
    nu = _cluster_mean(nu, ~energetic(lam_r, threshold), -1)
  if lam_l is not None:
    nu = _cluster_mean(nu, ~energetic(lam_l, threshold), -2)
  return nu


def null_coordinates(lam_l: jax.Array, lam_r: jax.Array, threshold, *,
                     sides: tuple[bool, bool]) -> jax.Array:
  """``(B, m, n)``-broadcastable booleans: True where a rotated coordinate
  carries gradient energy (see :func:`scale_by_soap`, ``null_threshold``).

  ``sides``: whether each side is preconditioned (identity sides keep all).
  """
  keep = jnp.ones(lam_l.shape[:1] + (1, 1), bool)
  if sides[0]:
    keep = keep & energetic(lam_l, threshold)[..., :, None]
  if sides[1]:
    keep = keep & energetic(lam_r, threshold)[..., None, :]
  return keep


# --------------------------------------------------------------------------
# Leaf views.
# --------------------------------------------------------------------------
