r"""Polar factor of a matrix by odd-polynomial (Newton–Schulz) iterations.

For ``X = U Σ Vᵀ`` the polar factor (orthogonal part, "matrix sign") is
``polar(X) = U Vᵀ``. Muon uses it as its update direction, LITE uses it to
build spectral projectors, FISMO applies it in a whitened space.

Every iterative method normalises ``X`` by its Frobenius norm (so all singular
values lie in ``(0, 1]``) and then applies, ``steps`` times, an odd polynomial

.. math::  X \leftarrow a X + (b A + c A^2) X,  \qquad A = X X^\top,

on the *smaller* Gram side (wide orientation), so the cost per step is
``2·s²·l + s³`` multiply-adds for an ``s × l`` matrix with ``s ≤ l``. Only
matrix products are used, which is what makes the iteration fast on GPU/TPU.

Methods:

* ``"polar_express"`` (default, 6 steps) – the per-step optimal coefficients
  of Amsel et al. (2025), the 8-row table used by the LITE reference code and
  HeavyBall, with the 1.01 safety factor applied to all but the last row.
  Steps beyond 8 repeat the last row.
* ``"gram_polar_express"`` (6 steps) – the same polynomial computed by Gram
  Newton–Schulz (:func:`newton_schulz_gram`): the iteration runs on the
  ``s × s`` matrix ``X Xᵀ`` and ``X`` is touched once every 2 steps, so an
  ``s × l`` matrix costs ``(6·l + 15)·s²`` multiply-adds in place of
  ``(12·l + 6)·s²`` (1.38× fewer at 1:4). Used where it is cheaper
  (``l > 1.5·s``, :func:`uses_gram`); square matrices run the plain
  iteration. Equal to ``"polar_express"`` up to round-off.
* ``"jordan"`` (5 steps) – Keller Jordan's quintic ``(3.4445, −4.7750,
  2.0315)``, the default of ``optax.contrib.muon``. Fast but inexact: its
  singular values oscillate in roughly ``[0.7, 1.2]``.
* ``"cubic"`` (12 steps) – the classical Newton–Schulz iteration
  ``X ← 1.5 X − 0.5 X Xᵀ X``; converges to the exact polar factor, slowly for
  small singular values.
* ``"svd"`` – the exact reference ``U Vᵀ`` from an SVD (singular values below
  round-off are treated as zero, i.e. the Moore–Penrose polar factor).

References:
  Amsel, Persson, Musco, Gower, `The Polar Express: Optimal Matrix Sign
  Methods and Their Application to the Muon Algorithm
  <https://arxiv.org/abs/2505.16932>`_, 2025.

  Jordan et al., `Muon: An optimizer for hidden layers in neural networks
  <https://kellerjordan.github.io/posts/muon/>`_, 2024.

  Zhang, Amsel, Chen, Dao, `Gram Newton–Schulz
  <https://dao-ailab.github.io/blog/2026/gram-newton-schulz/>`_, 2026.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from optax_lite import _checks
from optax_lite.linalg import matmul as matmul_lib

# Polar Express, Amsel et al. 2025 (l = 1e-3, 8 steps), as used in LITE's
# muonlite.py and HeavyBall; the 1.01 safety factor is applied below.
_POLAR_EXPRESS_RAW = np.array([
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
])
_SAFETY = 1.01

# Added to the Frobenius norm before dividing by it (a zero matrix stays zero).
EPS = 1e-7


def _polar_express_table() -> np.ndarray:
  t = _POLAR_EXPRESS_RAW.copy()
  t[:-1] /= np.array([_SAFETY, _SAFETY**3, _SAFETY**5])
  return t


POLAR_EXPRESS_COEFFS = _polar_express_table()
JORDAN_COEFFS = (3.4445, -4.7750, 2.0315)
CUBIC_COEFFS = (1.5, -0.5, 0.0)

METHODS = ('polar_express', 'gram_polar_express', 'jordan', 'cubic', 'svd')
DEFAULT_STEPS = {'polar_express': 6, 'gram_polar_express': 6, 'jordan': 5,
                 'cubic': 12, 'svd': 0}
# Frobenius normalisation factor: Polar Express is tuned for σ_max ≤ 1/1.01.
_NORM_FACTOR = {'polar_express': _SAFETY, 'gram_polar_express': _SAFETY,
                'jordan': 1.0, 'cubic': 1.0}
# Gram Newton–Schulz restarts (re-forms X and X Xᵀ) every this many steps:
# the longest period that keeps Polar Express's 6 steps in its band under
# bfloat16. Measured max|σ−1| at condition 100 (48 × 96), bfloat16
# products / bfloat16 iterates: every 2 steps 0.012 / 0.009; every 3 steps
# 7.1 / 63; no restart 4e10 / 6e11 (float32: 0.0023 for all).
GRAM_RESTART_EVERY = 2


def check_method(method: str, steps: int | None, name: str = 'method') -> int:
  """Validates ``method``/``steps`` and returns the resolved step count."""
  _checks.check_choice(name, method, METHODS)
  if steps is None:
    return DEFAULT_STEPS[method]
  if method == 'svd':
    return 0
  _checks.check_int('steps', steps, low=1)
  return int(steps)


def flops(rows: int, cols: int, steps: int,
          method: str = 'polar_express') -> float:
  """Flops of ``steps`` iterations on a ``rows × cols`` matrix.

  ``2·s²·l + s³`` multiply-adds per step on the smaller Gram side
  (``s = min``, ``l = max``), two flops each: the cost by which the
  distributed paths balance polar factors across devices. For
  ``method="gram_polar_express"`` the smaller of that and
  :func:`gram_flops` (the form :func:`polar_by_method` runs).
  """
  s, l = min(rows, cols), max(rows, cols)
  plain = float(max(steps, 1) * (4 * s * s * l + 2 * s ** 3))
  if method == 'gram_polar_express':
    return min(plain, gram_flops(rows, cols, steps))
  return plain


def coefficients(method: str, steps: int | None = None) -> np.ndarray:
  """The ``(steps, 3)`` table of ``(a, b, c)`` used by an iterative method."""
  steps = check_method(method, steps)
  if method == 'svd':
    raise ValueError('method: "svd" has no iteration coefficients.')
  if method in ('polar_express', 'gram_polar_express'):
    table = POLAR_EXPRESS_COEFFS
    idx = np.minimum(np.arange(steps), len(table) - 1)
    return table[idx]
  row = JORDAN_COEFFS if method == 'jordan' else CUBIC_COEFFS
  return np.tile(np.asarray(row, dtype=np.float64), (steps, 1))


def check_ns_dtype(ns_dtype, name: str = 'ns_dtype'):
  """``None`` or a floating dtype (returned as a ``numpy.dtype``)."""
  if ns_dtype is None:
    return None
  try:
    dt = jnp.dtype(ns_dtype)
  except TypeError:
    raise TypeError(f'{name} must be None or a floating dtype, got '
                    f'{ns_dtype!r}.') from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f'{name} must be None or a floating dtype, got {dt}.')
  return dt


def _to_wide_unit(x, norm_factor, eps, ns_dtype):
  """``x`` on its wide side, divided by ``norm_factor·‖x‖_F + eps``.

  Returns the normalised iterate (in ``ns_dtype`` if given, else ``x``'s
  dtype), whether it was transposed, and the products' accumulation dtype
  (``None``: the iterate's dtype).
  """
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  # float32 at least (float64 inputs keep float64: norm and coefficients).
  wide_dtype = jnp.promote_types(x.dtype, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(wide_dtype)), axis=(-2, -1),
                          keepdims=True))
  # A zero matrix stays zero: 0 / (0 + eps) = 0, never NaN.
  if ns_dtype is None:
    return (x / (norm * norm_factor + eps).astype(x.dtype)), tall, None
  x = (x.astype(jnp.float32) / (norm * norm_factor + eps)).astype(ns_dtype)
  return x, tall, jnp.promote_types(ns_dtype, jnp.float32)


def newton_schulz(x: jax.Array, coeffs: np.ndarray, *, norm_factor=1.0,
                  eps: float = EPS, precision=None,
                  ns_dtype=None, kernel: str = 'polar') -> jax.Array:
  """Runs the odd-polynomial iteration given a static ``(steps, 3)`` table.

  ``x`` has shape ``(..., m, n)``. The iteration runs on the wide orientation
  (the Gram matrix is ``min(m, n)²``) and returns the same shape and dtype.
  ``ns_dtype`` (e.g. ``jnp.bfloat16``): the iterates and the products'
  operands are stored in that dtype, every product accumulates in float32
  and the polynomial's combinations are formed in float32 then rounded (as
  Keller Jordan's Muon runs it in bfloat16). ``None``: ``x``'s dtype
  throughout. Products go through :func:`optax_lite.linalg.matmul.matmul`
  as ``kernel`` (``"polar"``; the LITE filter passes ``"lite_filter"``).
  """
  coeffs = np.asarray(coeffs, dtype=np.float64)
  ns_dtype = check_ns_dtype(ns_dtype)
  out_dtype = x.dtype
  wide_dtype = jnp.promote_types(out_dtype, jnp.float32)
  x, tall, acc = _to_wide_unit(x, norm_factor, eps, ns_dtype)
  cubic_only = bool(np.all(coeffs[:, 2] == 0.0))

  def mm(u, v):
    return matmul_lib.matmul(u, v, kernel=kernel, precision=precision,
                             preferred_element_type=acc)

  def step(x, abc):
    dt = x.dtype if acc is None else acc
    a, b, c = (abc[i].astype(dt) for i in range(3))
    gram = mm(x, jnp.swapaxes(x, -1, -2)).astype(x.dtype)
    if cubic_only:
      poly = b * gram
    else:
      poly = b * gram + c * mm(gram, gram)
    poly = poly.astype(x.dtype)
    return (a * x + mm(poly, x)).astype(x.dtype), None

  x, _ = jax.lax.scan(step, x, jnp.asarray(coeffs, dtype=wide_dtype))
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(out_dtype)


def newton_schulz_gram(x: jax.Array, coeffs: np.ndarray, *,
                       norm_factor=1.0, eps: float = EPS, precision=None,
                       ns_dtype=None, kernel: str = 'polar',
                       restart_every: int = GRAM_RESTART_EVERY) -> jax.Array:
  r"""The same polynomial as :func:`newton_schulz`, iterated on the Gram matrix.

  For the wide ``s × l`` iterate ``X`` (``s ≤ l``) each step is
  ``X ← W X`` with ``W = a I + b R + c R²`` and ``R = X Xᵀ``, so ``k`` steps
  are ``X_k = Q X_0`` with ``Q = W_{k-1} ⋯ W_0`` and
  ``R_{j+1} = W_j R_j W_j`` (all polynomials in ``R_0``, so they commute):
  only ``s × s`` products inside, one ``s × s`` by ``s × l`` product at the
  end. Every ``restart_every`` steps the accumulated ``Q`` is applied and
  ``R`` recomputed from the new ``X`` (Zhang, Amsel, Chen, Dao's restart):
  ``Q`` grows like ``1/σ`` on small singular values and amplifies the
  round-off of ``R``; restarting bounds it. A segment of ``k`` steps costs
  ``2·s²·l + (4k − 3)·s³`` multiply-adds against ``k·(2·s²·l + s³)`` for
  :func:`newton_schulz`: fewer for ``k = 2`` once ``l > 1.5·s``.

  Segments are a ``lax.scan`` (a trailing shorter segment is traced apart),
  so the compiled program does not grow with ``steps``. Arguments as
  :func:`newton_schulz`; ``restart_every >= 1`` (1 is plain Newton–Schulz,
  computed the Gram way).

  References:
    Zhang, Amsel, Chen, Dao, `Gram Newton–Schulz
    <https://dao-ailab.github.io/blog/2026/gram-newton-schulz/>`_, 2026
    (used by microsoft/dion as ``use_gram_newton_schulz``).
  """
  coeffs = np.asarray(coeffs, dtype=np.float64)
  ns_dtype = check_ns_dtype(ns_dtype)
  _checks.check_int('restart_every', restart_every, low=1)
  out_dtype = x.dtype
  wide_dtype = jnp.promote_types(out_dtype, jnp.float32)
  x, tall, acc = _to_wide_unit(x, norm_factor, eps, ns_dtype)
  dt = x.dtype
  eye = jnp.eye(x.shape[-2], dtype=dt)

  def mm(u, v):  # products accumulate in ``acc``; stored iterates in dt
    return matmul_lib.matmul(u, v, kernel=kernel, precision=precision,
                             preferred_element_type=acc)

  def segment(x, table):
    """``len(table)`` steps: ``X ← Q X`` with ``Q`` built on ``R = X Xᵀ``."""
    r = mm(x, jnp.swapaxes(x, -1, -2)).astype(dt)
    q = None
    for j in range(table.shape[0]):
      a, b, c = (table[j, i].astype(dt if acc is None else acc)
                 for i in range(3))
      w = (a * eye + b * r + c * mm(r, r)).astype(dt)
      q = w if q is None else mm(q, w).astype(dt)
      if j + 1 < table.shape[0]:  # R of the next step: W R W
        r = mm(mm(w, r).astype(dt), w).astype(dt)
    return mm(q, x).astype(dt), None

  k = int(restart_every)
  full = (coeffs.shape[0] // k) * k
  if full:
    tables = jnp.asarray(coeffs[:full].reshape(-1, k, 3), dtype=wide_dtype)
    x, _ = jax.lax.scan(segment, x, tables)
  if full < coeffs.shape[0]:
    x, _ = segment(x, jnp.asarray(coeffs[full:], dtype=wide_dtype))
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(out_dtype)


def gram_flops(rows: int, cols: int, steps: int,
               restart_every: int = GRAM_RESTART_EVERY) -> float:
  """Flops of :func:`newton_schulz_gram` (two per multiply-add)."""
  s, l = min(rows, cols), max(rows, cols)
  full, rest = divmod(max(steps, 1), restart_every)
  seg = [restart_every] * full + ([rest] if rest else [])
  return float(sum(2 * (2 * s * s * l + (4 * k - 3) * s ** 3) for k in seg))


def uses_gram(rows: int, cols: int, steps: int) -> bool:
  """Whether ``"gram_polar_express"`` runs the Gram form on this shape.

  Where it costs fewer flops than the plain iteration (for the default
  restart every 2 steps: ``max > 1.5·min``, e.g. a 1:4 MLP matrix), else
  the plain iteration (a square matrix), which is the same polynomial.
  """
  return gram_flops(rows, cols, steps) < flops(rows, cols, steps)


def polar_svd(x: jax.Array) -> jax.Array:
  """Exact (Moore–Penrose) polar factor ``U Vᵀ`` through an SVD."""
  dtype = x.dtype
  xf = x.astype(jnp.promote_types(dtype, jnp.float32))
  u, s, vt = jnp.linalg.svd(xf, full_matrices=False)
  tol = (max(x.shape[-2:]) * jnp.finfo(xf.dtype).eps
         * jnp.max(s, axis=-1, keepdims=True))
  keep = (s > tol).astype(xf.dtype)
  # The exact reference: rebuilt in full float32 on every backend.
  return matmul_lib.matmul(u * keep[..., None, :], vt, kernel='polar',
                           precision=jax.lax.Precision.HIGHEST).astype(dtype)


def polar_by_method(x: jax.Array, method: str = 'polar_express',
                    steps: int | None = None, *, eps: float = EPS,
                    precision=None, ns_dtype=None,
                    kernel: str = 'polar') -> jax.Array:
  """The polar factor of ``x`` by ``method``, unjitted, for use inside a step.

  The one place that maps a method name to its computation:
  ``"svd"`` → :func:`polar_svd`; ``"gram_polar_express"`` →
  :func:`newton_schulz_gram` where :func:`uses_gram`; otherwise
  :func:`newton_schulz` with the method's coefficient table and Frobenius
  normalisation factor (Polar Express is tuned for ``σ_max ≤ 1/1.01``).
  ``method``/``steps`` are static; validate them once with
  :func:`check_method` when building a transform.
  :func:`polar_factor` is the checked, jitted entry point for users.
  """
  if method == 'svd':
    return polar_svd(x)
  if method == 'gram_polar_express':
    steps = check_method(method, steps)
    if uses_gram(x.shape[-2], x.shape[-1], steps):
      return newton_schulz_gram(x, coefficients(method, steps),
                                norm_factor=_NORM_FACTOR[method], eps=eps,
                                precision=precision, ns_dtype=ns_dtype,
                                kernel=kernel)
  return newton_schulz(x, coefficients(method, steps),
                       norm_factor=_NORM_FACTOR[method], eps=eps,
                       precision=precision, ns_dtype=ns_dtype, kernel=kernel)


@functools.partial(jax.jit, static_argnames=('method', 'steps', 'precision',
                                             'ns_dtype'))
def _polar_factor_jit(x, method, steps, eps, precision, ns_dtype):
  return polar_by_method(x, method, steps, eps=eps, precision=precision,
                         ns_dtype=ns_dtype)


def polar_factor(x: jax.Array, method: str = 'polar_express',
                 steps: int | None = None, *, eps: float = EPS,
                 precision=None, ns_dtype=None) -> jax.Array:
  """Returns ``≈ U Vᵀ`` for ``x = U Σ Vᵀ``, batched over leading dims.

  Args:
    x: array of shape ``(..., m, n)``, float32 / bfloat16 / float16 / float64.
      Tall and wide matrices are both fine.
    method: ``"polar_express"`` (default), ``"gram_polar_express"`` (the
      same polynomial through the Gram matrix, cheaper on rectangular
      matrices), ``"jordan"``, ``"cubic"`` or ``"svd"``.
    steps: number of iterations (static). Defaults: polar_express and
      gram_polar_express 6, jordan 5, cubic 12; ignored by ``"svd"``.
    eps: added to the Frobenius norm before normalising; a zero matrix maps
      to zeros.
    precision: ``jax.lax.Precision`` for the matrix products (``None``: the
      policy of :mod:`optax_lite.linalg.matmul`, the backend default;
      ``HIGHEST`` forces full float32 on TPU/GPU).
    ns_dtype: ``None`` or a dtype (``jnp.bfloat16``) for the iterates and
      product operands, with float32 accumulation (see
      :func:`newton_schulz`). Ignored by ``"svd"``.

  Returns:
    An array of the same shape and dtype as ``x``.
  """
  steps = check_method(method, steps)
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f'x must have rank >= 2, got shape {x.shape}.')
  _checks.check_float_leaf('x', x)
  _checks.check_positive('eps', eps)
  precision = matmul_lib.check_precision('precision', precision)
  ns_dtype = check_ns_dtype(ns_dtype)
  return _polar_factor_jit(x, method, steps, eps, precision, ns_dtype)
