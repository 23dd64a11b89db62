r"""Shape-dependent scaling of matrix updates.

Conventions, for a leaf seen as a ``fan_in × fan_out`` matrix:

* ``mode="rms"`` (default): multiply by ``rms · sqrt(max(fan_in, fan_out))``
  with ``rms = 0.2``. An orthogonal ``m × n`` matrix has RMS
  ``1/sqrt(max(m, n))``, so the update's RMS becomes 0.2, about AdamW's, and
  AdamW's learning rate and weight decay carry over (Moonlight; LITE C.2).
* ``mode="width"``: multiply by ``sqrt(max(1, fan_out / fan_in))`` (Keller
  Jordan's Muon, RMNP's code, ``optax.contrib.scale_by_shape`` default).
* ``mode="spectral"``: multiply by ``sqrt(fan_out / fan_in)`` (dion's
  ``adjust_lr="spectral_norm"``, its Muon / NorMuon default: spectral norm 1
  to RMS-operator norm 1).

References:
  Liu et al., `Muon is Scalable for LLM Training
  <https://arxiv.org/abs/2502.16982>`_, 2025.
"""

from __future__ import annotations

import math

import optax

from optax_lite import _checks
from optax_lite.transforms import _tree

SCALING_MODES = ('rms', 'width', 'spectral', 'none')


def shape_factor(rows: int, cols: int, mode: str, rms: float) -> float:
  """The scalar multiplier for a ``rows × cols`` (fan_in × fan_out) matrix."""
  if mode == 'rms':
    return rms * math.sqrt(max(rows, cols))
  if mode == 'width':
    return math.sqrt(max(1.0, cols / rows))
  if mode == 'spectral':
    return math.sqrt(cols / rows)
  return 1.0


def scale_by_shape(mode: str = 'rms', rms: float = 0.2,
                   dims: _tree.DimsSpec = None
                   ) -> optax.GradientTransformation:
  """Scales each matrix leaf by its shape factor (see module doc).

  Args:
    mode: ``"rms"``, ``"width"``, ``"spectral"`` or ``"none"``.
    rms: target update RMS for ``mode="rms"``.
    dims: matrix view of each leaf, as in :func:`orthogonalize`.
  """
  _checks.check_choice('mode', mode, SCALING_MODES)
  _checks.check_positive('rms', rms)

  def leaf(view, x):
    if view is None:
      return x
    return x * shape_factor(view.rows, view.cols, mode, rms)

  def update_fn(updates, state, params=None):
    del params
    return _tree.map_leaves(leaf, updates, dims=dims), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
