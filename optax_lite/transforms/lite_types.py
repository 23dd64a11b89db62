"""The interface between :func:`optax_lite.lite_flat_boost` and a geometry.

A :class:`Geometry` is what LITE needs of a preconditioner (its state, and
for one leaf at one step the :class:`LeafDirections`); :func:`sharp_dim` is
the target number of sharp directions of a matrix, shared by the spectral
filters. The geometries live in :mod:`optax_lite.transforms.lite`,
:mod:`optax_lite.transforms.lite_muon` and
:mod:`optax_lite.transforms.lite_geometries`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from optax_lite import _checks


class LeafDirections(NamedTuple):
  """What a geometry returns for one leaf at one step.

  ``flat`` must be linear; the transform applies it once to the sum of the
  boost and the flat weight-decay terms.
  """
  d_m: jax.Array                      # F⁻¹(momentum term), own coordinates
  d_g: jax.Array | None               # F⁻¹ g, or None when not needed
  flat: Callable[[jax.Array], jax.Array]       # Q·x in own coordinates
  finish: Callable[[jax.Array], jax.Array]     # own coordinates -> leaf
  to_coords: Callable[[jax.Array], jax.Array]  # parameter leaf -> own coords
  state: tuple                        # the geometry's new per-leaf state
  # True on a warm-up step of the base method (SOAP's first step only builds
  # its statistics): the momentum is left unchanged on that step.
  keep_momentum: jax.Array | None = None


class Geometry(NamedTuple):
  """A preconditioner seen by LITE.

  Attributes:
    init: ``(view, param) -> tuple of arrays`` (per-leaf state).
    directions: ``(view, m_term, g, leaf_state, count, need_g) ->
      LeafDirections``. ``view`` is the leaf's MatrixView (None when
      ``needs_matrix`` is False).
    needs_matrix: whether leaves must be seen as matrices (``dims``).
    momentum_ema: the geometry expects EMA momentum ``θm + (1−θ)g`` (Adam,
      SOAP) rather than heavy-ball ``θm + g`` (Muon); only matters for
      geometries that are not scale-invariant.
    state_type: the NamedTuple class of the per-leaf state that ``init``
      returns and ``directions`` receives. :class:`LiteState` then holds one
      instance of it whose fields are trees shaped like the params (as
      optax's ``ScaleByAdamState(mu, nu)``), so its layout does not depend on
      the params' leaves; ``optax.tree_utils.tree_map_params`` maps the
      fields whose entries have their parameter's shape (read from ``init``
      on a probe matrix) and leaves the others to ``transform_non_params``.
      ``None`` (custom geometries): a plain tuple, its length read from the
      first leaf's state.
    wait_state: the one-device budget's packs wait with their state too
      (:attr:`optax_lite.linalg.engine.MatrixMethod.wait_state`; SOAP's).
  """
  init: Callable
  directions: Callable
  needs_matrix: bool = True
  momentum_ema: bool = False
  state_type: type | None = None
  wait_state: bool = False


def sharp_dim(ratio: float, rows: int, cols: int, rule: str) -> int:
  """Target number of sharp directions ``d_s`` of a ``rows × cols`` matrix.

  ``rule="reference"``: ``min(⌊r·min(m,n)⌋ + 1, min(m,n) − 1)`` (LITE code);
  ``rule="paper"``: ``max(1, round(r·min(m,n)))``.
  """
  k = min(rows, cols)
  if not _checks.is_static_number(ratio):  # traced (inject_hyperparams)
    r = jnp.asarray(ratio)
    if rule == 'reference':
      return jnp.maximum(1, jnp.minimum(jnp.floor(r * k) + 1, k - 1))
    return jnp.maximum(1, jnp.round(r * k))
  if rule == 'reference':
    return max(1, min(int(ratio * k) + 1, k - 1))
  return max(1, int(round(ratio * k)))
