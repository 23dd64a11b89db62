r"""``kron_precondition``: Kronecker-factored preconditioners (SOAP, Shampoo).

Every leaf is seen as a stack of ``m × n`` matrices ``G`` through its
:class:`optax_lite.MatrixDims` view: **rows = fan_in (reduction axes),
columns = fan_out (output axes)**, so for a Flax ``Dense`` kernel ``[in, out]``
the *left* factor ``L ≈ E[G Gᵀ]`` is ``fan_in × fan_in`` (the input side) and
the *right* factor ``R ≈ E[Gᵀ G]`` is ``fan_out × fan_out`` (the output side).
Papers in PyTorch layout ``(out, in)`` swap the two names.

SOAP (``mode="soap"``, :func:`scale_by_soap`; LITE paper Algorithm 6)::

    L ← β_s L + (1−β_s) G Gᵀ,     R ← β_s R + (1−β_s) Gᵀ G
    step 1:        Q_l, Q_r ← eigh(L), eigh(R)   (descending eigenvalues)
    G_rot = Q_lᵀ G Q_r
    M ← θ M + (1−θ) G                      (original basis)
    V ← β_v V + (1−β_v) G_rot ⊙ G_rot      (rotated basis)
    U = Q_l [ (Q_lᵀ M̂ Q_r) / (sqrt(V̂) + ε) ] Q_rᵀ
    if t mod k = 0:  Q ← QR(L Q) (one power step, columns re-sorted,
                     V permuted alongside)

with ``M̂ = M / (1−θᵗ)`` and ``V̂ = V / (1−β_vᵗ)``. The refreshed bases are
used from step ``t+1``. As in the reference PyTorch code, step 1 only
initialises ``L``, ``R`` and the bases on preconditioned leaves and returns a
zero update (``skip_first_update=True``); ``t`` then counts the real steps
only (Adam's bias correction and the refresh: the bases are refreshed after
calls ``k+1, 2k+1, …``). The first moment is kept unrotated (as in
Algorithm 6 and ``SOAP_JAX``). With both bases at the identity SOAP is Adam.

Shampoo (``mode="shampoo"``, :func:`scale_by_shampoo`; Gupta et al. 2018,
Shi et al. 2023)::

    L ← L + G Gᵀ  (accumulation="sum")  or  β_s L + (1−β_s) G Gᵀ  ("ema")
    every k steps (from step 1):  P_l = (L̂ + ε_l I)^{-e},
                                  P_r = (R̂ + ε_r I)^{-e}
    M ← b1 M + (1−b1) G;   U = P_l M̂ P_r
    grafting "adam":  U ← U · ‖Adam(M̂, V)‖_F / ‖U‖_F   per matrix

with ``ε_l = matrix_eps · ‖L̂‖_F`` (relative damping), ``L̂`` the
bias-corrected EMA, ``e = 1/4`` for two-sided leaves (``exponent=0.5`` gives
the "squared" −1/2 preconditioner of Morwani et al.) and ``1/2`` for
one-sided leaves by default. One step with ``e = 1/4``, no accumulation,
``b1 = 0`` and no grafting gives ``polar(G)``, the Muon direction.

One-sided / identity sides: a side larger than ``max_precond_dim`` gets the
identity (its basis / preconditioner is stored as a ``(B, 1)`` placeholder
array). Leaves of rank < 2 under the default dims, and leaves whose dims
entry is ``None``, get the identity on both sides: SOAP is then exactly Adam,
Shampoo is its graft (Adam) or plain momentum. ``max_precond_dim=0`` turns
every side into the identity.

Public pieces (per leaf, matrix form ``(B, m, n)``): SOAP is its basis
upkeep (:class:`SoapBasis`: :func:`soap_basis_init`,
:func:`soap_basis_update` for the statistics and the first ``eigh``,
:func:`soap_basis_refresh` for the QR refresh) and its rotated Adam
(:func:`soap_rotated_adam`, or :func:`soap_second_moment` alone for ``V``
and ``V̂``), tied by :func:`soap_step_index` (the statistics-only first
step); :func:`soap_leaf_update` composes them and SOAP-LITE
(:func:`optax_lite.transforms.lite_geometries.soap_geometry`) reuses them
with its own first moment.

State layout: every per-leaf field is a tree shaped like the params. The
moments ``mu``/``nu`` have the parameter's own shape (so they shard like it);
the factors and bases are ``(B, m, m)`` / ``(B, n, n)`` (``B`` = product of
the batch axes). Factors, bases and ``nu`` are float32 (``precond_dtype``),
``mu`` float32 unless ``mu_dtype`` says otherwise; the arithmetic is float32
(or wider) whatever the storage dtype. The per-leaf helpers
(:func:`soap_leaf_update`, :func:`shampoo_leaf_update`) work on the matrix
form ``(B, m, n)`` of every field. With ``distribute=`` over several
devices, the per-matrix fields of every preconditioned leaf live instead in
the state's ``owned`` field, on the device that computes that matrix (see
:func:`scale_by_soap`).

References:
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, ICLR 2025.

  Gupta, Koren, Singer, `Shampoo: Preconditioned Stochastic Tensor
  Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018.

  Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the
  Distributed Shampoo Optimizer <https://arxiv.org/abs/2309.06497>`_, 2023.

  Anil et al., `Scalable Second Order Optimization for Deep Learning
  <https://arxiv.org/abs/2002.09018>`_, 2020 (grafting, coupled Newton).

  Zhu et al., `Accelerating LLM Pre-Training through Flat-Direction Dynamics
  Enhancement <https://arxiv.org/abs/2602.22681>`_, 2026 (Algorithm 6).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import eigenbasis as eig_lib
from optax_lite.linalg import engine
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.linalg import roots as roots_lib
from optax_lite.linalg.matrices import MatrixView, matrix_view
from optax_lite.transforms import _tree

MODES = ('soap', 'shampoo')
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
RAMP_BASE = True
ACCUMULATIONS = ('ema', 'sum')
GRAFTS = ('adam', 'none')
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# States.
# --------------------------------------------------------------------------
class SoapState(NamedTuple):
  """State of :func:`scale_by_soap`; per-leaf fields are trees like params.

  Attributes:
    count: int32 scalar, number of updates so far.
    mu: first moment ``M`` in the original basis, shaped like the param.
    nu: second moment ``V`` in the rotated basis, stored in the param's
      layout; ``view.to_matrix(nu)`` (the leaf's MatrixView) gives the
      ``(B, m, n)`` matrix whose entry ``[b, i, j]`` belongs to the direction
      ``q_l[b, :, i] ⊗ q_r[b, :, j]``. These are SOAP's eigenvalue estimates
      (LITE ranks them).
    stats_l: ``L ≈ E[G Gᵀ]``, ``(B, m, m)`` (``(B, 1)``: identity side).
    stats_r: ``R ≈ E[Gᵀ G]``, ``(B, n, n)`` (``(B, 1)``: identity side).
    q_l: eigenbasis of ``L``, columns by descending eigenvalue, ``(B, m, m)``
      (``(B, 1)``: identity).
    q_r: eigenbasis of ``R``, ``(B, n, n)`` (``(B, 1)``: identity).
    lam_l: ``(B, m)``, the energy of each column of ``q_l`` when the basis
      was last computed (eigenvalues at ``eigh``, Rayleigh quotients
      ``diag(Q_lᵀ L Q_l)`` after a refresh); ``(B, 1)`` on identity sides.
      Exactly 0 on the columns found null (round-off) when the basis was
      computed (see ``null_threshold``): their coordinates get a zero
      update.
    lam_r: the same for ``q_r``, ``(B, n)``.
    owned: ``None`` (one device, or ``distribute=None``), or with
      ``distribute=`` over several devices an
      :class:`optax_lite.linalg.grouped.OwnerStacks`: the eight arrays above
      of every matrix with a preconditioned side, in matrix form, stacked
      on the device that computes it (split along axis 0). Those leaves'
      entries in the other per-leaf fields are then one-element
      placeholders.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  stats_l: optax.Updates
  stats_r: optax.Updates
  q_l: optax.Updates
  q_r: optax.Updates
  lam_l: optax.Updates
  lam_r: optax.Updates
  owned: Any = None


class ShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`; per-leaf fields are trees like params.

  Attributes:
    count: int32 scalar.
    mu: momentum ``M`` (EMA of ``G``), shaped like the param.
    nu: Adam second moment for grafting, shaped like the param (shape
      ``(1,)`` without grafting).
    stats_l, stats_r: ``L``, ``R`` (``(B, 1)`` on identity sides).
    precond_l, precond_r: the cached inverse roots ``P_l``, ``P_r``.
    owned: ``None``, or with ``distribute=`` over several devices an
      :class:`optax_lite.linalg.grouped.OwnerStacks` holding ``mu``, ``nu``
      (with grafting), ``stats_*`` and ``precond_*`` of every matrix with a
      preconditioned side on the device that computes it (tall matrices
      transposed, their sides swapped); those leaves' entries in the other
      fields are one-element placeholders.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  stats_l: optax.Updates
  stats_r: optax.Updates
  precond_l: optax.Updates
  precond_r: optax.Updates
  owned: Any = None


class SoapLeaf(NamedTuple):
  """One leaf's SOAP state in matrix form (see :class:`SoapState`)."""
  mu: jax.Array
  nu: jax.Array
  stats_l: jax.Array
  stats_r: jax.Array
  q_l: jax.Array
  q_r: jax.Array
  lam_l: jax.Array
  lam_r: jax.Array


class SoapDirection(NamedTuple):
  """The pieces of one SOAP step, all in the rotated basis except the bases.

  The SOAP direction is
  ``rotate_back(numerator / denominator, q_l, q_r)``; a caller (SOAP-LITE)
  may reweight the rotated coordinates before rotating back.

  Attributes:
    numerator: ``Q_lᵀ M̂ Q_r`` (bias-corrected first moment, rotated).
    grad_rot: ``Q_lᵀ G Q_r`` (rotated gradient).
    denominator: ``sqrt(V̂) + ε`` (bias-corrected, rotated basis).
    q_l, q_r: the bases used for this step (before any refresh).
    keep: ``(B, m, n)`` weights in ``[0, 1]`` (broadcastable), 0 on the
      coordinates without gradient energy (see :func:`null_coordinates`),
      whose update must be exactly zero, and below 1 on those near the
      round-off bound (:func:`roundoff_weight`).
    nu_hat: ``V̂``, the bias-corrected second moment in the rotated basis
      (SOAP's eigenvalue estimates; 0 on a statistics-only step).
  """
  numerator: jax.Array
  grad_rot: jax.Array
  denominator: jax.Array
  q_l: jax.Array
  q_r: jax.Array
  keep: jax.Array
  nu_hat: jax.Array


class ShampooLeaf(NamedTuple):
  """One leaf's Shampoo state in matrix form (see :class:`ShampooState`)."""
  mu: jax.Array
  nu: jax.Array
  stats_l: jax.Array
  stats_r: jax.Array
  precond_l: jax.Array
  precond_r: jax.Array


# --------------------------------------------------------------------------
# Pure matrix helpers (batched over the leading axis; public for SOAP-LITE).
# --------------------------------------------------------------------------
def has_side(q: jax.Array) -> bool:
  """False for an identity side, stored as a ``(B, 1)`` placeholder.

  The placeholder has one element per batch entry rather than zero because
  orbax-checkpoint refuses zero-size arrays; real factors are ``(B, n, n)``.
  """
  return not _tree.is_identity_placeholder(q, batch_ndim=1)


def _mm(a, b, precision):
  return matmul_lib.matmul(a, b, kernel='kron', precision=precision)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def rotate(x: jax.Array, q_l: jax.Array, q_r: jax.Array, *,
           precision=_HIGHEST) -> jax.Array:
  """``Q_lᵀ x Q_r`` for ``x`` of shape ``(…, m, n)`` (placeholder: identity)."""
  if has_side(q_l):
    x = _mm(_t(q_l), x, precision)
  if has_side(q_r):
    x = _mm(x, q_r, precision)
  return x


def rotate_back(x: jax.Array, q_l: jax.Array, q_r: jax.Array, *,
                precision=_HIGHEST) -> jax.Array:
  """``Q_l x Q_rᵀ`` (inverse of :func:`rotate` for orthogonal bases)."""
  if has_side(q_l):
    x = _mm(q_l, x, precision)
  if has_side(q_r):
    x = _mm(x, _t(q_r), precision)
  return x


def update_factors(stats_l: jax.Array, stats_r: jax.Array, g: jax.Array,
                   beta: float, *, accumulation: str = 'ema',
                   precision=_HIGHEST) -> tuple[jax.Array, jax.Array]:
  """``L ← β L + (1−β) G Gᵀ``, ``R ← β R + (1−β) Gᵀ G`` (or sums).

  ``accumulation="sum"`` gives ``L + G Gᵀ``. Identity sides (placeholders)
  are returned unchanged. ``g`` is ``(…, m, n)`` in the factors' dtype.
  """
  def acc(s, gram):
    if accumulation == 'sum':
      return s + gram
    b = _decay(beta, s.dtype)
    return b * s + (1.0 - b) * gram

  if has_side(stats_l):
    stats_l = acc(stats_l, _mm(g, _t(g), precision))
  if has_side(stats_r):
    stats_r = acc(stats_r, _mm(_t(g), g, precision))
  return stats_l, stats_r


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


def _decay(beta, dtype) -> jax.Array:
  """A decay rate in the computing dtype, before ``1 − β`` is formed.

  ``1 − β`` of a Python float is exact in float64, and of the same rate
  injected by ``optax.inject_hyperparams`` (a float32 array) exact in
  float32 but for ``float32(β)``: 1.3e-5 apart for ``β = 0.999``. Rounding
  ``β`` first gives both the same (and weights ``β``, ``1 − β`` that sum
  to exactly 1).
  """
  return jnp.asarray(beta, dtype)


def _no_energy(stats: jax.Array) -> jax.Array:
  """Energies of an identity side: the ``(B, 1)`` placeholder."""
  return jnp.zeros(stats.shape[:1] + (1,), stats.dtype)


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


def _refresh_side(stats, q, lam, threshold):
  """One side's refresh: ``(q, lam, mix)`` where ``mix(nu, axis)`` carries
  the rotated second moment over to the new basis along ``axis``."""
  q_qr, perm = eig_lib.eigenbasis_refresh(stats, q)
  keep_old = energetic(lam, threshold)
  redo = ~jnp.all(keep_old, axis=-1)  # (B,): a null column to re-derive

  # Both bases, then a select, not a ``lax.cond`` on ``any(redo)``: the
  # predicate compares round-off-level eigenvalues with τ·λ_max, so two
  # devices (or processes) holding the "same" replicated statistics can
  # disagree on it, and under SPMD partitioning the branches hold different
  # collectives: each side waited in its own, a deadlock (seen with two
  # processes × 4 CPU devices, FSDP-sharded SOAP; docs/multi_device.md).
  # The price is an ``eigh`` at every refresh (every k steps).
  q_e, lam_e = eig_lib.eigenbasis_init(stats)
  w = jnp.where(redo[..., None, None],
                _transport(q.astype(q_e.dtype), q_e, keep_old), 0.0)
  q_new = jnp.where(redo[..., None, None], q_e, q_qr)
  lam_new = jnp.where(redo[..., None], lam_e,
                      eig_lib.rayleigh_eigenvalues(stats, q_qr))

  def mix(nu, axis):
    if axis == -2:
      permuted = jnp.take_along_axis(nu, perm[..., :, None], axis=-2)
      carried = _mm(w.astype(nu.dtype), nu, None)
    else:
      permuted = jnp.take_along_axis(nu, perm[..., None, :], axis=-1)
      carried = _mm(nu, _t(w).astype(nu.dtype), None)
    return jnp.where(redo[..., None, None], carried, permuted)

  return q_new.astype(q.dtype), lam_new.astype(lam.dtype), mix


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
    q_l, out_lam[0], mix = _refresh_side(stats_l, q_l, lam, null_threshold)
    nu = mix(nu, -2)
  if has_side(q_r):
    lam = _no_energy(stats_r) if lam_r is None else lam_r
    q_r, out_lam[1], mix = _refresh_side(stats_r, q_r, lam, null_threshold)
    nu = mix(nu, -1)
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


def _neighbour_leak(amp: jax.Array, lam: jax.Array, tau, axis: int
                    ) -> jax.Array:
  """``Σ_d θᵢ,ᵢ₊d · amp[i+d]`` along ``axis`` over the ``LEAK_BAND`` nearest
  columns on each side (columns are sorted by energy), with
  ``θ = τ·λ_max / |λᵢ − λᵢ₊d|`` where at most ``LEAK_CAP`` (0 beyond):
  how much of row ``i+d`` a basis vector computed with round-off ``τ``
  takes in (see :func:`roundoff_coordinates`)."""
  k = lam.shape[-1]
  top = jnp.max(lam, axis=-1, keepdims=True)
  idx = jnp.arange(k)
  out = jnp.zeros_like(amp)
  for d in range(1, min(LEAK_BAND, k - 1) + 1):
    for step in (d, -d):
      gap = jnp.abs(lam - jnp.roll(lam, -step, axis=-1))
      theta = tau * top / jnp.maximum(gap, jnp.finfo(lam.dtype).tiny)
      # θ > c: the pair is not resolved (a degenerate cluster, whose basis
      # is arbitrary but whose coordinates carry signal): no leak counted.
      theta = jnp.where((idx + step >= 0) & (idx + step < k)
                        & (theta <= LEAK_CAP), theta, 0.0)
      theta = theta[..., :, None] if axis == -2 else theta[..., None, :]
      out = out + theta.astype(amp.dtype) * jnp.roll(amp, -step, axis=axis)
  return out


def roundoff_coordinates(nu_hat: jax.Array, threshold=NULL_THRESHOLD,
                         lam_l: jax.Array | None = None,
                         lam_r: jax.Array | None = None) -> jax.Array:
  """``(B, m, n)`` booleans: False where a rotated coordinate is round-off.

  ``A = sqrt(V̂)`` is each coordinate's RMS amplitude and
  ``sqrt(Σᵢⱼ V̂ᵢⱼ)`` the RMS of ``‖G‖_F`` (the rotation is orthogonal).
  Coordinate ``(i, j)`` is round-off when ``Aᵢⱼ <= δᵢⱼ`` with::

    δᵢⱼ = τ·sqrt(Σ V̂) + Σ_d θˡᵢ,ᵢ₊d Aᵢ₊d,ⱼ + Σ_d θʳⱼ,ⱼ₊d Aᵢ,ⱼ₊d,
    θᵢ,ₖ = τ·λ_max / |λᵢ − λₖ|   (0 where above c)

  The first term is the rotation's own round-off (``~ε‖G‖`` per entry);
  the others are what a basis vector computed with relative round-off
  ``τ`` takes in from its neighbours (first-order perturbation:
  ``δqᵢ ≈ Σₖ τλ_max/(λᵢ−λₖ) qₖ``), over the ``LEAK_BAND`` nearest columns
  on each side. A pair with ``θ > c = LEAK_CAP`` is not resolved by the
  arithmetic at all (a degenerate cluster: its basis is arbitrary, but its
  coordinates carry the gradient's energy in that subspace), so it counts
  no leak: the guard never freezes a cluster. ``lam_*``: the column
  energies (``None``: identity side). All True when ``τ <= 0``.
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


def soap_keep(basis: SoapBasis, null_threshold=NULL_THRESHOLD,
              nu_hat: jax.Array | None = None) -> jax.Array:
  """Weights in ``[0, 1]`` of the rotated basis's coordinates: 0 in a null
  column of the basis and, given ``nu_hat`` (``V̂``), the round-off weight
  (:func:`roundoff_weight`; 0 on round-off)."""
  keep = null_coordinates(basis.lam_l, basis.lam_r, null_threshold,
                          sides=soap_basis_sides(basis))
  keep = keep.astype(basis.lam_l.dtype)
  if nu_hat is not None:
    left, right = soap_basis_sides(basis)
    keep = keep * roundoff_weight(
        nu_hat, null_threshold, basis.lam_l if left else None,
        basis.lam_r if right else None).astype(keep.dtype)
  return keep


def soap_second_moment(nu: jax.Array, g_rot: jax.Array, t: jax.Array,
                       first: jax.Array | None = None, *, b2
                       ) -> tuple[jax.Array, jax.Array]:
  """``V ← β_v V + (1−β_v) G_rot²`` and ``V̂ = V / (1 − β_vᵗ)``.

  On a statistics-only step (``first`` True) ``V`` is kept and ``V̂ = 0``.
  """
  b2 = _decay(b2, nu.dtype)
  new = b2 * nu + (1.0 - b2) * jnp.square(g_rot)
  tf = jnp.maximum(t, 1).astype(nu.dtype)
  if first is None:
    return new, new / (1.0 - b2 ** tf)
  new = jnp.where(first, nu, new)
  return new, jnp.where(first, 0.0, new / (1.0 - b2 ** tf))


def soap_rotated_adam(mu: jax.Array, nu: jax.Array, g: jax.Array,
                      basis: SoapBasis, t: jax.Array,
                      first: jax.Array | None = None, *, b1, b2, eps,
                      null_threshold=NULL_THRESHOLD, precision=_HIGHEST
                      ) -> tuple[jax.Array, jax.Array, SoapDirection]:
  """Adam in SOAP's rotated basis: ``(mu, nu, direction)``.

  ``mu`` (original basis) and ``nu`` (rotated basis) are ``(B, m, n)`` in
  the computing dtype; ``t``, ``first`` from :func:`soap_step_index`. On a
  statistics-only step the moments are kept and the direction is zero.
  """
  g_rot = rotate(g, basis.q_l, basis.q_r, precision=precision)
  b1 = _decay(b1, mu.dtype)
  new_mu = b1 * mu + (1.0 - b1) * g
  if first is not None:
    new_mu = jnp.where(first, mu, new_mu)
  nu, nu_hat = soap_second_moment(nu, g_rot, t, first, b2=b2)
  tf = jnp.maximum(t, 1).astype(mu.dtype)
  numerator = rotate(new_mu / (1.0 - b1 ** tf), basis.q_l, basis.q_r,
                     precision=precision)
  denominator = jnp.sqrt(nu_hat) + eps
  keep = soap_keep(basis, null_threshold, nu_hat)
  if first is not None:
    # 0·G_rot, not 0: a non-finite gradient still gives a non-finite step.
    numerator = jnp.where(first, 0.0 * g_rot, numerator)
    denominator = jnp.where(first, 1.0, denominator)
  direction = SoapDirection(numerator=numerator, grad_rot=g_rot,
                            denominator=denominator, q_l=basis.q_l,
                            q_r=basis.q_r, keep=keep, nu_hat=nu_hat)
  return new_mu, nu, direction


def soap_leaf_update(leaf: SoapLeaf, g: jax.Array, count: jax.Array, *,
                     b1: float, b2: float, shampoo_beta: float, eps: float,
                     precondition_frequency: int,
                     skip_first_update: bool = True,
                     null_threshold: float | None = NULL_THRESHOLD,
                     precision=_HIGHEST
                     ) -> tuple[SoapLeaf, SoapDirection]:
  """One SOAP step for one leaf in matrix form (see module doc).

  Args:
    leaf: the leaf's state (:class:`SoapLeaf`, all ``(B, ·, ·)`` arrays).
    g: the gradient ``(B, m, n)``.
    count: the 1-based index ``t`` of this step (int32 scalar).
    b1, b2, shampoo_beta, eps, precondition_frequency, skip_first_update,
    null_threshold: see :func:`scale_by_soap`.
    precision: matmul precision.

  Returns:
    ``(new_leaf, direction)``: the new state (statistics updated, bases
    refreshed when ``t mod k = 0``) and the :class:`SoapDirection` of this
    step; the SOAP update is
    ``rotate_back(d.numerator / d.denominator, d.q_l, d.q_r)``. On a skipped
    first step (``skip_first_update`` and a preconditioned side) ``M`` and
    ``V`` are left unchanged, ``numerator = 0`` and ``denominator = 1``.
  """
  sdt = jnp.promote_types(leaf.nu.dtype, jnp.float32)
  basis = soap_basis_update(
      SoapBasis(leaf.stats_l, leaf.stats_r, leaf.q_l, leaf.q_r, leaf.lam_l,
                leaf.lam_r), g, count, shampoo_beta=shampoo_beta,
      null_threshold=null_threshold, precision=precision)
  t, first = soap_step_index(count, basis, skip_first_update)
  mu, nu, direction = soap_rotated_adam(
      leaf.mu.astype(sdt), leaf.nu.astype(sdt), g.astype(sdt), basis, t,
      first, b1=b1, b2=b2, eps=eps, null_threshold=null_threshold,
      precision=precision)
  # The reference counts real steps only: with the statistics-only first
  # call, refresh after calls k+1, 2k+1, ... (real steps k, 2k, ...).
  basis, nu = soap_basis_refresh(basis, nu, t,
                                 precondition_frequency=precondition_frequency,
                                 null_threshold=null_threshold)
  new_leaf = SoapLeaf(mu=mu.astype(leaf.mu.dtype), nu=nu.astype(leaf.nu.dtype),
                      **{f: getattr(basis, f).astype(getattr(leaf, f).dtype)
                         for f in SoapBasis._fields})
  return new_leaf, direction


def soap_direction(d: SoapDirection, *, precision=_HIGHEST) -> jax.Array:
  """The plain SOAP update ``Q_l (num / den) Q_rᵀ`` from a direction.

  Each coordinate is weighted by ``d.keep``; those without gradient energy
  (weight 0) contribute exactly zero; ``0·num`` keeps a non-finite
  gradient visible.
  """
  u = jnp.where(d.keep > 0, d.keep * (d.numerator / d.denominator),
                0.0 * d.numerator)
  return rotate_back(u, d.q_l, d.q_r, precision=precision)


def shampoo_inverse_root(stats: jax.Array, exponent: float, *,
                         matrix_eps: float, root_method: str = 'eigh',
                         null_threshold: float = 0.0) -> jax.Array:
  """``(S + ε‖S‖_F I)^{-exponent}``; a zero ``S`` gives the identity.

  With ``root_method="eigh"`` and ``null_threshold = τ > 0`` the eigen-
  directions of ``S`` with eigenvalue ``<= τ·λ_max`` get 0 instead of
  ``(λ + ε‖S‖_F)^{-exponent}`` (a pseudo-inverse root): the gradient's
  component there is round-off, which the damped root would amplify by
  ``(ε‖S‖_F)^{-exponent}``. The Newton iteration has no eigenbasis and
  keeps the damped root.
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(stats), axis=(-2, -1), keepdims=True))
  eye = jnp.broadcast_to(jnp.eye(stats.shape[-1], dtype=stats.dtype),
                         stats.shape)
  if root_method == 'newton':
    damped = stats + matrix_eps * norm * eye
    root = roots_lib.inverse_root(damped, int(round(1.0 / exponent)),
                                  method='newton')
  else:
    wide = roots_lib.symmetrize(
        stats.astype(jnp.promote_types(stats.dtype, jnp.float32)))
    lam, q = jnp.linalg.eigh(wide)
    lam = jnp.maximum(lam, 0.0)
    damped = lam + matrix_eps * norm[..., 0].astype(lam.dtype)
    inv = jnp.where(damped > 0, damped, 1.0) ** (-exponent)
    tau = roundoff_level(null_threshold, lam.dtype)
    inv = jnp.where(_above_floor(lam, tau) & (damped > 0), inv, 0.0)
    root = matmul_lib.matmul(q * inv[..., None, :], _t(q),
                             kernel='inverse_root').astype(stats.dtype)
  ok = (norm > 0) & jnp.all(jnp.isfinite(root), axis=(-2, -1), keepdims=True)
  return jnp.where(ok, root, eye)


def shampoo_leaf_update(leaf: ShampooLeaf, g: jax.Array, count: jax.Array, *,
                        b1: float, b2: float, shampoo_beta: float,
                        accumulation: str, eps: float, matrix_eps: float,
                        exponent: float, root_method: str,
                        precondition_frequency: int, graft: str,
                        null_threshold: float = 0.0,
                        precision=_HIGHEST) -> tuple[ShampooLeaf, jax.Array]:
  """One Shampoo step for one leaf in matrix form; returns (state, update)."""
  sdt = jnp.promote_types(leaf.stats_l.dtype, jnp.float32)
  g = g.astype(sdt)
  t = count.astype(sdt)
  stats_l, stats_r = update_factors(leaf.stats_l.astype(sdt),
                                    leaf.stats_r.astype(sdt), g,
                                    shampoo_beta, accumulation=accumulation,
                                    precision=precision)
  b1, b2 = _decay(b1, sdt), _decay(b2, sdt)
  bc = (1.0 if accumulation == 'sum'
        else 1.0 - _decay(shampoo_beta, sdt) ** t)

  def roots():
    out = []
    for s in (stats_l, stats_r):
      if has_side(s):
        out.append(shampoo_inverse_root(
            s / bc, exponent, matrix_eps=matrix_eps, root_method=root_method,
            null_threshold=null_threshold).astype(s.dtype))
      else:
        out.append(s)
    return tuple(out)

  p_l, p_r = leaf.precond_l.astype(sdt), leaf.precond_r.astype(sdt)
  if has_side(p_l) or has_side(p_r):
    p_l, p_r = jax.lax.cond((count - 1) % precondition_frequency == 0, roots,
                            lambda: (p_l, p_r))
  mu = b1 * leaf.mu.astype(sdt) + (1.0 - b1) * g
  mu_hat = mu / (1.0 - b1 ** t)  # b1 = 0: 0ᵗ = 0, no correction
  u = mu_hat
  if has_side(p_l):
    u = _mm(p_l, u, precision)
  if has_side(p_r):
    u = _mm(u, p_r, precision)
  nu = leaf.nu
  if graft == 'adam':
    nu = b2 * nu.astype(sdt) + (1.0 - b2) * jnp.square(g)
    adam = mu_hat / (jnp.sqrt(nu / (1.0 - b2 ** t)) + eps)
    n_adam = jnp.sqrt(jnp.sum(jnp.square(adam), axis=(-2, -1), keepdims=True))
    n_u = jnp.sqrt(jnp.sum(jnp.square(u), axis=(-2, -1), keepdims=True))
    u = jnp.where(n_u > 0, u * (n_adam / jnp.where(n_u > 0, n_u, 1.0)), adam)
  new_leaf = ShampooLeaf(mu=mu.astype(leaf.mu.dtype),
                         nu=nu.astype(leaf.nu.dtype),
                         stats_l=stats_l.astype(leaf.stats_l.dtype),
                         stats_r=stats_r.astype(leaf.stats_r.dtype),
                         precond_l=p_l.astype(leaf.precond_l.dtype),
                         precond_r=p_r.astype(leaf.precond_r.dtype))
  return new_leaf, u


# --------------------------------------------------------------------------
# Leaf views.
# --------------------------------------------------------------------------
def _vector_view(shape) -> MatrixView:
  """A ``(1, 1, size)`` view: the leaf is kept element-wise (identity)."""
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  return MatrixView(tuple(range(len(shape))), (), 1, size, shape)


def _leaf_view(x, d) -> tuple[MatrixView, bool]:
  """``(view, is_matrix)`` of a leaf under resolved dims ``d``."""
  _checks.check_float_leaf('updates', x)
  if d is None or (d is _tree._DEFAULT and x.ndim < 2):
    return _vector_view(x.shape), False
  return matrix_view(x.shape, None if d is _tree._DEFAULT else d), True


def _sides(view: MatrixView, is_matrix: bool, max_precond_dim: int
           ) -> tuple[bool, bool]:
  if not is_matrix:
    return False, False
  return view.rows <= max_precond_dim, view.cols <= max_precond_dim


def _factor(batch: int, size: int, on: bool, dtype, eye: bool = False):
  if not on:
    return _tree.identity_placeholder(dtype, (batch,))  # see has_side
  if eye:
    return jnp.broadcast_to(jnp.eye(size, dtype=dtype), (batch, size, size))
  return jnp.zeros((batch, size, size), dtype)


def _energies(batch: int, size: int, on: bool, dtype):
  """Initial per-column energies (zeros; ``(B, 1)`` on identity sides)."""
  return jnp.zeros((batch, size if on else 1), dtype)


def _leaves_of(tree, like):
  return jax.tree.structure(like).flatten_up_to(tree)


def _auto_exponent(exponent, n_sides: int):
  if exponent is None:
    return 1.0 / (2.0 * max(n_sides, 1))
  return exponent if isinstance(exponent, jax.core.Tracer) else float(exponent)


def soap_warmup_leaves(tree, dims: _tree.DimsSpec = None,
                       max_precond_dim: int = 4096) -> Any:
  """Which leaves :func:`scale_by_soap` skips on step 1 (``skip_first_update``).

  A tree of Python bools shaped like ``tree`` (params or updates): True
  where the leaf has a preconditioned side, so that SOAP's first step only
  builds the statistics and returns a zero update. A named optimizer uses it
  to skip the weight decay on that step, as the reference does.
  """
  resolved = _tree.resolve_dims(dims, tree)

  def warm(x, d):
    view, is_matrix = _leaf_view(x, d)
    return any(_sides(view, is_matrix, max_precond_dim))

  return jax.tree.map(warm, tree, resolved)


# --------------------------------------------------------------------------
# On the matrix engine (one device, owner-computes, owner-resident).
# --------------------------------------------------------------------------
def _resolve_init_dims(dims, params):
  """Resolved dims; params without leaves (the placeholder that
  ``optax.tree_utils.tree_map_params`` passes to ``init``) match any dims
  tree, and are their own."""
  if not jax.tree.leaves(params):
    return params
  return _tree.resolve_dims(dims, params)


class _KronSpec(NamedTuple):
  """What SOAP and Shampoo differ in, for :func:`_kron_transform`."""
  state_type: type
  method: engine.MatrixMethod
  init_leaf: Callable      # (x, d) -> the leaf's fields, in state order
  kernel_at: Callable      # count -> kernel(g, *active) -> (u, *new)
  max_precond_dim: Any


def _leaves(tree, resolved, fields, sides_of=None) -> list:
  """The engine's leaves of ``tree`` (updates or params): per leaf its
  view, its fields, and whether it is a matrix item (a preconditioned
  side, read from the state's factors or, with ``sides_of``, from the
  static sides)."""
  g_leaves, treedef = jax.tree.flatten(tree)
  d_leaves = treedef.flatten_up_to(resolved)
  f_leaves = [treedef.flatten_up_to(f) for f in fields]
  out = []
  for i, (g, d) in enumerate(zip(g_leaves, d_leaves)):
    fs = tuple(f[i] for f in f_leaves)
    view, is_matrix = _leaf_view(g, d)
    item = (any(sides_of(view, is_matrix)) if sides_of is not None
            else has_side(fs[2]) or has_side(fs[3]))
    out.append(engine.Leaf(g, view, fs, item))
  return out


def _kron_transform(spec_of: _KronSpec, dims, spec, memory_budget
                    ) -> optax.GradientTransformation:
  """SOAP's or Shampoo's transform: one step per leaf through the engine.

  Over several devices (``spec``) every matrix's state lives on its owner
  (``state.owned``, made by ``init``); a state made without ``distribute``
  still steps there, its state then travelling each step.
  """
  kind = spec_of.state_type
  n_fields = len(kind._fields) - 2  # without count and owned
  resident = spec is not None and spec.num_shards() > 1

  def static_sides(view, is_matrix):
    require_static('the owner of each matrix depends on it',
                   max_precond_dim=spec_of.max_precond_dim)
    return _sides(view, is_matrix, spec_of.max_precond_dim)

  def init_fn(params):
    require_static(max_precond_dim=spec_of.max_precond_dim)
    resolved = _resolve_init_dims(dims, params)
    out = jax.tree.map(spec_of.init_leaf, params, resolved)
    fields = _tree.unzip(out, n_fields, params)
    if not resident:
      return kind(jnp.zeros([], jnp.int32), *fields)
    if not jax.tree.leaves(params):
      # optax.tree_utils.tree_map_params's placeholder params. A leaf here
      # (not a subtree) lets its non-params rule take OwnerStacks.
      return kind(jnp.zeros([], jnp.int32), *fields,
                  jnp.zeros((), jnp.int32))
    leaves = _leaves(params, resolved, fields, static_sides)
    per_leaf, owned = engine.own_leaves(
        spec_of.method, engine.placement_for(spec, resident=True), leaves,
        resident_lib.leaf_paths(params),
        lambda x: _tree.identity_placeholder(x.dtype))
    treedef = jax.tree.structure(params)
    fields = [treedef.unflatten([t[j] for t in per_leaf])
              for j in range(n_fields)]
    return kind(jnp.zeros([], jnp.int32), *fields, owned)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    resolved = _tree.resolve_dims(dims, updates)
    fields = tuple(state[1:1 + n_fields])
    owned = isinstance(state.owned, grouped_lib.OwnerStacks)
    placement = engine.placement_for(
        spec, resident=owned,
        memory_budget=grouped_lib.budget_bytes(memory_budget, updates))
    leaves = _leaves(updates, resolved, fields,
                     static_sides if owned else None)
    out = engine.step_leaves(spec_of.method, spec_of.kernel_at(count),
                             placement, leaves,
                             state.owned if owned else None)
    out, owned_out = out if owned else (out, state.owned)
    treedef = jax.tree.structure(updates)
    new_updates, *fields = [treedef.unflatten([t[j] for t in out])
                            for j in range(1 + n_fields)]
    return new_updates, kind(count, *fields, owned_out)

  return optax.GradientTransformation(
      init_fn, distributed_lib.layout_stable(update_fn))


def _kron_flops(m, n, left, right, k, root) -> float:
  """Per step: statistic and products ``4·m²n`` per preconditioned side,
  plus ``root·m³`` every ``k`` steps (QR / eigh / inverse root)."""
  return float(left * (4 * m * m * n + root * m ** 3 / k)
               + right * (4 * m * n * n + root * n ** 3 / k) + m * n)


def _kron_bytes(*arrays) -> float:
  """Working set of one leaf's step: every array (gradient, moments,
  factors, bases) read and written once, plus an ``eigh`` / QR workspace of
  four copies of each square factor."""
  total = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
              for a in arrays)
  square = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in arrays if a.ndim >= 2 and a.shape[-1] == a.shape[-2])
  return float(2 * total + 4 * square)


def _resident_cost(precondition_frequency, max_precond_dim, root):
  """Cost of an owner-resident item, whose only moving array is its
  gradient ``(B, m, n)``: the sides are those ``<= max_precond_dim``."""
  k = _frequency(precondition_frequency)

  def cost(shapes):
    m, n = shapes[0][-2:]
    return _kron_flops(m, n, m <= max_precond_dim, n <= max_precond_dim, k,
                       root)
  return cost


def _frequency(precondition_frequency) -> float:
  """``k`` for the cost model (a traced ``k``: the default 10)."""
  if isinstance(precondition_frequency, int):
    return float(precondition_frequency)
  return 10.0


def _sides_of(shapes, first_factor: int) -> tuple[int, int, bool, bool]:
  m, n = shapes[0][-2:]
  return (m, n, len(shapes[first_factor]) == 2,
          len(shapes[first_factor + 1]) == 2)


def _soap_cost(precondition_frequency):
  """Flops of one SOAP item per step, up to a constant.

  Per step and preconditioned side: the statistic ``G Gᵀ`` and three
  rotations (``G``, ``M̂``, back), ``4·m²n``; every ``k`` steps a QR power
  step (``L Q`` and the QR, ``≈ 4·m³``).
  """
  k = _frequency(precondition_frequency)

  def cost(shapes):
    m, n, left, right = _sides_of(shapes, 3)
    return _kron_flops(m, n, left, right, k, 4)
  return cost


def _shampoo_cost(precondition_frequency, first_factor: int):
  """Flops of one Shampoo item per step, up to a constant.

  Per preconditioned side: the statistic and the product with the root,
  ``4·m²n``; every ``k`` steps an inverse root (``eigh`` or Newton,
  ``≈ 10·m³``). The item's factors start at ``first_factor`` (after the
  gradient, ``M`` and, with grafting, ``V``).
  """
  k = _frequency(precondition_frequency)

  def cost(shapes):
    m, n, left, right = _sides_of(shapes, first_factor)
    return _kron_flops(m, n, left, right, k, 10)
  return cost


# --------------------------------------------------------------------------
# Transforms.
# --------------------------------------------------------------------------
require_static = _checks.require_static


def check_soap_args(b1, b2, shampoo_beta, eps, precondition_frequency,
                    max_precond_dim):
  """Validates SOAP's shared hyperparameters (named errors).

  Floats may be traced (``optax.inject_hyperparams``); returns
  ``(precondition_frequency, max_precond_dim)`` as ints, or as the traced
  values themselves (``max_precond_dim`` must then be static when the state
  is created, see :func:`require_static`).
  """
  _checks.check_decay('b1', b1)
  _checks.check_decay('b2', b2)
  _checks.check_decay('shampoo_beta', shampoo_beta)
  _checks.check_positive('eps', eps)
  return (_checks.int_hyperparameter('precondition_frequency',
                                     precondition_frequency, 1),
          _checks.int_hyperparameter('max_precond_dim', max_precond_dim, 0))


def scale_by_soap(b1: float = 0.95, b2: float = 0.99,
                  shampoo_beta: float = 0.95, eps: float = 1e-8,
                  precondition_frequency: int = 10,
                  max_precond_dim: int = 4096, dims: _tree.DimsSpec = None, *,
                  skip_first_update: bool = True,
                  null_threshold: float | None = NULL_THRESHOLD, mu_dtype=None,
                  precond_dtype='float32',
                  precision=_HIGHEST, distribute=None,
                  memory_budget: float | str | None = 'auto'
                  ) -> optax.GradientTransformation:
  r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors.

  See the module docstring for the update. Defaults are the LITE paper's SOAP
  baseline (θ = 0.95, β_v = 0.99, β_shampoo = 0.95, k = 10).

  Args:
    b1: first-moment decay ``θ``, in ``[0, 1)``.
    b2: second-moment decay ``β_v``, in ``[0, 1)``.
    shampoo_beta: EMA decay ``β_shampoo`` of ``L`` and ``R``, in ``[0, 1)``.
    eps: added to ``sqrt(V̂)``, ``> 0``.
    precondition_frequency: ``k``; the bases are refreshed by one QR power
      step after real step ``t`` with ``t mod k = 0`` (``>= 1``; with the
      skipped first step, after calls ``k+1, 2k+1, …``, as the reference).
    max_precond_dim: sides larger than this use the identity (one-sided
      SOAP); ``0`` makes SOAP exactly Adam.
    dims: matrix view of each leaf, as in :func:`optax_lite.orthogonalize`;
      leaves of rank < 2 (default rule) or with dims ``None`` are element-wise
      (Adam).
    skip_first_update: on leaves with a preconditioned side, step 1 only
      initialises ``L``, ``R`` and the bases and returns a zero update (as
      the reference implementation: "never use the current gradient in the
      projection"); Adam's step count on those leaves then starts at step 2.
      With ``False``, step 1 updates in the fresh eigenbasis of ``G`` itself,
      where Adam's sign-like first step also amplifies the round-off
      entries of ``Q_lᵀ G Q_r`` to ±1.
    null_threshold: ``τ``, the relative round-off level of the arithmetic:
      a quantity is round-off when it is below ``τ`` times the scale that
      produced it, in its own units. ``None`` (default) is
      ``ROUNDOFF_ULPS·ε`` = ``16ε`` of the computing dtype (1.9e-6 in
      float32, 3.6e-15 in float64); ``0`` switches every rule off (the
      reference's behaviour). Three rules, each giving exactly zero update
      (the Adam ratio would turn round-off divided by round-off into a ±1
      step):

      * *Rotated amplitudes* (per coordinate, every step). Each entry of
        ``Q_lᵀ G Q_r`` carries round-off ``~ε‖G‖_F`` (the rotation is
        orthogonal), and a basis vector computed with relative round-off
        ``τ`` takes in ``θᵢₖ = τλ_max/|λᵢ − λₖ|`` of its neighbour ``k``
        (first-order eigenvector perturbation). Coordinate ``(i, j)`` is
        round-off when ``sqrt(V̂ᵢⱼ) <= τ·sqrt(Σ V̂) + Σₖ θˡᵢₖ sqrt(V̂ₖⱼ) +
        Σₖ θʳⱼₖ sqrt(V̂ᵢₖ)`` (``Σ V̂`` is the second moment of ``‖G‖_F²``;
        ``k`` over the 4 nearest columns; pairs with ``θ > 0.1`` are not
        resolved at all, a degenerate cluster whose coordinates carry
        signal, and count no leak): see :func:`roundoff_coordinates`. This
        is what removes the full-batch round-off: with the same gradient
        twice the rotated gradient is diagonal and its off-diagonal entries
        are round-off. Above that bound the update is weighted, from 0 to
        1 over ``(ρ − 1)·τ·sqrt(Σ V̂)`` (``ρ = ROUNDOFF_RAMP = 512``:
        full weight from about ``1e-3‖G‖_F`` in float32), not switched on:
        see :func:`roundoff_weight`.
      * *Null columns when the basis is first computed* (step 1, from one
        gradient): row ``i`` of the basis is null when the rotated
        gradient's row is round-off in amplitude,
        ``‖(Q_lᵀ G Q_r)[i, :]‖ <= τ‖G‖_F`` (columns alike): energies are
        compared with ``τ²``. ``eigh`` fills a null space (any non-square
        leaf at step 1) with an arbitrary basis that changes with the
        rounding; its coordinates stay frozen until the next refresh (every
        ``k`` steps) re-derives them, so the step is continuous in the
        gradient (a 1e-6 relative change moves SOAP by ≲ 1e-5 of the
        distance travelled after 4 steps on 1×7 to 32×80 leaves, instead of
        0.5–0.8). The price: until then a non-square leaf moves only in the
        directions its first gradient spanned.
      * *Null columns at a refresh*: the energies there are read off the
        Gram factor ``L`` itself, whose round-off is ``~ε‖L‖ = ε·λ_max``,
        *linear* in ε (forming ``G Gᵀ`` squares the amplitudes, not the
        round-off): a column is null when ``λᵢ <= τ·λ_max`` *and* the
        rotated second moment carried over shows no amplitude either (row
        energy ``<= τ²·Σ V``). A direction whose energy is below the Gram
        round-off but whose amplitude is not (``sqrt(ε)·σ_max > σ > ε·σ_max``)
        still moves, as in the reference.

      ``τ`` in these units never freezes a real direction of a full-rank
      leaf: in float64 ``ol.soap`` follows the reference on 32×32 Gaussian
      gradients with ``λ_min/λ_max`` down to 3.5e-10 (``τ = 1e-5`` compared
      with energies, the former default, froze amplitudes below 3e-3 of the
      largest: 0.18 of the distance travelled). With bfloat16 statistics
      the round-off is ~1e-2: raise ``τ``.
    mu_dtype: dtype of ``M``; ``None`` uses ``precond_dtype``.
    precond_dtype: dtype of ``V``, ``L``, ``R``, ``Q`` (float32 default).
    precision: matmul precision of the rotations and statistics.
    distribute: ``None`` (default: one device, leaf by leaf, the program
      as without this argument) or a :class:`optax_lite.PolarSharding` /
      ``Mesh`` / ``(mesh, axes)``: owner-computes. Every preconditioned
      matrix (each slice of a stacked ``[B, m, n]`` leaf separately) is
      assigned to one device by its cost (rotations ``≈ m²n + mn²`` per
      step, QR refreshes ``≈ (m³ + n³)/k``); that device runs the whole
      :func:`soap_leaf_update` on it (statistics, ``eigh`` at step 1,
      rotations, the QR refresh). Over several devices the matrix's whole
      state (``mu``, ``nu``, ``stats_*``, ``q_*``, ``lam_*``) *lives* on
      its owner: ``init`` puts it in ``SoapState.owned``, an
      :class:`optax_lite.linalg.grouped.OwnerStacks` split along its first
      axis over the mesh axes (``ol.sharded_init`` / ``state_shardings``
      place it so), and leaves one-element placeholders in the per-leaf
      fields. Each step only the gradient travels to the owner and the
      update back, one all-to-all per shape group each way, none inside an
      ``eigh`` / QR (:mod:`optax_lite.linalg.grouped`): about ``2·mn/D``
      floats per device per ``m × n`` matrix (0.94× the parameter bytes
      per step on the 8-device FSDP test tree, against 14.3× for plain
      GSPMD). The owned state is in matrix form and in owner order, so it
      belongs to this mesh and this parameter tree (a state made with
      ``distribute=None``, ``owned=None``, still steps here, its state then
      moving to the owners each step). A one-device mesh only stacks
      same-shape matrices, with the single-device state. Leaves without a
      preconditioned side (Adam) stay where they are. Bad input raises
      naming ``distribute``; with several devices ``max_precond_dim`` must
      be static in ``update`` too (it decides the owners).

    memory_budget: on one device, the working set of the leaves stepped
      together, as a fraction of the updates' bytes (``"auto"``: 0.1):
      the matrix leaves run in packs whose estimated working sets (every
      array twice, four copies of each factor for the ``eigh`` / QR) fit
      it, one pack after another (barrier-chained). Same values;
      ``None``: every leaf at once, as XLA schedules it. These leaves
      already run one kernel each; on XLA:CPU the measured temporaries do
      not change with the budget (they come from its default
      concurrency-optimised scheduler and from the refresh conditionals'
      copies of the kept bases; ``docs/benchmarks.md``, memory). With
      ``distribute`` it is ignored (each device computes its own share).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`SoapState`.

  Against the reference (``soap.py`` of github nikhilvyas/SOAP; a float64
  transcription of its step is in ``tests/test_kron.py``): with the same
  hyperparameters and no weight decay, ``ol.soap`` in float64 follows it to
  ≤ 3.2e-7 of the distance travelled over 30 steps (k = 10 and 3, square,
  tall and wide leaves). What remains, by design:

  * ε is added to ``sqrt(V̂)`` (optax's Adam); the reference adds it to
    ``sqrt(V)`` and folds the bias correction into the step size, i.e. uses
    ``ε/sqrt(1−β_vᵗ)``. The difference is below ``ε·(1/sqrt(1−β_vᵗ) − 1) /
    sqrt(V̂)`` relative, ≤ 1e-7 with unit-scale gradients (ε = 1e-8), larger
    only where ``sqrt(V̂)`` is itself near ε.
  * The named :func:`optax_lite.soap` decays the old weight
    (``W − η(U + λW)``, optax's ``add_decayed_weights``); the reference
    decays the updated one, ``(W − ηU)(1 − ηλ)``: a relative difference of
    ``ηλ`` per step (measured 1e-3 at η = 1e-2, λ = 0.1). Both skip the
    decay on the statistics-only first step.
  * ``max_precond_dim`` defaults to 4096, the reference to 10000, which it
    chose to leave vocabulary-sized sides unpreconditioned. The named
    optimizers already send embeddings and the head to AdamW, so the bound
    only concerns hidden matrices, where 4096 keeps each factor at 64 MiB
    (float32) and its ``eigh`` affordable; pass ``max_precond_dim=10000`` to
    reproduce the reference on sides in ``(4096, 10000]``.
  * No ``merge_dims``: the reference preconditions every tensor axis (4
    factors for a conv kernel) or, with ``merge_dims``, greedily merges
    axes, mixing output and input channels in one factor. Here every leaf
    is one ``fan_in × fan_out`` matrix (or a batch of them) through its
    ``dims`` view: a conv kernel ``[kh, kw, c_in, c_out]`` is preconditioned
    as ``(kh·kw·c_in) × c_out`` by default, and any other 2-way grouping is
    a :class:`~optax_lite.MatrixDims` away.
  * 1-D leaves are Adam (the reference's ``precondition_1d=False``).
  """
  precondition_frequency, max_precond_dim = check_soap_args(
      b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim)
  if null_threshold is not None:
    _checks.check_positive('null_threshold', null_threshold, allow_zero=True)
  spec = distributed_lib.check_distribute(distribute)
  memory_budget = grouped_lib.check_memory_budget(memory_budget)
  precond_dtype = _checks.dtype_argument('precond_dtype', precond_dtype)
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  mu_dtype = precond_dtype if mu_dtype is None else mu_dtype

  def init_leaf(x, d):
    view, is_matrix = _leaf_view(x, d)
    b, m, n = view.matrix_shape
    on_l, on_r = _sides(view, is_matrix, max_precond_dim)
    return (jnp.zeros(x.shape, mu_dtype),
            jnp.zeros(x.shape, precond_dtype)) + tuple(soap_basis_init(
                b, m, n, left=on_l, right=on_r, dtype=precond_dtype))

  def kernel_at(count):
    def kernel(g, mu, nu, *factors):
      """One step on ``(B, m, n)`` matrices: ``(u, *new SoapLeaf fields)``."""
      new, direc = soap_leaf_update(
          SoapLeaf(mu, nu, *factors), g, count, b1=b1, b2=b2,
          shampoo_beta=shampoo_beta, eps=eps,
          precondition_frequency=precondition_frequency,
          skip_first_update=skip_first_update, null_threshold=null_threshold,
          precision=precision)
      return (soap_direction(direc, precision=precision),) + tuple(new)
    return kernel

  # Tall leaves are not transposed to share a group with wide ones:
  # Q_lᵀ(G Q_r) instead of (Q_lᵀ G) Q_r changes the round-off, which the
  # sign-like first Adam step amplifies on rank-deficient leaves (2.8e-4
  # measured on a 24 × 8 leaf, 2.7× the float32 error of the step itself);
  # untransposed, the owners' results equal the single-device ones to the
  # bit on unstacked leaves.
  method = engine.MatrixMethod(
      names=SoapState._fields[1:9], active=tuple(range(8)),
      leaf_shaped=(0, 1), transpose_tall=False,
      cost=_soap_cost(precondition_frequency),
      resident_cost=_resident_cost(precondition_frequency, max_precond_dim,
                                   4),
      item_bytes=lambda arrays: _kron_bytes(*arrays))
  return _kron_transform(
      _KronSpec(SoapState, method, init_leaf, kernel_at, max_precond_dim),
      dims, spec, memory_budget)


def scale_by_shampoo(b1: float = 0.9, b2: float = 0.999,
                     shampoo_beta: float = 0.999, eps: float = 1e-8,
                     precondition_frequency: int = 10,
                     max_precond_dim: int = 4096, dims: _tree.DimsSpec = None,
                     *, accumulation: str = 'ema',
                     exponent: float | None = None, root_method: str = 'eigh',
                     matrix_eps: float = 1e-6, graft: str = 'adam',
                     null_threshold: float | None = NULL_THRESHOLD,
                     mu_dtype=None, precond_dtype='float32',
                     precision=_HIGHEST, distribute=None,
                     memory_budget: float | str | None = 'auto'
                     ) -> optax.GradientTransformation:
  r"""Shampoo with EMA or summed factors, cached inverse roots and grafting.

  See the module docstring for the update.

  Args:
    b1: momentum (EMA of the gradient, bias-corrected), in ``[0, 1)``;
      ``0`` preconditions the raw gradient.
    b2: decay of the Adam second moment used for grafting, in ``[0, 1)``.
    shampoo_beta: EMA decay of ``L``, ``R`` (``accumulation="ema"``,
      bias-corrected), in ``[0, 1)``.
    eps: Adam's ε of the graft, ``> 0``.
    precondition_frequency: the inverse roots are recomputed at steps
      ``1, k+1, 2k+1, …`` (``>= 1``).
    max_precond_dim: sides larger than this use the identity.
    dims: matrix view of each leaf (see :func:`scale_by_soap`).
    accumulation: ``"ema"`` (Shi et al.) or ``"sum"`` (Gupta et al.).
    exponent: ``e`` in ``L^{-e}`` for every preconditioned side; ``None``
      (default) uses ``1/4`` on two-sided leaves and ``1/2`` on one-sided
      ones. ``0.5`` gives the −1/2 ("squared") variant. In ``(0, 1]``.
    root_method: ``"eigh"`` or ``"newton"`` (coupled Newton, matmul only;
      needs ``1/exponent`` to be an integer).
    matrix_eps: relative damping, ``ε‖L‖_F I`` is added before the root,
      ``> 0``.
    graft: ``"adam"`` (default) rescales each matrix's update to the
      Frobenius norm of Adam's; ``"none"`` keeps Shampoo's own scale.
    null_threshold: ``τ``, the relative round-off level (``None``: ``16ε``
      of the computing dtype, see :func:`scale_by_soap`); with
      ``root_method="eigh"`` the eigendirections of ``L̂`` (``R̂``) with
      eigenvalue ``<= τ·λ_max`` (the Gram factor's round-off, linear in
      ``ε``) get a zero root (pseudo-inverse root) instead of
      ``(λ + ε‖L̂‖_F)^{-e}``: on a rank-deficient factor the gradient's
      component there is round-off, which the damped root amplifies
      ``(matrix_eps)^{-e}``-fold. A 1e-6 relative change of the gradients
      then moves Shampoo by ≲ 1e-6 of the distance travelled after 4 steps
      on 1×7 to 32×80 leaves (9.8e-3 without). ``0`` switches the rule
      off. Newton roots keep the damped root.
    mu_dtype: dtype of ``M``; ``None`` uses ``precond_dtype``.
    precond_dtype: dtype of the factors, roots and ``V`` (float32 default).
    precision: matmul precision.
    distribute: ``None`` (default: one device, the program as without
      this argument) or a :class:`optax_lite.PolarSharding` / ``Mesh`` /
      ``(mesh, axes)``: owner-computes, as in :func:`scale_by_soap`. Each
      preconditioned matrix is assigned to one device by its cost
      (products ``≈ m²n + mn²`` per step, inverse roots ``≈ (m³ + n³)/k``),
      which runs the whole :func:`shampoo_leaf_update` (statistics, the
      ``eigh`` / Newton roots, the preconditioned step, the graft); the
      gradient moves to the owner and the update back in one all-to-all
      per shape group each way, none inside a root iteration. Tall
      matrices run transposed (``L`` and ``R`` swapped, the same math up
      to round-off), so that ``m × n`` and ``n × m`` leaves share one
      group. Over several devices the matrix's state *lives* on the owner,
      as in :func:`scale_by_soap`: ``ShampooState.owned`` (an
      :class:`optax_lite.linalg.grouped.OwnerStacks` split along axis 0;
      tall matrices stored transposed, sides swapped) holds ``mu``, ``nu``
      (with grafting), ``stats_*`` and ``precond_*`` of every
      preconditioned matrix, the per-leaf fields keep one-element
      placeholders, and each step moves only the gradient in and the
      update out (0.61× the parameter bytes per step on the 8-device FSDP
      test tree, plain GSPMD 4.6×). A one-device mesh only stacks
      same-shape matrices, with the single-device state. Leaves without a
      preconditioned side stay local. Bad input raises naming
      ``distribute``; with several devices ``max_precond_dim`` must be
      static in ``update`` too.

    memory_budget: on one device, the working set of the leaves stepped
      together, as a fraction of the updates' bytes (``"auto"``: 0.1):
      the matrix leaves run in packs whose estimated working sets (every
      array twice, four copies of each factor for the ``eigh`` / QR) fit
      it, one pack after another (barrier-chained). Same values;
      ``None``: every leaf at once, as XLA schedules it. These leaves
      already run one kernel each; on XLA:CPU the measured temporaries do
      not change with the budget (they come from its default
      concurrency-optimised scheduler and from the refresh conditionals'
      copies of the kept bases; ``docs/benchmarks.md``, memory). With
      ``distribute`` it is ignored (each device computes its own share).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ShampooState`.
  """
  precondition_frequency, max_precond_dim = check_soap_args(
      b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim)
  _checks.check_choice('accumulation', accumulation, ACCUMULATIONS)
  _checks.check_choice('root_method', root_method, roots_lib.ROOT_METHODS)
  _checks.check_choice('graft', graft, GRAFTS)
  _checks.check_positive('matrix_eps', matrix_eps)
  if null_threshold is not None:
    _checks.check_positive('null_threshold', null_threshold, allow_zero=True)
  if exponent is not None:
    _checks.check_number('exponent', exponent, low=0.0, low_open=True,
                         high=1.0)
    if root_method == 'newton':
      require_static('the Newton iteration needs a static root order',
                     exponent=exponent)
      if abs(1.0 / float(exponent) - round(1.0 / float(exponent))) > 1e-9:
        raise ValueError('exponent: root_method="newton" needs 1/exponent to '
                         f'be an integer, got exponent={exponent}.')
  spec = distributed_lib.check_distribute(distribute)
  memory_budget = grouped_lib.check_memory_budget(memory_budget)
  precond_dtype = _checks.dtype_argument('precond_dtype', precond_dtype)
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  mu_dtype = precond_dtype if mu_dtype is None else mu_dtype

  def init_leaf(x, d):
    view, is_matrix = _leaf_view(x, d)
    b, m, n = view.matrix_shape
    on_l, on_r = _sides(view, is_matrix, max_precond_dim)
    nu = (jnp.zeros(x.shape, precond_dtype) if graft == 'adam'
          else jnp.zeros((1,), precond_dtype))
    return (jnp.zeros(x.shape, mu_dtype), nu,
            _factor(b, m, on_l, precond_dtype),
            _factor(b, n, on_r, precond_dtype),
            _factor(b, m, on_l, precond_dtype, eye=True),
            _factor(b, n, on_r, precond_dtype, eye=True))

  graft_adam = graft == 'adam'

  def kernel_at(count):
    def kernel(g, mu, *rest):
      """One step on ``(B, m, n)`` matrices: ``(u, *new active fields)``;
      without grafting ``nu`` is not stepped (a ``(1,)`` placeholder)."""
      nu, factors = ((rest[0], rest[1:]) if graft_adam else
                     (jnp.zeros((1,), mu.dtype), rest))
      parts = ShampooLeaf(mu, nu, *factors)
      n_sides = int(has_side(parts.stats_l)) + int(has_side(parts.stats_r))
      new, u = shampoo_leaf_update(
          parts, g, count, b1=b1, b2=b2,
          shampoo_beta=shampoo_beta, accumulation=accumulation, eps=eps,
          matrix_eps=matrix_eps, exponent=_auto_exponent(exponent, n_sides),
          root_method=root_method,
          precondition_frequency=precondition_frequency, graft=graft,
          null_threshold=null_threshold, precision=precision)
      if graft_adam:
        return (u,) + tuple(new)
      return (u, new.mu) + tuple(new[2:])
    return kernel

  # Resident per matrix: mu, nu (grafting only), the factors and the roots.
  # Tall matrices run transposed, their sides swapped (Kronecker
  # preconditioning commutes with transposition).
  method = engine.MatrixMethod(
      names=ShampooState._fields[1:7],
      active=(0, 1, 2, 3, 4, 5) if graft_adam else (0, 2, 3, 4, 5),
      leaf_shaped=(0, 1) if graft_adam else (0,), transpose_tall=True,
      cost=_shampoo_cost(precondition_frequency, 3 if graft_adam else 2),
      resident_cost=_resident_cost(precondition_frequency, max_precond_dim,
                                   10),
      item_bytes=lambda arrays: _kron_bytes(*arrays))
  return _kron_transform(
      _KronSpec(ShampooState, method, init_leaf, kernel_at, max_precond_dim),
      dims, spec, memory_budget)


def kron_precondition(mode: str = 'soap', **kwargs: Any
                      ) -> optax.GradientTransformation:
  """Kronecker-factored preconditioning: ``"soap"`` or ``"shampoo"``.

  ``kron_precondition("soap", **kw)`` is :func:`scale_by_soap` and
  ``kron_precondition("shampoo", **kw)`` is :func:`scale_by_shampoo`; see
  those for the keyword arguments and the module doc for the math.

  Raises:
    ValueError: unknown ``mode`` or a bad hyperparameter (named).
    TypeError: a keyword the chosen mode does not take.
  """
  _checks.check_choice('mode', mode, MODES)
  if mode == 'soap':
    return scale_by_soap(**kwargs)
  return scale_by_shampoo(**kwargs)
