r"""Muon-LITE's geometry: polar factors and the spectral sharp-subspace filter.

:func:`muon_geometry` is the :class:`~optax_lite.transforms.lite_types.Geometry`
of Muon-LITE (Zhu et al. 2026, eq. 5 and Appendix B.1) for
:func:`optax_lite.lite_flat_boost`: ``D_m = polar(M̃)``, ``D_g = polar(G)``
and the flat projector ``Q = I − P`` on the fan-in side, with ``P`` the
spectral filter on ``M̃`` (eq. 12–15) at the threshold ``τ = l·‖M̃‖_F`` of
the controller eq. (13). FISMO-LITE and NorMuon-LITE use it inside their
own coordinates. ``filter_every = k > 1`` (not in the paper) refreshes
``P`` every ``k`` steps only.

References:
  Zhu et al., `Accelerating LLM Pre-Training through Flat-Direction Dynamics
  Enhancement <https://arxiv.org/abs/2602.22681>`_, 2026.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_lite import _checks
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import polar as polar_lib
from optax_lite.linalg import subspace
from optax_lite.transforms.lite_types import Geometry, LeafDirections, sharp_dim

FILTER_ROUTES = ('small_side', 'reference')


class MuonGeometryState(NamedTuple):
  """Per-leaf state of :func:`muon_geometry` (``filter_every=1``)."""
  threshold_ratio: jax.Array  # (batch,): l in τ = l·‖M̃‖_F, eq. (13)


class MuonCachedGeometryState(NamedTuple):
  """Per-leaf state of :func:`muon_geometry` with ``filter_every > 1``."""
  threshold_ratio: jax.Array  # (batch,): l in τ = l·‖M̃‖_F, eq. (13)
  # The sharp filter of the last refresh: P (batch, s, s) on the small side
  # (s = min(rows, cols)), or T (batch, rows, cols) on the reference route.
  sharp_filter: jax.Array


def _check_filter_every(filter_every) -> int:
  """``filter_every`` as a Python int >= 1 (it decides the state layout)."""
  filter_every = _checks.int_hyperparameter('filter_every', filter_every, 1)
  _checks.require_static(
      'whether it is > 1 decides the layout of the optimizer state (the '
      'cached projector), so it must be known when the geometry is built',
      filter_every=filter_every)
  return filter_every


def _filter_shape(route: str, b: int, rows: int, cols: int) -> tuple:
  """The shape of one leaf's sharp filter (what ``filter_every`` caches)."""
  if route == 'reference':
    return (b, rows, cols)
  return (b, min(rows, cols), min(rows, cols))


def _sharp_map(route: str, filt, o, rows: int, cols: int, precision):
  """``x ↦ P x`` on the fan-in side from the sharp filter ``filt``.

  Reference route: ``P = T Tᵀ``. Small side: ``P`` itself when the fan-in
  side is the small side, else ``O P Oᵀ`` (``T Tᵀ = O P Oᵀ``), with the
  current polar factor ``O``.
  """
  def mm(x, y):
    return matmul_lib.matmul(x, y, kernel='lite_project', precision=precision)

  if route == 'reference':
    tt = jnp.swapaxes(filt, -1, -2)
    return lambda x: mm(filt, mm(tt, x.astype(filt.dtype)))
  if rows <= cols:
    return lambda x: mm(filt, x.astype(filt.dtype))
  ot = jnp.swapaxes(o, -1, -2)
  return lambda x: mm(o, mm(filt, mm(ot, x.astype(o.dtype))))


def muon_geometry(*, sharp_ratio: float = 0.1, method: str = 'polar_express',
                  steps: int | None = None, threshold_rate: float = 1.05,
                  threshold_cap: float | None = 1.0,
                  sharp_dim_rule: str = 'reference',
                  threshold_deadband: float = 0.0, precision=None,
                  filter_route: str = 'small_side',
                  ns_dtype=None, filter_every: int = 1) -> Geometry:
  r"""Muon's geometry: polar factors, sharp subspace from the momentum.

  The sharp subspace is the top singular subspace of ``M̃`` on the fan-in
  side (rows of the ``(fan_in, fan_out)`` view; the *input* side of the
  PyTorch weight, as in the reference code): singular values above
  ``τ = l·‖M̃‖_F``. ``l`` starts at ``1/√min(m, n)`` and follows eq. (13)
  towards ``d_s`` sharp directions. Two matmul-only routes build the
  projector ``P`` (both are eq. 12–15 in exact arithmetic):

  * ``filter_route="small_side"`` (default): the second sign function is
    taken on the small symmetric factor of the polar decomposition,
    ``P = ½(I + sign(H/τ − I))`` with ``H = M̃ Oᵀ`` or ``Oᵀ M̃`` (see
    :func:`optax_lite.linalg.subspace.small_side_projector`); it costs a
    third of the flops on a 1:4 matrix, and the controller measures
    ``‖P‖_F``.
  * ``filter_route="reference"``: the LITE code's
    ``T = ½(polar(M̃) + polar(M̃/τ − polar(M̃)))``, ``P = T Tᵀ`` on the fan-in
    side (``P_flat = I − TᵀT`` of the PyTorch weight), with the controller
    measuring ``‖T‖_F``; this reproduces ``muonlite.py`` step for step.

  Accuracy against the exact SVD projector onto the top ``d_s`` singular
  vectors (spectral norm of the difference; float32, Polar Express 6 steps;
  24 Gaussian matrices from 64×64 to 256×64 and 64×256, ``τ`` halfway
  between ``σ_{d_s}`` and ``σ_{d_s+1}``;
  ``benchmarks/lite_filter_accuracy.py``):
  small side median 1.3e-3, 90th percentile 5.1e-3, worst 0.56; reference
  route median 2.7e-3, 90th percentile 9.2e-3, worst 0.34 (the small side
  is closer on 15 of 24). Both worst cases are the same 96×160 matrix, whose
  ``σ_{d_s}`` and ``σ_{d_s+1}`` differ by 0.14%: no six-step sign function
  separates them, and which route errs less there is luck. The reference
  route is kept to reproduce ``muonlite.py`` (to round-off, tested in
  float64); the default is the more accurate and cheaper one.

  **Amortised filter** (``filter_every = k``, not in the paper). The sharp
  subspace of the momentum turns slowly from step to step, so the
  projector may be reused: it is recomputed only on steps with
  ``count % k == 0`` (``count`` = updates so far, so the first step always
  refreshes) and cached in the state in between. On the ``k − 1`` steps
  after a refresh at step ``r``

  .. math::
     P_t = P_r, \qquad l_t = l_r \qquad (r < t < r + k),

  i.e. the projector of the last refresh (small side: the ``s × s`` ``P_r``,
  ``s = min(m, n)``, in the small side's coordinates, carried to the fan-in
  side through the *current* ``O_t = polar(M̃_t)`` when the small side is
  the fan-out side; reference route: ``T_r``, ``P = T_r T_rᵀ``) and the
  ratio ``l`` held, since the controller of eq. (13) has no fresh
  ``‖P‖_F`` to measure (so ``l`` moves by one factor per refresh, not per
  step). ``polar(M̃)`` and ``polar(G)`` are still computed every step: they
  are the update. A held step skips the filter: on the small side the
  product ``H = M̃ Oᵀ`` and the sign iteration on ``s × s``, about one polar
  factor of the small side (reference route: one polar factor of the
  ``m × n`` matrix). In matmul flops (Polar Express, 6 steps) that is 35%
  of a square matrix's polar factors and filter and 17% of a 1:4 matrix's
  with ``polar(G)`` (``β₁, β₂ ≠ 0``), 51% and 29% without. The choice is a
  ``jax.lax.cond`` (jit-safe), so the held steps do not run the iteration.
  ``filter_every=1`` (default) is the paper's filter exactly and caches
  nothing.

  Args:
    sharp_ratio: ``r_s`` in ``d_s`` (see :func:`sharp_dim`), in (0, 1).
    method, steps: polar method (Polar Express, 6 steps by default).
    threshold_rate: controller rate (>1): ×rate / ×(2−rate) per step.
    threshold_cap: upper bound of ``l`` (reference: 1.0); ``None``: none.
    sharp_dim_rule: ``"reference"`` or ``"paper"`` rounding of ``d_s``.
    threshold_deadband: hold ``l`` while ``|‖P‖_F² − d_s| <`` this (0: the
      paper's eq. (13); see :func:`optax_lite.linalg.subspace.adapt_threshold`).
    precision: ``jax.lax.Precision`` of the matrix products.
    filter_route: ``"small_side"`` or ``"reference"`` (see above).
    ns_dtype: ``None`` or ``jnp.bfloat16``: the Newton–Schulz iteration of
      ``polar(M̃)`` and ``polar(G)`` in that dtype with float32
      accumulation (the filter's sign iteration stays in the input dtype).
    filter_every: ``k >= 1``; the sharp projector is recomputed on steps
      with ``count % k == 0`` and cached in between, with ``l`` held (see
      "Amortised filter" above). ``1`` (default) is the paper's filter.
      Whether ``k > 1`` decides the state's layout (the cached projector:
      ``min(m, n)²`` per matrix on the small side, ``m·n`` on the reference
      route): ``k`` must be a Python int (or a concrete integer array) when
      the geometry is built; a traced ``k`` is a ``TypeError`` naming
      ``static_args``.

  Raises:
    ValueError: ``filter_every < 1`` (and the other arguments' ranges).
    TypeError: ``filter_every`` not an int, or traced.
  """
  steps = polar_lib.check_method(method, steps)
  _checks.check_number('sharp_ratio', sharp_ratio, low=0.0, high=1.0,
                       low_open=True, high_open=True)
  _checks.check_number('threshold_rate', threshold_rate, low=1.0,
                       low_open=True, high=2.0, high_open=True)
  if threshold_cap is not None:
    _checks.check_positive('threshold_cap', threshold_cap)
  _checks.check_choice('sharp_dim_rule', sharp_dim_rule,
                       ('reference', 'paper'))
  _checks.check_positive('threshold_deadband', threshold_deadband,
                         allow_zero=True)
  _checks.check_choice('filter_route', filter_route, FILTER_ROUTES)
  ns_dtype = polar_lib.check_ns_dtype(ns_dtype)
  filter_every = _check_filter_every(filter_every)
  cached = filter_every > 1

  def polar(x):
    return polar_lib.polar_by_method(x, method, steps, precision=precision,
                                     ns_dtype=ns_dtype)

  def init(view, param):
    b, rows, cols = view.matrix_shape
    dtype = jnp.promote_types(param.dtype, jnp.float32)
    ratio = jnp.full((b,), 1.0 / math.sqrt(min(rows, cols)), dtype)
    if not cached:
      return MuonGeometryState(ratio)
    return MuonCachedGeometryState(ratio, jnp.zeros(
        _filter_shape(filter_route, b, rows, cols), dtype))

  def measured(m, o, tau, norm, ratio, rows, cols):
    """A fresh sharp filter of ``m`` at ``τ`` and the ratio it moves ``l``
    to (eq. 13): the controller measures ``‖P‖_F`` (``‖T‖_F`` on the
    reference route)."""
    if filter_route == 'reference':
      # T = ½(polar(M̃) + polar(M̃/τ − polar(M̃))), (fan_in, fan_out).
      filt = subspace.filter_from_polar(m, o, tau, method=method,
                                        steps=steps, precision=precision)
    else:
      # The sharp projector on the small side (the fan-in side itself when
      # fan_in <= fan_out, else the fan-out side).
      filt = subspace.small_side_projector(m, o, tau, method=method,
                                           steps=steps, precision=precision)
    d_s = sharp_dim(sharp_ratio, rows, cols, sharp_dim_rule)
    target = math.sqrt(d_s) if isinstance(d_s, int) else jnp.sqrt(d_s)
    mes = filt.astype(jnp.promote_types(filt.dtype, jnp.float32))
    rank = jnp.sqrt(jnp.sum(jnp.square(mes), axis=(-2, -1)))
    new_ratio = subspace.adapt_threshold(
        ratio, rank.astype(ratio.dtype), target,
        threshold_rate, threshold_cap, threshold_deadband)
    # A zero momentum carries no geometry: keep the ratio unchanged.
    return filt, jnp.where(norm > 0, new_ratio, ratio).astype(ratio.dtype)

  def directions(view, m_term, g, leaf_state, count, need_g):
    ratio = leaf_state[0]
    b, rows, cols = view.matrix_shape
    m = view.to_matrix(m_term)
    if need_g:
      # polar(M̃) and polar(G) in one batched call (same shapes).
      both = polar(jnp.concatenate([m, view.to_matrix(g)], axis=0))
      o, h = both[:b], both[b:]
    else:
      o, h = polar(m), None
    mf = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(mf * mf, axis=(-2, -1)))
    tau = (ratio * norm + 1e-9).astype(m.dtype)
    if not cached:
      filt, new_ratio = measured(m, o, tau, norm, ratio, rows, cols)
      new_state = MuonGeometryState(new_ratio)
    else:
      held = leaf_state[1]

      def fresh(m, o, tau, norm, ratio):
        filt, new_ratio = measured(m, o, tau, norm, ratio, rows, cols)
        return filt.astype(held.dtype), new_ratio

      def reuse(m, o, tau, norm, ratio):
        del m, o, tau, norm
        return held, ratio

      # ``count`` is the step number (1 on the first step). A cond, not a
      # select: the skipped steps must not run the sign iteration.
      refresh = (count - 1) % filter_every == 0
      filt, new_ratio = jax.lax.cond(refresh, fresh, reuse, m, o, tau, norm,
                                     ratio)
      new_state = MuonCachedGeometryState(new_ratio, filt)
    sharp = _sharp_map(filter_route, filt, o, rows, cols, precision)

    def flat(x):  # (I − P) x on the fan-in side
      return x - sharp(x)

    def to_coords(w):
      return view.to_matrix(w).astype(o.dtype)

    return LeafDirections(o, h, flat, view.from_matrix, to_coords, new_state)

  return Geometry(init, directions, needs_matrix=True, momentum_ema=False,
                  state_type=(MuonCachedGeometryState if cached
                              else MuonGeometryState))
