"""``muon``: Nesterov momentum -> polar factor -> RMS scaling -> decay -> lr."""

from __future__ import annotations

import optax

from optax_lite import _checks
from optax_lite.linalg import polar as polar_lib
from optax_lite.optimizers import _common
from optax_lite.transforms.momentum import momentum as momentum_tx
from optax_lite.transforms.orthogonalize import orthogonalize
from optax_lite.transforms.scaling import SCALING_MODES, scale_by_shape


def muon(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.95,
         nesterov: bool = True, ema: bool = False,
         bias_correction: bool = False, method: str = 'polar_express',
         steps: int | None = None, scaling: str = 'rms', rms: float = 0.2,
         weight_decay: float = 0.1, weight_decay_mask=None,
         cautious_weight_decay: bool = False, mu_dtype=None,
         dims=None, labels=None, precision=None, distribute=None,
         ns_dtype=None, shard_polar=None,
         memory_budget: float | str | None = 'auto',
         adam_learning_rate: optax.ScalarOrSchedule | None = None,
         adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
         adam_weight_decay: float | None = None, adam_nesterov: bool = False
         ) -> optax.GradientTransformation:
  r"""Muon: orthogonalised momentum for hidden matrices, AdamW elsewhere.

  For each matrix leaf ``W`` (``fan_in × fan_out`` after the ``dims``
  reshape) with gradient ``G``:

  .. math::
     M_k = μ M_{k-1} + G_k,\quad U_k = \mathrm{polar}(μ M_k + G_k),\quad
     W_{k+1} = W_k - η_k\,(0.2\sqrt{\max(m,n)}\,U_k + λ W_k)

  (LITE paper Algorithm 5 / Moonlight). Embeddings, the output head, norms,
  biases and scalars (see :func:`optax_lite.label_params`) use AdamW.

  Args:
    learning_rate: float or optax schedule for the matrix leaves.
    momentum: ``μ``, in ``[0, 1)``.
    nesterov: Nesterov look-ahead (default) or plain heavy-ball momentum.
    ema: EMA momentum ``μM + (1−μ)G`` (Keller Jordan / optax form) instead of
      heavy-ball; identical direction after the polar factor up to the
      weight of the Nesterov term when ``bias_correction`` is on.
    bias_correction: optax.contrib.muon's bias-corrected Nesterov (needs
      ``ema=True``).
    method, steps: polar-factor method, see :func:`optax_lite.polar_factor`.
    scaling: ``"rms"`` (``rms·sqrt(max(m, n))``), ``"width"``
      (``sqrt(max(1, fan_out/fan_in))``) or ``"none"``.
    rms: target RMS for ``scaling="rms"``.
    weight_decay: decoupled weight decay ``λ`` for the matrix leaves
      (multiplied by the learning rate, not by the shape factor).
    weight_decay_mask: optional mask for it.
    cautious_weight_decay: apply the decoupled decay (matrix and AdamW
      leaves) only where the update direction and the weight agree in sign,
      ``λ·𝟙[u⊙W ≥ 0]⊙W`` with ``u`` the step before the learning rate (see
      :func:`optax_lite.add_cautious_decayed_weights`).
    mu_dtype: momentum dtype (e.g. ``jnp.bfloat16``), also for AdamW's mu.
    dims: matrix view of leaves, see :func:`optax_lite.orthogonalize`.
    labels: ``None`` (:func:`optax_lite.label_params`), a callable
      ``params -> label tree`` or a label tree.
    precision: matmul precision of the polar iteration (``None``: the
      policy of :mod:`optax_lite.linalg.matmul`, the accelerator default).
    distribute: spread the polar factors over devices, owner-computes (a
      :class:`optax_lite.PolarSharding`, a ``Mesh`` or ``(mesh, axes)``):
      each device orthogonalises whole matrices assigned by cost, one
      all-gather in and one out per shape group; see
      ``docs/multi_device.md``. ``None``: one device (same-shape matrices
      still share one batched kernel).
    ns_dtype: ``None`` or ``jnp.bfloat16``: run the Newton–Schulz iteration
      in that dtype with float32 accumulation (as Keller Jordan's Muon); see
      docs/precision.md for its accuracy band.
    shard_polar: the former name of ``distribute`` (an alias).
    memory_budget: working set of one batched polar-factor call, as a
      fraction of the matrix leaves' bytes: same-shape matrices are
      orthogonalised in chunks that fit it, one after another (``0``: one
      matrix at a time; ``None``: each shape in one call, fastest, with
      temporaries that grow with depth). See
      :func:`optax_lite.orthogonalize`.
    adam_*: AdamW settings for the non-matrix leaves;
      ``adam_learning_rate=None`` uses ``learning_rate`` and
      ``adam_weight_decay=None`` uses ``weight_decay``.

  References:
    Jordan et al., `Muon <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  polar_lib.check_method(method, steps)
  _checks.check_decay('momentum', momentum)
  _checks.check_choice('scaling', scaling, SCALING_MODES)
  return _common.named_optimizer(
      locals(),
      momentum_tx(momentum, nesterov=nesterov, ema=ema,
                  bias_correction=bias_correction, mu_dtype=mu_dtype),
      orthogonalize(method, steps, dims, precision=precision,
                    distribute=distribute, shard_polar=shard_polar,
                    ns_dtype=ns_dtype, memory_budget=memory_budget),
      scale_by_shape(scaling, rms, dims))
