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

**One device, fused** (``distribute=None`` with an
:class:`optax_lite.transforms.OwnerInner` whose ``locate`` finds its
arrays in the plain inner transform's state; ``fismo`` builds one). A
plain inner transform runs on the whole whitened tree, so every matrix's
``G̃`` and inner intermediates (FISMO: the momentum output and the polar
factor) are alive at once, and the map back waits for all of them
(FISMO's temporaries: 1.84× the parameter bytes of the 34M tree of
``benchmarks/memory.py``, 2.10× at 118M). Fused, each matrix's factor
update, roots, ``G̃``, inner ``step`` (on its arrays of the plain inner
transform's state, read and written back where ``locate`` says) and map
back are one kernel call of the engine's per-leaf placement, in
``memory_budget`` packs that wait for each other (0.35× and 0.40×). The
leaves without a matrix view get the plain inner transform (the matrix
leaves masked), which also advances its other state (e.g. a step count).
Same state and, up to round-off, values as the unfused path.

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

import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.transforms import _tree
from optax_lite.transforms import owner_inner as owner_inner_lib
from optax_lite.transforms.fisher_factors import (  # noqa: F401 (re-exported)
    AUTO_ROOT_METHOD, AUTO_ROOT_METHOD_ACCELERATOR, FisherWhitenState, _Config,
    _ROOT_METHODS, _init_leaf, auto_root_method, factor_step)
from optax_lite.transforms import fisher_owner


def _init(params, *, inner, cfg: _Config, dims, max_factor_size,
          root_every, spec=None, fused=None) -> FisherWhitenState:
  _checks.require_static(
      'they decide the shape of the optimizer state and must be Python ints '
      'when the state is created (or do not jit init)',
      max_factor_size=max_factor_size, root_every=root_every)
  cache = root_every > 1 or cfg.root_method == 'newton_warm'
  if _tree.is_params_placeholder(params):
    # tree_map_params's stand-in: no factor is shaped like its parameter.
    p, q, p_cache, q_cache = _tree.placeholder_fields(params, [False] * 4)
  else:
    out = _tree.map_leaves(
        functools.partial(_init_leaf, cfg=cfg,
                          max_factor_size=max_factor_size, cache=cache),
        params, dims=dims, name='params')
    p, q, p_cache, q_cache = _tree.unzip(out, 4, params)
  multi = spec is not None and spec.num_shards() > 1
  state = FisherWhitenState(count=jnp.zeros([], jnp.int32), p=p, q=q,
                            inner_state=None if multi and fused is not None else
                            inner.init(params),
                            p_isqrt=p_cache, q_isqrt=q_cache)
  if not multi:
    return state
  init = (fisher_owner.owner_init if fused is None else functools.partial(
      fisher_owner.fused_init, fused=fused))
  return init(state, params, cfg=cfg, dims=dims,
              max_factor_size=max_factor_size, cache=cache, spec=spec)


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
    return fisher_owner.update_fused(updates, state, fused=fused, cfg=cfg,
                                     dims=dims, root_every=root_every,
                                     spec=spec)
  if fisher_owner.fuses_locally(fused, state, spec, cfg):
    return fisher_owner.update_fused_local(
        updates, state, fused=fused, cfg=cfg, dims=dims,
        root_every=root_every, memory_budget=memory_budget)
  return fisher_owner.update_whiten(
      updates, state, inner=inner, cfg=cfg, dims=dims, root_every=root_every,
      max_factor_size=max_factor_size, spec=spec, memory_budget=memory_budget)


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
      ``params=None``. Or an :class:`optax_lite.transforms.OwnerInner`:
      with ``distribute=None`` (and a ``locate``) its slice-wise ``step``
      runs fused with the whitening, one call per matrix (see "One
      device, fused" in the module doc); with ``distribute`` over several
      devices it runs on each matrix's owner inside the whitening call
      (see ``distribute``); on a one-device mesh its plain ``transform``
      is used. The state is the plain ``transform``'s in the first and
      last case and the results those of passing it directly, up to
      round-off.
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
      values. ``None``: every leaf at once, as XLA schedules it. With an
      ``OwnerInner`` a pack holds each of its matrices' whole step, inner
      step included; with a plain inner transform only the whitening and
      the map back are packed (the inner transform takes its own budget
      and runs on the whole whitened tree; see ``docs/benchmarks.md``,
      memory).

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
  _checks.check_flag('scale_invariant', scale_invariant)
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
