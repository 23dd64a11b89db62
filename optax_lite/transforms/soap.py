"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors.

The per-matrix step (:func:`soap_leaf_update`, :func:`soap_direction`) and
the transform (:func:`scale_by_soap`); the math and references are in
:mod:`optax_lite.transforms.kron_precondition`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import engine
from optax_lite.transforms import _tree
from optax_lite.transforms.kron_common import (
    _HIGHEST, _KronSpec, _decay, _kron_bytes, _kron_transform, _leaf_view,
    _resident_cost, _sides, _soap_cost, check_soap_args,
    check_stack_by_shape, placement_and_dtypes, rotate, rotate_back)
from optax_lite.transforms.kron_roundoff import (
    NULL_THRESHOLD)
from optax_lite.transforms.soap_basis import (
    SoapBasis, soap_basis_init, soap_basis_refresh, soap_basis_update,
    soap_keep, soap_shared_moment, soap_step_index)


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
    lam_l: ``(B, m)``, the energy of each column of ``q_l`` when the basis
      was last computed (eigenvalues at ``eigh``, Rayleigh quotients
      ``diag(Q_lᵀ L Q_l)`` after a refresh); ``(B, 1)`` on identity sides.
      Exactly 0 on the columns found null (round-off) when the basis was
      computed (see ``null_threshold``): their coordinates share one
      second moment per cluster.
    lam_r: the same for ``q_r``, ``(B, n)``.
    owned: ``None`` (one device, or ``distribute=None``), or with
      ``distribute=`` over several devices an
      :class:`optax_lite.linalg.grouped.OwnerStacks`: the eight arrays above
      of every matrix with a preconditioned side, in matrix form, stacked
      on the device that computes it (split along axis 0). Those leaves'
      entries in the other per-leaf fields are then one-element
      placeholders.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  stats_l: optax.Updates
  stats_r: optax.Updates
  q_l: optax.Updates
  q_r: optax.Updates
  lam_l: optax.Updates
  lam_r: optax.Updates
  owned: Any = None


class SoapLeaf(NamedTuple):
  """One leaf's SOAP state in matrix form (see :class:`SoapState`)."""
  mu: jax.Array
  nu: jax.Array
  stats_l: jax.Array
  stats_r: jax.Array
  q_l: jax.Array
  q_r: jax.Array
  lam_l: jax.Array
  lam_r: jax.Array


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
    keep: ``(B, m, n)`` weights in ``[0, 1]`` (broadcastable), 0 on the
      round-off coordinates, whose update must be exactly zero, and below
      1 on those near the round-off bound (:func:`roundoff_weight`).
    nu_hat: ``V̂``, the bias-corrected second moment in the rotated basis
      (SOAP's eigenvalue estimates; 0 on a statistics-only step), each
      null cluster's coordinates sharing their mean.
  """
  numerator: jax.Array
  grad_rot: jax.Array
  denominator: jax.Array
  q_l: jax.Array
  q_r: jax.Array
  keep: jax.Array
  nu_hat: jax.Array


def soap_second_moment(nu: jax.Array, g_rot: jax.Array, t: jax.Array,
                       first: jax.Array | None = None, *, b2
                       ) -> tuple[jax.Array, jax.Array]:
  """``V ← β_v V + (1−β_v) G_rot²`` and ``V̂ = V / (1 − β_vᵗ)``.

  On a statistics-only step (``first`` True) ``V`` is kept and ``V̂ = 0``.
  """
  b2 = _decay(b2, nu.dtype)
  new = b2 * nu + (1.0 - b2) * jnp.square(g_rot)
  tf = jnp.maximum(t, 1).astype(nu.dtype)
  if first is None:
    return new, new / (1.0 - b2 ** tf)
  new = jnp.where(first, nu, new)
  return new, jnp.where(first, 0.0, new / (1.0 - b2 ** tf))


def soap_rotated_adam(mu: jax.Array, nu: jax.Array, g: jax.Array,
                      basis: SoapBasis, t: jax.Array,
                      first: jax.Array | None = None, *, b1, b2, eps,
                      null_threshold=NULL_THRESHOLD, precision=_HIGHEST
                      ) -> tuple[jax.Array, jax.Array, SoapDirection]:
  """Adam in SOAP's rotated basis: ``(mu, nu, direction)``.

  ``mu`` (original basis) and ``nu`` (rotated basis) are ``(B, m, n)`` in
  the computing dtype; ``t``, ``first`` from :func:`soap_step_index`. On a
  statistics-only step the moments are kept and the direction is zero.
  """
  g_rot = rotate(g, basis.q_l, basis.q_r, precision=precision)
  b1 = _decay(b1, mu.dtype)
  new_mu = b1 * mu + (1.0 - b1) * g
  if first is not None:
    new_mu = jnp.where(first, mu, new_mu)
  nu, nu_hat = soap_second_moment(nu, g_rot, t, first, b2=b2)
  nu_hat = soap_shared_moment(basis, nu_hat, null_threshold)
  tf = jnp.maximum(t, 1).astype(mu.dtype)
  numerator = rotate(new_mu / (1.0 - b1 ** tf), basis.q_l, basis.q_r,
                     precision=precision)
  denominator = jnp.sqrt(nu_hat) + eps
  keep = soap_keep(basis, null_threshold, nu_hat)
  if first is not None:
    # 0·G_rot, not 0: a non-finite gradient still gives a non-finite step.
    numerator = jnp.where(first, 0.0 * g_rot, numerator)
    denominator = jnp.where(first, 1.0, denominator)
  direction = SoapDirection(numerator=numerator, grad_rot=g_rot,
                            denominator=denominator, q_l=basis.q_l,
                            q_r=basis.q_r, keep=keep, nu_hat=nu_hat)
  return new_mu, nu, direction


def soap_leaf_update(leaf: SoapLeaf, g: jax.Array, count: jax.Array, *,
                     b1: float, b2: float, shampoo_beta: float, eps: float,
                     precondition_frequency: int,
                     skip_first_update: bool = True,
                     null_threshold: float | None = NULL_THRESHOLD,
                     precision=_HIGHEST
                     ) -> tuple[SoapLeaf, SoapDirection]:
  """One SOAP step for one leaf in matrix form (see module doc).

  Args:
    leaf: the leaf's state (:class:`SoapLeaf`, all ``(B, ·, ·)`` arrays).
    g: the gradient ``(B, m, n)``.
    count: the 1-based index ``t`` of this step (int32 scalar).
    b1, b2, shampoo_beta, eps, precondition_frequency, skip_first_update,
    null_threshold: see :func:`scale_by_soap`.
    precision: matmul precision.

  Returns:
    ``(new_leaf, direction)``: the new state (statistics updated, bases
    refreshed when ``t mod k = 0``) and the :class:`SoapDirection` of this
    step; the SOAP update is
    ``rotate_back(d.numerator / d.denominator, d.q_l, d.q_r)``. On a skipped
    first step (``skip_first_update`` and a preconditioned side) ``M`` and
    ``V`` are left unchanged, ``numerator = 0`` and ``denominator = 1``.
  """
  sdt = jnp.promote_types(leaf.nu.dtype, jnp.float32)
  basis = soap_basis_update(
      SoapBasis(leaf.stats_l, leaf.stats_r, leaf.q_l, leaf.q_r, leaf.lam_l,
                leaf.lam_r), g, count, shampoo_beta=shampoo_beta,
      null_threshold=null_threshold, precision=precision)
  t, first = soap_step_index(count, basis, skip_first_update)
  mu, nu, direction = soap_rotated_adam(
      leaf.mu.astype(sdt), leaf.nu.astype(sdt), g.astype(sdt), basis, t,
      first, b1=b1, b2=b2, eps=eps, null_threshold=null_threshold,
      precision=precision)
  # The reference counts real steps only: with the statistics-only first
  # call, refresh after calls k+1, 2k+1, ... (real steps k, 2k, ...).
  basis, nu = soap_basis_refresh(basis, nu, t,
                                 precondition_frequency=precondition_frequency,
                                 null_threshold=null_threshold)
  new_leaf = SoapLeaf(mu=mu.astype(leaf.mu.dtype), nu=nu.astype(leaf.nu.dtype),
                      **{f: getattr(basis, f).astype(getattr(leaf, f).dtype)
                         for f in SoapBasis._fields})
  return new_leaf, direction


def soap_direction(d: SoapDirection, *, precision=_HIGHEST) -> jax.Array:
  """The plain SOAP update ``Q_l (num / den) Q_rᵀ`` from a direction.

  Each coordinate is weighted by ``d.keep``; those without gradient energy
  (weight 0) contribute exactly zero; ``0·num`` keeps a non-finite
  gradient visible.
  """
  u = jnp.where(d.keep > 0, d.keep * (d.numerator / d.denominator),
                0.0 * d.numerator)
  return rotate_back(u, d.q_l, d.q_r, precision=precision)


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


def scale_by_soap(b1: float = 0.95, b2: float = 0.99,
                  shampoo_beta: float = 0.95, eps: float = 1e-8,
                  precondition_frequency: int = 10,
                  max_precond_dim: int = 4096, dims: _tree.DimsSpec = None, *,
                  skip_first_update: bool = True,
                  null_threshold: float | None = NULL_THRESHOLD, mu_dtype=None,
                  precond_dtype='float32',
                  precision=_HIGHEST, distribute=None,
                  memory_budget: float | str | None = 'auto',
                  stack_by_shape: bool = False
                  ) -> optax.GradientTransformation:
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
    null_threshold: ``τ``, the relative round-off level of the arithmetic:
      a quantity is round-off when it is below ``τ`` times the scale that
      produced it, in its own units. ``None`` (default) is
      ``ROUNDOFF_ULPS·ε`` = ``16ε`` of the computing dtype (1.9e-6 in
      float32, 3.6e-15 in float64); ``0`` switches every rule off (the
      reference's behaviour). Three rules, so that round-off gets exactly
      zero update (the Adam ratio would turn round-off divided by
      round-off into a ±1 step):

      * *Rotated amplitudes* (per coordinate, every step). Each entry of
        ``Q_lᵀ G Q_r`` carries round-off ``~ε‖G‖_F`` (the rotation is
        orthogonal), and a basis vector computed with relative round-off
        ``τ`` takes in ``θᵢₖ = τλ_max/|λᵢ − λₖ|`` of its neighbour ``k``
        (first-order eigenvector perturbation). Coordinate ``(i, j)`` is
        round-off when ``sqrt(V̂ᵢⱼ) <= τ·sqrt(Σ V̂) + sqrt(Σₖ θˡᵢₖ² V̂ₖⱼ) +
        sqrt(Σₖ θʳⱼₖ² V̂ᵢₖ)`` (``Σ V̂`` is the second moment of ``‖G‖_F²``;
        ``k`` over the 4 nearest non-null columns and, as one cluster
        whose basis is arbitrary, the null columns; pairs with
        ``θ > 0.1`` are not resolved at all, a degenerate cluster whose
        coordinates carry signal, and count no leak): see
        :func:`roundoff_coordinates`. This is what removes the full-batch
        round-off: with the same gradient twice the rotated gradient is
        diagonal and its off-diagonal entries are round-off. Above that
        bound the update is weighted, from 0 to 1 over
        ``(ρ − 1)·τ·sqrt(Σ V̂)`` (``ρ = ROUNDOFF_RAMP = 512``:
        full weight from about ``1e-3‖G‖_F`` in float32), not switched on:
        see :func:`roundoff_weight`.
      * *Null columns when the basis is first computed* (step 1, from one
        gradient): row ``i`` of the basis is null when the rotated
        gradient's row is round-off in amplitude,
        ``‖(Q_lᵀ G Q_r)[i, :]‖ <= τ‖G‖_F`` (columns alike): energies are
        compared with ``τ²``. ``eigh`` fills a null space (any non-square
        leaf at step 1) with an arbitrary basis that changes with the
        rounding, so the coordinates of a null cluster share one second
        moment, their mean (``kron_roundoff.shared_moment``): Adam then
        steps along the momentum's projection onto the null space, the
        same for any basis of it. The step is
        continuous in the gradient (a 1e-6 relative change moves SOAP by
        ≲ 1e-4 of the distance travelled after 4 steps on 1×7 to 32×80
        leaves, instead of 0.5–0.8 with one moment per coordinate), and
        the null space moves as soon as a gradient reaches it (before,
        its coordinates stayed frozen until the next refresh: on a 4×16
        leaf 61–83% of each gradient's energy got no step over steps
        2–10). The next refresh (every ``k`` steps) re-derives the
        cluster with ``eigh``.
      * *Null columns at a refresh*: the energies there are read off the
        Gram factor ``L`` itself, whose round-off is ``~ε‖L‖ = ε·λ_max``,
        *linear* in ε (forming ``G Gᵀ`` squares the amplitudes, not the
        round-off): a column is null when ``λᵢ <= τ·λ_max`` *and* the
        rotated second moment carried over shows no amplitude either (row
        energy ``<= τ²·Σ V``). A direction whose energy is below the Gram
        round-off but whose amplitude is not (``sqrt(ε)·σ_max > σ > ε·σ_max``)
        still moves, as in the reference.

      ``τ`` in these units never freezes a real direction of a full-rank
      leaf: in float64 ``ol.soap`` follows the reference on 32×32 Gaussian
      gradients with ``λ_min/λ_max`` down to 3.5e-10 (``τ = 1e-5`` compared
      with energies, the former default, froze amplitudes below 3e-3 of the
      largest: 0.18 of the distance travelled). With bfloat16 statistics
      the round-off is ~1e-2: raise ``τ``.
    mu_dtype: dtype of ``M``; ``None`` uses ``precond_dtype``.
    precond_dtype: dtype of ``V``, ``L``, ``R``, ``Q`` (float32 default).
    precision: matmul precision of the rotations and statistics.
    distribute: ``None`` (default: one device, leaf by leaf, the program
      as without this argument) or a :class:`optax_lite.PolarSharding` /
      ``Mesh`` / ``(mesh, axes)``: owner-computes. Every preconditioned
      matrix (each slice of a stacked ``[B, m, n]`` leaf separately) is
      assigned to one device by its cost (rotations ``≈ m²n + mn²`` per
      step, QR refreshes ``≈ (m³ + n³)/k``); that device runs the whole
      :func:`soap_leaf_update` on it (statistics, ``eigh`` at step 1,
      rotations, the QR refresh). Over several devices the matrix's whole
      state (``mu``, ``nu``, ``stats_*``, ``q_*``, ``lam_*``) *lives* on
      its owner: ``init`` puts it in ``SoapState.owned``, an
      :class:`optax_lite.linalg.grouped.OwnerStacks` split along its first
      axis over the mesh axes (``ol.sharded_init`` / ``state_shardings``
      place it so), and leaves one-element placeholders in the per-leaf
      fields. Each step only the gradient travels to the owner and the
      update back, one all-to-all per shape group each way, none inside an
      ``eigh`` / QR (:mod:`optax_lite.linalg.grouped`): about ``2·mn/D``
      floats per device per ``m × n`` matrix (0.94× the parameter bytes
      per step on the 8-device FSDP test tree, against 14.3× for plain
      GSPMD). The owned state is in matrix form and in owner order, so it
      belongs to this mesh and this parameter tree (a state made with
      ``distribute=None``, ``owned=None``, still steps here, its state then
      moving to the owners each step). A one-device mesh only stacks
      same-shape matrices, with the single-device state. Leaves without a
      preconditioned side (Adam) stay where they are. Bad input raises
      naming ``distribute``; with several devices ``max_precond_dim`` must
      be static in ``update`` too (it decides the owners).

    memory_budget: on one device, the working set of the leaves stepped
      together, as a fraction of the updates' bytes (``"auto"``: 0.1):
      the matrix leaves run in packs whose estimated working sets (every
      array twice, four copies of each factor for the ``eigh`` / QR) fit
      it, one pack after another (each waits for the previous one's
      outputs). Same values; ``None``: every leaf at once, as XLA
      schedules it. One leaf's working set (an ``eigh`` of its larger
      factor and the refresh conditional's copies of the kept bases)
      stays: it is the floor of SOAP's temporaries
      (``docs/benchmarks.md``, memory). With ``distribute`` it is ignored
      (each device computes its own share).
    stack_by_shape: on one device, stack the matrices of each distinct
      shape (and state layout) into one kernel call (the engine's
      ``"stacked"`` placement, in calls that fit ``memory_budget``): one
      compiled kernel per shape instead of one per leaf, so the compile
      time does not grow with the depth. Off by default: a batched
      ``eigh`` / QR differs from per-leaf calls in round-off, which the
      rotated Adam step amplifies. In a process with several CPU devices
      (plain GSPMD) a kernel with an ``eigh`` / QR runs one matrix at a
      time (XLA:CPU's shared pool, ``docs/multi_device.md``). Ignored
      with ``distribute`` over several devices.

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
  precondition_frequency, max_precond_dim = check_soap_args(
      b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim)
  _checks.check_flag('skip_first_update', skip_first_update)
  if null_threshold is not None:
    _checks.check_positive('null_threshold', null_threshold, allow_zero=True)
  spec, memory_budget, precond_dtype, mu_dtype = placement_and_dtypes(
      distribute, memory_budget, precond_dtype, mu_dtype)

  def init_leaf(x, d):
    view, is_matrix = _leaf_view(x, d)
    b, m, n = view.matrix_shape
    on_l, on_r = _sides(view, is_matrix, max_precond_dim)
    return (jnp.zeros(x.shape, mu_dtype),
            jnp.zeros(x.shape, precond_dtype)) + tuple(soap_basis_init(
                b, m, n, left=on_l, right=on_r, dtype=precond_dtype))

  def kernel_at(count):
    def kernel(g, mu, nu, *factors):
      """One step on ``(B, m, n)`` matrices: ``(u, *new SoapLeaf fields)``."""
      new, direc = soap_leaf_update(
          SoapLeaf(mu, nu, *factors), g, count, b1=b1, b2=b2,
          shampoo_beta=shampoo_beta, eps=eps,
          precondition_frequency=precondition_frequency,
          skip_first_update=skip_first_update, null_threshold=null_threshold,
          precision=precision)
      return (soap_direction(direc, precision=precision),) + tuple(new)
    return kernel

  # Tall leaves are not transposed to share a group with wide ones:
  # Q_lᵀ(G Q_r) instead of (Q_lᵀ G) Q_r changes the round-off, which the
  # sign-like first Adam step amplifies on rank-deficient leaves (2.8e-4
  # measured on a 24 × 8 leaf, 2.7× the float32 error of the step itself);
  # untransposed, the owners' results equal the single-device ones to the
  # bit on unstacked leaves.
  method = engine.MatrixMethod(
      names=SoapState._fields[1:9], active=tuple(range(8)),
      leaf_shaped=(0, 1), transpose_tall=False,
      cost=_soap_cost(precondition_frequency),
      resident_cost=_resident_cost(precondition_frequency, max_precond_dim,
                                   4),
      item_bytes=lambda view, arrays: _kron_bytes(*arrays), wait_state=True)
  return _kron_transform(
      _KronSpec(SoapState, method, init_leaf, kernel_at, max_precond_dim),
      dims, spec, memory_budget, check_stack_by_shape(stack_by_shape))
