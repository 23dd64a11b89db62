r"""Eigenbases of symmetric PSD matrices: exact init and a cheap QR refresh.

SOAP (Vyas et al., 2025) runs Adam in the eigenbasis ``Q`` of a Kronecker
factor ``L ≈ E[G Gᵀ]``. The basis is computed once exactly and then tracked
lazily, since ``L`` changes slowly:

* :func:`eigenbasis_init` – ``Q`` from ``jnp.linalg.eigh``, columns sorted by
  **descending** eigenvalue (``Q[:, 0]`` is the top eigenvector);
* :func:`eigenbasis_refresh` – one step of subspace (block power) iteration,

  .. math::  Q \leftarrow \mathrm{QR}(L\,Q)_Q ,

  after re-sorting the columns of ``Q`` by their Rayleigh quotients
  ``diag(Qᵀ L Q)`` (the reference implementation's
  ``get_orthogonal_matrix_QR``).
  Repeated refreshes on a fixed ``L`` converge to its eigenvectors (the
  column order follows the descending eigenvalues), at a cost of one matmul
  and one QR instead of an ``eigh``.

Both work on stacks ``(..., n, n)`` in float32 (or wider) and are NaN-safe:
a zero matrix yields the identity (init) or leaves ``Q`` unchanged (refresh),
and a non-finite result falls back to the identity / the previous ``Q``.

References:
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, ICLR 2025 (Algorithm 6 of the LITE
  paper restates it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg.roots import symmetrize


def _wide(a: jax.Array) -> jax.Array:
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _eye_like(a: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _all_finite(x: jax.Array) -> jax.Array:
  """``(...,)`` booleans: whether each matrix of a stack is finite."""
  return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def eigenbasis_init(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenvectors of symmetric ``a``, sorted by descending eigenvalue.

  Args:
    a: ``(..., n, n)`` symmetric (PSD in SOAP's use) matrices.

  Returns:
    ``(q, lam)``: ``q`` of shape ``(..., n, n)`` with orthonormal columns,
    ``lam`` of shape ``(..., n)`` in descending order, so that
    ``a ≈ q diag(lam) qᵀ``. Both in float32 (or wider). A zero (or non-finite)
    matrix gives ``q = I`` and ``lam = 0``.
  """
  af = symmetrize(_wide(a))
  lam, q = jnp.linalg.eigh(af)
  lam, q = lam[..., ::-1], q[..., ::-1]  # eigh is ascending
  ok = _all_finite(q) & jnp.all(jnp.isfinite(lam), axis=-1)
  q = jnp.where(ok[..., None, None], q, _eye_like(af))
  lam = jnp.where(ok[..., None], lam, 0.0)
  return q, lam


def rayleigh_eigenvalues(a: jax.Array, q: jax.Array) -> jax.Array:
  """``diag(qᵀ a q)``: eigenvalue estimates of ``a`` in the basis ``q``."""
  af = _wide(a)
  return jnp.sum(q * matmul_lib.matmul(af, q, kernel='eigenbasis'), axis=-2)


def eigenbasis_refresh(a: jax.Array, q: jax.Array, *, sort: bool = True
                       ) -> tuple[jax.Array, jax.Array]:
  """One QR power-iteration step ``q ← QR(a q)`` towards ``a``'s eigenbasis.

  Args:
    a: ``(..., n, n)`` symmetric PSD matrices.
    q: ``(..., n, n)`` current orthonormal bases.
    sort: first re-order the columns of ``q`` by descending Rayleigh quotient
      ``diag(qᵀ a q)`` (as SOAP's reference does), so that the column order
      tracks the eigenvalue order.

  Returns:
    ``(q_new, perm)``: the refreshed bases and the ``(..., n)`` column
    permutation applied before the power step (``q[..., :, perm]``; identity
    when ``sort=False``). Callers holding statistics indexed by the basis
    columns (SOAP's second moment) must permute them with ``perm``. Where
    ``a q`` is zero or the result is not finite, ``q`` is kept (permuted).
  """
  af = _wide(a)
  q = q.astype(af.dtype)
  n = af.shape[-1]
  # One matmul: the Rayleigh quotients and the power step.
  power = matmul_lib.matmul(af, q, kernel='eigenbasis')
  if sort:
    est = jnp.sum(q * power, axis=-2)
    perm = jnp.argsort(-est, axis=-1, stable=True)
    q = jnp.take_along_axis(q, perm[..., None, :], axis=-1)
    power = jnp.take_along_axis(power, perm[..., None, :], axis=-1)
  else:
    perm = jnp.broadcast_to(jnp.arange(n), af.shape[:-1])
  q_new, _ = jnp.linalg.qr(power)
  nonzero = jnp.any(power != 0, axis=(-2, -1))
  ok = nonzero & _all_finite(q_new)
  q_new = jnp.where(ok[..., None, None], q_new, q)
  return q_new, perm
