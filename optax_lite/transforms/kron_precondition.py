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
    every k steps (from step 1):  P_l = (L̂ + ε_l I)^{-e},  P_r = (R̂ + ε_r I)^{-e}
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

State layout: every per-leaf field is a tree shaped like the params. The
moments ``mu``/``nu`` have the parameter's own shape (so they shard like it);
the factors and bases are ``(B, m, m)`` / ``(B, n, n)`` (``B`` = product of
the batch axes). Factors, bases and ``nu`` are float32 (``precond_dtype``),
``mu`` float32 unless ``mu_dtype`` says otherwise; the arithmetic is float32
(or wider) whatever the storage dtype. The per-leaf helpers
(:func:`soap_leaf_update`, :func:`shampoo_leaf_update`) work on the matrix
form ``(B, m, n)`` of every field.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import eigenbasis as eig_lib
from optax_lite.linalg import roots as roots_lib
from optax_lite.linalg.matrices import MatrixView, matrix_view
from optax_lite.transforms import _tree

MODES = ('soap', 'shampoo')
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
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  stats_l: optax.Updates
  stats_r: optax.Updates
  q_l: optax.Updates
  q_r: optax.Updates


class ShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`; per-leaf fields are trees like params.

  Attributes:
    count: int32 scalar.
    mu: momentum ``M`` (EMA of ``G``), shaped like the param.
    nu: Adam second moment for grafting, shaped like the param (shape
      ``(1,)`` without grafting).
    stats_l, stats_r: ``L``, ``R`` (``(B, 1)`` on identity sides).
    precond_l, precond_r: the cached inverse roots ``P_l``, ``P_r``.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  stats_l: optax.Updates
  stats_r: optax.Updates
  precond_l: optax.Updates
  precond_r: optax.Updates


class SoapLeaf(NamedTuple):
  """One leaf's SOAP state in matrix form (see :class:`SoapState`)."""
  mu: jax.Array
  nu: jax.Array
  stats_l: jax.Array
  stats_r: jax.Array
  q_l: jax.Array
  q_r: jax.Array


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
  """
  numerator: jax.Array
  grad_rot: jax.Array
  denominator: jax.Array
  q_l: jax.Array
  q_r: jax.Array


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
  return q.ndim == 3


def _mm(a, b, precision):
  return jnp.matmul(a, b, precision=precision)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def rotate(x: jax.Array, q_l: jax.Array, q_r: jax.Array, *,
           precision=_HIGHEST) -> jax.Array:
  """``Q_lᵀ x Q_r`` for ``x`` of shape ``(…, m, n)``; placeholder ``q`` = identity."""
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
    return beta * s + (1.0 - beta) * gram

  if has_side(stats_l):
    stats_l = acc(stats_l, _mm(g, _t(g), precision))
  if has_side(stats_r):
    stats_r = acc(stats_r, _mm(_t(g), g, precision))
  return stats_l, stats_r


def soap_init_bases(stats_l: jax.Array, stats_r: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Exact eigenbases (descending eigenvalues) of ``L`` and ``R`` by eigh."""
  q_l = eig_lib.eigenbasis_init(stats_l)[0] if has_side(stats_l) else stats_l
  q_r = eig_lib.eigenbasis_init(stats_r)[0] if has_side(stats_r) else stats_r
  return q_l.astype(stats_l.dtype), q_r.astype(stats_r.dtype)


def soap_refresh_bases(stats_l: jax.Array, stats_r: jax.Array,
                       q_l: jax.Array, q_r: jax.Array, nu: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One QR power step per side; ``V`` is permuted with the sorted columns.

  Returns ``(q_l, q_r, nu)``; see :func:`optax_lite.linalg.eigenbasis
  .eigenbasis_refresh`. ``nu`` is ``(B, m, n)``.
  """
  if has_side(q_l):
    q_new, perm = eig_lib.eigenbasis_refresh(stats_l, q_l)
    q_l = q_new.astype(q_l.dtype)
    nu = jnp.take_along_axis(nu, perm[..., :, None], axis=-2)
  if has_side(q_r):
    q_new, perm = eig_lib.eigenbasis_refresh(stats_r, q_r)
    q_r = q_new.astype(q_r.dtype)
    nu = jnp.take_along_axis(nu, perm[..., None, :], axis=-1)
  return q_l, q_r, nu


def soap_leaf_update(leaf: SoapLeaf, g: jax.Array, count: jax.Array, *,
                     b1: float, b2: float, shampoo_beta: float, eps: float,
                     precondition_frequency: int,
                     skip_first_update: bool = True, precision=_HIGHEST
                     ) -> tuple[SoapLeaf, SoapDirection]:
  """One SOAP step for one leaf in matrix form (see module doc).

  Args:
    leaf: the leaf's state (:class:`SoapLeaf`, all ``(B, ·, ·)`` arrays).
    g: the gradient ``(B, m, n)``.
    count: the 1-based index ``t`` of this step (int32 scalar).
    b1, b2, shampoo_beta, eps, precondition_frequency, skip_first_update:
      see :func:`scale_by_soap`.
    precision: matmul precision.

  Returns:
    ``(new_leaf, direction)``: the new state (statistics updated, bases
    refreshed when ``t mod k = 0``) and the :class:`SoapDirection` of this
    step; the SOAP update is
    ``rotate_back(d.numerator / d.denominator, d.q_l, d.q_r)``. On a skipped
    first step (``skip_first_update`` and a preconditioned side) ``M`` and
    ``V`` are left unchanged, ``numerator = 0`` and ``denominator = 1``.
  """
  # Compute in float32 (or wider); store back in each field's own dtype.
  sdt = jnp.promote_types(leaf.nu.dtype, jnp.float32)
  g = g.astype(sdt)
  q_l, q_r = leaf.q_l.astype(sdt), leaf.q_r.astype(sdt)
  stats_l, stats_r = update_factors(leaf.stats_l.astype(sdt),
                                    leaf.stats_r.astype(sdt), g,
                                    shampoo_beta, precision=precision)
  if has_side(q_l) or has_side(q_r):
    q_l, q_r = jax.lax.cond(count == 1,
                            lambda: soap_init_bases(stats_l, stats_r),
                            lambda: (q_l, q_r))
  skip = skip_first_update and (has_side(q_l) or has_side(q_r))
  first = count == 1
  # With the skipped first step, Adam's step index is t − 1 on this leaf.
  t = jnp.maximum(count - 1 if skip else count, 1).astype(sdt)
  g_rot = rotate(g, q_l, q_r, precision=precision)
  mu_old, nu_old = leaf.mu.astype(sdt), leaf.nu.astype(sdt)
  mu = b1 * mu_old + (1.0 - b1) * g
  nu = b2 * nu_old + (1.0 - b2) * jnp.square(g_rot)
  if skip:
    mu = jnp.where(first, mu_old, mu)
    nu = jnp.where(first, nu_old, nu)
  mu_hat = mu / (1.0 - b1 ** t)
  nu_hat = nu / (1.0 - b2 ** t)
  numerator = rotate(mu_hat, q_l, q_r, precision=precision)
  denominator = jnp.sqrt(nu_hat) + eps
  if skip:
    # 0·G_rot, not 0: a non-finite gradient still gives a non-finite step.
    numerator = jnp.where(first, 0.0 * g_rot, numerator)
    denominator = jnp.where(first, 1.0, denominator)
  direction = SoapDirection(numerator=numerator, grad_rot=g_rot,
                            denominator=denominator, q_l=q_l, q_r=q_r)
  new_q_l, new_q_r = q_l, q_r
  if has_side(q_l) or has_side(q_r):
    # The reference counts real steps only: with the statistics-only first
    # call, refresh after calls k+1, 2k+1, ... (real steps k, 2k, ...).
    real = count - 1 if skip else count
    new_q_l, new_q_r, nu = jax.lax.cond(
        (real > 0) & (real % precondition_frequency == 0),
        lambda: soap_refresh_bases(stats_l, stats_r, q_l, q_r, nu),
        lambda: (q_l, q_r, nu))
  new_leaf = SoapLeaf(mu=mu.astype(leaf.mu.dtype), nu=nu.astype(leaf.nu.dtype),
                      stats_l=stats_l.astype(leaf.stats_l.dtype),
                      stats_r=stats_r.astype(leaf.stats_r.dtype),
                      q_l=new_q_l.astype(leaf.q_l.dtype),
                      q_r=new_q_r.astype(leaf.q_r.dtype))
  return new_leaf, direction


def soap_direction(d: SoapDirection, *, precision=_HIGHEST) -> jax.Array:
  """The plain SOAP update ``Q_l (num / den) Q_rᵀ`` from a direction."""
  return rotate_back(d.numerator / d.denominator, d.q_l, d.q_r,
                     precision=precision)


def shampoo_inverse_root(stats: jax.Array, exponent: float, *,
                         matrix_eps: float, root_method: str = 'eigh'
                         ) -> jax.Array:
  """``(S + ε‖S‖_F I)^{-exponent}``; a zero ``S`` gives the identity."""
  norm = jnp.sqrt(jnp.sum(jnp.square(stats), axis=(-2, -1), keepdims=True))
  eye = jnp.broadcast_to(jnp.eye(stats.shape[-1], dtype=stats.dtype),
                         stats.shape)
  damped = stats + matrix_eps * norm * eye
  p = 1.0 / exponent
  if root_method == 'newton':
    p = int(round(p))
  root = roots_lib.inverse_root(damped, p, method=root_method)
  ok = (norm > 0) & jnp.all(jnp.isfinite(root), axis=(-2, -1), keepdims=True)
  return jnp.where(ok, root, eye)


def shampoo_leaf_update(leaf: ShampooLeaf, g: jax.Array, count: jax.Array, *,
                        b1: float, b2: float, shampoo_beta: float,
                        accumulation: str, eps: float, matrix_eps: float,
                        exponent: float, root_method: str,
                        precondition_frequency: int, graft: str,
                        precision=_HIGHEST) -> tuple[ShampooLeaf, jax.Array]:
  """One Shampoo step for one leaf in matrix form; returns (state, update)."""
  sdt = jnp.promote_types(leaf.stats_l.dtype, jnp.float32)
  g = g.astype(sdt)
  t = count.astype(sdt)
  stats_l, stats_r = update_factors(leaf.stats_l.astype(sdt),
                                    leaf.stats_r.astype(sdt), g,
                                    shampoo_beta, accumulation=accumulation,
                                    precision=precision)
  bc = 1.0 if accumulation == 'sum' else 1.0 - shampoo_beta ** t

  def roots():
    out = []
    for s in (stats_l, stats_r):
      if has_side(s):
        out.append(shampoo_inverse_root(
            s / bc, exponent, matrix_eps=matrix_eps,
            root_method=root_method).astype(s.dtype))
      else:
        out.append(s)
    return tuple(out)

  p_l, p_r = leaf.precond_l.astype(sdt), leaf.precond_r.astype(sdt)
  if has_side(p_l) or has_side(p_r):
    p_l, p_r = jax.lax.cond((count - 1) % precondition_frequency == 0, roots,
                            lambda: (p_l, p_r))
  mu = b1 * leaf.mu.astype(sdt) + (1.0 - b1) * g
  mu_hat = mu / (1.0 - b1 ** t) if b1 > 0 else mu
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
    return jnp.zeros((batch, 1), dtype)  # identity side (see has_side)
  if eye:
    return jnp.broadcast_to(jnp.eye(size, dtype=dtype), (batch, size, size))
  return jnp.zeros((batch, size, size), dtype)


def _leaves_of(tree, like):
  return jax.tree.structure(like).flatten_up_to(tree)


def _auto_exponent(exponent, n_sides: int) -> float:
  if exponent is not None:
    return float(exponent)
  return 1.0 / (2.0 * max(n_sides, 1))


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
# Transforms.
# --------------------------------------------------------------------------
def _check_common(b1, b2, shampoo_beta, eps, precondition_frequency,
                  max_precond_dim):
  _checks.check_decay('b1', b1)
  _checks.check_decay('b2', b2)
  _checks.check_decay('shampoo_beta', shampoo_beta)
  _checks.check_positive('eps', eps)
  _checks.check_int('precondition_frequency', precondition_frequency, low=1)
  _checks.check_int('max_precond_dim', max_precond_dim, low=0)


def scale_by_soap(b1: float = 0.95, b2: float = 0.99,
                  shampoo_beta: float = 0.95, eps: float = 1e-8,
                  precondition_frequency: int = 10,
                  max_precond_dim: int = 4096, dims: _tree.DimsSpec = None, *,
                  skip_first_update: bool = True, mu_dtype=None,
                  precond_dtype=jnp.float32,
                  precision=_HIGHEST) -> optax.GradientTransformation:
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
    mu_dtype: dtype of ``M``; ``None`` uses ``precond_dtype``.
    precond_dtype: dtype of ``V``, ``L``, ``R``, ``Q`` (float32 default).
    precision: matmul precision of the rotations and statistics.

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
  _check_common(b1, b2, shampoo_beta, eps, precondition_frequency,
                max_precond_dim)
  precond_dtype = jnp.dtype(precond_dtype)
  mu_dtype = precond_dtype if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_leaf(x, d):
    view, is_matrix = _leaf_view(x, d)
    b, m, n = view.matrix_shape
    on_l, on_r = _sides(view, is_matrix, max_precond_dim)
    return (jnp.zeros(x.shape, mu_dtype), jnp.zeros(x.shape, precond_dtype),
            _factor(b, m, on_l, precond_dtype),
            _factor(b, n, on_r, precond_dtype),
            _factor(b, m, on_l, precond_dtype, eye=True),
            _factor(b, n, on_r, precond_dtype, eye=True))

  def init_fn(params):
    resolved = _tree.resolve_dims(dims, params)
    out = jax.tree.map(init_leaf, params, resolved)
    fields = _tree.unzip(out, 6, params)
    return SoapState(jnp.zeros([], jnp.int32), *fields)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    resolved = _tree.resolve_dims(dims, updates)

    def leaf(g, d, mu, nu, *factors):
      view, _ = _leaf_view(g, d)
      parts = SoapLeaf(view.to_matrix(mu), view.to_matrix(nu), *factors)
      new, direc = soap_leaf_update(
          parts, view.to_matrix(g), count, b1=b1, b2=b2,
          shampoo_beta=shampoo_beta, eps=eps,
          precondition_frequency=precondition_frequency,
          skip_first_update=skip_first_update, precision=precision)
      u = soap_direction(direc, precision=precision)
      new = new._replace(mu=view.from_matrix(new.mu),
                         nu=view.from_matrix(new.nu))
      return (view.from_matrix(u).astype(g.dtype),) + tuple(new)

    out = jax.tree.map(leaf, updates, resolved, state.mu, state.nu,
                       state.stats_l, state.stats_r, state.q_l, state.q_r)
    new_updates, *fields = _tree.unzip(out, 7, updates)
    return new_updates, SoapState(count, *fields)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shampoo(b1: float = 0.9, b2: float = 0.999,
                     shampoo_beta: float = 0.999, eps: float = 1e-8,
                     precondition_frequency: int = 10,
                     max_precond_dim: int = 4096, dims: _tree.DimsSpec = None,
                     *, accumulation: str = 'ema',
                     exponent: float | None = None, root_method: str = 'eigh',
                     matrix_eps: float = 1e-6, graft: str = 'adam',
                     mu_dtype=None, precond_dtype=jnp.float32,
                     precision=_HIGHEST) -> optax.GradientTransformation:
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
    mu_dtype: dtype of ``M``; ``None`` uses ``precond_dtype``.
    precond_dtype: dtype of the factors, roots and ``V`` (float32 default).
    precision: matmul precision.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ShampooState`.
  """
  _check_common(b1, b2, shampoo_beta, eps, precondition_frequency,
                max_precond_dim)
  _checks.check_choice('accumulation', accumulation, ACCUMULATIONS)
  _checks.check_choice('root_method', root_method, roots_lib.ROOT_METHODS)
  _checks.check_choice('graft', graft, GRAFTS)
  _checks.check_positive('matrix_eps', matrix_eps)
  if exponent is not None:
    _checks.check_number('exponent', exponent, low=0.0, low_open=True,
                         high=1.0)
    if root_method == 'newton' and abs(1.0 / exponent
                                       - round(1.0 / exponent)) > 1e-9:
      raise ValueError('exponent: root_method="newton" needs 1/exponent to be '
                       f'an integer, got exponent={exponent}.')
  precond_dtype = jnp.dtype(precond_dtype)
  mu_dtype = precond_dtype if mu_dtype is None else jnp.dtype(mu_dtype)

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

  def init_fn(params):
    resolved = _tree.resolve_dims(dims, params)
    out = jax.tree.map(init_leaf, params, resolved)
    fields = _tree.unzip(out, 6, params)
    return ShampooState(jnp.zeros([], jnp.int32), *fields)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    resolved = _tree.resolve_dims(dims, updates)

    def leaf(g, d, mu, nu, *factors):
      view, _ = _leaf_view(g, d)
      if graft == 'adam':
        nu = view.to_matrix(nu)
      parts = ShampooLeaf(view.to_matrix(mu), nu, *factors)
      n_sides = int(has_side(parts.stats_l)) + int(has_side(parts.stats_r))
      new, u = shampoo_leaf_update(
          parts, view.to_matrix(g), count, b1=b1, b2=b2,
          shampoo_beta=shampoo_beta, accumulation=accumulation, eps=eps,
          matrix_eps=matrix_eps, exponent=_auto_exponent(exponent, n_sides),
          root_method=root_method,
          precondition_frequency=precondition_frequency, graft=graft,
          precision=precision)
      new = new._replace(mu=view.from_matrix(new.mu))
      if graft == 'adam':
        new = new._replace(nu=view.from_matrix(new.nu))
      return (view.from_matrix(u).astype(g.dtype),) + tuple(new)

    out = jax.tree.map(leaf, updates, resolved, state.mu, state.nu,
                       state.stats_l, state.stats_r, state.precond_l,
                       state.precond_r)
    new_updates, *fields = _tree.unzip(out, 7, updates)
    return new_updates, ShampooState(count, *fields)

  return optax.GradientTransformation(init_fn, update_fn)


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
