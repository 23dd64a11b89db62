r"""``orthogonalize``: replace every matrix leaf by its polar factor.

.. math::  U = \mathrm{polar}(G) = G (G^\top G)^{-1/2} = U_G V_G^\top.

This is the direction of Muon (steepest descent under the spectral norm).
N-D leaves are reshaped to ``(batch, fan_in, fan_out)`` by
:class:`optax_lite.MatrixDims` (default: all leading axes are fan-in, the last
is fan-out, so a conv kernel ``[kh, kw, in, out]`` becomes
``(kh·kw·in, out)``); the polar factor is taken per batch slice and reshaped
back.

References:
  Jordan et al., `Muon: An optimizer for hidden layers in neural networks
  <https://kellerjordan.github.io/posts/muon/>`_, 2024.

  Amsel et al., `The Polar Express <https://arxiv.org/abs/2505.16932>`_, 2025.
"""

from __future__ import annotations

import optax

from optax_lite.linalg import polar as polar_lib
from optax_lite.transforms import _tree


def polar_of_leaf(view, x, method, steps, eps, precision):
  """The polar factor of one leaf through its matrix view (None: identity)."""
  if view is None:
    return x
  mat = view.to_matrix(x)
  if method == 'svd':
    out = polar_lib.polar_svd(mat)
  else:
    out = polar_lib.newton_schulz(
        mat, polar_lib.coefficients(method, steps),
        norm_factor=polar_lib._NORM_FACTOR[method], eps=eps,
        precision=precision)
  return view.from_matrix(out)


def orthogonalize(method: str = 'polar_express', steps: int | None = None,
                  dims: _tree.DimsSpec = None, *, eps: float = 1e-7,
                  precision=None) -> optax.GradientTransformation:
  """Maps each matrix leaf ``G`` to ``≈ polar(G) = U Vᵀ``.

  Args:
    method: ``"polar_express"`` (default, 6 steps), ``"jordan"`` (5),
      ``"cubic"`` (12) or ``"svd"`` (exact); see
      :func:`optax_lite.polar_factor`.
    steps: iteration count (static), ``None`` for the method's default.
    dims: how leaves are seen as matrices: ``None`` (default rule), a
      :class:`MatrixDims`, a tree of them (``None`` entries pass through
      unchanged) or a callable returning such a tree.
    eps: Frobenius-norm regulariser; zero leaves map to zero.
    precision: ``jax.lax.Precision`` for the matrix products.

  Returns:
    A stateless ``optax.GradientTransformation`` (state ``optax.EmptyState``).

  Raises:
    ValueError: unknown method, ``steps < 1``, or a leaf of rank < 2 under
      the default dims.
  """
  steps = polar_lib.check_method(method, steps)

  def update_fn(updates, state, params=None):
    del params
    new = _tree.map_leaves(
        lambda v, x: polar_of_leaf(v, x, method, steps, eps, precision),
        updates, dims=dims)
    return new, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
