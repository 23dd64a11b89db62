"""``rmnp``: momentum -> row normalisation -> shape scale -> decay -> lr."""

from __future__ import annotations

import optax

from optax_lite import _checks
from optax_lite.linalg import distributed
from optax_lite.linalg import grouped
from optax_lite.optimizers import _common
from optax_lite.transforms.momentum import momentum as momentum_tx
from optax_lite.transforms.row_normalize import AXES, row_normalize
from optax_lite.transforms.scaling import SCALING_MODES, scale_by_shape

VARIANTS = ('code', 'paper')


def rmnp(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.95,
         variant: str = 'code', nesterov: bool | None = None,
         ema: bool | None = None, axis: str = 'input', eps: float = 1e-12,
         scaling: str = 'width', rms: float = 0.2, weight_decay: float = 0.1,
         weight_decay_mask=None, cautious_weight_decay: bool = False,
         mu_dtype=None, dims=None, labels=None,
         distribute=None, memory_budget: float | str | None = 'auto',
         adam_learning_rate: optax.ScalarOrSchedule | None = None,
         adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
         adam_weight_decay: float | None = None, adam_nesterov: bool = False
         ) -> optax.GradientTransformation:
  r"""RMNP: row-normalised momentum for hidden matrices, AdamW elsewhere.

  For each matrix leaf ``W`` (``fan_in × fan_out`` after the ``dims``
  reshape) with gradient ``G``, the default (``variant="code"``, the authors'
  public code, Dominator-Index/RMNP, used for every experiment in the paper):

  .. math::
     B_k = β B_{k-1} + G_k,\quad U_k = G_k + β B_k,\quad
     D_k = \mathrm{RN}(U_k),\quad
     W_{k+1} = W_k - η_k\,(s\,D_k + λ W_k),

  with ``RN`` the unit-ℓ2 normalisation of each output unit's fan-in vector
  (:func:`optax_lite.transforms.row_normalize`, ``axis="input"``; a column
  of a Flax ``[in, out]`` kernel; no transpose to the smaller side, as the
  code) and ``s = sqrt(max(1, fan_out / fan_in))``.

  ``variant="paper"`` is Algorithm 2 of the paper, which its theory covers:
  ``V_k = βV_{k-1} + (1−β)G_k``, ``D_k = RN(V_k)`` (EMA, no Nesterov). Since
  RN is invariant to positive scaling, EMA vs. heavy-ball momentum gives the
  same direction; only Nesterov changes it. ``nesterov`` / ``ema`` override
  the variant's choice.

  Embeddings, the output head, norms, biases and scalars (see
  :func:`optax_lite.label_params`; the paper's LLaMA code) use AdamW with
  ``β = (0.9, 0.95)`` and weight decay 0.1 (the paper's protocol) and their
  own learning rate ``adam_learning_rate``.

  Defaults: ``momentum=0.95`` (paper and code), ``weight_decay=0.1`` on the
  matrices (paper §4.1 / App. D and the LLaMA code; the GPT-2 code uses 0),
  ``scaling="width"`` (code). The paper's tuned matrix learning rates are
  about 2e-3 to 5e-3 for GPT-2/LLaMA (smaller than Muon's); the code's
  default is 0.02.

  Args:
    learning_rate: float or optax schedule for the matrix leaves.
    momentum: ``β``, in ``[0, 1)``.
    variant: ``"code"`` (Nesterov heavy-ball, default) or ``"paper"``
      (Algorithm 2: EMA, no Nesterov).
    nesterov, ema: override the variant's momentum form (``None``: keep).
    axis: ``"input"`` (default, the paper's rows) or ``"output"``; see
      :func:`optax_lite.transforms.row_normalize`.
    eps: norm clamp of the row normalisation.
    scaling: ``"width"`` (``sqrt(max(1, fan_out/fan_in))``, default), ``"rms"``
      (``rms·sqrt(max(m, n))``) or ``"none"``.
    rms: target RMS for ``scaling="rms"``.
    weight_decay: decoupled weight decay ``λ`` of the matrix leaves
      (multiplied by the learning rate, not by the shape factor).
    weight_decay_mask: optional mask for it.
    cautious_weight_decay: as for :func:`optax_lite.muon`.
    mu_dtype: momentum dtype, also for AdamW's first moment.
    dims: matrix view of leaves, see :func:`optax_lite.orthogonalize`.
    labels: ``None`` (:func:`optax_lite.label_params`), a callable
      ``params -> label tree`` or a label tree.
    distribute: accepted for a uniform interface (a
      :class:`optax_lite.PolarSharding`, ``Mesh`` or ``(mesh, axes)``,
      validated) and deliberately unused: RMNP's per-matrix work is
      ``O(m·n)`` (one norm per row), which XLA's SPMD partitioner already
      splits with the parameter's sharding at the cost of one small
      all-reduce of the row norms (``fan_out`` numbers per matrix); moving
      whole matrices to owner devices would cost more bytes than it saves.
    memory_budget: accepted and checked for a uniform interface (row
      normalisation is element-wise; nothing to budget).
    adam_learning_rate: AdamW's learning rate; ``None`` uses
      ``learning_rate``.
    adam_weight_decay: AdamW's weight decay; ``None`` (default) uses
      ``weight_decay`` (0.1, the paper's AdamW decay, by default).
    adam_b1, adam_b2, adam_eps, adam_nesterov: AdamW's other settings for
      the non-matrix leaves.

  References:
    Deng et al., `Row-Momentum Normalized Preconditioning
    <https://arxiv.org/abs/2603.20527>`_, 2026.
  """
  _checks.check_decay('momentum', momentum)
  _checks.check_choice('scaling', scaling, SCALING_MODES)
  _checks.check_choice('variant', variant, VARIANTS)
  _checks.check_choice('axis', axis, AXES)
  _checks.check_positive('eps', eps)
  distributed.check_polar_sharding(distribute, 'distribute')
  grouped.check_memory_budget(memory_budget)
  if nesterov is None:
    nesterov = variant == 'code'
  if ema is None:
    ema = variant == 'paper'
  return _common.named_optimizer(
      locals(),
      momentum_tx(momentum, nesterov=nesterov, ema=ema, mu_dtype=mu_dtype),
      row_normalize(axis, eps, dims),
      scale_by_shape(scaling, rms, dims))
