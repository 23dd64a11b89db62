"""FISMO's Kronecker-factored Fisher whitening: the maths on one leaf.

Factor EMAs, their inverse square roots (``eigh``, Newton, warm-started
Newton), the whitening ``P^{-1/2} X Q^{-1/2}`` and its map back; the
equations and references are in :mod:`optax_lite.transforms.fisher_whiten`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import roots as roots_lib
from optax_lite.transforms import _tree


class FisherWhitenState(NamedTuple):
  count: jax.Array  # int32 scalar, number of updates so far
  p: optax.Updates  # output-side factors, batch_shape + (fan_out, fan_out)
  q: optax.Updates  # input-side factors, batch_shape + (fan_in, fan_in)
  inner_state: optax.OptState  # the inner transform's state (whitened space)
  # Cached inverse roots (``root_every > 1``): ``P_s^{-1/2}``, ``Q_s^{-1/2}``
  # of the last refresh step ``s``, shaped like ``p`` / ``q``; placeholders
  # (shape ``(1,)``) with ``root_every=1`` and for identity sides.
  p_isqrt: optax.Updates
  q_isqrt: optax.Updates
  # ``distribute=`` over several devices: the matrix leaves' factors (and
  # cached roots; with an ``OwnerInner``, also its per-matrix state, those
  # leaves then ``optax.MaskedNode`` in ``inner_state``) on their owner
  # devices (:class:`optax_lite.linalg.grouped.OwnerStacks`; their entries
  # above are then one-element placeholders); ``None`` otherwise.
  owned: Any = None


class _Config(NamedTuple):
  """The hyperparameters every per-leaf function needs."""
  gamma: Any
  damping: Any
  min_eig: Any
  trace_damping: Any
  scale_invariant: bool
  root_method: str
  root_iters: Any
  root_eps: Any
  factor_dtype: Any
  precision: Any
  warm_iters: Any = 3
  # root_every == 1 known statically: every step refreshes.
  every_step: bool = True


class _Pair(NamedTuple):
  """One leaf's output-side (``p``) and input-side (``q``) matrices, as
  ``(b, d, d)`` arrays; ``None`` marks an identity side."""
  p: jax.Array | None
  q: jax.Array | None


class _Factors(NamedTuple):
  """Steps 4–5 of Algorithm 1 for one leaf: the new factors and the inverse
  square roots used this step (``None`` on identity sides)."""
  new: _Pair
  isqrt: _Pair


def _is_static_zero(x) -> bool:
  """``x == 0`` known at trace time (a traced hyperparameter is not)."""
  return _checks.is_static_number(x) and float(x) == 0.0


def _trace(a):
  return jnp.trace(a, axis1=-2, axis2=-1)[..., None, None]


def _is_identity(f) -> bool:
  return _tree.is_identity_placeholder(f)


def _mm(a, b, cfg: _Config):
  return matmul_lib.matmul(a, b, kernel='whiten', precision=cfg.precision)


_ROOT_METHODS = roots_lib.ROOT_METHODS + ('newton_warm', 'auto')

# ``root_method="auto"``: the inverse-root method per JAX platform. On CPU,
# LAPACK ``eigh`` is exact and costs about what the matmul-only warm start
# does (one 256x768 FISMO step: eigh/newton_warm 1.19x on an idle 2-core
# CPU, benchmarks/fismo_roots.py), so the exact method stays. On GPU (cuSOLVER
# syevd) and TPU (QDWH) a dense eigh is a long, poorly parallel kernel while
# matmuls run at peak, so the warm-started Newton iteration is used.
AUTO_ROOT_METHOD = {'cpu': 'eigh'}
AUTO_ROOT_METHOD_ACCELERATOR = 'newton_warm'


def auto_root_method(platform: str | None = None) -> str:
  """The ``root_method`` that ``"auto"`` resolves to on ``platform``.

  Args:
    platform: a JAX platform name (``"cpu"``, ``"gpu"``, ``"cuda"``,
      ``"rocm"``, ``"tpu"``); ``None``: ``jax.default_backend()``.
  """
  platform = jax.default_backend() if platform is None else platform
  return AUTO_ROOT_METHOD.get(platform, AUTO_ROOT_METHOD_ACCELERATOR)


def _isqrt(a, cfg: _Config, start=None):
  """``a^{-1/2}``; with ``root_method="newton_warm"``, refined from
  ``start`` (a previous root) when given, else the cold Newton iteration."""
  if cfg.root_method == 'newton_warm':
    if start is None:
      return roots_lib.inverse_root_newton(a, 2, cfg.root_eps,
                                           cfg.root_iters, cfg.precision)
    return roots_lib.inverse_sqrt_warm(
        a, start, iters=cfg.warm_iters, eps=cfg.root_eps,
        cold_iters=cfg.root_iters, precision=cfg.precision)
  return roots_lib.inverse_root(a, 2, method=cfg.root_method,
                                eps=cfg.root_eps, iters=cfg.root_iters,
                                precision=cfg.precision)


def _compute_dtype(cfg: _Config):
  return jnp.promote_types(cfg.factor_dtype, jnp.float32)


def factor_step(prev: jax.Array, stat: jax.Array, gamma: float,
                damping: float, scale_invariant: bool, min_eig: float = 0.0,
                trace_damping: float = 0.0) -> jax.Array:
  """One factor update of Algorithm 1 (step 4 or 5), batched.

  Args:
    prev: ``F_{t-1}``, shape ``(..., d, d)``, SPD with trace ``d``.
    stat: the data statistic ``S_t`` (``G Q⁻¹ Gᵀ / n`` for ``P``).
    gamma, damping: ``γ`` and ``μ``.
    scale_invariant: normalise ``S_t`` to trace ``d`` before the EMA.
    min_eig: the result is mixed with the identity, ``(1 − min_eig)·F +
      min_eig·I`` (keeps the trace, bounds ``λ_min ≥ min_eig``).
    trace_damping: ``ν >= 0``, damping relative to the statistic's mean
      eigenvalue: ``L_t = S_t + (μ·tr F_{t-1}/d + ν·tr S_t/d)·I``; bounds
      ``λ_min(F_t) ≥ ν / (1 + ν)`` (``0``: Algorithm 1).

  Returns:
    ``sym(d · F̃_t / tr F̃_t)`` with ``F̃_t = γ F_{t-1} + (1 − γ) L_t``
    (then the ``min_eig`` mix).
  """
  d = prev.shape[-1]
  eye = jnp.eye(d, dtype=prev.dtype)
  # Every rate as an array of the factor's dtype, as an injected one is.
  gamma, damping = _as(gamma, prev), _as(damping, prev)
  if scale_invariant:
    tr_s = _trace(stat)
    stat = jnp.where(tr_s > 0, d * stat / jnp.where(tr_s > 0, tr_s, 1.0),
                     0.0)
  ridge = damping * (_trace(prev) / d)
  if not _is_static_zero(trace_damping):
    ridge = ridge + _as(trace_damping, prev) * (_trace(stat) / d)
  lt = stat + ridge * eye
  ft = gamma * prev + (1.0 - gamma) * lt
  f = roots_lib.symmetrize(d / _trace(ft) * ft)
  if not _is_static_zero(min_eig):
    min_eig = _as(min_eig, prev)
    f = (1.0 - min_eig) * f + min_eig * eye
  return f


def _as(x, runtime: jax.Array):
  """A hyperparameter as a scalar of ``runtime``'s dtype that XLA cannot
  fold into a constant.

  ``optax.inject_hyperparams`` passes float32 arrays, known only at run
  time; a Python float would be a constant that XLA folds (``1.0·x``
  disappears) and then contracts the rest into other fused multiply-adds:
  1 ulp in the factors, ~20× after the Newton root. Selected by a value
  known at run time (``runtime``'s first entry, not NaN), both are the
  same unknown scalar and are computed alike. (An optimization barrier
  does not survive XLA:CPU's pipeline.)
  """
  x = jnp.asarray(x, runtime.dtype)
  if runtime.size == 0:
    return x
  first = jnp.ravel(runtime)[0]
  return jnp.where(first == first, x, 0.0)


def _gram(a, transpose_first: bool, cfg: _Config):
  """``aᵀa`` or ``aaᵀ``: symmetric positive semi-definite in floating point
  too."""
  at = jnp.swapaxes(a, -1, -2)
  return _mm(at, a, cfg) if transpose_first else _mm(a, at, cfg)


def _factors(x, prev: _Pair, cached: _Pair | None, cfg: _Config,
             warm: _Pair | None = None) -> _Factors:
  """Steps 4–5 of Algorithm 1 for ``x`` of shape ``(b, fan_in, fan_out)``.

  ``cached=None``: fresh roots (``Q_{t-1}^{-1/2}`` for the P statistic, then
  ``P_t^{-1/2}``, ``Q_t^{-1/2}``); otherwise the cached ``P_s^{-1/2}``,
  ``Q_s^{-1/2}`` are used instead and no root is computed. ``warm``: the
  stored roots of the last refresh, starting points of
  ``root_method="newton_warm"`` (with ``root_every=1`` the stored
  ``Q_{t-1}^{-1/2}`` is used as is: it is that root).
  """
  r, c = x.shape[-2:]
  p_new = q_new = p_isqrt = q_isqrt = None
  step = functools.partial(
      factor_step, gamma=cfg.gamma, damping=cfg.damping,
      scale_invariant=cfg.scale_invariant, min_eig=cfg.min_eig,
      trace_damping=cfg.trace_damping)
  warm_p = None if warm is None else warm.p
  warm_q = None if warm is None else warm.q
  if prev.p is not None:  # Step 4: P from Q_{t-1}; L = Xᵀ Q⁻¹ X / fan_in.
    qx = x
    if prev.q is not None:
      if cached is not None:
        q_root = cached.q
      elif warm_q is not None and cfg.every_step:
        q_root = warm_q
      else:
        q_root = _isqrt(prev.q, cfg, warm_q)
      warm_q = q_root if warm_q is not None else None
      qx = _mm(q_root, x, cfg)
    p_new = step(prev.p, _gram(qx, True, cfg) / r)
    p_isqrt = _isqrt(p_new, cfg, warm_p) if cached is None else cached.p
  if prev.q is not None:  # Step 5: Q from the new P; R = X P⁻¹ Xᵀ / fan_out.
    xp = x if prev.p is None else _mm(x, p_isqrt, cfg)
    q_new = step(prev.q, _gram(xp, False, cfg) / c)
    q_isqrt = _isqrt(q_new, cfg, warm_q) if cached is None else cached.q
  return _Factors(_Pair(p_new, q_new), _Pair(p_isqrt, q_isqrt))


def _sandwich(x, isqrt: _Pair, cfg: _Config):
  """``Q^{-1/2} x P^{-1/2}`` (Flax view); ``None`` sides are the identity."""
  if isqrt.q is not None:
    x = _mm(isqrt.q, x, cfg)
  if isqrt.p is not None:
    x = _mm(x, isqrt.p, cfg)
  return x


def _init_leaf(view, x, cfg: _Config, max_factor_size, cache: bool):
  """-> ``(P_0, Q_0, P cache, Q cache)`` for one leaf (``I`` or
  placeholders)."""
  del x
  # A new array for every leaf: a state that holds one buffer twice cannot
  # be donated to a jitted update ("donate the same buffer twice").
  empty = lambda: _tree.identity_placeholder(cfg.factor_dtype)
  def eye(d):
    if max_factor_size is not None and d > max_factor_size:
      return empty()
    return jnp.broadcast_to(jnp.eye(d, dtype=cfg.factor_dtype),
                            view.batch_shape + (d, d))
  sides = lambda: ((empty(), empty()) if view is None
                   else (eye(view.cols), eye(view.rows)))
  if cache:  # Cached roots start at I (overwritten on the first step).
    return sides() + sides()
  return sides() + (empty(), empty())


def _step_factors(x, prev: _Pair, cached: _Pair | None, refresh,
                  cfg: _Config) -> _Factors:
  """Steps 4–5 for ``x`` of shape ``(b, fan_in, fan_out)`` (compute dtype).

  ``cached``: ``None`` when the state caches no roots (``root_every=1``
  without warm roots), else the stored roots of the last refresh (fresh
  roots on ``refresh`` steps, warm-started from them with
  ``"newton_warm"``; the stored ones on the others). Slice-wise in ``b``
  (the warm roots' cold fallback is chosen for the whole batch).
  """
  if cached is None:
    return _factors(x, prev, None, cfg)
  warm = cfg.root_method == 'newton_warm'

  def fresh(x, prev, cached):
    return _factors(x, prev, None, cfg, cached if warm else None)

  def lagged(x, prev, cached):
    return _factors(x, prev, cached, cfg)

  if cfg.every_step:
    return fresh(x, prev, cached)
  # Only the chosen branch runs: skipped steps compute no root.
  return jax.lax.cond(refresh, fresh, lagged, x, prev, cached)
