r"""Inverse p-th roots of symmetric positive semi-definite matrices.

``inverse_root(A, p)`` returns ``(A + ε I)^{-1/p}``, batched over leading
dims. Two methods:

* ``"eigh"`` – exact: ``Q diag((λ + ε)^{-1/p}) Qᵀ`` from ``jnp.linalg.eigh``;
  eigenvalues are clipped at 0 first so round-off never gives NaN.
* ``"newton"`` – the coupled Newton iteration of Guo & Higham (2006) as used
  by Distributed Shampoo: matmul-only, so it runs well on accelerators::

      z = (1 + p) / (2 ‖A‖_F);  M₀ = z A;  H₀ = z^{1/p} I
      Tᵢ = ((p + 1) I − Mᵢ) / p;  Mᵢ₊₁ = Tᵢᵖ Mᵢ;  Hᵢ₊₁ = Hᵢ Tᵢ

  ``H → A^{-1/p}`` because ``M → I`` (all eigenvalues of ``M₀`` lie in
  ``(0, (1+p)/2]``, where the iteration converges). The Frobenius norm bounds
  the spectral norm from above, so no eigenvalue estimate is needed.

:func:`inverse_sqrt_warm` refines a nearby root (e.g. the previous step's,
for an EMA factor) by the symmetrised Newton–Schulz iteration
``Z ← sym(½ Z (3I − Z A Z))``, falling back to ``"newton"`` when the start
is too far.

References:
  Guo & Higham, `A Schur–Newton method for the matrix p-th root and its
  inverse <https://doi.org/10.1137/050643374>`_, SIAM J. Matrix Anal. Appl.
  2006.

  Anil et al., `Scalable Second Order Optimization for Deep Learning
  <https://arxiv.org/abs/2002.09018>`_, 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_lite import _checks
from optax_lite.linalg import matmul as matmul_lib

ROOT_METHODS = ('eigh', 'newton')


def symmetrize(a: jax.Array) -> jax.Array:
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _eye_like(a: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def inverse_root_eigh(a: jax.Array, p: float, eps: float = 0.0) -> jax.Array:
  """``(A + εI)^{-1/p}`` by eigendecomposition (float32 or wider inside)."""
  dtype = a.dtype
  af = symmetrize(a.astype(jnp.promote_types(dtype, jnp.float32)))
  lam, q = jnp.linalg.eigh(af)
  lam = jnp.maximum(lam, 0.0) + eps
  # Zero eigenvalues with eps=0 would give inf: map them to 0 (pseudo-inverse).
  inv = jnp.where(lam > 0, lam ** (-1.0 / p), 0.0)
  return matmul_lib.matmul(q * inv[..., None, :], jnp.swapaxes(q, -1, -2),
                           kernel='inverse_root').astype(dtype)


def inverse_root_newton(a: jax.Array, p: int, eps: float = 0.0,
                        iters: int = 30, precision=None) -> jax.Array:
  """``(A + εI)^{-1/p}`` by the coupled Newton iteration (matmul only)."""
  if int(p) != p or p < 1:
    raise ValueError(f'p: the Newton iteration needs an integer p >= 1, '
                     f'got {p}.')
  p = int(p)
  dtype = a.dtype
  af = symmetrize(a.astype(jnp.promote_types(dtype, jnp.float32)))
  eye = _eye_like(af)
  af = af + eps * eye
  norm = jnp.sqrt(jnp.sum(af * af, axis=(-2, -1), keepdims=True))
  safe = jnp.where(norm > 0, norm, 1.0)
  z = (1.0 + p) / (2.0 * safe)
  m = z * af
  h = eye * z ** (1.0 / p)

  def mm(x, y):
    return matmul_lib.matmul(x, y, kernel='inverse_root',
                             precision=precision)

  def body(_, mh):
    m, h = mh
    t = ((p + 1.0) * eye - m) / p
    tp = t
    for _ in range(p - 1):
      tp = mm(tp, t)
    return mm(tp, m), mm(h, t)

  m, h = jax.lax.fori_loop(0, iters, body, (m, h))
  h = jnp.where(norm > 0, symmetrize(h), 0.0)
  return h.astype(dtype)


def inverse_sqrt_warm(a: jax.Array, init: jax.Array, *, iters: int = 3,
                      eps: float = 0.0, tol: float = 0.5, cold_iters: int = 30,
                      precision=None) -> jax.Array:
  r"""``(A + εI)^{-1/2}`` refined from a nearby root ``init`` (matmul only).

  Symmetrised Newton–Schulz iteration from ``Z₀ = init`` (e.g. the previous
  step's root of a slowly moving factor)::

      Z ← sym(½ Z (3I − Z A Z))

  Its only symmetric positive-definite fixed point is ``A^{-1/2}`` (``ZAZ =
  I``). The coupled Newton iteration of :func:`inverse_root_newton` is not
  usable warm: it assumes ``Z₀`` commutes with ``A`` and, from a previous
  root, stalls at the non-commuting error (``~2e-4`` relative in float64 on
  a 48 × 48 EMA factor, where this iteration reaches ``1e-6`` in 3 steps).
  Convergence needs ``Z₀ A Z₀`` close to ``I`` (``‖Z₀AZ₀ − I‖₂ < 1``
  suffices): when a power-iteration estimate of ``‖Z₀AZ₀ − I‖₂`` exceeds
  ``tol`` (the factor moved too far) the cold coupled Newton iteration
  (``cold_iters`` steps) is used instead, chosen by ``jax.lax.cond`` for the
  whole batch (only the chosen branch runs).
  """
  dtype = a.dtype
  ct = jnp.promote_types(dtype, jnp.float32)
  af = symmetrize(a.astype(ct))
  eye = _eye_like(af)
  af = af + eps * eye
  z0 = symmetrize(init.astype(ct))

  def mm(x, y):
    return matmul_lib.matmul(x, y, kernel='inverse_root',
                             precision=precision)

  def warm(af, z):
    def body(_, z):
      return symmetrize(0.5 * mm(z, 3.0 * eye - mm(mm(z, af), z)))
    return jax.lax.fori_loop(0, iters, body, z)

  def cold(af, z):
    del z
    return inverse_root_newton(af, 2, 0.0, cold_iters, precision)

  close = jnp.all(_spectral_norm_estimate(mm(mm(z0, af), z0) - eye)
                  <= tol)
  return jax.lax.cond(close, warm, cold, af, z0).astype(dtype)


def _spectral_norm_estimate(r: jax.Array, iters: int = 12) -> jax.Array:
  """``‖R‖₂`` of symmetric ``R`` (batched) by power iteration (matvecs)."""
  d = r.shape[-1]
  v = jnp.broadcast_to(1.0 + jnp.arange(d, dtype=r.dtype) / d,
                       r.shape[:-1])[..., None]

  def body(_, v):
    w = matmul_lib.matmul(r, v, kernel='inverse_root')
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-2, keepdims=True),
                           jnp.finfo(r.dtype).tiny)

  v = jax.lax.fori_loop(0, iters, body, v / jnp.linalg.norm(
      v, axis=-2, keepdims=True))
  return jnp.linalg.norm(matmul_lib.matmul(r, v, kernel='inverse_root'),
                         axis=(-2, -1))


def inverse_root(a: jax.Array, p: float, *, method: str = 'eigh',
                 eps: float = 0.0, iters: int = 30, precision=None
                 ) -> jax.Array:
  """``(A + εI)^{-1/p}`` for symmetric PSD ``A`` of shape ``(..., n, n)``.

  Args:
    a: symmetric positive semi-definite matrices.
    p: the root (2 for ``A^{-1/2}``, 4 for Shampoo's ``A^{-1/4}``).
    method: ``"eigh"`` (exact) or ``"newton"`` (matmul-only).
    eps: ridge added to the diagonal.
    iters: Newton iterations.
    precision: matmul precision for ``"newton"``.
  """
  _checks.check_choice('method', method, ROOT_METHODS)
  _checks.check_positive('p', p)
  _checks.check_positive('eps', eps, allow_zero=True)
  if method == 'eigh':
    return inverse_root_eigh(a, p, eps)
  return inverse_root_newton(a, p, eps, iters, precision)
