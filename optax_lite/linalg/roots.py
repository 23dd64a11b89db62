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
  return ((q * inv[..., None, :]) @ jnp.swapaxes(q, -1, -2)).astype(dtype)


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
    return jnp.matmul(x, y, precision=precision)

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
