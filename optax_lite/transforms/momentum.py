r"""Momentum in the unified form of the LITE paper, eq. (2).

Heavy-ball form (the default):

.. math::  m_k = (1 - \alpha) m_{k-1} + g_k, \qquad
           u_k = m_k + \beta g_k,

with ``decay = 1 − α``. ``β > 0`` is Nesterov-type momentum ("Hessian
damping" in the LITE paper). EMA form (``ema=True``):
``m_k = decay · m_{k−1} + (1 − decay) g_k``.

The output for each setting:

* ``nesterov_coeff=β`` given: ``m_k + β g_k`` (eq. (2) literally).
* ``nesterov=True``: the standard Nesterov look-ahead,
  ``decay · m_k + g_k`` (heavy-ball, Moonlight / LITE Algorithm 5) or
  ``decay · m_k + (1 − decay) g_k`` (EMA, Keller Jordan's Muon). Both equal
  ``decay · (m_k + β g_k)`` with ``β = 1/decay`` resp. ``(1−decay)/decay``,
  so after a scale-invariant map (polar factor, row normalisation) they are
  eq. (2) with those β.
* ``nesterov=False``: ``m_k``.

``bias_correction=True`` (EMA form only) divides by ``1 − decay^t`` as Adam
and ``optax.contrib.muon`` do; it changes the relative weight of ``m`` and
``g`` in the Nesterov sum and is what makes ``optax_lite.muon`` reproduce
``optax.contrib.muon``.

References:
  Zhu et al., `Accelerating LLM Pre-Training through Flat-Direction Dynamics
  Enhancement <https://arxiv.org/abs/2602.22681>`_, 2026 (eq. 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks


class MomentumState(NamedTuple):
  count: jax.Array  # int32 scalar, number of updates so far
  mu: optax.Updates  # m_k, in ``mu_dtype``


def momentum_step(g, m, *, decay, nesterov: bool, ema: bool,
                  nesterov_coeff=None, count=None):
  """One leaf's momentum step: ``(output, new m)``, each in its input dtype.

  The arithmetic of :func:`momentum` (see the module doc), in the wider of
  the two dtypes; ``count`` (the step number after this update) turns on
  the EMA bias correction. Shared with the owner-resident steps that fuse
  momentum into a per-matrix kernel, so both compute the same numbers.
  """
  ct = jnp.promote_types(g.dtype, m.dtype)
  # 1 − decay in ct, as for an injected (array) decay: the same numbers.
  decay = jnp.asarray(decay, ct)
  g_weight = (1.0 - decay) if ema else 1.0
  gc, mc = g.astype(ct), m.astype(ct)
  m_new = decay * mc + g_weight * gc
  if count is not None:
    t = count.astype(ct)
    look_ahead = nesterov and nesterov_coeff is None
    mb = m_new / (1 - decay ** (t + 1)) if look_ahead else (
        m_new / (1 - decay ** t))
    gb = gc / (1 - decay ** t)
  else:
    mb, gb = m_new, gc
  if nesterov_coeff is not None:
    out = mb + nesterov_coeff * gb
  elif nesterov:
    out = decay * mb + g_weight * gb
  else:
    out = mb
  return out.astype(g.dtype), m_new.astype(m.dtype)


def momentum(decay: float = 0.95, *, nesterov: bool = True,
             nesterov_coeff: float | None = None, ema: bool = False,
             bias_correction: bool = False, mu_dtype=None
             ) -> optax.GradientTransformation:
  """Heavy-ball / EMA momentum with optional Nesterov look-ahead.

  Args:
    decay: ``1 − α`` in eq. (2), in ``[0, 1)``.
    nesterov: apply the standard Nesterov look-ahead (see module doc).
    nesterov_coeff: explicit ``β`` of eq. (2); overrides ``nesterov``.
    ema: use the EMA form ``decay·m + (1−decay)·g``.
    bias_correction: divide EMA terms by ``1 − decay^t`` (EMA form only).
    mu_dtype: dtype of the stored momentum (e.g. ``jnp.bfloat16``); ``None``
      keeps each parameter's dtype. Arithmetic is done in the wider of the two.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`MomentumState`.
  """
  _checks.check_decay('decay', decay)
  for name, flag in (('nesterov', nesterov), ('ema', ema),
                     ('bias_correction', bias_correction)):
    _checks.check_flag(name, flag)
  if nesterov_coeff is not None:
    _checks.check_number('nesterov_coeff', nesterov_coeff)
  if bias_correction and not ema:
    raise ValueError('bias_correction: only defined for the EMA form '
                     '(ema=True).')
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)

  def init_fn(params):
    for leaf in jax.tree.leaves(params):
      _checks.check_float_leaf('params', leaf)
    # zeros_like keeps each parameter's sharding (jnp.zeros(p.shape) would
    # drop it under explicit sharding and place it on the default device).
    mu = jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
    return MomentumState(count=jnp.zeros([], jnp.int32), mu=mu)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)

    def leaf(g, m):
      _checks.check_float_leaf('updates', g)
      return momentum_step(g, m, decay=decay, nesterov=nesterov,
                           nesterov_coeff=nesterov_coeff, ema=ema,
                           count=count if bias_correction else None)

    out = jax.tree.map(leaf, updates, state.mu)
    new_updates = jax.tree.map(lambda _, o: o[0], updates, out)
    new_mu = jax.tree.map(lambda _, o: o[1], updates, out)
    return new_updates, MomentumState(count=count, mu=new_mu)

  return optax.GradientTransformation(init_fn, update_fn)
