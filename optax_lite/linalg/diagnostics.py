r"""Diagnostics of matrices and updates (pure jnp, batched over leading dims).

* :func:`dominance_ratios` / :func:`diagonal_dominance` – the diagonal
  dominance metrics of the RMNP paper (Deng et al. 2026, eqs. (5)–(6)). For a
  matrix ``V`` with ``m`` rows (paper / PyTorch orientation: one row per
  output unit) and Gram matrix ``A = V Vᵀ``,

  .. math::
     r_i = \frac{A_{ii}}{\frac{1}{m-1}\sum_{j\ne i} |A_{ij}|},\qquad
     r_{avg} = \tfrac1m \sum_i r_i,\quad r_{min} = \min_i r_i,\quad
     r_{max} = \max_i r_i.

  ``r_i > 1`` means the diagonal of the Gram matrix dominates the mean
  off-diagonal magnitude in row ``i``; then RMNP's row normalisation
  ``diag(A)^{-1/2} V`` is close to Muon's ``A^{-1/2} V``. Rows that are
  exactly orthogonal give ``r_i = A_ii / eps`` (the paper's ratio is
  infinite), identical rows give ``r_i = 1``.
* :func:`leaf_diagonal_dominance` – the same metrics for a parameter-shaped
  leaf, oriented as RMNP normalises it: rows are the *output* units (the
  columns of a Flax ``[in, out]`` kernel).
* :func:`condition_number` – ``σ_max / σ_min`` of each matrix (the paper
  FISMO's Figure 3 metric for update matrices).

References:
  Deng et al., `Row-Momentum Normalized Preconditioning
  <https://arxiv.org/abs/2603.20527>`_, 2026 (§3.2, eqs. (5)–(6)).

  Xu, Yan, Zhang, `FISMO: Fisher-Structured Momentum-Orthogonalized
  Optimizer <https://arxiv.org/abs/2601.21750>`_, 2026 (§7).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_lite import _checks
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg.matrices import MatrixDims, matrix_view


class DiagonalDominance(NamedTuple):
  """RMNP eq. (6): mean, minimum and maximum of the row ratios ``r_i``."""
  r_avg: jax.Array
  r_min: jax.Array
  r_max: jax.Array


def _wide(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dominance_ratios(v: jax.Array, *, eps: float = 1e-30) -> jax.Array:
  """Row ratios ``r_i`` of eq. (5) for ``v`` of shape ``(..., m, n)``.

  Args:
    v: matrices whose *rows* are the units RMNP normalises (paper orientation;
      for a Flax ``[in, out]`` kernel pass ``kernel.T`` or use
      :func:`leaf_diagonal_dominance`).
    eps: added to the denominator, so exactly orthogonal rows give a large
      finite ratio instead of ``inf``.

  Returns:
    An array of shape ``(..., m)``.

  Raises:
    ValueError: if ``m < 2`` (the off-diagonal mean is undefined).
  """
  _checks.check_positive('eps', eps)
  v = jnp.asarray(v)
  if v.ndim < 2:
    raise ValueError(f'v must have rank >= 2, got shape {v.shape}.')
  m = v.shape[-2]
  if m < 2:
    raise ValueError(f'v: the diagonal dominance ratio needs at least 2 rows, '
                     f'got shape {v.shape}.')
  v = _wide(v)
  gram = matmul_lib.matmul(v, jnp.swapaxes(v, -1, -2), kernel='diagnostics')
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  off = (jnp.sum(jnp.abs(gram), axis=-1) - jnp.abs(diag)) / (m - 1)
  return diag / (off + eps)


def diagonal_dominance(v: jax.Array, *, eps: float = 1e-30
                       ) -> DiagonalDominance:
  """``(r_avg, r_min, r_max)`` of eq. (6) for ``v`` of shape ``(..., m, n)``."""
  r = dominance_ratios(v, eps=eps)
  return DiagonalDominance(jnp.mean(r, axis=-1), jnp.min(r, axis=-1),
                           jnp.max(r, axis=-1))


def leaf_diagonal_dominance(x: jax.Array, dims: MatrixDims | None = None, *,
                            eps: float = 1e-30) -> DiagonalDominance:
  """Eq. (6) for a parameter-shaped leaf, one row per *output* unit.

  The leaf is viewed as ``(batch, fan_in, fan_out)`` through ``dims`` (the
  default rule of :func:`optax_lite.linalg.default_dims`) and transposed, so
  the rows of the paper's ``V`` are the output units, as RMNP (and
  :func:`optax_lite.transforms.row_normalize` by default) normalises them.
  The result has the batch shape of the view (``()`` for a plain matrix).
  """
  view = matrix_view(x.shape, dims)
  mat = jnp.swapaxes(view.to_matrix(x), -1, -2)
  out = diagonal_dominance(mat, eps=eps)
  return DiagonalDominance(*(a.reshape(view.batch_shape) for a in out))


def condition_number(x: jax.Array) -> jax.Array:
  """``σ_max / σ_min`` of each matrix in ``x`` of shape ``(..., m, n)``.

  Uses the ``min(m, n)`` singular values, so a rank-deficient matrix gives
  ``inf`` and a zero matrix ``nan``.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f'x must have rank >= 2, got shape {x.shape}.')
  s = jnp.linalg.svd(_wide(x), compute_uv=False)
  return s[..., 0] / s[..., -1]
