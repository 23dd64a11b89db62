r"""``neuron_normalize``: NorMuon's per-neuron second moment of the update.

For each matrix leaf seen as ``(fan_in, fan_out)`` (see
:class:`optax_lite.MatrixDims`) and an input ``U`` (the polar factor of the
momentum, when placed after :func:`optax_lite.orthogonalize`):

.. math::
   v_k = β_2 v_{k-1} + (1 - β_2)\,\mathrm{mean}_{\text{fan-in}}(U ⊙ U),
   \qquad Û = \frac{U}{\sqrt{v_k} + ε},
   \qquad \mathrm{out} = Û\,\frac{\|U\|_F}{\max(\|Û\|_F, ε)},

one ``v`` per output neuron (a column of the Flax kernel, a row of the
PyTorch ``(out, in)`` weight, whose mean over its inputs dion takes with
``mean(dim=-1)``), no bias correction, and the Frobenius norm of ``U`` kept
(dion ``normuon.py``, ``_normuon_normalization_core``).
``axis="short_axis"``: one ``v`` per entry of the longer side, the mean
taken over the shorter one (over fan-in on a square matrix), dion
``muonh.py``'s ``normalization="short_axis"`` and modded-nanogpt's NorMuon.

References:
  Li et al., `NorMuon: Making Muon more efficient and scalable
  <https://arxiv.org/abs/2510.05491>`_, 2025.

  microsoft/dion, ``dion/normuon.py`` and ``dion/muonh.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import engine
from optax_lite.transforms import _tree
from optax_lite.transforms.lite import (Geometry, MuonGeometryState,
                                        muon_geometry)

NORMALIZATION_AXES = ('neuron', 'short_axis')
# One per-neuron second moment per matrix (``variance_shape``), stepped
# leaf by leaf: the work is O(m·n).
_METHOD = engine.MatrixMethod(names=('variance',), active=(0,),
                              leaf_shaped=())


class NeuronNormalizeState(NamedTuple):
  """State of :func:`neuron_normalize`.

  ``variance``: per matrix leaf, ``(batch, 1, fan_out)`` in float32 (or
  the parameter's dtype where wider)
  (``axis="neuron"``) or the shape of the mean over the shorter side; a
  scalar placeholder for leaves that are not matrices.
  """
  variance: optax.Updates


def reduce_axis(rows: int, cols: int, axis: str) -> int:
  """The axis of ``(batch, fan_in, fan_out)`` that the mean runs over."""
  if axis == 'neuron' or rows <= cols:
    return -2
  return -1


def variance_shape(view, axis: str) -> tuple[int, ...]:
  """The second moment's shape for one leaf's matrix view."""
  b, rows, cols = view.matrix_shape
  if reduce_axis(rows, cols, axis) == -2:
    return (b, 1, cols)
  return (b, rows, 1)


def neuron_scale(u, v, *, beta2, eps, axis: str):
  """``(scale, new v)`` for a ``(batch, fan_in, fan_out)`` stack ``u``.

  ``u * scale`` is the module's ``out`` (the per-neuron division and the
  Frobenius-norm rescale, folded into one broadcastable factor in the
  wider of ``u``'s dtype and float32); shared by :func:`neuron_normalize`
  and the NorMuon-LITE geometry.
  """
  ct = jnp.promote_types(u.dtype, jnp.float32)
  uf = u.astype(ct)
  sq = uf * uf
  norm = jnp.sqrt(jnp.sum(sq, axis=(-2, -1), keepdims=True))
  stat = jnp.mean(sq, axis=reduce_axis(u.shape[-2], u.shape[-1], axis),
                  keepdims=True)
  vc = v.astype(ct)
  v_new = vc + (1 - beta2) * (stat - vc)      # torch.lerp(V, stat, 1 − β₂)
  inv = 1.0 / (jnp.sqrt(v_new) + eps)
  # ‖Û‖_F² = Σ_neurons (Σ over the reduced side of U²) / (√v + ε)².
  red = jnp.sum(sq, axis=reduce_axis(u.shape[-2], u.shape[-1], axis),
                keepdims=True)
  norm_new = jnp.sqrt(jnp.sum(red * inv * inv, axis=(-2, -1), keepdims=True))
  scale = inv * (norm / jnp.maximum(norm_new, eps))
  return scale, v_new.astype(v.dtype)


def neuron_normalize(beta2: float = 0.95, eps: float = 1e-8,
                     axis: str = 'neuron', dims: _tree.DimsSpec = None
                     ) -> optax.GradientTransformation:
  """NorMuon's normalisation (module doc); place it after ``orthogonalize``.

  Args:
    beta2: ``β₂`` of the per-neuron EMA, in ``[0, 1)`` (dion: 0.95).
    eps: ``ε`` of the division and of the norm rescale, > 0 (dion NorMuon:
      1e-8; MuonH's ``hyperball_eps``: 1e-10).
    axis: ``"neuron"`` (one ``v`` per output unit) or ``"short_axis"``.
    dims: matrix view of leaves, as in :func:`optax_lite.orthogonalize`
      (``None`` entries pass through unchanged).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`NeuronNormalizeState`.
  """
  _checks.check_decay('beta2', beta2)
  _checks.check_positive('eps', eps)
  _checks.check_choice('axis', axis, NORMALIZATION_AXES)

  def init_leaf(view, p):
    if view is None:
      return jnp.zeros((), jnp.float32)
    return jnp.zeros(variance_shape(view, axis),
                     jnp.promote_types(p.dtype, jnp.float32))

  def init_fn(params):
    if _tree.is_params_placeholder(params):  # see _tree.placeholder_fields
      return NeuronNormalizeState(_tree.not_params())
    return NeuronNormalizeState(
        _tree.map_leaves(init_leaf, params, dims=dims, name='params'))

  def kernel(u, v):
    scale, v_new = neuron_scale(u, v, beta2=beta2, eps=eps, axis=axis)
    return (u.astype(scale.dtype) * scale).astype(u.dtype), v_new

  def update_fn(updates, state, params=None):
    del params
    u_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
    variance = treedef.flatten_up_to(state.variance)
    leaves = [engine.Leaf(u, view, (v,), view is not None)
              for u, view, v in zip(u_leaves, views, variance)]
    out = engine.step_leaves(_METHOD, kernel,
                             engine.placement_for(None, resident=False),
                             leaves, local=lambda leaf: (leaf.g,) + leaf.state)
    out, variance = ([treedef.unflatten([t[j] for t in out])
                      for j in range(2)])
    return out, NeuronNormalizeState(variance)

  return optax.GradientTransformation(init_fn, update_fn)


class NorMuonGeometryState(NamedTuple):
  """Per-leaf state of :func:`normuon_geometry`."""
  threshold_ratio: jax.Array  # muon_geometry's controller, (batch,)
  variance: jax.Array         # per-neuron v (≥ float32), variance_shape


class NorMuonCachedGeometryState(NamedTuple):
  """Per-leaf state of :func:`normuon_geometry` with ``filter_every > 1``."""
  threshold_ratio: jax.Array  # muon_geometry's controller, (batch,)
  variance: jax.Array         # per-neuron v (≥ float32), variance_shape
  sharp_filter: jax.Array     # muon_geometry's cached sharp filter


def normuon_geometry(*, beta2: float = 0.95, eps: float = 1e-8,
                     axis: str = 'neuron', **muon_kw) -> Geometry:
  r"""NorMuon's geometry for :func:`optax_lite.lite_flat_boost`.

  :func:`optax_lite.muon_geometry` (``muon_kw``: its arguments) with both
  directions multiplied by NorMuon's per-neuron factor ``S`` computed from
  ``polar(M̃)`` (:func:`neuron_scale`; ``v`` updated from ``polar(M̃)``
  only): ``D_m = polar(M̃) S``, ``D_g = polar(G) S``. ``S`` scales the
  fan-out side and the flat projector ``Q`` acts on the fan-in side, so
  they commute and the LITE combination is LITE in NorMuon's coordinates;
  with ``χ = 1, β₁ = β₂ = 0`` the direction is exactly NorMuon's.
  With ``filter_every > 1`` (in ``muon_kw``) the state also holds the
  Muon geometry's cached sharp filter (:class:`NorMuonCachedGeometryState`).
  """
  _checks.check_decay('beta2', beta2)
  _checks.check_positive('eps', eps)
  _checks.check_choice('axis', axis, NORMALIZATION_AXES)
  inner = muon_geometry(**muon_kw)
  # The Muon geometry's fields, with NorMuon's variance second.
  state_type = (NorMuonGeometryState if inner.state_type is MuonGeometryState
                else NorMuonCachedGeometryState)

  def init(view, param):
    ratio, *cached = inner.init(view, param)
    return state_type(
        ratio, jnp.zeros(variance_shape(view, axis),
                         jnp.promote_types(param.dtype, jnp.float32)),
        *cached)

  def directions(view, m_term, g, leaf_state, count, need_g):
    muon_state = inner.state_type(leaf_state[0], *leaf_state[2:])
    out = inner.directions(view, m_term, g, muon_state, count, need_g)
    scale, v_new = neuron_scale(out.d_m, leaf_state.variance, beta2=beta2,
                                eps=eps, axis=axis)
    d_m = (out.d_m.astype(scale.dtype) * scale).astype(out.d_m.dtype)
    d_g = out.d_g
    if d_g is not None:
      d_g = (d_g.astype(scale.dtype) * scale).astype(d_g.dtype)
    ratio, *cached = out.state
    return out._replace(d_m=d_m, d_g=d_g,
                        state=state_type(ratio, v_new, *cached))

  return Geometry(init, directions, needs_matrix=True, momentum_ema=False,
                  state_type=state_type)
