r"""``hyperball_step``: MuonH's step on the sphere of each matrix's norm.

For each matrix ``W`` (a ``(fan_in, fan_out)`` slice of a leaf, see
:class:`optax_lite.MatrixDims`) with radius ``r = ‖W_0‖_F`` fixed at
``init`` and an incoming direction ``U`` (Muon's polar factor):

.. math::
   s = \frac{η\,c\,r}{\max(\|U\|_F, ε)},\qquad
   W' = W - s\,U,\qquad
   W_{k+1} = r\,\frac{W'}{\max(\|W'\|_F, ε)},

so the step moves ``W`` by a fixed fraction ``η c`` of its norm and projects
it back to the sphere of radius ``r``; ``c`` is the shape factor
(``scaling``; dion's ``adjust_lr``, ``None`` by default). The transform
returns the optax update ``W_{k+1} − W_k`` (it needs ``params``); there is
no weight decay (the norm is held fixed). This is dion ``muonh.py``
(``_muonh_apply_step_compiled``, which evaluates ``‖W'‖²`` in closed form
as here).

A zero matrix has no sphere: ``init`` raises a ``ValueError`` when the
parameters are concrete (dion raises on its first step); under a traced
``init`` a zero matrix keeps radius 0 and stays zero.

References:
  `Fantastic Pretraining Optimizers and Where to Find Them 2.1: Hyperball
  Optimization <https://tinyurl.com/muonh>`_ (blog post cited by dion).

  microsoft/dion, ``dion/muonh.py`` (branch ``jcl/muonh-on-main``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.transforms import _tree
from optax_lite.transforms.scaling import SCALING_MODES, shape_factor


class HyperballState(NamedTuple):
  """State of :func:`hyperball_step`."""
  count: jax.Array      # int32 scalar: steps so far (for schedules)
  radius: optax.Updates  # per matrix leaf, (batch,) ‖W_0‖_F, ≥ float32


def _frobenius(x):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sqrt(jnp.sum(xf * xf, axis=(-2, -1)))


def hyperball_matrix_step(w, u, radius, step, eps):
  """``W_{k+1}`` of a ``(batch, fan_in, fan_out)`` stack (module doc).

  ``step`` is ``η c`` (scalar); arithmetic in the wider of float32 and the
  inputs' dtype.
  """
  ct = jnp.promote_types(jnp.promote_types(w.dtype, u.dtype), jnp.float32)
  wf, uf = w.astype(ct), u.astype(ct)
  u_sq = jnp.sum(uf * uf, axis=(-2, -1))
  w_sq = jnp.sum(wf * wf, axis=(-2, -1))
  wu = jnp.sum(wf * uf, axis=(-2, -1))
  r = radius.astype(ct)
  s = step * r / jnp.maximum(jnp.sqrt(u_sq), eps)
  # ‖W − sU‖² = ‖W‖² − 2s⟨W, U⟩ + s²‖U‖², clamped as dion does.
  cand = jnp.sqrt(jnp.maximum(w_sq - 2 * s * wu + s * s * u_sq, eps * eps))
  scale_w = (r / cand)[:, None, None]
  scale_u = (s * r / cand)[:, None, None]
  return wf * scale_w - uf * scale_u


def hyperball_step(learning_rate: optax.ScalarOrSchedule, *,
                   scaling: str = 'none', rms: float = 0.2,
                   eps: float = 1e-10, dims: _tree.DimsSpec = None
                   ) -> optax.GradientTransformation:
  """The last transform of MuonH's matrix chain (see the module doc).

  Args:
    learning_rate: ``η``, the relative move size before the projection
      (float or schedule of the step count).
    scaling: the shape factor ``c`` (``"none"``: dion's default
      ``adjust_lr=None``; ``"spectral"`` / ``"rms"``: dion's
      ``"spectral_norm"`` / ``"rms_norm"``).
    rms: target RMS for ``scaling="rms"``.
    eps: ``ε`` of the norm divisions (dion's ``hyperball_eps``), > 0.
    dims: matrix view of leaves; a leaf whose dims are ``None`` gets the
      plain step ``−η u``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`HyperballState`;
    ``update`` needs ``params``.
  """
  _checks.check_learning_rate('learning_rate', learning_rate)
  _checks.check_choice('scaling', scaling, SCALING_MODES)
  _checks.check_positive('rms', rms)
  _checks.check_positive('eps', eps)

  def init_leaf(view, p):
    if view is None:
      return jnp.zeros((), jnp.float32)
    radius = _frobenius(view.to_matrix(p))  # float32 or wider
    if not isinstance(radius, jax.core.Tracer) and bool(
        jnp.any(radius <= eps)):
      raise ValueError(
          'params: the hyperball radius of each matrix is its Frobenius '
          f'norm at init, but a leaf of shape {p.shape} has a (near) zero '
          'matrix; initialise it non-zero (e.g. lecun_normal) or send it '
          'to AdamW with labels=.')
    return radius

  def init_fn(params):
    if _tree.is_params_placeholder(params):  # see _tree.placeholder_fields
      return HyperballState(jnp.zeros([], jnp.int32), _tree.not_params())
    radius = _tree.map_leaves(init_leaf, params, dims=dims, name='params')
    return HyperballState(jnp.zeros([], jnp.int32), radius)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('params: hyperball_step needs params in update().')
    lr = _checks.resolve(learning_rate, state.count)

    def leaf(view, u, w, radius):
      if view is None:
        return (-lr * u).astype(u.dtype)
      step = lr * shape_factor(view.rows, view.cols, scaling, rms)
      w_new = hyperball_matrix_step(view.to_matrix(w), view.to_matrix(u),
                                    radius, step, eps)
      delta = w_new - view.to_matrix(w).astype(w_new.dtype)
      return view.from_matrix(delta).astype(w.dtype)

    out = _tree.map_leaves(leaf, updates, params, state.radius, dims=dims)
    return out, HyperballState(optax.safe_increment(state.count),
                               state.radius)

  return optax.GradientTransformation(init_fn, update_fn)
