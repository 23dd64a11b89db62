"""``normuon`` and ``normuon_lite``: Muon with a per-neuron second moment."""

from __future__ import annotations

import optax

from optax_lite import _checks
from optax_lite.linalg import polar as polar_lib
from optax_lite.optimizers import _common
from optax_lite.optimizers import lite as lite_lib
from optax_lite.transforms.lite import lite_flat_boost
from optax_lite.transforms.momentum import momentum as momentum_tx
from optax_lite.transforms.neuron_normalize import (neuron_normalize,
                                                    normuon_geometry)
from optax_lite.transforms.orthogonalize import orthogonalize
from optax_lite.transforms.scaling import SCALING_MODES, scale_by_shape


def normuon(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.95,
            nesterov: bool = True, beta2: float = 0.95, eps: float = 1e-8,
            method: str = 'polar_express', steps: int | None = None,
            scaling: str = 'rms', rms: float = 0.2,
            weight_decay: float = 0.1, weight_decay_mask=None,
            cautious_weight_decay: bool = False, mu_dtype=None, dims=None,
            labels=None, precision=None, distribute=None, ns_dtype=None,
            memory_budget: float | str | None = 'auto',
            adam_learning_rate: optax.ScalarOrSchedule | None = None,
            adam_b1: float = 0.9, adam_b2: float = 0.95,
            adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
            adam_nesterov: bool = False) -> optax.GradientTransformation:
  r"""NorMuon: Muon's polar factor normalised per output neuron.

  For each matrix leaf ``W`` (``fan_in × fan_out`` after ``dims``) with
  gradient ``G``:

  .. math::
     M_k = μM_{k-1} + G_k,\quad O_k = \mathrm{polar}(μM_k + G_k),\\
     v_k = β_2 v_{k-1} + (1-β_2)\,\mathrm{mean}_{\text{fan-in}}(O_k⊙O_k),
     \quad Ô_k = \frac{O_k}{\sqrt{v_k}+ε}\cdot
     \frac{\|O_k\|_F}{\max(\|O_k/(\sqrt{v_k}+ε)\|_F, ε)},\\
     W_{k+1} = W_k - η_k\,(c\,Ô_k + λW_k),

  one ``v`` per output neuron (a Flax column; a row of PyTorch's
  ``(out, in)`` weight), ``c`` the shape factor of ``scaling``. This is dion's
  ``normuon.py`` (``NorMuon``: ``muon_update_pre_orthogonalize``,
  ``_normuon_normalization_core``, ``muon_update_post_orthogonalize``; the
  decay uses the base learning rate, the shape factor only the direction).
  Non-matrix leaves use AdamW, as in :func:`optax_lite.muon`.

  Where ``fan_out ≤ fan_in`` an exact polar factor has orthonormal columns,
  so every neuron's ``mean(O²)`` is ``1/fan_in`` and the normalisation only
  corrects the Newton–Schulz iteration's inexactness; it reshapes the step
  fully where ``fan_out > fan_in`` (e.g. MLP up-projections).

  Defaults: dion's ``muon_beta2=0.95`` and ``ε = 1e-8``; the momentum,
  scaling and decay are :func:`optax_lite.muon`'s (Nesterov, ``0.2·√max(m,
  n)`` = dion's ``adjust_lr="rms_norm"``, ``λ = 0.1``), so that ``muon`` and
  ``normuon`` differ only by the normalisation. dion's own defaults are
  ``nesterov=False, scaling="spectral"`` (``√(fan_out/fan_in)``) and
  ``weight_decay=0.01``.

  Args:
    learning_rate: float or optax schedule.
    momentum, nesterov: heavy-ball ``μ`` and the Nesterov look-ahead.
    beta2: ``β₂`` of the per-neuron EMA, in ``[0, 1)``.
    eps: ``ε`` (> 0).
    method, steps, precision, ns_dtype, distribute, memory_budget: the
      polar factor, as for :func:`optax_lite.muon` (``distribute`` spreads
      the polar factors; the normalisation is O(mn) and stays where the
      leaf is).
    scaling: ``"rms"``, ``"spectral"``, ``"width"`` or ``"none"``.
    rms: target RMS for ``scaling="rms"``.
    weight_decay, weight_decay_mask, cautious_weight_decay, mu_dtype, dims,
      labels, adam_*: as for :func:`optax_lite.muon`.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.

    microsoft/dion, ``dion/normuon.py``.
  """
  polar_lib.check_method(method, steps)
  _checks.check_decay('momentum', momentum)
  _checks.check_choice('scaling', scaling, SCALING_MODES)
  return _common.named_optimizer(
      locals(),
      momentum_tx(momentum, nesterov=nesterov, mu_dtype=mu_dtype),
      orthogonalize(method, steps, dims, precision=precision,
                    distribute=distribute, ns_dtype=ns_dtype,
                    memory_budget=memory_budget),
      neuron_normalize(beta2, eps, 'neuron', dims),
      scale_by_shape(scaling, rms, dims))


def normuon_lite(learning_rate: optax.ScalarOrSchedule, *,
                 variant: str = 'lite', chi: optax.ScalarOrSchedule = 2.0,
                 beta1: float = -0.25, beta2: optax.ScalarOrSchedule = 1.0,
                 sharp_ratio: float = 0.1,
                 emb_chi: optax.ScalarOrSchedule = 4.0,
                 emb_sharp_ratio: float = 0.1, emb_smooth_ratio: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 neuron_beta2: float = 0.95, eps: float = 1e-8,
                 method: str = 'polar_express', steps: int | None = None,
                 scaling: str = 'rms', rms: float = 0.2,
                 weight_decay: float = 0.1, flat_weight_decay: bool = True,
                 total_steps: int | None = None,
                 warmup_steps: int | None = None, schedule: str | None = None,
                 reference_schedules: bool = True,
                 threshold_rate: float = 1.05,
                 threshold_cap: float | None = 1.0,
                 threshold_deadband: float = 0.0,
                 sharp_dim_rule: str = 'reference',
                 filter_route: str = 'small_side',
                 filter_every: int | None = None, mu_dtype=None,
                 dims=None, labels=None, precision=None, ns_dtype=None,
                 distribute=None,
                 memory_budget: float | str | None = 'auto',
                 adam_learning_rate: optax.ScalarOrSchedule | None = None,
                 adam_b1: float = 0.9, adam_b2: float = 0.95,
                 adam_eps: float = 1e-8,
                 adam_weight_decay: float | None = None,
                 cautious_weight_decay: bool = False
                 ) -> optax.GradientTransformation:
  r"""NorMuon-LITE (beyond the papers): LITE in NorMuon's coordinates.

  Muon-LITE (:func:`optax_lite.muon_lite`, eq. 5) with both polar factors
  multiplied on the fan-out side by NorMuon's per-neuron factor ``S``
  (computed from ``polar(M̃)``, :func:`optax_lite.normuon`):

  .. math::
     U = \big(\mathrm{polar}(M̃)(P + χ(I−P))
       + \mathrm{polar}(G)(β_1P + χβ_2(I−P))\big)\,S

  in the Flax orientation where ``P`` acts on the fan-in side; ``S`` is
  diagonal on the fan-out side, so it commutes with ``P``. Then the shape
  factor, decoupled decay (plus the reference's flat decay) and the
  learning rate, as Muon-LITE; emb/norm leaves get AdamW-LITE, the head
  AdamW. With ``chi=1, beta1=0, beta2=0, emb_chi=1`` this is exactly
  :func:`optax_lite.normuon` (with the same ``nesterov``).

  Args:
    neuron_beta2: NorMuon's ``β₂`` (``beta2`` is LITE's flat damping).
    eps: NorMuon's ``ε``.
    nesterov: Nesterov momentum term (as :func:`optax_lite.normuon`).
    The others: as for :func:`optax_lite.muon_lite`.
  """
  _checks.check_structural(steps=steps, total_steps=total_steps,
                           warmup_steps=warmup_steps,
                           filter_every=filter_every)
  polar_lib.check_method(method, steps)
  _checks.check_decay('momentum', momentum)
  _checks.check_decay('neuron_beta2', neuron_beta2)
  _checks.check_positive('eps', eps)

  geometry = normuon_geometry(beta2=neuron_beta2, eps=eps,
                              **lite_lib.muon_geometry_settings(locals()))

  def matrix_lite(chi_t, beta1_t, beta2_t, flat_decay):
    return lite_flat_boost(
        geometry, chi=chi_t, beta1=beta1_t, beta2=beta2_t, momentum=momentum,
        nesterov=nesterov, mu_dtype=mu_dtype, dims=dims, scaling=scaling,
        rms=rms, flat_weight_decay=flat_decay, distribute=distribute,
        memory_budget=memory_budget)

  return lite_lib.assemble(matrix_lite, learning_rate,
                           lite_lib.lite_settings(locals(),
                                                  h_betas=(-0.25, 2.0)))
