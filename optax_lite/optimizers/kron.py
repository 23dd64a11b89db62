"""``soap`` and ``shampoo``: Kronecker preconditioners for hidden matrices."""

from __future__ import annotations

import functools

import jax
import optax

from optax_lite import _checks
from optax_lite.optimizers import _common
from optax_lite.transforms.kron_precondition import (scale_by_shampoo,
                                                     scale_by_soap,
                                                     soap_warmup_leaves)


def soap(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.95,
         b2: float = 0.99, shampoo_beta: float = 0.95, eps: float = 1e-8,
         precondition_frequency: int = 10, max_precond_dim: int = 4096,
         skip_first_update: bool = True, null_threshold: float | None = None,
         weight_decay: float = 0.1,
         weight_decay_mask=None, cautious_weight_decay: bool = False,
         mu_dtype=None, precond_dtype='float32', dims=None, labels=None,
         precision=jax.lax.Precision.HIGHEST,
         adam_learning_rate: optax.ScalarOrSchedule | None = None,
         adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
         adam_weight_decay: float | None = None, adam_nesterov: bool = False,
         distribute=None,
         memory_budget: float | str | None = 'auto',
         stack_by_shape: bool = False
         ) -> optax.GradientTransformation:
  r"""SOAP for hidden matrices, AdamW for embeddings, head, norms, biases.

  For each matrix leaf (``fan_in × fan_out`` after the ``dims`` reshape):

  .. math::
     W_{k+1} = W_k - η_k\,Q_l \frac{Q_l^\top \hat M_k Q_r}{\sqrt{\hat V_k}
     + ε} Q_r^\top - η_k λ W_k

  (LITE paper Algorithm 6; see :func:`optax_lite.kron_precondition` for the
  statistics, the eigh initialisation and the QR refresh). Defaults are the
  LITE paper's SOAP baseline (θ = 0.95, β_v = 0.99, β_shampoo = 0.95,
  k = 10) with the same weight decay as ``muon``.

  Args:
    learning_rate: float or optax schedule for the matrix leaves.
    b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
    skip_first_update, null_threshold: see
      :func:`optax_lite.transforms.kron_precondition.scale_by_soap` (step 1
      gives a zero update on the matrix leaves by default, as the reference;
      the weight decay skips that step too). That docstring lists what
      differs from the reference code, with the size of each difference.
    weight_decay: decoupled weight decay for the matrix leaves.
    weight_decay_mask: optional mask for it.
    cautious_weight_decay: as for :func:`optax_lite.muon`.
    mu_dtype: first-moment dtype (also AdamW's mu); ``None``: float32 for
      the matrix leaves, the parameter dtype for AdamW.
    precond_dtype: dtype of ``V``, ``L``, ``R``, ``Q``.
    dims: matrix view of leaves, see :func:`optax_lite.orthogonalize`.
    labels: ``None`` (:func:`optax_lite.label_params`), a callable or a tree.
    precision: matmul precision of rotations and statistics.
    adam_*: AdamW settings for the non-matrix leaves (``None``: the matrix
      learning rate / weight decay).
    distribute: spread the per-matrix work over devices, owner-computes
      (a :class:`optax_lite.PolarSharding`, a ``Mesh`` or ``(mesh,
      axes)``; see ``docs/multi_device.md``): each device runs whole SOAP
      steps (statistics, ``eigh`` / QR refreshes, rotations) of the
      matrices assigned to it by cost; see ``scale_by_soap``. Over several
      devices each matrix's state (moments, factors, bases, energies) lives
      on its owner (``SoapState.owned``, split along its first axis as
      ``ol.sharded_init`` places it); each step only the gradient travels
      there and the update back, one all-to-all per shape group each way.
      ``None``: one device, unchanged.
    memory_budget: on one device, the working set of the matrix leaves
      stepped together, as a fraction of their bytes (``None``: all at
      once, as XLA schedules them); see ``scale_by_soap``.
    stack_by_shape: on one device, one kernel call per distinct matrix
      shape instead of one per leaf (compile time flat in depth; off by
      default: batched ``eigh`` / QR round-off differs); see
      ``scale_by_soap``.

  ``optax.inject_hyperparams(soap)(learning_rate=…)`` works as is: every
  float (learning rate, betas, ε, decays, ``null_threshold``) and
  ``precondition_frequency`` may be traced; ``max_precond_dim`` decides the
  state's shapes, so a jitted ``init`` needs
  ``static_args=('max_precond_dim',)`` (a ``TypeError`` says so). Dtype
  arguments are static: their defaults are strings (``'float32'``), which
  ``inject_hyperparams`` leaves alone; a dtype class such as
  ``jnp.bfloat16`` is callable, so it would be taken for a schedule: pass
  it as a string or in ``static_args`` (an array is refused, naming it).
  Decay rates are rounded to the computing dtype before ``1 − β`` is
  formed, so the injected optimizer (float32 rates) equals the plain one,
  states included.

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, ICLR 2025.
  """
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  # The reference's first step is statistics only: no decay either.
  warmup_fn = (functools.partial(soap_warmup_leaves, dims=dims,
                                 max_precond_dim=max_precond_dim)
               if skip_first_update else None)
  return _common.named_optimizer(
      locals(),
      scale_by_soap(
          b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
          dims, skip_first_update=skip_first_update,
          null_threshold=null_threshold, mu_dtype=mu_dtype,
          precond_dtype=precond_dtype, precision=precision,
          distribute=distribute, memory_budget=memory_budget,
          stack_by_shape=stack_by_shape),
      warmup_fn=warmup_fn)


def shampoo(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9,
            b2: float = 0.999, shampoo_beta: float = 0.999, eps: float = 1e-8,
            precondition_frequency: int = 10, max_precond_dim: int = 4096,
            accumulation: str = 'ema', exponent: float | None = None,
            root_method: str = 'eigh', matrix_eps: float = 1e-6,
            graft: str = 'adam', null_threshold: float | None = None,
            weight_decay: float = 0.1,
            weight_decay_mask=None, cautious_weight_decay: bool = False,
            mu_dtype=None, precond_dtype='float32',
            dims=None, labels=None, precision=jax.lax.Precision.HIGHEST,
            adam_learning_rate: optax.ScalarOrSchedule | None = None,
            adam_b1: float = 0.9, adam_b2: float = 0.95,
            adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
            adam_nesterov: bool = False, distribute=None,
            memory_budget: float | str | None = 'auto',
            stack_by_shape: bool = False
            ) -> optax.GradientTransformation:
  r"""Shampoo (grafted to Adam) for hidden matrices, AdamW for the rest.

  For each matrix leaf:

  .. math::
     U_k = L̂_k^{-1/4} \hat M_k R̂_k^{-1/4}\cdot
     \frac{\|\mathrm{Adam}_k\|_F}{\|L̂_k^{-1/4} \hat M_k R̂_k^{-1/4}\|_F},
     \qquad W_{k+1} = W_k - η_k U_k - η_k λ W_k,

  with the inverse roots recomputed every ``precondition_frequency`` steps
  (see :func:`optax_lite.transforms.kron_precondition.scale_by_shampoo` for
  every option: sum / EMA factors, the −1/2 exponent, eigh / Newton roots,
  grafting on or off).

  Args:
    learning_rate: float or optax schedule for the matrix leaves.
    b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
    accumulation, exponent, root_method, matrix_eps, graft, null_threshold:
      see
      ``scale_by_shampoo``.
    weight_decay, weight_decay_mask, cautious_weight_decay, mu_dtype,
    precond_dtype, dims, labels,
    precision, adam_*: as in :func:`soap`.
    distribute: owner-computes over devices, as in :func:`soap`: each
      device runs whole Shampoo steps (statistics, inverse roots, the
      preconditioned and grafted update) of the matrices assigned to it,
      whose state (moments, factors, roots) lives there
      (``ShampooState.owned``); only the gradient and the update travel.
      ``None``: one device, unchanged.
    memory_budget: as in :func:`soap`.
    stack_by_shape: as in :func:`soap`.

  ``optax.inject_hyperparams(shampoo)`` as for :func:`soap`; in addition
  ``exponent`` must be static with ``root_method="newton"``.

  References:
    Gupta et al., `Shampoo <https://arxiv.org/abs/1802.09568>`_, 2018.

    Shi et al., `Distributed Shampoo <https://arxiv.org/abs/2309.06497>`_,
    2023.
  """
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  return _common.named_optimizer(
      locals(),
      scale_by_shampoo(
          b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
          dims, accumulation=accumulation, exponent=exponent,
          root_method=root_method, matrix_eps=matrix_eps, graft=graft,
          null_threshold=null_threshold, mu_dtype=mu_dtype,
          precond_dtype=precond_dtype,
          precision=precision, distribute=distribute,
          memory_budget=memory_budget, stack_by_shape=stack_by_shape))
