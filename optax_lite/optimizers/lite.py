"""LITE named optimizers and the reference code's schedules for χ and β₂.

``muon_lite`` is Muon-LITE of Zhu et al. (2026) with the paper's tuned
defaults (Appendix C.2): hidden matrices get the spectral filter on the
Nesterov momentum with ``d_s ≈ 0.1·min(m, n)``, ``(β₁, β₂) = (−0.25, 1.0)``,
``χ = 2``; embedding and norm leaves get AdamW-LITE (``χ = 4``,
``d_s = 0.1·numel``, ``d_smooth = 0.1·numel``); the output head and other
leaves get plain AdamW (the paper excludes the head: all sharp).

Ablations (paper §6): ``variant="lite"`` (default), ``"lite_l"`` (only the
χ boost: ``β₁ = β₂ = 0``), ``"lite_h"`` (only the flat damping: ``χ = 1``,
``(β₁, β₂) = (−0.25, 2.0)`` for Muon, ``(0, 0.5)`` for SOAP).

What the reference code (``muonlite.py``) adds and the paper omits, each a
switch here: the flat damping β₂ ramps linearly from β₁ to β₂ over a
flat-warmup horizon; χ ramps in (matrix leaves) or decays to 1 with the
cosine schedule (emb/norm leaves); extra decoupled weight decay along the
flat directions; the threshold ratio starts at ``1/√min(m, n)`` and is capped
at 1; ``d_s = min(⌊r_s·min(m,n)⌋ + 1, min(m,n) − 1)``. The ramps need the
run length: pass ``total_steps`` (and ``warmup_steps``), or pass χ and β₂ as
your own optax schedules.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import optax

from optax_lite import _checks
from optax_lite.linalg import distributed
from optax_lite.linalg import grouped
from optax_lite.linalg import polar as polar_lib
from optax_lite.optimizers import _common
from optax_lite.optimizers import lite_schedule as lite_schedule_lib
from optax_lite.optimizers.lite_schedule import (beta2_ramp, chi_schedule,
                                                 flat_warmup_fraction)
from optax_lite.transforms.fisher_whiten import fisher_whiten
from optax_lite.transforms.kron_precondition import soap_warmup_leaves
from optax_lite.transforms.lite import (diagonal_geometry, lite_flat_boost,
                                        muon_geometry)
from optax_lite.transforms.lite_geometries import (row_norm_geometry,
                                                   soap_geometry)
from optax_lite.transforms.scaling import SCALING_MODES, scale_by_shape

VARIANTS = ('lite', 'lite_l', 'lite_h')


def _variant(variant, chi, beta1, beta2, h_beta):
  _checks.check_choice('variant', variant, VARIANTS)
  if variant == 'lite_l':
    return chi, 0.0, 0.0
  if variant == 'lite_h':
    return 1.0, h_beta[0], h_beta[1]
  return chi, beta1, beta2


def structural_int(name: str, value, default: int | None, *, low: int = 0
                   ) -> int | None:
  """An integer fixed when the optimizer is built; ``None`` gives ``default``.

  Such arguments default to ``None`` so that ``optax.inject_hyperparams``
  (which turns every numeric argument into an array) leaves them alone; an
  array or traced value raises a ``TypeError`` that names ``static_args``.
  """
  if value is None:
    return default
  _checks.check_int(name, value, low=low)
  return int(value)


def lite_schedules(chi, beta1, beta2, *, total_steps, warmup_steps, schedule,
                   mode, reference_schedules, min_lr_ratio=0.1):
  """χ and β₂ as schedules (reference ramps) or constants.

  Traced χ/β values (``optax.inject_hyperparams``) get the same ramps as
  numbers do; only a static ``χ ≤ 1`` or ``β₂ = β₁`` skips its ramp.
  """
  if total_steps is None or not reference_schedules:
    return chi, beta2
  _checks.check_int('total_steps', total_steps, low=1)
  tf = flat_warmup_fraction(schedule, total_steps, warmup_steps)
  static = _checks.is_static_number
  b2 = beta2
  if not callable(beta2) and not (static(beta2) and static(beta1) and
                                  float(beta2) == float(beta1)):
    b2 = beta2_ramp(beta1, beta2, total_steps=total_steps,
                    warmup_steps=warmup_steps, flat_warmup=tf)
  c = chi
  if (schedule == 'cosine' and not callable(chi) and
      not (static(chi) and float(chi) <= 1.0)):
    c = chi_schedule(chi, mode=mode, total_steps=total_steps,
                     warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                     flat_warmup=tf)
  return c, b2


class LiteRun(NamedTuple):
  """The run the reference's χ / β₂ ramps span (frozen settings).

  ``total_steps`` ``None``: no ramps (χ and β₂ constant);
  ``warmup_steps`` ``None``: 0; ``schedule``: the learning rate's kind
  (``"cosine"`` or ``"wsd"``, ``None``: read from an
  :func:`optax_lite.lite_schedule` learning rate, else cosine);
  ``reference_schedules``: the ramps' switch.
  """
  total_steps: int | None = None
  warmup_steps: int | None = None
  schedule: str | None = None
  reference_schedules: bool = True


class LiteMix(NamedTuple):
  """How a LITE optimizer mixes its directions (frozen settings).

  ``chi``, ``beta1``, ``beta2``: the matrix leaves' boost and damping;
  ``variant``: ``"lite"``, ``"lite_l"`` (χ only) or ``"lite_h"`` (damping
  only, with ``h_betas`` as ``(β₁, β₂)``); ``emb_chi``,
  ``emb_sharp_ratio``, ``emb_smooth_ratio``: AdamW-LITE on the embedding
  and norm leaves; ``threshold_rate``: both filters' controller.
  """
  variant: str
  chi: Any
  beta1: Any
  beta2: Any
  h_betas: tuple[float, float]
  emb_chi: Any
  emb_sharp_ratio: Any
  emb_smooth_ratio: Any
  threshold_rate: Any


class LiteDecay(NamedTuple):
  """Decoupled weight decay of a LITE optimizer (frozen settings):
  ``weight_decay`` on every leaf, the reference's extra decay along flat
  directions (``flat``), and whether the decoupled decay is cautious."""
  weight_decay: Any
  flat: bool
  cautious: bool


class LiteSettings(NamedTuple):
  """What every LITE optimizer shares beyond its matrix transform."""
  mix: LiteMix
  run: LiteRun
  decay: LiteDecay
  adam: _common.AdamRest
  mu_dtype: Any
  labels: Any


def lite_settings(args: Mapping[str, Any], *, h_betas: tuple[float, float],
                  emb_smooth_ratio: str = 'emb_smooth_ratio') -> LiteSettings:
  """The shared settings, read by name from a LITE builder's arguments.

  Every named LITE optimizer takes the same keywords for them (``chi``,
  ``beta1``, ``beta2``, ``variant``, ``emb_*``, ``threshold_rate``,
  ``weight_decay``, ``flat_weight_decay``, ``total_steps``,
  ``warmup_steps``, ``schedule``, ``reference_schedules``, ``mu_dtype``,
  ``labels``, ``adam_*``, ``cautious_weight_decay``), flat so that
  ``optax.inject_hyperparams`` can trace the numbers; this groups them
  once. ``emb_smooth_ratio``: the argument holding the emb/norm leaves'
  smooth ratio (SOAP-LITE and RMNP-LITE share their ``smooth_ratio``).
  """
  _common.check_emb_ratios(args, emb_smooth_ratio)
  mix = LiteMix(args['variant'], args['chi'], args['beta1'], args['beta2'],
                h_betas, args['emb_chi'], args['emb_sharp_ratio'],
                args[emb_smooth_ratio], args['threshold_rate'])
  run = LiteRun(args['total_steps'], args['warmup_steps'], args['schedule'],
                args['reference_schedules'])
  decay = LiteDecay(args['weight_decay'], args['flat_weight_decay'],
                    args['cautious_weight_decay'])
  return LiteSettings(mix, run, decay, _common.adam_rest(args),
                      args['mu_dtype'], args['labels'])


def assemble(matrix_lite, learning_rate, settings: LiteSettings, *,
             warmup_fn=None) -> optax.GradientTransformation:
  """The shared shape of every LITE optimizer.

  ``matrix_lite(chi, beta1, beta2, flat_decay)`` builds the matrix leaves'
  LITE transform (before decay and learning rate) from the resolved χ and
  β₂ (constants or reference schedules). Embedding and norm leaves get
  AdamW-LITE, the head and other leaves AdamW. A cautious decay
  (``cautious_weight_decay``) is cautious on every leaf
  (:func:`optax_lite.add_cautious_decayed_weights`); the reference's extra
  decay along flat directions (``flat_weight_decay``) is not.
  """
  mix, run, decay, rest = (settings.mix, settings.run, settings.decay,
                           settings.adam)
  chi, beta1, beta2 = _variant(mix.variant, mix.chi, mix.beta1, mix.beta2,
                               mix.h_betas)
  _checks.check_structural(total_steps=run.total_steps,
                           warmup_steps=run.warmup_steps)
  total_steps, warmup_steps, schedule, min_lr_ratio = (
      lite_schedule_lib.resolve_run(learning_rate, run.total_steps,
                                    run.warmup_steps, run.schedule))
  warmup_steps = structural_int('warmup_steps', warmup_steps, 0)
  if total_steps is not None:
    lite_schedule_lib.check_run_length(total_steps, warmup_steps)
  emb_chi = 1.0 if mix.variant == 'lite_h' else mix.emb_chi
  _checks.check_choice('schedule', schedule, lite_schedule_lib.KINDS)
  _checks.check_number('emb_chi', emb_chi, low=1.0, allow_schedule=True)
  _checks.check_positive('weight_decay', decay.weight_decay, allow_zero=True)
  ramps = functools.partial(
      lite_schedules, total_steps=total_steps, warmup_steps=warmup_steps,
      schedule=schedule, reference_schedules=run.reference_schedules,
      min_lr_ratio=min_lr_ratio)
  chi_m, beta2_m = ramps(chi, beta1, beta2, mode='ramp')
  chi_e, _ = ramps(emb_chi, 0.0, 0.0, mode='decay')
  adam_lr = learning_rate if rest.learning_rate is None else rest.learning_rate
  adam_wd = (decay.weight_decay if rest.weight_decay is None
             else rest.weight_decay)
  matrix_tx = optax.chain(
      matrix_lite(chi_m, beta1, beta2_m,
                  decay.weight_decay if decay.flat else 0.0),
      *_common.decay_and_learning_rate(learning_rate, decay.weight_decay,
                                       warmup_fn=warmup_fn,
                                       cautious=decay.cautious))
  adam = _common.adamw(adam_lr, b1=rest.b1, b2=rest.b2, eps=rest.eps,
                       weight_decay=adam_wd, mu_dtype=settings.mu_dtype,
                       cautious=decay.cautious)
  emb_tx = adamw_lite(adam_lr, chi=chi_e, sharp_ratio=mix.emb_sharp_ratio,
                      smooth_ratio=mix.emb_smooth_ratio, b1=rest.b1,
                      b2=rest.b2, eps=rest.eps, weight_decay=adam_wd,
                      flat_weight_decay=decay.flat,
                      threshold_rate=mix.threshold_rate,
                      mu_dtype=settings.mu_dtype,
                      cautious_weight_decay=decay.cautious)
  return _common.with_adamw(matrix_tx, settings.labels, adam,
                            {'embedding': emb_tx, 'norm': emb_tx})


MUON_GEOMETRY_ARGS = ('sharp_ratio', 'method', 'steps', 'threshold_rate',
                      'threshold_cap', 'sharp_dim_rule',
                      'threshold_deadband', 'precision', 'filter_route',
                      'ns_dtype', 'filter_every')


def muon_geometry_settings(args: Mapping[str, Any]) -> dict[str, Any]:
  """The :func:`optax_lite.muon_geometry` arguments of a LITE builder
  (Muon-, NorMuon- and FISMO-LITE take them under the same names;
  ``filter_every`` is a structural int there, ``None``: 1)."""
  return {**{k: args[k] for k in MUON_GEOMETRY_ARGS}, 'filter_every':
          structural_int('filter_every', args['filter_every'], 1, low=1)}


def muon_lite(learning_rate: optax.ScalarOrSchedule, *,
              variant: str = 'lite', chi: optax.ScalarOrSchedule = 2.0,
              beta1: float = -0.25, beta2: optax.ScalarOrSchedule = 1.0,
              sharp_ratio: float = 0.1,
              emb_chi: optax.ScalarOrSchedule = 4.0,
              emb_sharp_ratio: float = 0.1, emb_smooth_ratio: float = 0.1,
              momentum: float = 0.95, method: str = 'polar_express',
              steps: int | None = None, scaling: str = 'rms',
              rms: float = 0.2, weight_decay: float = 0.1,
              flat_weight_decay: bool = True, total_steps: int | None = None,
              warmup_steps: int | None = None, schedule: str | None = None,
              reference_schedules: bool = True,
              threshold_rate: float = 1.05,
              threshold_cap: float | None = 1.0,
              threshold_deadband: float = 0.0,
              sharp_dim_rule: str = 'reference',
              filter_route: str = 'small_side',
              filter_every: int | None = None, mu_dtype=None, dims=None,
              labels=None, precision=None, ns_dtype=None, distribute=None,
              memory_budget: float | str | None = 'auto',
              adam_learning_rate: optax.ScalarOrSchedule | None = None,
              adam_b1: float = 0.9, adam_b2: float = 0.95,
              adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
              cautious_weight_decay: bool = False
              ) -> optax.GradientTransformation:
  r"""Muon-LITE (Zhu et al. 2026, eq. 5) with AdamW-LITE on emb/norm leaves.

  Matrix leaves:

  .. math::
     U = \mathrm{polar}(M̃)(P + χ(I − P))
       + \mathrm{polar}(G)(β_1 P + χβ_2(I − P)),

  with the sharp projector ``P`` from the spectral filter on ``M̃`` (fan-in
  side of the ``(fan_in, fan_out)`` Flax kernel, which is the input side of
  the PyTorch weight), then ``0.2·√max(m, n)`` scaling, decoupled weight
  decay (plus ``λ(χ − 1)`` along flat directions), learning rate.
  With ``chi=1, beta1=0, beta2=0, emb_chi=1`` this is exactly ``muon``.

  Args:
    learning_rate: peak learning rate or schedule (as for ``muon``).
    variant: ``"lite"``, ``"lite_l"`` (only χ) or ``"lite_h"`` (only β₂).
    chi, beta1, beta2: LITE coefficients of the matrix leaves.
    sharp_ratio: ``r_s``: ``d_s ≈ r_s·min(m, n)``.
    emb_chi, emb_sharp_ratio, emb_smooth_ratio: AdamW-LITE on emb/norm.
    momentum, method, steps, scaling, rms, weight_decay, mu_dtype, dims,
      labels, precision, ns_dtype, adam_*, cautious_weight_decay: as for
      :func:`optax_lite.muon`
      (``ns_dtype``: the polar factors; the filter keeps the input dtype).
    flat_weight_decay: add the reference's extra decay along flat directions.
    total_steps, warmup_steps, schedule: run length, warmup (``None``: 0)
      and LR schedule kind (``"cosine"``, the default, or ``"wsd"``) for
      the reference χ/β₂ ramps; without ``total_steps`` χ and β₂ are
      constant. Simpler: pass ``learning_rate=ol.lite_schedule(peak,
      total_steps=T, warmup_steps=W)``, which is the reference's learning
      rate schedule and gives the ramps the same ``T`` and ``W`` (these
      arguments may then be left out; given, they must agree).
    reference_schedules: switch the ramps off.
    threshold_rate, threshold_cap, threshold_deadband, sharp_dim_rule: the
      filter's threshold controller (eq. 13 with the reference's cap).
    filter_route: ``"small_side"`` (default, the more accurate projector)
      or ``"reference"`` (the LITE code's ``T = ½(polar(M̃) + polar(M̃/τ −
      polar(M̃)))``, ``P_flat = I − TᵀT``, reproducing ``muonlite.py``); see
      :func:`optax_lite.muon_geometry` for the accuracy of each.
    filter_every: ``k`` (``None``: 1, the paper): the sharp projector is
      recomputed every ``k`` steps, it and the threshold ratio held in
      between (not in the paper; saves the filter's sign iteration on
      ``k − 1`` of ``k`` steps); see :func:`optax_lite.muon_geometry`.
    distribute: ``None`` or a :class:`optax_lite.PolarSharding` / ``Mesh``
      / ``(mesh, axes)``: owner-computes for the matrix leaves (each
      device runs whole matrices' LITE steps, chosen by cost; see
      :func:`optax_lite.lite_flat_boost` and ``docs/multi_device.md``).
    memory_budget: on one device, the working set of the matrix leaves
      stepped together, as a fraction of their bytes (``"auto"``: 0.1;
      ``None``: all at once); see :func:`optax_lite.lite_flat_boost`.

  ``optax.inject_hyperparams(muon_lite)(learning_rate=...)`` works: every
  float argument may be traced. The integers ``total_steps``,
  ``warmup_steps`` (``None``: 0), ``steps`` and ``filter_every`` (``None``:
  1) are structural: leave them
  ``None`` or pass them in ``static_args`` (otherwise one ``TypeError``
  names all of them). The same holds for every LITE optimizer.
  ``inject_hyperparams`` evaluates a schedule before the optimizer sees it,
  so an injected ``lite_schedule`` gives no run length: pass
  ``total_steps``/``warmup_steps`` in ``static_args`` there.
  """
  _checks.check_structural(steps=steps, total_steps=total_steps,
                           warmup_steps=warmup_steps,
                           filter_every=filter_every)
  polar_lib.check_method(method, steps)
  _checks.check_decay('momentum', momentum)

  geometry = muon_geometry(**muon_geometry_settings(locals()))

  def matrix_lite(chi_t, beta1_t, beta2_t, flat_decay):
    return lite_flat_boost(
        geometry, chi=chi_t, beta1=beta1_t, beta2=beta2_t, momentum=momentum,
        nesterov=True, mu_dtype=mu_dtype, dims=dims, scaling=scaling,
        rms=rms, flat_weight_decay=flat_decay, distribute=distribute,
        memory_budget=memory_budget)

  return assemble(matrix_lite, learning_rate,
                  lite_settings(locals(), h_betas=(-0.25, 2.0)))


def adamw_lite(learning_rate: optax.ScalarOrSchedule, *,
               chi: optax.ScalarOrSchedule = 4.0, sharp_ratio: float = 0.1,
               smooth_ratio: float = 0.1, b1: float = 0.9, b2: float = 0.95,
               eps: float = 1e-8, weight_decay: float = 0.1,
               flat_weight_decay: bool = True, threshold_rate: float = 1.05,
               mu_dtype=None, cautious_weight_decay: bool = False
               ) -> optax.GradientTransformation:
  """AdamW-LITE: Adam with the soft flat mask on ``v`` and the χ boost.

  SOAP-LITE with identity bases (LITE paper, Appendix B.1 for the
  embedding and norm blocks). With ``chi=1`` it is ``optax.adamw``.
  ``cautious_weight_decay``: the decoupled decay only where the direction
  and the weight agree in sign (the flat-direction decay stays plain).
  """
  _checks.check_positive('weight_decay', weight_decay, allow_zero=True)
  return _common.refuse_non_float(optax.chain(
      lite_flat_boost(
          diagonal_geometry(b1=b1, b2=b2, eps=eps, sharp_ratio=sharp_ratio,
                            smooth_ratio=smooth_ratio,
                            threshold_rate=threshold_rate),
          chi=chi, momentum=b1, nesterov=False, mu_dtype=mu_dtype,
          scaling='none', flat_weight_decay=(weight_decay if _checks.check_flag(
              'flat_weight_decay', flat_weight_decay) else 0.0)),
      *_common.decay_and_learning_rate(learning_rate, weight_decay,
                                       cautious=cautious_weight_decay)))


def soap_lite(learning_rate: optax.ScalarOrSchedule, *,
              variant: str = 'lite', chi: optax.ScalarOrSchedule = 2.0,
              beta1: float = 0.0, beta2: optax.ScalarOrSchedule = 0.25,
              sharp_ratio: float = 0.2, smooth_ratio: float = 0.1,
              emb_chi: optax.ScalarOrSchedule = 4.0,
              emb_sharp_ratio: float = 0.2, b1: float = 0.95,
              b2: float = 0.99, shampoo_beta: float = 0.95, eps: float = 1e-8,
              precondition_frequency: int | None = None,
              max_precond_dim: int | None = None,
              skip_first_update: bool = True,
              null_threshold: float | None = None,
              weight_decay: float = 0.1,
              flat_weight_decay: bool = True, total_steps: int | None = None,
              warmup_steps: int | None = None, schedule: str | None = None,
              reference_schedules: bool = True, threshold_rate: float = 1.05,
              mu_dtype=None, precond_dtype='float32', dims=None,
              labels=None, precision=None, distribute=None,
              memory_budget: float | str | None = 'auto',
              adam_learning_rate: optax.ScalarOrSchedule | None = None,
              adam_b1: float = 0.9, adam_b2: float = 0.95,
              adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
              cautious_weight_decay: bool = False,
              stack_by_shape: bool = False
              ) -> optax.GradientTransformation:
  r"""SOAP-LITE (Zhu et al. 2026, §5.2, Appendix B.2) with AdamW-LITE.

  Matrix leaves: SOAP (Algorithm 6) with the soft sharp mask ``P`` on its
  eigenvalues ``V`` (eq. 16–18) and, in the rotated basis,
  ``U = Q_l(V^{-1/2}⊙(β₁P + χβ₂(1−P))⊙G_rot + V^{-1/2}⊙(P + χ(1−P))⊙M_rot)
  Q_rᵀ``. Paper defaults (C.2): ``r_s = 0.2``, ``(β₁, β₂) = (0, 0.25)``,
  ``χ = 2`` (matrix) and 4 (emb/norm), ``d_smooth = 0.1·mn``; SOAP's own
  defaults as ``ol.soap``. The head and other leaves use AdamW.
  ``null_threshold``: see
  :func:`optax_lite.transforms.kron_precondition.scale_by_soap` (round-off
  coordinates get a zero update and count as ``V = 0`` in the mask).
  ``variant="lite_l"``: only χ; ``"lite_h"``: ``χ = 1``, ``(β₁, β₂) = (0,
  0.5)``. With ``chi=1, beta2=0, emb_chi=1`` this is exactly ``ol.soap``.

  The authors' repository has no SOAP-LITE code; this follows the paper's
  Appendix B.2, with the reference Muon-LITE's schedules and extra flat decay
  as options (see :func:`muon_lite`).

  ``precondition_frequency`` (default 10) and ``max_precond_dim`` (default
  4096) are structural: ``None`` gives the default, and under
  ``optax.inject_hyperparams`` a value must be passed with ``static_args``.

  ``distribute``: ``None`` or a :class:`optax_lite.PolarSharding` / ``Mesh``
  / ``(mesh, axes)``: owner-computes — each device runs whole matrices'
  SOAP-LITE steps (statistics, rotations, eigenbasis refreshes), chosen by
  cost; see :func:`optax_lite.lite_flat_boost`.
  ``cautious_weight_decay``: as for :func:`muon_lite`.
  ``stack_by_shape``: on one device, one kernel call per distinct matrix
  shape instead of one per leaf (off by default: batched ``eigh`` / QR
  round-off differs); see :func:`optax_lite.lite_flat_boost`.
  """
  _checks.check_structural(precondition_frequency=precondition_frequency,
                           max_precond_dim=max_precond_dim,
                           total_steps=total_steps, warmup_steps=warmup_steps)
  precision = jax.lax.Precision.HIGHEST if precision is None else precision
  precondition_frequency = structural_int(
      'precondition_frequency', precondition_frequency, 10, low=1)
  max_precond_dim = structural_int('max_precond_dim', max_precond_dim, 4096,
                                   low=1)

  precond_dtype = _checks.dtype_argument('precond_dtype', precond_dtype)
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)

  def matrix_lite(chi_t, beta1_t, beta2_t, flat_decay):
    return lite_flat_boost(
        soap_geometry(b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
                      precondition_frequency=precondition_frequency,
                      max_precond_dim=max_precond_dim,
                      skip_first_update=skip_first_update,
                      precond_dtype=precond_dtype, sharp_ratio=sharp_ratio,
                      smooth_ratio=smooth_ratio,
                      threshold_rate=threshold_rate,
                      null_threshold=null_threshold, precision=precision),
        chi=chi_t, beta1=beta1_t, beta2=beta2_t, momentum=b1,
        nesterov=False, mu_dtype=mu_dtype or precond_dtype,
        dims=dims, scaling='none', flat_weight_decay=flat_decay,
        distribute=distribute, memory_budget=memory_budget,
        stack_by_shape=stack_by_shape)

  # SOAP's statistics-only first step skips the weight decay too.
  warmup_fn = (functools.partial(soap_warmup_leaves, dims=dims,
                                 max_precond_dim=max_precond_dim)
               if skip_first_update else None)
  return assemble(matrix_lite, learning_rate,
                  lite_settings(locals(), h_betas=(0.0, 0.5),
                                emb_smooth_ratio='smooth_ratio'),
                  warmup_fn=warmup_fn)


def rmnp_lite(learning_rate: optax.ScalarOrSchedule, *,
              variant: str = 'lite', chi: optax.ScalarOrSchedule = 2.0,
              beta1: float = -0.25, beta2: optax.ScalarOrSchedule = 1.0,
              sharp_ratio: float = 0.1, smooth_ratio: float = 0.1,
              emb_chi: optax.ScalarOrSchedule = 4.0,
              emb_sharp_ratio: float = 0.1, momentum: float = 0.95,
              axis: str = 'input', scaling: str = 'width', rms: float = 0.2,
              weight_decay: float = 0.1, flat_weight_decay: bool = True,
              total_steps: int | None = None,
              warmup_steps: int | None = None,
              schedule: str | None = None, reference_schedules: bool = True,
              threshold_rate: float = 1.05, mu_dtype=None, dims=None,
              labels=None, distribute=None,
              memory_budget: float | str | None = 'auto',
              adam_learning_rate: optax.ScalarOrSchedule | None = None,
              adam_b1: float = 0.9, adam_b2: float = 0.95,
              adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
              cautious_weight_decay: bool = False
              ) -> optax.GradientTransformation:
  r"""RMNP-LITE (beyond the papers): LITE around row-normalised momentum.

  RMNP's preconditioner ``diag(VVᵀ)^{1/2}`` has one eigenvalue per output
  unit, the squared norm of that unit's momentum; the sharp directions are
  the output units with the largest momentum norm, picked by the soft mask
  of eq. (16) (``d_s = r_s·fan_out``), and
  ``U = RN(M̃)(P + χ(1−P)) + RN(G)(β₁P + χβ₂(1−P))`` per output unit,
  then RMNP's scaling ``sqrt(max(1, fan_out/fan_in))``. Library defaults
  follow ``muon_lite`` (χ = 2, (β₁, β₂) = (−0.25, 1.0), r_s = 0.1) and
  ``rmnp`` (Nesterov 0.95, width scaling). With ``chi=1, beta1=beta2=0,
  emb_chi=1`` this is exactly ``ol.rmnp``.

  ``distribute`` is accepted and checked for a uniform interface, as in
  :func:`optax_lite.rmnp`: RMNP-LITE's per-matrix work is O(mn) row norms
  and masks, which GSPMD shards without moving whole matrices.
  ``cautious_weight_decay``: as for :func:`muon_lite`.
  """
  _checks.check_decay('momentum', momentum)
  distributed.check_polar_sharding(distribute, 'distribute')

  def matrix_lite(chi_t, beta1_t, beta2_t, flat_decay):
    return lite_flat_boost(
        row_norm_geometry(axis=axis, sharp_ratio=sharp_ratio,
                          smooth_ratio=smooth_ratio,
                          threshold_rate=threshold_rate),
        chi=chi_t, beta1=beta1_t, beta2=beta2_t, momentum=momentum,
        nesterov=True, mu_dtype=mu_dtype, dims=dims, scaling=scaling,
        rms=rms, flat_weight_decay=flat_decay,
        memory_budget=grouped.check_memory_budget(memory_budget))

  return assemble(matrix_lite, learning_rate,
                  lite_settings(locals(), h_betas=(-0.25, 2.0),
                                emb_smooth_ratio='smooth_ratio'))


def fismo_lite(learning_rate: optax.ScalarOrSchedule, *,
               variant: str = 'lite', chi: optax.ScalarOrSchedule = 2.0,
               beta1: float = 0.0, beta2: optax.ScalarOrSchedule = 1.0,
               sharp_ratio: float = 0.1, emb_chi: optax.ScalarOrSchedule = 4.0,
               emb_sharp_ratio: float = 0.1, emb_smooth_ratio: float = 0.1,
               momentum: float = 0.95, gamma: float = 0.95,
               damping: float = 1e-3, scale_invariant: bool = False,
               root_method: str = 'auto', root_iters: int = 30,
               warm_iters: int = 3, root_eps: float = 0.0,
               min_eig: float = 1e-5, trace_damping: float = 1.0,
               max_factor_size: int | None = 4096,
               factor_dtype=None, root_every: int = 1,
               method: str = 'polar_express',
               steps: int | None = None, scaling: str = 'rms',
               rms: float = 0.2, weight_decay: float = 0.1,
               flat_weight_decay: bool = True,
               total_steps: int | None = None,
               warmup_steps: int | None = None,
               schedule: str | None = None, reference_schedules: bool = True,
               threshold_rate: float = 1.05,
               threshold_cap: float | None = 1.0,
               threshold_deadband: float = 0.0,
               sharp_dim_rule: str = 'reference',
               filter_route: str = 'small_side',
               filter_every: int | None = None, mu_dtype=None, dims=None,
               labels=None, precision=None, ns_dtype=None, distribute=None,
               memory_budget: float | str | None = 'auto',
               adam_learning_rate: optax.ScalarOrSchedule | None = None,
               adam_b1: float = 0.9, adam_b2: float = 0.95,
               adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
               cautious_weight_decay: bool = False
               ) -> optax.GradientTransformation:
  r"""FISMO-LITE (beyond the papers): Muon-LITE inside FISMO's whitening.

  FISMO is ``P^{-1/2} polar(M̃_white) Q^{-1/2}`` with the momentum kept in
  the whitened space ``G̃ = P^{-1/2} G Q^{-1/2}``; FISMO-LITE runs
  Muon-LITE on the whitened momentum, so its sharp subspace is the top
  singular subspace (fan-in side) of the *whitened* momentum, i.e. sharp in
  the Fisher geometry, and maps back with the same factors. The reference's
  extra flat-direction decay is not applied to the matrix leaves (the
  whitened inner step sees no weights); ``flat_weight_decay`` acts on the
  emb/norm leaves only. Defaults: FISMO's (``ol.fismo``: EMA momentum 0.95
  without Nesterov, γ = 0.95, μ = 1e-3) and χ = 2, (β₁, β₂) = (0, 1.0)
  (β₁ = 0 because FISMO's momentum has no Nesterov term to damp). With
  ``chi=1, beta2=0, emb_chi=1`` this is exactly ``ol.fismo``.

  The whitening's arguments (``gamma`` ... ``root_every``) are
  :func:`optax_lite.fismo`'s, with its defaults; the filter's
  (``sharp_ratio``, ``threshold_*``, ``sharp_dim_rule``, ``filter_route``,
  ``filter_every``)
  and the polar factors' (``method``, ``steps``, ``precision``,
  ``ns_dtype``) are :func:`optax_lite.muon_lite`'s
  (:func:`optax_lite.muon_geometry`).
  Under ``optax.inject_hyperparams`` the whitening's arguments behave as in
  :func:`optax_lite.fismo` (``max_factor_size`` and whether ``root_every >
  1`` are read when the state is created); the rest as in
  :func:`muon_lite`.

  ``distribute``: ``None`` or a :class:`optax_lite.PolarSharding` / ``Mesh``
  / ``(mesh, axes)``: owner-computes, as in :func:`optax_lite.fismo` — each
  device computes whole matrices chosen by cost, and the whole step of a
  matrix (factor updates, inverse roots, ``G̃``, the whitened Muon-LITE
  step of :func:`optax_lite.lite_flat_boost`, the map back) runs in one
  owner call of :func:`optax_lite.transforms.fisher_whiten`, its state
  owner-resident: the gradient travels in, the update out; see
  ``docs/multi_device.md``.
  ``cautious_weight_decay``: as for :func:`muon_lite`.
  """
  _checks.check_structural(steps=steps, total_steps=total_steps,
                           warmup_steps=warmup_steps,
                           filter_every=filter_every)
  polar_lib.check_method(method, steps)
  _checks.check_decay('momentum', momentum)
  _checks.check_choice('scaling', scaling, SCALING_MODES)  # (rms: its own)
  distribute = distributed.check_distribute(distribute)

  geometry = muon_geometry(**muon_geometry_settings(locals()))
  whitening = _common.whitening_settings(locals())

  def matrix_lite(chi_t, beta1_t, beta2_t, flat_decay):
    del flat_decay  # the whitened inner step sees no weights
    inner = lite_flat_boost(
        geometry, chi=chi_t, beta1=beta1_t, beta2=beta2_t, momentum=momentum,
        nesterov=False, mu_dtype=mu_dtype, dims=dims, scaling='none',
        distribute=distribute, owner_inner=distribute is not None,
        memory_budget=memory_budget)
    return optax.chain(fisher_whiten(inner, **whitening),
                       scale_by_shape(scaling, rms, dims))

  return assemble(matrix_lite, learning_rate,
                  lite_settings(locals(), h_betas=(0.0, 2.0)))
