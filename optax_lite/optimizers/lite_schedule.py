"""One place for a LITE run's length: the learning rate and the ramps.

The LITE reference code ramps χ and the flat damping β₂ over the run, so
the LITE optimizers need the same ``total_steps`` and ``warmup_steps`` as
the learning-rate schedule. :func:`lite_schedule` builds the reference's
learning-rate schedule *and* carries those numbers; given as
``learning_rate``, a LITE optimizer takes its ramps from it::

  lr = ol.lite_schedule(3e-3, total_steps=10_000, warmup_steps=500)
  tx = ol.muon_lite(lr)              # χ/β₂ ramps over the same 10,000 steps

Passing ``total_steps``/``warmup_steps``/``schedule`` as well is allowed
only when they agree (a ``ValueError`` names each one that does not).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from optax_lite import _checks

KINDS = ('cosine', 'wsd')


@dataclasses.dataclass(frozen=True)
class LiteSchedule:
  """The reference's learning-rate schedule, with the run length it uses.

  Callable as an optax schedule (``count -> learning rate``, ``count`` the
  0-based step). ``kind="cosine"`` is the reference's
  ``cosine_lr_schedule``: ``peak·(t + 1)/W`` for ``t < W``, then a cosine
  from ``peak`` to ``min_lr_ratio·peak`` at ``total_steps``.
  ``kind="wsd"`` is its ``get_wsd_schedule_with_min_lr``: ``peak·t/W``
  for ``t < W``, ``peak`` until ``⌊stable_ratio·T⌋``, then linear to
  ``min_lr_ratio·peak`` at ``T``.
  """
  peak_value: float
  total_steps: int
  warmup_steps: int = 0
  kind: str = 'cosine'
  min_lr_ratio: float = 0.1
  stable_ratio: float = 0.8

  def __call__(self, count):
    t = jnp.asarray(count, dtype=float)
    w, total = self.warmup_steps, self.total_steps
    if self.kind == 'cosine':
      warm = (t + 1) / max(1, w)
      frac = jnp.clip((t - w) / max(1, total - w), 0.0, 1.0)
      rest = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
          1 + jnp.cos(jnp.pi * frac))
    else:
      warm = t / max(1, w)
      stable_end = int(self.stable_ratio * total)
      frac = (total - t) / max(1, total - stable_end)
      rest = jnp.where(
          t < stable_end, 1.0,
          self.min_lr_ratio + (1 - self.min_lr_ratio) * jnp.maximum(frac, 0))
    return self.peak_value * jnp.where(t < w, warm, rest)


def check_run_length(total_steps, warmup_steps) -> None:
  """A run length: ints ``T >= 1`` and ``0 <= W < T`` (the warmup ends
  before the run does, or no ramp ever starts)."""
  _checks.check_int('total_steps', total_steps, low=1)
  _checks.check_int('warmup_steps', warmup_steps, low=0)
  if warmup_steps >= total_steps:
    raise ValueError(f'warmup_steps must be < total_steps, got '
                     f'{warmup_steps} >= {total_steps}.')


def lite_schedule(peak_value: float, *, total_steps: int,
                  warmup_steps: int = 0, kind: str = 'cosine',
                  min_lr_ratio: float = 0.1, stable_ratio: float = 0.8
                  ) -> LiteSchedule:
  """A :class:`LiteSchedule`, checked: pass it as a LITE ``learning_rate``.

  Args:
    peak_value: the peak learning rate.
    total_steps: the run length ``T`` (> 0).
    warmup_steps: the linear warmup ``W`` (0 ≤ W < T).
    kind: ``"cosine"`` or ``"wsd"`` (warmup–stable–decay).
    min_lr_ratio: the final learning rate as a fraction of the peak.
    stable_ratio: ``wsd`` only: the decay starts at ``⌊stable_ratio·T⌋``.
  """
  _checks.check_number('peak_value', peak_value, low=0.0)
  check_run_length(total_steps, warmup_steps)
  _checks.check_choice('kind', kind, KINDS)
  _checks.check_number('min_lr_ratio', min_lr_ratio, low=0.0, high=1.0)
  _checks.check_number('stable_ratio', stable_ratio, low=0.0, high=1.0)
  return LiteSchedule(float(peak_value), int(total_steps), int(warmup_steps),
                      kind, float(min_lr_ratio), float(stable_ratio))


def resolve_run(learning_rate, total_steps, warmup_steps, schedule):
  """``(total_steps, warmup_steps, schedule, min_lr_ratio)`` of a LITE run.

  From ``learning_rate`` when it is a :class:`LiteSchedule` (explicit
  arguments must then agree with it), else from the arguments
  (``schedule=None``: ``"cosine"``; ``min_lr_ratio`` 0.1, the reference's).
  """
  if not isinstance(learning_rate, LiteSchedule):
    return total_steps, warmup_steps, schedule or 'cosine', 0.1
  given = {'total_steps': (total_steps, learning_rate.total_steps),
           'warmup_steps': (warmup_steps, learning_rate.warmup_steps),
           'schedule': (schedule, learning_rate.kind)}
  clash = [f'{k}={mine!r} (learning_rate has {theirs!r})'
           for k, (mine, theirs) in given.items()
           if mine is not None and mine != theirs]
  if clash:
    raise ValueError(
        'learning_rate is an ol.lite_schedule, which sets the run length; '
        'these arguments disagree with it: ' + ', '.join(clash) +
        '. Leave them out (None) or build the schedule with the same values.')
  return (learning_rate.total_steps, learning_rate.warmup_steps,
          learning_rate.kind, learning_rate.min_lr_ratio)


def _float(count):
  """A step count as a float array (float64 when x64 is enabled)."""
  return jnp.asarray(count, dtype=float)


def _cosine(step, warmup, total, peak, min_ratio):
  """The reference's ``cosine_lr_schedule`` at the 0-based ``step``.

  Linear warmup ``peak·(step + 1)/warmup`` for ``step < warmup``, then a
  cosine from ``peak`` to ``min_ratio·peak``.
  """
  step = _float(step)
  warm = peak * (step + 1) / max(1, warmup)
  frac = jnp.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
  cos = min_ratio * peak + (peak - min_ratio * peak) * 0.5 * (
      1 + jnp.cos(jnp.pi * frac))
  return jnp.where(step < warmup, warm, cos)


def flat_warmup_fraction(schedule: str, total_steps: int, warmup_steps: int
                         ) -> float:
  """The reference's ``T_flat_warmup`` default: 0.5 (cosine), 2·W/T (wsd)."""
  if schedule == 'cosine':
    return 0.5
  return 2.0 * warmup_steps / max(1, total_steps)


def beta2_ramp(beta1: float, beta2: float, *, total_steps: int,
               warmup_steps: int = 0, flat_warmup: float = 0.5
               ) -> optax.Schedule:
  """β₂ ramps linearly from β₁ (t ≤ warmup) to β₂ (t ≥ T_β) (reference).

  ``T_β = ⌊flat_warmup·(total − warmup)⌋ + warmup``; ``t`` is the 0-based
  step (the count before the update, as optax's schedules and the
  reference's iteration counter).
  """
  check_run_length(total_steps, warmup_steps)
  # 0 (wsd with no warmup: T_f = 2·W/T): β₂ from the first step, no ramp.
  _checks.check_positive('flat_warmup', flat_warmup, allow_zero=True)
  _checks.check_number('beta1', beta1)
  _checks.check_number('beta2', beta2)
  if (_checks.is_static_number(beta1) and _checks.is_static_number(beta2)
      and float(beta2) < float(beta1)):
    raise ValueError(f'beta2 must be >= beta1, got {beta2} < {beta1}.')
  t_beta = int(flat_warmup * (total_steps - warmup_steps)) + warmup_steps

  def schedule(count):
    t = _float(count)
    if t_beta <= 0:
      return beta2 + 0.0 * t
    frac = jnp.clip((t - warmup_steps) / max(1, t_beta - warmup_steps), 0, 1)
    # Reference order: t ≥ T_β gives β₂ before t ≤ warmup gives β₁.
    frac = jnp.where(t >= t_beta, 1.0, frac)
    return beta1 + (beta2 - beta1) * frac

  return schedule


def chi_schedule(chi: float, *, mode: str, total_steps: int,
                 warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                 flat_warmup: float = 0.5) -> optax.Schedule:
  """The reference's ``get_lr_ratio`` under a cosine learning rate.

  Evaluated at the 0-based step (the count before the update).

  ``mode="ramp"`` (matrix leaves, ``flat_mode=1``): 1 during warmup, then
  ``min(lr_f/lr_s, 1 + (t − W)/(T − W)·(χ − 1)/T_f)``.
  ``mode="decay"`` (emb/norm, ``flat_mode=2``): ``lr_f/lr_s``, which starts
  at χ and decays to 1 as both cosines reach the same floor.
  """
  if mode not in ('ramp', 'decay'):
    raise ValueError(f'mode must be "ramp" or "decay", got {mode!r}.')
  check_run_length(total_steps, warmup_steps)
  _checks.check_positive('flat_warmup', flat_warmup)
  _checks.check_number('chi', chi, low=1.0)
  _checks.check_number('min_lr_ratio', min_lr_ratio, low=0.0, high=1.0)

  def ratio(t):
    lr_f = _cosine(t, warmup_steps, total_steps, chi, min_lr_ratio / chi)
    lr_s = _cosine(t, warmup_steps, total_steps, 1.0, min_lr_ratio) + 1e-9
    return lr_f / lr_s

  def schedule(count):
    t = _float(count)
    r = ratio(t)
    if mode == 'decay':
      return jnp.maximum(r, 1.0)
    ramp = 1 + (t - warmup_steps) / max(1, total_steps - warmup_steps) * (
        chi - 1) / flat_warmup
    return jnp.where(t <= warmup_steps, 1.0, jnp.maximum(1.0, jnp.minimum(
        r, ramp)))

  return schedule
