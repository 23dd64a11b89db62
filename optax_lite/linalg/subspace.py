r"""Spectral subspace filters: which directions of a matrix are *sharp*.

LITE (Zhu et al. 2026, Appendix B.1, eq. 12–15) finds the top singular
subspace of the momentum ``M = U Σ Vᵀ`` with two polar factors and no SVD:

.. math::
   T = \tfrac12\,\mathrm{polar}(M)
     + \tfrac12\,\mathrm{polar}(M/τ - \mathrm{polar}(M))
     = U\,\mathrm{diag}(\mathbb 1[σ_i > τ])\,V^\top,

because ``M/τ − polar(M) = U diag(σᵢ/τ − 1) Vᵀ`` and the polar factor maps
each ``σᵢ/τ − 1`` to its sign. ``Tᵀ T`` projects onto the right singular
vectors with ``σᵢ > τ`` and ``T Tᵀ`` onto the left ones. With a finite-step
polar iteration the cut is soft near ``σ ≈ τ``, which is why the filter needs
a precise polar factor (Polar Express).

Layout: in optax_lite a leaf is seen as ``X`` of shape ``(fan_in, fan_out)``,
the transpose of PyTorch's ``(out, in)``. The LITE reference projects on the
input side (right singular vectors of the torch weight), which is the *left*
side of ``X``: :func:`sharp_projector` with ``side="left"`` (the default used
by the LITE transforms) returns ``T Tᵀ`` of size ``fan_in × fan_in``.

:func:`adapt_threshold` is the controller of eq. (13): the ratio ``l`` in
``τ = l·‖M‖_F`` grows by ``rate`` when the filter keeps at least ``d_s``
directions (``‖P‖_F ≥ √d_s``) and shrinks by ``1/rate``-ish (``2 − rate``)
otherwise, so the rank settles at the target.

:func:`soft_mask` is the element-wise soft mask of eq. (16) used by SOAP-LITE
and AdamW-LITE, with its two-threshold controller (eq. 17–18).

References:
  Zhu et al., `Accelerating LLM Pre-Training through Flat-Direction Dynamics
  Enhancement <https://arxiv.org/abs/2602.22681>`_, 2026.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import polar as polar_lib


def _polar(x, method, steps, precision):
  return polar_lib.polar_by_method(x, method, steps, precision=precision,
                                   kernel='lite_filter')


def _mm(a, b, kernel='lite_filter', precision=None):
  return matmul_lib.matmul(a, b, kernel=kernel, precision=precision)


def filter_from_polar(m: jax.Array, polar_m: jax.Array, tau: jax.Array, *,
                      method: str = 'polar_express', steps: int | None = None,
                      precision=None) -> jax.Array:
  """``T`` of eq. (12) given ``polar(M)`` already computed.

  ``tau`` broadcasts against the leading (batch) dims of ``m``.
  """
  tau = jnp.asarray(tau, m.dtype)[..., None, None]
  return 0.5 * (polar_m + _polar(m / tau - polar_m, method, steps, precision))


def spectral_filter(m: jax.Array, tau, *, method: str = 'polar_express',
                    steps: int | None = None, precision=None) -> jax.Array:
  """``T ≈ U diag(1[σᵢ > τ]) Vᵀ`` for ``m = U Σ Vᵀ``, batched over ``(...)``.

  Args:
    m: ``(..., rows, cols)``.
    tau: threshold(s), a scalar or an array of the batch shape. Must be > 0.
    method, steps: the polar method (``"svd"`` gives the exact filter).
  """
  steps = polar_lib.check_method(method, steps)
  m = jnp.asarray(m)
  return filter_from_polar(m, _polar(m, method, steps, precision), tau,
                           method=method, steps=steps, precision=precision)


def sharp_projector(m: jax.Array, tau, *, side: str = 'left',
                    method: str = 'polar_express', steps: int | None = None,
                    precision=None) -> jax.Array:
  """Projector onto the singular vectors of ``m`` with ``σ > τ``.

  ``side="left"``: ``T Tᵀ`` (rows × rows, the column space); ``"right"``:
  ``Tᵀ T`` (cols × cols, the paper's ``P_k`` in PyTorch layout).
  """
  if side not in ('left', 'right'):
    raise ValueError(f'side must be "left" or "right", got {side!r}.')
  t = spectral_filter(m, tau, method=method, steps=steps, precision=precision)
  tt = jnp.swapaxes(t, -1, -2)
  return _mm(t, tt, precision=precision) if side == 'left' else _mm(
      tt, t, precision=precision)


def small_side_projector(m: jax.Array, polar_m: jax.Array, tau, *,
                         method: str = 'polar_express',
                         steps: int | None = None, precision=None
                         ) -> jax.Array:
  r"""The sharp projector on the *smaller* side of ``m``, from a symmetric sign.

  With ``O = polar(M) = U Vᵀ`` the symmetric factor of the polar
  decomposition on the small side is ``H = M Oᵀ = U Σ Uᵀ`` (wide ``M``) or
  ``H = Oᵀ M = V Σ Vᵀ`` (tall), and

  .. math::  P = ½\,(I + \mathrm{sign}(H/τ - I))
     = U\,\mathrm{diag}(\mathbb 1[σ_i > τ])\,U^\top,

  the same eigen-structure as eq. (12–15) (``sign(H/τ − I)`` has
  eigenvalues ``sign(σᵢ/τ − 1)``) but the second polar factor runs on an
  ``s × s`` symmetric matrix (``s = min(m, n)``) instead of ``m × n``: for a
  ``1024 × 4096`` matrix it costs a third of the flops. Zero singular values
  (rank deficiency) land in the flat part.

  Returns ``P`` of shape ``(..., s, s)``: the left projector for wide ``m``
  (rows ≤ cols), the right projector for tall ``m``.
  """
  rows, cols = m.shape[-2:]
  ot = jnp.swapaxes(polar_m, -1, -2)
  h = (_mm(m, ot, precision=precision) if rows <= cols else
       _mm(ot, m, precision=precision))
  h = 0.5 * (h + jnp.swapaxes(h, -1, -2))
  eye = jnp.eye(h.shape[-1], dtype=h.dtype)
  tau = jnp.asarray(tau, h.dtype)[..., None, None]
  sign = _polar(h / tau - eye, method, steps, precision)
  return 0.5 * (eye + 0.5 * (sign + jnp.swapaxes(sign, -1, -2)))


def exact_sharp_projector(m: jax.Array, rank: int, side: str = 'left'
                          ) -> jax.Array:
  """The SVD projector onto the top-``rank`` singular vectors (reference)."""
  u, _, vt = jnp.linalg.svd(m, full_matrices=False)
  if side == 'left':
    b = u[..., :, :rank]
  else:
    b = jnp.swapaxes(vt, -1, -2)[..., :, :rank]
  return _mm(b, jnp.swapaxes(b, -1, -2), precision=jax.lax.Precision.HIGHEST)


def apply_left(t: jax.Array, x: jax.Array) -> jax.Array:
  """``(T Tᵀ) X`` without forming the projector when that is cheaper."""
  rows, cols = t.shape[-2:]
  tt = jnp.swapaxes(t, -1, -2)
  if cols < rows:
    return _mm(t, _mm(tt, x, 'lite_project'), 'lite_project')  # 2·r·c·c'
  return _mm(_mm(t, tt), x, 'lite_project')


def projector_rank(t: jax.Array) -> jax.Array:
  """``‖T Tᵀ‖_F`` (= ``√rank`` for an exact filter), per batch element."""
  rows, cols = t.shape[-2:]
  tt = jnp.swapaxes(t, -1, -2)
  gram = _mm(tt, t) if cols <= rows else _mm(t, tt)
  return jnp.sqrt(jnp.sum(jnp.square(gram), axis=(-2, -1)))


def adapt_threshold(ratio: jax.Array, measure: jax.Array, target,
                    rate: float = 1.05, cap: float | None = 1.0,
                    deadband: float = 0.0) -> jax.Array:
  """Eq. (13): ``ratio·rate`` if ``measure ≥ target`` else ``ratio·(2−rate)``.

  ``measure`` is ``‖P‖_F`` and ``target`` is ``√d_s``. With the paper's
  ``rate = 1.05`` this is ×1.05 / ×0.95, a bang-bang controller that keeps
  ``τ`` oscillating at an edge of the spectrum. ``deadband > 0`` (in units of
  rank, compared on ``‖P‖_F²``) holds the ratio while
  ``|‖P‖_F² − d_s| < deadband``, so that ``τ`` can rest inside a spectral gap;
  ``deadband = 0`` is eq. (13) exactly. ``cap`` bounds the ratio from above
  (the reference caps it at 1).
  """
  m2, t2 = jnp.square(measure), jnp.square(target)
  up = m2 >= t2 + deadband
  down = m2 < t2 - deadband
  new = jnp.where(up, ratio * rate, jnp.where(down, ratio * (2.0 - rate),
                                              ratio))
  return new if cap is None else jnp.minimum(new, cap)


def soft_mask(v: jax.Array, l_sharp: jax.Array, l_smooth: jax.Array,
              axes=None) -> jax.Array:
  """Eq. (16): 1 above ``l_s·mean(v)``, 0 below ``l_smooth·mean(v)``, linear
  in between. ``axes`` are the axes the mean runs over (default: all);
  ``l_*`` broadcast against the remaining (batch) axes."""
  axes = tuple(range(v.ndim)) if axes is None else axes
  mean = jnp.mean(v, axis=axes, keepdims=True)
  keep = [i for i in range(v.ndim) if i not in tuple(a % v.ndim for a in axes)]
  shape = [v.shape[i] if i in keep else 1 for i in range(v.ndim)]
  ts = jnp.reshape(l_sharp, shape) * mean
  tm = jnp.reshape(l_smooth, shape) * mean
  width = jnp.maximum(ts - tm, jnp.finfo(v.dtype).tiny)
  return jnp.clip((v - tm) / width, 0.0, 1.0)


# counts_above: leaves of at least this many elements are counted in at
# most COUNT_MAX_CHUNKS equal chunks of about COUNT_CHUNK elements.
COUNT_CHUNKED_FROM = 1 << 20
COUNT_CHUNK = 1 << 18
COUNT_MAX_CHUNKS = 4096


def _count_chunks(size: int) -> int:
  """How many equal chunks ``counts_above`` splits ``size`` elements into
  (the first divisor of ``size`` that makes them at most ``COUNT_CHUNK``;
  1: count in one piece)."""
  if size < COUNT_CHUNKED_FROM:
    return 1
  return next((d for d in range(-(-size // COUNT_CHUNK), COUNT_MAX_CHUNKS + 1)
               if size % d == 0), 1)


def counts_above(v: jax.Array, thresholds, axes) -> tuple:
  """``jnp.sum(v > t, axis=axes)`` for each ``t`` of ``thresholds``
  (broadcastable against ``v``, size 1 along ``axes``).

  XLA:CPU materialises a reduction's elementwise input, so the plain sum
  costs a buffer of ``v``'s size per threshold (for LITE's mask on an
  embedding, twice its bytes: the floor of a LITE step's temporaries under
  the smallest memory budget). When ``axes`` are ``v``'s trailing axes and
  hold at least ``COUNT_CHUNKED_FROM`` elements, the count runs over
  ``COUNT_CHUNK``-sized slices in a ``fori_loop``: the same integers.
  """
  axes = tuple(sorted(a % v.ndim for a in axes))
  size = math.prod(v.shape[a] for a in axes)
  trailing = axes == tuple(range(v.ndim - len(axes), v.ndim))
  chunks = _count_chunks(size)
  if not trailing or chunks <= 1:
    return tuple(jnp.sum(v > t, axis=axes) for t in thresholds)
  lead = v.shape[:v.ndim - len(axes)]
  batch = math.prod(lead)
  flat = v.reshape(batch, chunks, size // chunks)
  ts = [jnp.broadcast_to(t, lead + (1,) * len(axes)).reshape(batch, 1, 1)
        for t in thresholds]

  def body(i, acc):
    part = jax.lax.dynamic_slice_in_dim(flat, i, 1, axis=1)
    return tuple(a + jnp.sum(part > t, axis=(1, 2), dtype=jnp.int32)
                 for a, t in zip(acc, ts))

  zero = jnp.zeros((batch,), jnp.int32)
  counts = jax.lax.fori_loop(0, chunks, body, (zero,) * len(ts))
  return tuple(c.reshape(lead) for c in counts)


def adapt_mask_thresholds(v, l_sharp, l_smooth, d_sharp, d_smooth, axes=None,
                          rate: float = 1.05):
  """Eq. (17–18) and the ``l_smooth ≤ 0.95·l_s`` constraint.

  Returns the new ``(l_sharp, l_smooth)``. ``d_sharp``/``d_smooth`` are
  element counts per batch element.
  """
  axes = tuple(range(v.ndim)) if axes is None else axes
  mean = jnp.mean(v, axis=axes, keepdims=True)
  keep = [i for i in range(v.ndim) if i not in tuple(a % v.ndim for a in axes)]
  shape = [v.shape[i] if i in keep else 1 for i in range(v.ndim)]
  n_sharp, n_smooth = counts_above(
      v, (jnp.reshape(l_sharp, shape) * mean,
          jnp.reshape(l_smooth, shape) * mean), axes)
  new_s = jnp.where(n_sharp >= d_sharp, l_sharp * rate, l_sharp * (2 - rate))
  new_m = jnp.where(n_smooth >= d_sharp + d_smooth, l_smooth * rate,
                    l_smooth * (2 - rate))
  return new_s, jnp.minimum(new_m, 0.95 * new_s)
