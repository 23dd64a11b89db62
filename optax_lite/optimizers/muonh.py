"""``muonh``: Muon's direction, weights kept on each matrix's norm sphere."""

from __future__ import annotations

import optax

from optax_lite import _checks
from optax_lite.linalg import polar as polar_lib
from optax_lite.optimizers import _common
from optax_lite.transforms.hyperball import hyperball_step
from optax_lite.transforms.momentum import momentum as momentum_tx
from optax_lite.transforms.neuron_normalize import (NORMALIZATION_AXES,
                                                    neuron_normalize)
from optax_lite.transforms.orthogonalize import orthogonalize
from optax_lite.transforms.scaling import SCALING_MODES


def muonh(learning_rate: optax.ScalarOrSchedule, *,
          momentum: float = 0.95, nesterov: bool = False,
          normalization: str | None = None, beta2: float = 0.95,
          eps: float = 1e-10, method: str = 'polar_express',
          steps: int | None = None, scaling: str = 'none', rms: float = 0.2,
          weight_decay: float = 0.1, cautious_weight_decay: bool = False,
          mu_dtype=None, dims=None, labels=None, precision=None,
          distribute=None, ns_dtype=None,
          memory_budget: float | str | None = 'auto',
          adam_learning_rate: optax.ScalarOrSchedule | None = None,
          adam_b1: float = 0.9, adam_b2: float = 0.95,
          adam_eps: float = 1e-8, adam_nesterov: bool = False
          ) -> optax.GradientTransformation:
  r"""MuonH: Muon's direction as a relative step on a fixed-norm sphere.

  For each matrix ``W`` (``fan_in × fan_out`` after ``dims``; each slice of
  a batched leaf separately) with ``r = ‖W_0‖_F`` fixed at ``init``:

  .. math::
     M_k = μM_{k-1} + G_k,\quad U_k = \mathrm{polar}(M_k)
     \ (\text{or } μM_k + G_k \text{ with Nesterov}),\\
     W' = W_k - \frac{η_k c\,r}{\max(\|U_k\|_F, ε)}\,U_k,\qquad
     W_{k+1} = r\,\frac{W'}{\max(\|W'\|_F, ε)},

  optionally with NorMuon's normalisation of ``U_k`` first
  (``normalization``), ``c`` the shape factor of ``scaling``. No weight
  decay on the matrices (their norm is held fixed); non-matrix leaves use
  AdamW. This is dion's ``muonh.py`` (``MuonH``, branch
  ``jcl/muonh-on-main``) with its defaults: ``lr = 0.01``, ``μ = 0.95``
  without Nesterov, no normalisation, ``adjust_lr=None``,
  ``hyperball_eps = 1e-10``.

  Every matrix must be non-zero at ``init`` (a ``ValueError`` otherwise,
  as dion; see :func:`optax_lite.transforms.hyperball.hyperball_step`).
  Because the learning rate enters inside the projection, the update is
  not proportional to it (``inject_hyperparams`` still works).

  Args:
    learning_rate: ``η``, the relative move size per step (float or
      schedule); also AdamW's unless ``adam_learning_rate`` is given.
    momentum, nesterov: heavy-ball ``μ`` and the Nesterov look-ahead.
    normalization: ``None``, ``"neuron"`` or ``"short_axis"``
      (:func:`optax_lite.neuron_normalize`, with ``beta2`` and ``eps``).
    beta2: ``β₂`` of that normalisation.
    eps: ``ε`` of the norm divisions (dion's ``hyperball_eps``).
    method, steps, precision, ns_dtype, distribute, memory_budget,
      mu_dtype, dims, labels: as for :func:`optax_lite.muon`.
    scaling: ``c``: ``"none"`` (dion's default), ``"spectral"``, ``"rms"``
      or ``"width"``.
    rms: target RMS for ``scaling="rms"``.
    weight_decay: AdamW's decoupled decay on the non-matrix leaves (0.1 as
      for every named optimizer; dion's default is 0.01).
    cautious_weight_decay: that decay only where Adam's direction and the
      weight agree in sign (:func:`optax_lite.add_cautious_decayed_weights`).
    adam_*: AdamW settings for the non-matrix leaves.

  References:
    `Fantastic Pretraining Optimizers and Where to Find Them 2.1: Hyperball
    Optimization <https://tinyurl.com/muonh>`_ (blog post cited by dion).

    microsoft/dion, ``dion/muonh.py``.
  """
  polar_lib.check_method(method, steps)
  _checks.check_decay('momentum', momentum)
  _checks.check_choice('scaling', scaling, SCALING_MODES)
  if normalization is not None:
    _checks.check_choice('normalization', normalization, NORMALIZATION_AXES)
  _checks.check_decay('beta2', beta2)
  _checks.check_positive('weight_decay', weight_decay, allow_zero=True)
  matrix_txs = [
      momentum_tx(momentum, nesterov=nesterov, mu_dtype=mu_dtype),
      orthogonalize(method, steps, dims, precision=precision,
                    distribute=distribute, ns_dtype=ns_dtype,
                    memory_budget=memory_budget)]
  if normalization is not None:
    matrix_txs.append(neuron_normalize(beta2, eps, normalization, dims))
  matrix_txs.append(hyperball_step(learning_rate, scaling=scaling, rms=rms,
                                   eps=eps, dims=dims))
  adam = _common.adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate,
      b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay,
      mu_dtype=mu_dtype, nesterov=adam_nesterov,
      cautious=cautious_weight_decay)
  return _common.with_adamw(optax.chain(*matrix_txs), labels, adam)
