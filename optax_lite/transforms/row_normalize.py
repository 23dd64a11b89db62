r"""``row_normalize``: unit-ℓ2 "rows" of each matrix leaf (RMNP, eq. (4)).

RMNP (Deng et al. 2026) replaces Muon's polar factor of the momentum ``V``
by the diagonal part of the same preconditioner:

.. math::
   D = \mathrm{diag}(V V^\top)^{-1/2} V, \qquad
   D_{i,:} = \frac{V_{i,:}}{\max(\|V_{i,:}\|_2, \varepsilon)},

i.e. every row of ``V`` scaled to unit ℓ2 norm, ``O(mn)`` instead of
``O(mn·min(m, n))``. A zero row stays zero (``ε`` clamp, as the authors'
``F.normalize`` with ``ε = 1e-12``).

**Layout.** The paper's ``V`` is ``m × n`` in PyTorch layout ``(out, in)``: a
row is one *output* unit's fan-in vector, normalised over the *input*
dimension. A Flax ``Dense`` / ``nnx.Linear`` kernel is ``[in, out]``, the
transpose, so the paper's rows are the kernel's **columns**. In optax_lite
every leaf is seen through its :class:`optax_lite.MatrixDims` as
``(batch, fan_in, fan_out)``; ``axis`` says which axis is normalised:

* ``axis="input"`` (default, RMNP): normalise along the fan-in (reduction)
  axes, one unit vector per output index. For a 2-D Flax kernel ``K``,
  ``‖K[:, j]‖₂ = 1`` for every output unit ``j``. For a conv kernel
  ``[kh, kw, in, out]`` (default dims) each output channel's
  ``kh·kw·in`` vector has unit norm, as the code's ``view(out, -1)``.
* ``axis="output"``: normalise along the fan-out axes, one unit vector per
  input index (the paper's formula applied to the Flax array as it is
  stored; "column normalisation" in PyTorch terms).

The map is invariant to positive scaling of each normalised slice (hence of
the whole leaf), so EMA vs. heavy-ball momentum and bias corrections do not
change its output.

References:
  Deng et al., `Row-Momentum Normalized Preconditioning
  <https://arxiv.org/abs/2603.20527>`_, 2026 (eq. (4), Algorithm 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import engine
from optax_lite.transforms import _tree

AXES = ('input', 'output')
# Stateless, one matrix at a time.
_METHOD = engine.MatrixMethod(names=(), active=(), leaf_shaped=())


def normalize_matrix(mat: jax.Array, axis: str = 'input',
                     eps: float = 1e-12) -> jax.Array:
  """Unit-ℓ2 slices of ``mat`` of shape ``(batch, fan_in, fan_out)``.

  ``axis="input"`` normalises each column (fixed fan-out index) over the
  fan-in axis ``-2``; ``axis="output"`` each row over axis ``-1``. Norms are
  computed in float32 (or wider); the result has ``mat``'s dtype.
  """
  red = -2 if axis == 'input' else -1
  ct = jnp.promote_types(mat.dtype, jnp.float32)
  m32 = mat.astype(ct)
  norm = jnp.sqrt(jnp.sum(jnp.square(m32), axis=red, keepdims=True))
  return (m32 / jnp.maximum(norm, eps)).astype(mat.dtype)


def row_normalize(axis: str = 'input', eps: float = 1e-12,
                  dims: _tree.DimsSpec = None
                  ) -> optax.GradientTransformation:
  """Scales every row of each matrix leaf to unit ℓ2 norm (RMNP's ``RN``).

  Args:
    axis: ``"input"`` (default): normalise along the fan-in axes, one unit
      vector per output unit, which is the paper's row in PyTorch layout and
      a *column* of a Flax ``[in, out]`` kernel; ``"output"``: along the
      fan-out axes (see module doc).
    eps: norms are clamped below at ``eps`` (``x / max(‖x‖, eps)``), so zero
      slices stay zero.
    dims: how leaves are seen as matrices: ``None`` (default rule), a
      :class:`optax_lite.MatrixDims`, a tree of them (``None`` entries pass
      through unchanged) or a callable returning such a tree.

  Returns:
    A stateless ``optax.GradientTransformation`` (state ``optax.EmptyState``).

  Raises:
    ValueError: unknown ``axis`` or ``eps <= 0``.
  """
  _checks.check_choice('axis', axis, AXES)
  _checks.check_positive('eps', eps)

  def kernel(x):
    return (normalize_matrix(x, axis, eps),)

  def update_fn(updates, state, params=None):
    del params
    x_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
    leaves = [engine.Leaf(x, v, (), v is not None)
              for x, v in zip(x_leaves, views)]
    # O(m·n): leaf by leaf, as the parameters are laid out (see rmnp's
    # distribute).
    out = engine.step_leaves(_METHOD, kernel,
                             engine.placement_for(None, resident=False),
                             leaves, local=lambda leaf: (leaf.g,))
    return treedef.unflatten([u for u, *_ in out]), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
