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
    every k steps (from step 1):  P_l = (L̂ + ε_l I)^{-e},
                                  P_r = (R̂ + ε_r I)^{-e}
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

Public pieces (per leaf, matrix form ``(B, m, n)``): SOAP is its basis
upkeep (:class:`SoapBasis`: :func:`soap_basis_init`,
:func:`soap_basis_update` for the statistics and the first ``eigh``,
:func:`soap_basis_refresh` for the QR refresh) and its rotated Adam
(:func:`soap_rotated_adam`, or :func:`soap_second_moment` alone for ``V``
and ``V̂``), tied by :func:`soap_step_index` (the statistics-only first
step); :func:`soap_leaf_update` composes them and SOAP-LITE
(:func:`optax_lite.transforms.lite_geometries.soap_geometry`) reuses them
with its own first moment.

State layout: every per-leaf field is a tree shaped like the params. The
moments ``mu``/``nu`` have the parameter's own shape (so they shard like it);
the factors and bases are ``(B, m, m)`` / ``(B, n, n)`` (``B`` = product of
the batch axes). Factors, bases and ``nu`` are float32 (``precond_dtype``),
``mu`` float32 unless ``mu_dtype`` says otherwise; the arithmetic is float32
(or wider) whatever the storage dtype. The per-leaf helpers
(:func:`soap_leaf_update`, :func:`shampoo_leaf_update`) work on the matrix
form ``(B, m, n)`` of every field. With ``distribute=`` over several
devices, the per-matrix fields of every preconditioned leaf live instead in
the state's ``owned`` field, on the device that computes that matrix (see
:func:`scale_by_soap`).

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

from typing import Any

import optax

from optax_lite import _checks
from optax_lite.transforms.kron_common import (  # noqa: F401 (the facade)
    ACCUMULATIONS, GRAFTS, check_soap_args, has_side, require_static, rotate,
    rotate_back, update_factors)
from optax_lite.transforms.kron_roundoff import (  # noqa: F401 (the facade)
    LEAK_BAND, LEAK_CAP, NULL_THRESHOLD, ROUNDOFF_RAMP, ROUNDOFF_ULPS,
    energetic, null_coordinates, roundoff_coordinates, roundoff_level,
    roundoff_weight, shared_moment)
from optax_lite.transforms.soap_basis import (  # noqa: F401 (the facade)
    SoapBasis, soap_basis_init, soap_basis_refresh, soap_basis_sides,
    soap_basis_update, soap_init_bases, soap_keep, soap_refresh_bases,
    soap_shared_moment, soap_step_index)
from optax_lite.transforms.soap import (  # noqa: F401 (the facade)
    SoapDirection, SoapLeaf, SoapState, scale_by_soap, soap_direction,
    soap_leaf_update, soap_rotated_adam, soap_second_moment, soap_warmup_leaves)
from optax_lite.transforms.shampoo import (  # noqa: F401 (the facade)
    ShampooLeaf, ShampooState, scale_by_shampoo, shampoo_inverse_root,
    shampoo_leaf_update)

MODES = ('soap', 'shampoo')


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
