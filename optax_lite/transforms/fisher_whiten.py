r"""``fisher_whiten``: FISMO's Kronecker-factored whitening around a transform.

FISMO (Xu, Yan, Zhang 2026, Algorithm 1) keeps, for each matrix parameter
``W`` (``m × n`` in the paper's PyTorch layout, rows = output units), two
SPD Kronecker factors of the (empirical) Fisher ``F ≈ Q ⊗ P``: ``P``
(``m × m``, **output side**) and ``Q`` (``n × n``, **input side**). Each step,
with gradient ``G``, EMA ``γ`` and damping ``μ`` (Gauss–Seidel: ``P`` first,
then ``Q`` with the *new* ``P``):

.. math::
   L_t &= \tfrac1n G Q_{t-1}^{-1} G^\top
          + μ\,\tfrac{\mathrm{tr} P_{t-1}}{m} I_m,
   \quad \tilde P_t = γ P_{t-1} + (1-γ) L_t,
   \quad P_t = \mathrm{sym}\big(
     \tfrac{m}{\mathrm{tr}\tilde P_t}\tilde P_t\big)\\
   R_t &= \tfrac1m G^\top P_t^{-1} G
          + μ\,\tfrac{\mathrm{tr} Q_{t-1}}{n} I_n,
   \quad \tilde Q_t = γ Q_{t-1} + (1-γ) R_t,
   \quad Q_t = \mathrm{sym}\big(
     \tfrac{n}{\mathrm{tr}\tilde Q_t}\tilde Q_t\big)\\
   \tilde G_t &= P_t^{-1/2} G Q_t^{-1/2}, \qquad
   U_t = \mathrm{inner}(\tilde G_t), \qquad
   \Delta_t = P_t^{-1/2} U_t Q_t^{-1/2}.

``fisher_whiten(inner)`` is this conjugation: the inner transform (and its
state, e.g. momentum) lives in the whitened space. With
``inner = optax.identity()`` (or ``None``) the output is the Kronecker
natural gradient ``P⁻¹ G Q⁻¹``; with ``inner = chain(momentum(β, ema=True,
nesterov=False), orthogonalize())`` it is FISMO's ``P^{-1/2} Polar(M_t)
Q^{-1/2}`` (:func:`optax_lite.fismo`). The inner transform is called with
``params=None``: parameters live in the original coordinates, so weight decay
belongs outside the wrapper.

**Orientation (Flax).** Leaves are seen through their
:class:`optax_lite.MatrixDims` as ``X`` of shape ``(batch, fan_in,
fan_out)``, the transpose of the paper's ``G`` (a Flax kernel is ``[in,
out]``). ``P`` is always the **output-side** factor (``fan_out × fan_out``,
updated first) and ``Q`` the **input-side** factor (``fan_in × fan_in``), so a
Flax kernel gets exactly the update the paper's algorithm gives the PyTorch
weight ``Xᵀ``. In these coordinates ``L = Xᵀ Q⁻¹ X / fan_in``,
``R = X P⁻¹ Xᵀ / fan_out``, ``G̃ = Q^{-1/2} X P^{-1/2}`` and
``Δ = Q^{-1/2} U P^{-1/2}``. (Gauss–Seidel is not transpose-equivariant, so
the orientation changes the result by a few percent.)

**Gradient scale** (see the repo's FISMO notes, §1.12). Because ``P_{t-1}``
has mean eigenvalue 1 while ``L_t`` has units of gradient², Algorithm 1 is an
EMA with effective decay ``γ_eff = γ / (γ + (1−γ)ρ_t)``, ``ρ_t = tr L_t / m``:
for tiny gradients (``ρ ≪ 1``) the factors stay ≈ ``I`` (FISMO ≈ Muon); for
large ones (``ρ ≫ 1``) they follow single-batch statistics and can become
very ill-conditioned. ``scale_invariant=True`` (not in the paper) uses
``L_t = m·S_t / tr S_t + μ·(tr P_{t-1}/m) I`` with ``S_t = G Q⁻¹ Gᵀ / n``
(data term 0 when ``S_t = 0``): ``γ`` is then the true EMA decay, ``μ`` a
damping relative to the mean eigenvalue, ``λ_min(P) ≥ (1−γ)μ/(1+(1−γ)μ)``,
and the factors do not depend on the gradient scale.

**Inverse roots** use :func:`optax_lite.linalg.inverse_root`: ``"eigh"``
(exact) or ``"newton"`` (coupled Newton iteration, matmul only, for
accelerators). Each step computes three inverse square roots,
``Q_{t-1}^{-1/2}``, ``P_t^{-1/2}`` and ``Q_t^{-1/2}``; the statistics are
formed as Gram matrices, ``G Q⁻¹ Gᵀ = (G Q^{-1/2})(G Q^{-1/2})ᵀ``, so they are
positive semi-definite in floating point too.

**Warm-started roots** (``root_method="newton_warm"``, not in the paper).
The factors move by an EMA step, so the previous step's roots are good
starting points: the roots are kept in the state (as with ``root_every >
1``) and each new one is refined from the previous by ``warm_iters`` (3)
steps of the symmetrised Newton–Schulz iteration ``Z ← sym(½ Z (3I − Z F
Z))`` (:func:`optax_lite.linalg.roots.inverse_sqrt_warm`), matmul only;
with ``root_every=1`` the stored ``Q_{t-1}^{-1/2}`` is reused for the
Gauss–Seidel statistic, so two roots are computed per step instead of
three. When a factor jumped too far (``‖Z₀FZ₀ − I‖₂ > 0.5``) the cold
coupled Newton iteration (``root_iters`` steps) is used for that leaf.
Accuracy and CPU timings against ``eigh`` are in
``benchmarks/results/fismo_roots_cpu.json`` (``benchmarks/fismo_roots.py``).

**Default per platform** (``root_method="auto"``): ``"eigh"`` on CPU,
``"newton_warm"`` on GPU and TPU (:func:`auto_root_method`). On an idle
2-core CPU a 768×768 root took as long by ``eigh`` as by 3 warm steps
(ratio 1.03; 1.9 at 256×256) and a whole 256×768 step 1.19× longer, so the
exact method costs little there. Accelerators run dense ``eigh`` as a long,
poorly parallel kernel (cuSOLVER ``syevd``, TPU QDWH) and matmuls at peak.
The warm roots' relative error, 7.5e-6 against a float64 root (float32
``eigh``: 0.7e-6–1.6e-6), moves FISMO's update by < 1e-4 relative
(``tests/test_fismo.py``).

**Amortised roots** (``root_every = k``, not in the paper; this is how
Shampoo and SOAP amortise their eigendecompositions). The factors ``P`` and
``Q`` are still updated every step (EMA, trace normalisation, ``min_eig``
mix), but the inverse roots are cached in the state and recomputed only on
steps with ``count % k == 0`` (``count`` = updates so far, so the first step
always refreshes). A refresh step is exactly one step of Algorithm 1 (three
roots: ``Q_{t-1}^{-1/2}``, ``P_t^{-1/2}``, ``Q_t^{-1/2}``; the last two are
cached); on the ``k − 1`` steps in between, the cached ``P_s^{-1/2}`` and
``Q_s^{-1/2}`` of the last refresh step ``s`` are used everywhere a root is
needed: in the Gauss–Seidel statistics
(``L = Xᵀ Q_s⁻¹ X / fan_in``, ``R = X P_s⁻¹ Xᵀ / fan_out``), for whitening
and for mapping back. The roots thus lag the factors by fewer than ``k``
steps. The choice is a ``jax.lax.cond`` (jit-safe), so the skipped steps run
no eigendecomposition or Newton iteration, only ``O(mn(m + n))`` matmuls.
``root_every=1`` (default) is Algorithm 1 exactly and caches nothing.

**Numerical floor** (not in the paper). In exact arithmetic the damping
keeps ``λ_min(P_t) ≥ m(1−γ)μ / tr P̃_t``, but for large gradients that bound
falls far below float32 resolution (``~1e-18`` at gradient entries ``1e4``)
and the Gauss–Seidel recursion then produces indefinite factors and NaNs.
After each trace normalisation the factor is therefore mixed with the
identity, ``F ← (1 − min_eig)·F + min_eig·I`` (trace unchanged,
``λ_min ≥ min_eig``; default ``1e-5`` relative to the mean eigenvalue 1);
``min_eig=0`` with ``root_eps=0`` is Algorithm 1 literally. ``root_eps``
adds ``root_eps·I`` inside each inverse root.

**Trace-relative damping** (``trace_damping = ν``, default ``1``; not in
the paper, ``ν = 0`` is Algorithm 1). Each step's statistic gets a ridge
relative to its own mean eigenvalue, ``L_t = S_t + (μ·tr P_{t-1}/m +
ν·tr S_t/m)·I`` (the same for ``R_t``). Why: on a non-square leaf the larger
side's statistic has rank ``≤ min(m, n)`` every step, so with ``ν = 0`` its
factor's eigenvalues in the directions the gradient does not reach decay to
the absolute floor ``≈ μ/ρ`` (``ρ`` the mean squared gradient entry, see
"Gradient scale"); the square ``P/Q`` side can do the same when a gradient
is nearly low-rank. Theorem 4.2's step is then
``‖Δ‖₂ ≤ ‖P^{-1/2}‖₂‖Q^{-1/2}‖₂``, and the first gradient component that
reaches such a direction is amplified by ``1/λ_min``: on a quadratic in an
``8 × 6`` matrix the input-side ``λ_min`` fell to ``~2e-5``, steps grew to
``150×`` the learning rate and FISMO and FISMO-LITE diverged where Muon
converged. The paper's own analysis
(Lemma D.2) bounds ``‖P_t^{-1}‖`` only when ``μ > max‖G_t‖_F²/(mn)``, a
damping at least the statistic's mean eigenvalue, which a fixed absolute
``μ`` violates as soon as gradients are not tiny; ``ν·tr S_t/m`` is the
scale-free form of that condition (``ν ≥ 1`` meets it). Since Algorithm 1's
step is ``P_t = γ_eff P_{t-1} + (1 − γ_eff)·m L_t/tr L_t`` and the
normalised ``L_t`` has ``λ_min ≥ ν/(1 + ν)``, induction from ``P_0 = I``
gives ``λ_min(P_t), λ_min(Q_t) ≥ ν/(1 + ν)`` at every gradient scale and
every ``γ``; so ``‖Δ‖₂ ≤ (1 + ν)/ν`` (twice Muon's at ``ν = 1``) and
``cond(P) ≤ m(1 + ν)/ν``. Measured (the problems of
``tests/test_fismo.py``: ``8 × 6`` and ``6 × 8`` Kronecker quadratics of
condition 1, 10, 100 and optax's parabola and Rosenbrock embedded in the
matrix; 3,000 steps, cosine from 0.03 (0.3 on the parabola), weight decay 0;
final/initial loss): with ``ν = 0`` FISMO ends at ``1.3e4`` (quadratic,
cond 10, ``8 × 6``), ``1.7e4`` (parabola ``8 × 6``) and ``2.7e10``
(Rosenbrock ``8 × 6``); with ``ν = 1`` every problem ends ``≤ 1.1e-4`` and
never rises above its start, as Muon. Smaller ``ν`` is not enough: at peak
0.1 on the Rosenbrock, ``ν = 0.1`` overshoots to ``8``–``13×`` the start
(FISMO-LITE ``144``–``164×``); damping only the rank-deficient side
(``ν = 0.1``) still gave ``1.6×`` (FISMO-LITE ``22×``). The bound is twice
Muon's step, not Muon's: at peak 0.3 on the Rosenbrock FISMO (``ν = 1``)
still overshoots ``9×`` before converging, where Muon does not.

**Large sides.** A side whose size exceeds ``max_factor_size`` keeps an
identity factor (nothing stored, no root): e.g. for a ``768 × 3072`` kernel
with ``max_factor_size=2048`` only the 768-side is whitened, a one-sided
(ASGO-like) preconditioner. The other side's statistic then uses ``I``.

**Owner-computes** (``distribute=``, see :mod:`optax_lite.linalg.grouped`).
Each device computes whole matrices, assigned by cost. With an
:class:`optax_lite.transforms.OwnerInner` as ``inner`` (``fismo`` builds
one: momentum and polar factor; ``fismo_lite`` gets one from
``lite_flat_boost(owner_inner=True)``) over more than one device, *one*
grouped call per step runs the whole per-matrix pipeline on the owner: factor
updates, roots, ``G̃``, the inner step and the map back ``Δ``; the factors,
cached roots and the inner per-matrix state (the momentum) all live there
(``FisherWhitenState.owned``, an
:class:`optax_lite.linalg.grouped.OwnerStacks` split over the devices; the
factors' per-leaf entries are one-element placeholders and the matrix
leaves are ``optax.MaskedNode`` in the inner transform's state), so per
matrix only ``X`` goes in and ``Δ`` comes out: one all-to-all each per
shape group under FSDP, one all-gather of every device's results under
data parallelism (FISMO on the small LM tree, 8 devices, collective bytes
per step over parameter bytes: replicated 3.02 → 1.01, FSDP 1.21 → 0.45).
With a plain inner transform, one grouped call does the factor updates,
roots and ``G̃``, the inner transform runs on the whole tree and a second
grouped call maps back on the same owners, which keep this step's roots in
between and (over several devices) the factors: about ``4·mn`` elements
per matrix (``X``, ``G̃``, ``U``, ``Δ``) plus what the inner transform
moves. No collective inside an iteration either way.

State per matrix: ``m² + n²`` factor entries (in ``factor_dtype``, float32 by
default; twice that with ``root_every > 1``, for the cached roots) plus the
inner state (``mn`` for momentum).

References:
  Xu, Yan, Zhang, `FISMO: Fisher-Structured Momentum-Orthogonalized
  Optimizer <https://arxiv.org/abs/2601.21750>`_, 2026 (Algorithm 1,
  Theorems 4.1–4.2).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.linalg import roots as roots_lib
from optax_lite.transforms import _tree
from optax_lite.transforms import owner_inner as owner_inner_lib


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


class _LeafStep(NamedTuple):
  """What whitening one leaf produces, as stored leaves (placeholders on
  identity sides)."""
  whitened: jax.Array
  p: jax.Array         # P_t
  q: jax.Array         # Q_t
  p_isqrt: jax.Array   # the roots used this step (to map back)
  q_isqrt: jax.Array
  p_cache: jax.Array   # the roots cached for the next steps
  q_cache: jax.Array


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


def _as_matrices(view, p, q, cfg: _Config) -> _Pair:
  """Stored leaves -> ``(b, d, d)`` compute-dtype matrices (``None`` for
  placeholders)."""
  b, r, c = view.matrix_shape
  ct = _compute_dtype(cfg)
  return _Pair(None if _is_identity(p) else p.reshape(b, c, c).astype(ct),
               None if _is_identity(q) else q.reshape(b, r, r).astype(ct))


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


def _whiten_leaf(view, g, p, q, p_cache, q_cache, refresh, cfg: _Config
                 ) -> _LeafStep:
  """Steps 4–6 of Algorithm 1 for one leaf (the roots from the cache on the
  steps between refreshes when the state caches roots, ``root_every > 1``)."""
  if view is None:
    return _LeafStep(g, p, q, p, q, p_cache, q_cache)
  cache = not (_is_identity(p_cache) and _is_identity(q_cache))
  x = view.to_matrix(g).astype(_compute_dtype(cfg))  # = paper Gᵀ
  prev = _as_matrices(view, p, q, cfg)
  cached = _as_matrices(view, p_cache, q_cache, cfg) if cache else None
  f = _step_factors(x, prev, cached, refresh, cfg)

  def store(m, like):
    if m is None:
      return like
    return m.astype(cfg.factor_dtype).reshape(view.batch_shape
                                              + m.shape[-2:])

  used_p, used_q = store(f.isqrt.p, p), store(f.isqrt.q, q)
  if cache:  # The roots used this step, stored for the next ones.
    p_cache, q_cache = store(f.isqrt.p, p_cache), store(f.isqrt.q, q_cache)
  return _LeafStep(
      whitened=view.from_matrix(_sandwich(x, f.isqrt, cfg)).astype(g.dtype),
      p=store(f.new.p, p), q=store(f.new.q, q), p_isqrt=used_p,
      q_isqrt=used_q, p_cache=p_cache, q_cache=q_cache)


def _unwhiten_leaf(view, u, p_isqrt, q_isqrt, cfg: _Config):
  """Step 8's map back: ``Q^{-1/2} U P^{-1/2}`` in the Flax view."""
  if view is None:
    return u
  x = view.to_matrix(u).astype(_compute_dtype(cfg))
  x = _sandwich(x, _as_matrices(view, p_isqrt, q_isqrt, cfg), cfg)
  return view.from_matrix(x).astype(u.dtype)


# ----------------------------------------------------------------------------
# Owner-computes (``distribute=``): the same per-leaf steps, on stacks of
# same-shape matrices, each computed whole on one device.


def _root_weight(cfg: _Config) -> float:
  """Flops of one inverse root of a ``d × d`` factor, in units of ``d³``."""
  if cfg.root_method == 'eigh':
    return 10.0
  iters = cfg.root_iters if isinstance(cfg.root_iters, int) else 30
  if cfg.root_method == 'newton_warm':
    iters = cfg.warm_iters if isinstance(cfg.warm_iters, int) else 3
  return 6.0 * iters


def _whiten_cost(cfg: _Config):
  """Cost of one item whose first array is the ``r × c`` matrix ``X`` (or
  ``U``): ``≈ 3·r·c·(r + c)`` matmul flops plus three roots, ``d³`` each.

  Read from ``X``'s shape only, so that the whitening and the map back
  assign every matrix to the same owner (the roots stay there in between).
  """
  weight = 1.5 * _root_weight(cfg)

  def cost(shapes):
    r, c = shapes[0][-2:]
    return float(6 * r * c * (r + c) + weight * (r ** 3 + c ** 3))
  return cost


def _leaf_sides(view, p, q):
  """``(has P, has Q)`` of one leaf (``None`` view: neither)."""
  if view is None:
    return False, False
  return not _is_identity(p), not _is_identity(q)


def _whiten_kernel(refresh, cfg: _Config, resident: bool):
  """Batched whitening of stacked items for :func:`grouped_map`.

  Inputs ``(X, [P], [Q], [P cache], [Q cache])`` as stored (``X`` in the
  gradient's dtype, factors in ``factor_dtype``, leading batch axis), then,
  with ``resident``, the owner-resident root buffers ``[P^{-1/2}],
  [Q^{-1/2}]`` (overwritten). Returns ``{"w": G̃, "p": P_t, "q": Q_t,
  "p_root": P^{-1/2}, "q_root": Q^{-1/2}}`` (only the stored sides; the
  roots used this step, which are also the ones to cache); with
  ``resident``, the pair ``(that dict, the roots)``, and the dict has the
  roots only when the state caches them.
  """
  ct = _compute_dtype(cfg)

  def fn(x_in, *arrays, key):
    has_p, has_q, cache = key
    it = iter(arrays)
    take = lambda flag: next(it).astype(ct) if flag else None
    x = x_in.astype(ct)
    prev = _Pair(take(has_p), take(has_q))
    cached = _Pair(take(has_p), take(has_q)) if cache else None
    f = _step_factors(x, prev, cached, refresh, cfg)
    out = {'w': _sandwich(x, f.isqrt, cfg).astype(x_in.dtype)}
    roots = []
    for name, flag, new, root in (('p', has_p, f.new.p, f.isqrt.p),
                                  ('q', has_q, f.new.q, f.isqrt.q)):
      if flag:
        out[name] = new.astype(cfg.factor_dtype)
        roots.append(root.astype(cfg.factor_dtype))
        if cache or not resident:
          out[name + '_root'] = roots[-1]
    return (out, tuple(roots)) if resident else out
  return fn


def _unwhiten_kernel(cfg: _Config, resident: bool):
  """Batched map back ``Q^{-1/2} U P^{-1/2}`` of stacked ``(U, [P^{-1/2}],
  [Q^{-1/2}])`` items for :func:`grouped_map` (with ``resident`` the roots
  are the owner-resident buffers, returned unchanged)."""
  ct = _compute_dtype(cfg)

  def fn(u_in, *roots, key):
    has_p, has_q = key[:2]
    it = iter(roots)
    isqrt = _Pair(next(it).astype(ct) if has_p else None,
                  next(it).astype(ct) if has_q else None)
    out = _sandwich(u_in.astype(ct), isqrt, cfg).astype(u_in.dtype)
    return (out, roots) if resident else out
  return fn


def _update_distributed(updates, state: FisherWhitenState, *, inner,
                        cfg: _Config, dims, root_every, spec):
  """:func:`_update` with owner-computes: two :func:`grouped_map` calls
  (whitening: factor update, roots, ``G̃``; map back: ``Q^{-1/2} U
  P^{-1/2}``), the inner transform on the whole tree in between. On several
  devices the roots stay on their owner between the two calls
  (:func:`optax_lite.linalg.grouped.owner_stacks`; both calls assign the
  same owners). The state has the same structure, shapes and dtypes as
  :func:`_update`'s."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  p_l, q_l, pc_l, qc_l = (treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt))
  sides = [_leaf_sides(v, p, q) for v, p, q in zip(views, p_l, q_l)]
  todo = [i for i, s in enumerate(sides) if any(s)]
  cache = any(not (_is_identity(pc_l[i]) and _is_identity(qc_l[i]))
              for i in todo)
  resident = spec.num_shards() > 1
  cost = _whiten_cost(cfg)

  def matrices(i, *leaves):
    """Stored ``(batch_shape, d, d)`` factors -> ``(b, d, d)``."""
    b = views[i].matrix_shape[0]
    return tuple(x.reshape((b,) + x.shape[-2:]) for x in leaves)

  def on_sides(i, p, q):
    return [f for f, flag in zip((p, q), sides[i]) if flag]

  items, keys = [], []
  for i in todo:
    stored = on_sides(i, p_l[i], q_l[i])
    if cache:
      stored += on_sides(i, pc_l[i], qc_l[i])
    items.append((views[i].to_matrix(g_leaves[i]),) + matrices(i, *stored))
    keys.append(sides[i] + (cache,))
  kernel = _whiten_kernel(refresh, cfg, resident)
  if resident:  # root buffers on the owners, written by the whitening
    buffers = [tuple(jnp.zeros_like(f) for f in it[1:1 + sum(sides[i])])
               for i, it in zip(todo, items)]
    roots = grouped_lib.owner_stacks(items, buffers, spec=spec, cost=cost,
                                     keys=keys)
    outs, roots = grouped_lib.grouped_map(kernel, items, spec=spec,
                                          keys=keys, cost=cost,
                                          resident=roots)
  else:
    outs = grouped_lib.grouped_map(kernel, items, spec=spec, keys=keys,
                                   cost=cost)

  ct = _compute_dtype(cfg)
  white = list(g_leaves)
  for i, v in enumerate(views):  # no stored side: as _whiten_leaf casts
    if v is not None and i not in todo:
      white[i] = g_leaves[i].astype(ct).astype(g_leaves[i].dtype)
  new_p, new_q, new_pc, new_qc = list(p_l), list(q_l), list(pc_l), list(qc_l)
  root_p, root_q = list(p_l), list(q_l)  # the roots used (to map back)
  leaf = lambda m, like: m.reshape(like.shape)
  for i, out in zip(todo, outs):
    white[i] = views[i].from_matrix(out['w'])
    if 'p' in out:
      new_p[i] = leaf(out['p'], p_l[i])
    if 'q' in out:
      new_q[i] = leaf(out['q'], q_l[i])
    if 'p_root' in out:
      root_p[i] = leaf(out['p_root'], p_l[i])
      if cache:
        new_pc[i] = root_p[i]
    if 'q_root' in out:
      root_q[i] = leaf(out['q_root'], q_l[i])
      if cache:
        new_qc[i] = root_q[i]
  inner_updates, inner_state = inner.update(
      treedef.unflatten(white), state.inner_state, None)

  u_leaves = treedef.flatten_up_to(inner_updates)
  kernel = _unwhiten_kernel(cfg, resident)
  if resident:
    # The same groups as the whitening (same shapes, sides and gradient
    # dtype; ``U`` in the group's common dtype, cast back after), so the
    # same owners, which hold the roots.
    keys2 = [k + (jnp.dtype(g_leaves[i].dtype).name, views[i].rows,
                  views[i].cols) for i, k in zip(todo, keys)]
    common = {}
    for i, k in zip(todo, keys2):
      common[k] = jnp.promote_types(common.get(k, u_leaves[i].dtype),
                                    u_leaves[i].dtype)
    items = [(views[i].to_matrix(u_leaves[i]).astype(common[k]),)
             for i, k in zip(todo, keys2)]
    backs, _ = grouped_lib.grouped_map(kernel, items, spec=spec, keys=keys2,
                                       cost=cost, resident=roots)
  else:
    items = [(views[i].to_matrix(u_leaves[i]),) + matrices(
        i, *on_sides(i, root_p[i], root_q[i])) for i in todo]
    backs = grouped_lib.grouped_map(kernel, items, spec=spec,
                                    keys=[sides[i] for i in todo])
  new_u = list(u_leaves)
  for i, v in enumerate(views):
    if v is not None and i not in todo:
      new_u[i] = u_leaves[i].astype(ct).astype(u_leaves[i].dtype)
  for i, back in zip(todo, backs):
    new_u[i] = views[i].from_matrix(back).astype(u_leaves[i].dtype)
  unflat = treedef.unflatten
  return unflat(new_u), FisherWhitenState(
      count=optax.safe_increment(state.count), p=unflat(new_p),
      q=unflat(new_q), inner_state=inner_state, p_isqrt=unflat(new_pc),
      q_isqrt=unflat(new_qc), owned=state.owned)


def _static_sides(view, max_factor_size):
  """``(has P, has Q)`` of one leaf from its shape, as :func:`_init_leaf`
  decides (the owner-resident state keeps placeholders per leaf)."""
  if view is None:
    return False, False
  fits = lambda d: max_factor_size is None or d <= max_factor_size
  return fits(view.cols), fits(view.rows)


def _owned_items(leaves, views, sides, cfg: _Config):
  """The moving items of the owner-resident update: per matrix leaf with a
  stored side, its ``(B, rows, cols)`` matrix in the compute dtype (the
  same shapes and dtypes for the gradient ``X`` and the inner update
  ``U``, so both calls form the groups and owners :func:`_owner_init`
  fixed)."""
  ct = _compute_dtype(cfg)
  return [(views[i].to_matrix(x).astype(ct),)
          for i, x in enumerate(leaves) if any(sides[i])]


def _owner_init(state: FisherWhitenState, params, *, cfg: _Config, dims,
                max_factor_size, cache: bool, spec) -> FisherWhitenState:
  """Moves the matrix leaves' factors (and cached roots) to their owners;
  their per-leaf entries become one-element placeholders."""
  leaves, treedef, views = _tree.matrix_views(params, dims, 'params')
  if not leaves:
    # No leaves: optax.tree_utils.tree_map_params's placeholder params. A
    # leaf here (not a subtree) lets its non-params rule take OwnerStacks.
    return state._replace(owned=jnp.zeros((), jnp.int32))
  sides = [_static_sides(v, max_factor_size) for v in views]
  todo = [i for i, s in enumerate(sides) if any(s)]
  paths = resident_lib.leaf_paths(params)
  fields = [treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt)]
  structs = [tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in item)
             for item in _owned_items(leaves, views, sides, cfg)]
  per_leaf = [_stored_factors(fields, sides[i], cache, i,
                              views[i].matrix_shape[0]) for i in todo]
  owned = grouped_lib.owner_stacks(
      structs, per_leaf, spec=spec, cost=_whiten_cost(cfg),
      keys=[sides[i] + (cache,) for i in todo],
      homes=[_stored_homes(fields, sides[i], cache, i, paths[i])
             for i in todo])
  p, q, pc, qc = _placeholders(fields, todo, treedef, cfg)
  return state._replace(p=p, q=q, p_isqrt=pc, q_isqrt=qc, owned=owned)


def _stored_factors(fields, sides, cache: bool, i: int, batch: int):
  """Leaf ``i``'s stored factors (then cached roots) as ``(B, d, d)``."""
  stored = [f[i] for f, flag in zip(fields[:2], sides) if flag]
  if cache:
    stored += [f[i] for f, flag in zip(fields[2:], sides) if flag]
  return tuple(x.reshape((batch,) + x.shape[-2:]) for x in stored)


def _stored_homes(fields, sides, cache: bool, i: int, key) -> tuple:
  """Where :func:`_stored_factors`' arrays live in the one-device state
  (``key``: leaf ``i``'s key path)."""
  names = ('p', 'q', 'p_isqrt', 'q_isqrt')
  flags = tuple(sides) + (tuple(sides) if cache else (False, False))
  return tuple(resident_lib.Home((name,), key, tuple(f[i].shape))
               for name, f, flag in zip(names, fields, flags) if flag)


def _inner_homes(fused, view, leaf_shape, arrays, key) -> tuple:
  """Where an :class:`OwnerInner`'s per-matrix arrays of leaf ``i`` live in
  the one-device state (its plain transform's, under ``inner_state``)."""
  homes = []
  for j, x in enumerate(arrays):
    path, matrix_form = fused.locate(j)
    homes.append(resident_lib.Home(
        ('inner_state',) + tuple(path), key,
        tuple(leaf_shape) if matrix_form else tuple(x.shape),
        view if matrix_form else None))
  return tuple(homes)


def _placeholders(fields, todo, treedef, cfg: _Config):
  """The per-leaf ``p, q, p_isqrt, q_isqrt`` trees with the owned leaves
  replaced by one-element placeholders."""
  empty = _tree.identity_placeholder(cfg.factor_dtype)
  for f in fields:
    for i in todo:
      f[i] = empty
  return tuple(treedef.unflatten(f) for f in fields)


def _read_factors(res, key, ct):
  """An owner kernel's resident arrays: the stored factors, the cached roots
  (if ``key`` says so) in ``ct``, and an iterator over the rest."""
  has_p, has_q, cached_roots = key
  it = iter(res)
  take = lambda flag: next(it).astype(ct) if flag else None
  prev = _Pair(take(has_p), take(has_q))
  cached = _Pair(take(has_p), take(has_q)) if cached_roots else None
  return prev, cached, it


def _update_owned(updates, state: FisherWhitenState, *, inner, cfg: _Config,
                  dims, root_every, max_factor_size, spec):
  """:func:`_update` with the factors (and cached roots) resident on their
  owners (``state.owned``): only ``X`` travels to the owner and ``G̃``
  back, then ``U`` and ``Δ``; the owners keep this step's roots between
  the two grouped calls."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  sides = [_static_sides(v, max_factor_size) for v in views]
  todo = [i for i, s in enumerate(sides) if any(s)]
  items = _owned_items(g_leaves, views, sides, cfg)
  # Whether the roots are cached, read from the resident layout (per group:
  # the stored sides' factors, then as many cached roots).
  n_sides = sum(sum(k[1]) for k in grouped_lib.group_items(
      items, [sides[i] for i in todo]))
  n_res = len(jax.tree.leaves(state.owned))
  if n_res not in (n_sides, 2 * n_sides):
    raise ValueError(f'state: its owner-resident factors ({n_res} arrays) '
                     f'do not match these updates ({n_sides} stored sides); '
                     'create the state with this transform\'s init.')
  cache = n_sides > 0 and n_res == 2 * n_sides
  keys = [sides[i] + (cache,) for i in todo]
  cost = _whiten_cost(cfg)
  resident = state.owned
  if not cache:  # this step's roots: buffers on the owners
    buffers = grouped_lib.owner_stacks(items, [
        tuple(jnp.zeros((it[0].shape[0], d, d), cfg.factor_dtype)
              for d, flag in zip((views[i].cols, views[i].rows), sides[i])
              if flag) for i, it in zip(todo, items)],
        spec=spec, cost=cost, keys=keys)
    resident = resident.replace_groups(
        tuple(a + b for a, b in zip(resident.groups, buffers.groups)))
  ct = _compute_dtype(cfg)

  def whiten(x, *res, key):
    has_p, has_q, _ = key
    prev, cached, _ = _read_factors(res, key, ct)
    f = _step_factors(x, prev, cached, refresh, cfg)
    new = [m.astype(cfg.factor_dtype) for m, flag in zip(
        (f.new.p, f.new.q, f.isqrt.p, f.isqrt.q), (has_p, has_q) * 2)
           if flag]
    return (_sandwich(x, f.isqrt, cfg),), tuple(new)

  def unwhiten(u, *res, key):
    has_p, has_q = key[:2]
    it = iter(res[len(res) - has_p - has_q:])  # the roots used this step
    isqrt = _Pair(next(it).astype(ct) if has_p else None,
                  next(it).astype(ct) if has_q else None)
    return (_sandwich(u, isqrt, cfg),), res

  outs, resident = grouped_lib.grouped_map(whiten, items, spec=spec,
                                           keys=keys, cost=cost,
                                           resident=resident)
  white = list(g_leaves)
  for i, v in enumerate(views):  # no stored side: as _whiten_leaf casts
    if v is not None and i not in todo:
      white[i] = g_leaves[i].astype(ct).astype(g_leaves[i].dtype)
  for i, (w,) in zip(todo, outs):
    white[i] = views[i].from_matrix(w).astype(g_leaves[i].dtype)
  inner_updates, inner_state = inner.update(
      treedef.unflatten(white), state.inner_state, None)

  u_leaves = treedef.flatten_up_to(inner_updates)
  backs, resident = grouped_lib.grouped_map(
      unwhiten, _owned_items(u_leaves, views, sides, cfg), spec=spec,
      keys=keys, cost=cost, resident=resident)
  if not cache:  # drop the root buffers
    resident = resident.replace_groups(
        tuple(g[:len(g) // 2] for g in resident.groups))
  new_u = list(u_leaves)
  for i, v in enumerate(views):
    if v is not None and i not in todo:
      new_u[i] = u_leaves[i].astype(ct).astype(u_leaves[i].dtype)
  for i, (back,) in zip(todo, backs):
    new_u[i] = views[i].from_matrix(back).astype(u_leaves[i].dtype)
  return treedef.unflatten(new_u), state._replace(
      count=optax.safe_increment(state.count), inner_state=inner_state,
      owned=resident)


# ----------------------------------------------------------------------------
# Fused owner-computes: with an ``OwnerInner`` over several devices, the
# whitening, the inner step and the map back run in one grouped call; the
# factors, cached roots and the inner per-matrix state (FISMO: the momentum)
# all live on the owner, so per matrix only ``X`` travels in and ``Δ`` out.


def _fused_cost(cfg: _Config, fused: owner_inner_lib.OwnerInner):
  """:func:`_whiten_cost` plus the inner step's flops (``X``'s shape)."""
  whiten = _whiten_cost(cfg)
  inner = fused.cost or (lambda r, c: 0.0)

  def cost(shapes):
    r, c = shapes[0][-2:]
    return whiten(shapes) + float(inner(r, c))
  return cost


def _masked(treedef, leaves, todo):
  """The tree with the leaves in ``todo`` replaced by ``optax.MaskedNode``
  (what the plain inner transform sees next to the fused matrices)."""
  skip = set(todo)
  return treedef.unflatten([optax.MaskedNode() if i in skip else x
                            for i, x in enumerate(leaves)])


def _fused_init(state: FisherWhitenState, params, *, fused, cfg: _Config,
                dims, max_factor_size, cache: bool, spec
                ) -> FisherWhitenState:
  """Every matrix leaf's factors, cached roots and inner state
  (``fused.init``) on its owner; the plain inner transform's state covers
  the other leaves (the matrix leaves are ``optax.MaskedNode`` in it)."""
  leaves, treedef, views = _tree.matrix_views(params, dims, 'params')
  if not leaves:
    # No leaves: optax.tree_utils.tree_map_params's placeholder params. A
    # leaf here (not a subtree) lets its non-params rule take OwnerStacks.
    return state._replace(inner_state=fused.transform.init(params),
                          owned=jnp.zeros((), jnp.int32))
  sides = [_static_sides(v, max_factor_size) for v in views]
  todo = [i for i, v in enumerate(views) if v is not None]
  ct = _compute_dtype(cfg)
  paths = resident_lib.leaf_paths(params)
  fields = [treedef.flatten_up_to(t) for t in (
      state.p, state.q, state.p_isqrt, state.q_isqrt)]
  structs, per_leaf, homes = [], [], []
  for i in todo:
    x = views[i].to_matrix(leaves[i])
    structs.append((jax.ShapeDtypeStruct(x.shape, ct),))
    inner = tuple(fused.init(x))
    per_leaf.append(_stored_factors(fields, sides[i], cache, i, x.shape[0])
                    + inner)
    homes.append(_stored_homes(fields, sides[i], cache, i, paths[i])
                 + (_inner_homes(fused, views[i], leaves[i].shape, inner,
                                 paths[i])
                    if fused.locate is not None else ()))
  owned = grouped_lib.owner_stacks(
      structs, per_leaf, spec=spec, cost=_fused_cost(cfg, fused),
      keys=[sides[i] + (cache,) for i in todo],
      homes=homes if fused.locate is not None else None)
  p, q, pc, qc = _placeholders(fields, todo, treedef, cfg)
  inner_state = fused.transform.init(_masked(treedef, leaves, todo))
  return state._replace(p=p, q=q, p_isqrt=pc, q_isqrt=qc,
                        inner_state=inner_state, owned=owned)


def _fused_kernel(step, refresh, cfg: _Config):
  """Whitening, the inner ``step`` and the map back of stacked ``X`` (compute
  dtype) next to the resident ``([P], [Q], [P cache], [Q cache], *inner
  state)``; returns ``((Δ,), new resident arrays)``.

  The same arithmetic as the one-device path (:func:`_whiten_leaf`, the
  inner transform, :func:`_unwhiten_leaf`); the roots that map back are
  rounded to ``factor_dtype`` as that path stores them.
  """
  ct = _compute_dtype(cfg)
  fd = cfg.factor_dtype

  def fn(x, *res, key):
    has_p, has_q, cached_roots = key
    prev, cached, it = _read_factors(res, key, ct)
    inner_state = tuple(it)
    if has_p or has_q:
      f = _step_factors(x, prev, cached, refresh, cfg)
    else:  # both sides identity: only the inner step
      f = _Factors(prev, prev)
    y, new_inner = step(_sandwich(x, f.isqrt, cfg), *inner_state)
    stored = lambda m: None if m is None else m.astype(fd).astype(ct)
    delta = _sandwich(y.astype(ct), _Pair(stored(f.isqrt.p),
                                          stored(f.isqrt.q)), cfg)
    new = [m.astype(fd) for m, flag in zip((f.new.p, f.new.q),
                                           (has_p, has_q)) if flag]
    if cached_roots:
      new += [m.astype(fd) for m, flag in zip((f.isqrt.p, f.isqrt.q),
                                              (has_p, has_q)) if flag]
    return (delta,), tuple(new) + tuple(new_inner)
  return fn


def _resident_sides(factors, rows: int, cols: int):
  """``(has P, has Q, cached roots)`` of one group of the fused layout, read
  from its resident factor arrays (``[P], [Q], [P cache], [Q cache]``, each
  ``(N, d, d)``; ``P`` is ``cols × cols``) as :func:`_fused_init` stored
  them, so the update needs no (possibly traced) ``max_factor_size``.
  ``None`` when the layout does not fit; ``cached roots`` is ``None`` for a
  group without stored sides."""
  d = [a.shape[-1] for a in factors]
  if not d:
    return False, False, None
  if d == [cols, rows, cols, rows]:
    return True, True, True
  if len(d) == 2 and d == [cols, rows] and (rows == cols or d[0] != d[1]):
    return True, True, False
  if (len(d) in (1, 2) and rows != cols and len(set(d)) == 1
      and d[0] in (rows, cols)):
    return d[0] == cols, d[0] == rows, len(d) == 2
  return None


def _update_fused(updates, state: FisherWhitenState, *, fused, cfg: _Config,
                  dims, root_every, spec):
  """One grouped call per step: ``X`` goes to its owner, which updates the
  factors, whitens, runs ``fused.step`` with the resident inner state and
  maps back; ``Δ`` comes back. Leaves without a matrix view get the plain
  inner transform (with the matrix leaves masked)."""
  refresh = state.count % root_every == 0
  g_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  todo = [i for i, v in enumerate(views) if v is not None]
  ct = _compute_dtype(cfg)
  items = [(views[i].to_matrix(g_leaves[i]).astype(ct),) for i in todo]
  # The stored sides and whether the roots are cached, per group, read from
  # the resident layout. The groups are those of init: its keys (the sides,
  # fixed by the shape, and the uniform cache flag) split no shape group.
  groups = list(grouped_lib.group_items(items).items())
  resident = state.owned
  if len(resident.groups) != len(groups):
    raise ValueError(f'state: its owner-resident arrays form '
                     f'{len(resident.groups)} groups, these updates '
                     f'{len(groups)}; create the state with this '
                     'transform\'s init.')
  layouts, cache = [], set()
  for (gkey, _), arrays in zip(groups, resident.groups):
    shape = gkey[0][0][0]
    n_inner = len(jax.eval_shape(fused.init, jax.ShapeDtypeStruct(
        (1,) + shape, ct)))
    layout = (_resident_sides(arrays[:len(arrays) - n_inner], *shape[-2:])
              if len(arrays) >= n_inner else None)
    if layout is None:
      raise ValueError(f'state: owner-resident arrays of shapes '
                       f'{[a.shape for a in arrays]} do not fit {shape} '
                       f'matrices with {n_inner} inner state arrays; create '
                       'the state with this transform\'s init.')
    layouts.append(layout)
    if layout[2] is not None:
      cache.add(layout[2])
  if len(cache) > 1:
    raise ValueError('state: some groups cache their roots, others do not; '
                     'create the state with this transform\'s init.')
  cache = bool(cache and cache.pop())
  keys = [None] * len(items)
  for (_, idx), (has_p, has_q, _) in zip(groups, layouts):
    for j in idx:
      keys[j] = (has_p, has_q, cache)
  outs, resident = grouped_lib.grouped_map(
      _fused_kernel(fused.step_for(state.inner_state), refresh, cfg), items,
      spec=spec, keys=keys,
      cost=_fused_cost(cfg, fused), resident=resident)
  # The other leaves (no matrix view): the plain inner transform, unwhitened.
  inner_updates, inner_state = fused.transform.update(
      _masked(treedef, g_leaves, todo), state.inner_state, None)
  new_u = treedef.flatten_up_to(inner_updates)
  for i, (delta,) in zip(todo, outs):
    new_u[i] = views[i].from_matrix(delta).astype(g_leaves[i].dtype)
  return treedef.unflatten(new_u), state._replace(
      count=optax.safe_increment(state.count), inner_state=inner_state,
      owned=resident)


def _init(params, *, inner, cfg: _Config, dims, max_factor_size,
          root_every, spec=None, fused=None) -> FisherWhitenState:
  _checks.require_static(
      'they decide the shape of the optimizer state and must be Python ints '
      'when the state is created (or do not jit init)',
      max_factor_size=max_factor_size, root_every=root_every)
  cache = root_every > 1 or cfg.root_method == 'newton_warm'
  out = _tree.map_leaves(
      functools.partial(_init_leaf, cfg=cfg, max_factor_size=max_factor_size,
                        cache=cache), params, dims=dims, name='params')
  p, q, p_cache, q_cache = _tree.unzip(out, 4, params)
  multi = spec is not None and spec.num_shards() > 1
  state = FisherWhitenState(count=jnp.zeros([], jnp.int32), p=p, q=q,
                            inner_state=None if multi and fused is not None else
                            inner.init(params),
                            p_isqrt=p_cache, q_isqrt=q_cache)
  if multi and fused is not None:
    return _fused_init(state, params, fused=fused, cfg=cfg, dims=dims,
                       max_factor_size=max_factor_size, cache=cache,
                       spec=spec)
  if multi:
    return _owner_init(state, params, cfg=cfg, dims=dims,
                       max_factor_size=max_factor_size, cache=cache,
                       spec=spec)
  return state


def _update(updates, state: FisherWhitenState, params=None, *, inner,
            cfg: _Config, dims, root_every, max_factor_size=None, spec=None,
            fused=None, memory_budget=None):
  del params  # the inner transform lives in the whitened space
  owned = isinstance(state.owned, grouped_lib.OwnerStacks)
  if owned and (spec is None or spec.num_shards() == 1):
    raise ValueError('distribute: this state keeps its factors on their '
                     'owner devices (made by init with distribute over '
                     'several devices); update it with that distribute.')
  if owned and fused is not None:
    return _update_fused(updates, state, fused=fused, cfg=cfg, dims=dims,
                         root_every=root_every, spec=spec)
  if owned:
    return _update_owned(updates, state, inner=inner, cfg=cfg, dims=dims,
                         root_every=root_every,
                         max_factor_size=max_factor_size, spec=spec)
  if spec is not None:
    return _update_distributed(updates, state, inner=inner, cfg=cfg,
                               dims=dims, root_every=root_every, spec=spec)
  refresh = state.count % root_every == 0
  budget = grouped_lib.budget_bytes(memory_budget, updates)
  out = _tree.map_leaves(
      functools.partial(_whiten_leaf, refresh=refresh, cfg=cfg),
      updates, state.p, state.q, state.p_isqrt, state.q_isqrt, dims=dims,
      memory_budget=budget)
  step = _LeafStep(*_tree.unzip(out, len(_LeafStep._fields), updates))
  inner_updates, inner_state = inner.update(step.whitened, state.inner_state,
                                            None)
  new_updates = _tree.map_leaves(
      functools.partial(_unwhiten_leaf, cfg=cfg), inner_updates,
      step.p_isqrt, step.q_isqrt, dims=dims, memory_budget=budget)
  return new_updates, FisherWhitenState(
      count=optax.safe_increment(state.count), p=step.p, q=step.q,
      inner_state=inner_state, p_isqrt=step.p_cache, q_isqrt=step.q_cache)


def fisher_whiten(inner: optax.GradientTransformation | None = None, *,
                  gamma: float = 0.95, damping: float = 1e-3,
                  root_method: str = 'auto', root_iters: int = 30,
                  warm_iters: int = 3,
                  root_eps: float = 0.0, min_eig: float = 1e-5,
                  trace_damping: float = 1.0, factor_dtype=None,
                  max_factor_size: int | None = 4096,
                  scale_invariant: bool = False, root_every: int = 1,
                  dims: _tree.DimsSpec = None, precision=None,
                  distribute=None,
                  memory_budget: float | str | None = 'auto'
                  ) -> optax.GradientTransformation:
  """Whitens matrix leaves with FISMO's Kronecker factors around ``inner``.

  Args:
    inner: the transform applied in the whitened space (``None``: identity,
      which gives the Kronecker natural gradient ``P⁻¹ G Q⁻¹``). Called with
      ``params=None``. Or an :class:`optax_lite.transforms.OwnerInner`: its
      plain ``transform`` is used on one device (same results and state as
      passing it directly), and with ``distribute`` over several devices
      its slice-wise ``step`` runs on each matrix's owner inside the
      whitening call (see ``distribute``).
    gamma: factor EMA ``γ`` in ``[0, 1]`` (``1`` freezes ``P = Q = I``).
    damping: ``μ > 0``; absolute (gradient² units) in the exact algorithm,
      relative to the mean eigenvalue with ``scale_invariant=True``.
    root_method: ``"auto"`` (default: :func:`auto_root_method` of the
      platform when the transform is built — ``"eigh"`` on CPU,
      ``"newton_warm"`` on GPU and TPU), ``"eigh"`` (exact), ``"newton"``
      (matmul-only coupled Newton iteration) or ``"newton_warm"``
      (matmul-only, refined from the previous roots, see "Warm-started
      roots" in the module doc). The resolved method decides whether the
      roots live in the state, so pass it explicitly to restore a
      checkpoint on another platform.
    root_iters: iterations of the (cold) Newton method.
    warm_iters: iterations of ``"newton_warm"`` from the previous root.
    root_eps: ridge added before each inverse root (``>= 0``).
    min_eig: identity mix after each trace normalisation, in ``[0, 1)``
      (see module doc; ``0`` is the literal algorithm).
    trace_damping: ``ν >= 0``, damping relative to the mean eigenvalue of
      each step's statistic (not in the paper; see "Trace-relative damping"
      in the module doc). ``1`` (default) keeps every factor's eigenvalues
      ``>= 1/2`` and the update within twice Muon's spectral norm; ``0``
      with ``min_eig=0`` and ``root_eps=0`` is Algorithm 1 literally.
    factor_dtype: dtype of the stored factors and of the factor arithmetic
      (``None``: float32; bfloat16 is not recommended).
    max_factor_size: a side larger than this keeps an identity factor
      (``None``: no limit).
    scale_invariant: normalise the statistic before the EMA (see module
      doc); ``False`` is Algorithm 1 exactly.
    root_every: ``k >= 1``; the inverse roots are recomputed on steps with
      ``count % k == 0`` and cached in between (the factors themselves are
      updated every step; see "Amortised roots" in the module doc). ``1``
      (default) is Algorithm 1 exactly.
    dims: how leaves are seen as matrices (see
      :func:`optax_lite.orthogonalize`); ``None`` entries pass through
      unwhitened (the inner transform still sees them).
    precision: ``jax.lax.Precision`` of the matrix products.
    distribute: ``None`` (default: leaf by leaf on each device, as the
      SPMD partitioner lays it out) or a :class:`optax_lite.PolarSharding`
      / ``Mesh`` / ``(mesh, axes)``: owner-computes
      (:mod:`optax_lite.linalg.grouped`). Same-shape matrices are stacked
      and each device computes whole matrices, assigned by cost
      (``≈ 3·r·c·(r + c)`` matmul flops plus ``d³`` per root, plus the
      inner step's ``cost``). With an ``OwnerInner`` over several devices
      one grouped call per step does everything per matrix: the gradient
      goes to its owner (all-to-all; nothing moves in when it is
      replicated), which updates the factors, computes the roots and
      ``G̃``, runs the inner step with its per-matrix state (kept there)
      and maps back; ``Δ`` comes back (all-to-all, or one all-gather of
      all results when replicated). Leaves without a matrix view get the
      plain inner transform. With a plain inner transform: one grouped call
      does the factor update, the inverse roots and ``G̃`` (in and out as
      above), the inner transform runs on the whole tree (pass it
      ``distribute`` too), and a second grouped call maps back,
      ``Q^{-1/2} U P^{-1/2}``, on the same owners, which kept the roots.
      No collective inside a root iteration. Over several devices the
      factors (and cached roots, and an ``OwnerInner``'s state) live on
      their owners (``FisherWhitenState.owned``), so such a state needs
      this ``distribute`` (a ``distribute=None`` state still runs under a
      mesh, moving its factors each step); the update equals the
      single-device one up to round-off, except that with
      ``"newton_warm"`` the cold fallback is chosen per stack of
      same-shape matrices on a device rather than per leaf, and with
      an ``OwnerInner`` and bfloat16 gradients ``G̃`` and ``U`` stay in
      float32 on the owner (the per-leaf path rounds them to the
      gradient's dtype).

    memory_budget: with ``distribute=None``, the working set of the
      matrix leaves whitened together, as a fraction of the updates' bytes
      (``"auto"``: 0.1): they run in packs that fit it, one pack after
      another (:func:`optax_lite.linalg.grouped.sequential_calls`); same
      values. ``None``: every leaf at once, as XLA schedules it. (FISMO's
      inner ``orthogonalize`` takes its own budget, which is what bounds
      its polar factors; see ``docs/benchmarks.md``, memory.)

  ``gamma``, ``damping``, ``min_eig``, ``trace_damping``, ``root_eps``,
  ``root_iters`` and the value of ``root_every`` may be traced (e.g. by
  ``optax.inject_hyperparams``); ``max_factor_size`` and whether
  ``root_every > 1`` are read when the state is created and must then be
  Python ints (a ``TypeError`` names ``static_args`` otherwise).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`FisherWhitenState`.

  Raises:
    ValueError: ``gamma`` outside ``[0, 1]``, ``damping <= 0``, unknown
      ``root_method``, ``root_iters < 1``, ``root_eps < 0``, ``min_eig``
      outside ``[0, 1)``, ``trace_damping < 0``, ``max_factor_size < 1`` or
      ``root_every < 1``.
    TypeError: ``inner`` neither a GradientTransformation, an
      ``OwnerInner`` nor ``None``; ``root_every`` (or ``root_iters``,
      ``max_factor_size``) not
      an int; ``max_factor_size`` or ``root_every`` traced when the state is
      created; ``distribute`` not a PolarSharding, Mesh or ``(mesh,
      axes)`` (a ``ValueError`` for an unknown axis or layout, or for a
      state with owner-resident factors updated without its
      ``distribute``).
  """
  fused = inner if isinstance(inner, owner_inner_lib.OwnerInner) else None
  inner = owner_inner_lib.plain_transform(inner)
  if not (callable(getattr(inner, 'init', None)) and
          callable(getattr(inner, 'update', None))):
    raise TypeError('inner: expected an optax.GradientTransformation, an '
                    f'OwnerInner or None, got {type(inner).__name__}.')
  spec = distributed_lib.check_distribute(distribute)
  memory_budget = grouped_lib.check_memory_budget(memory_budget)
  _checks.check_decay('gamma', gamma, allow_one=True)
  _checks.check_positive('damping', damping)
  _checks.check_choice('root_method', root_method, _ROOT_METHODS)
  if root_method == 'auto':
    root_method = auto_root_method()
  root_iters = _checks.int_hyperparameter('root_iters', root_iters, 1)
  warm_iters = _checks.int_hyperparameter('warm_iters', warm_iters, 1)
  _checks.check_positive('root_eps', root_eps, allow_zero=True)
  _checks.check_decay('min_eig', min_eig)
  _checks.check_positive('trace_damping', trace_damping, allow_zero=True)
  if max_factor_size is not None:
    max_factor_size = _checks.int_hyperparameter('max_factor_size',
                                                 max_factor_size, 1)
  root_every = _checks.int_hyperparameter('root_every', root_every, 1)
  factor_dtype = jnp.dtype(jnp.float32 if factor_dtype is None
                           else factor_dtype)
  if not jnp.issubdtype(factor_dtype, jnp.floating):
    raise ValueError(f'factor_dtype must be a floating dtype, got '
                     f'{factor_dtype}.')
  cfg = _Config(gamma=gamma, damping=damping, min_eig=min_eig,
                trace_damping=trace_damping,
                scale_invariant=scale_invariant, root_method=root_method,
                root_iters=root_iters, root_eps=root_eps,
                factor_dtype=factor_dtype, precision=precision,
                warm_iters=warm_iters,
                every_step=isinstance(root_every, int) and root_every == 1)
  return optax.GradientTransformation(
      functools.partial(_init, inner=inner, cfg=cfg, dims=dims,
                        max_factor_size=max_factor_size,
                        root_every=root_every, spec=spec, fused=fused),
      distributed_lib.layout_stable(functools.partial(
          _update, inner=inner, cfg=cfg, dims=dims, root_every=root_every,
          max_factor_size=max_factor_size, spec=spec, fused=fused,
          memory_budget=memory_budget)))
