r"""``OwnerInner``: an inner transform that can also run slice-wise on owners.

A wrapper such as :func:`optax_lite.transforms.fisher_whiten` conjugates an
inner transform, ``Δ = B(inner(A(G)))``, with per-matrix maps ``A``, ``B``
(whitening and the map back) whose state lives on the matrix's owner device
under ``distribute=`` (:mod:`optax_lite.linalg.grouped`). With a plain
``optax.GradientTransformation`` as the inner transform the whitened
gradient has to come back to its leaf for the inner step and go to the owner
again for the map back. When the inner step is itself a per-matrix,
slice-wise function (FISMO's momentum and polar factor), the whole chain
runs in one grouped call instead, and the inner state lives on the owner
next to the wrapper's:

.. math::
   (Y, s_{t}) = \mathrm{step}(A(G), s_{t-1}), \qquad Δ = B(Y),

so per matrix only ``G`` goes to the owner and ``Δ`` comes back.

An :class:`OwnerInner` bundles the plain transform (used on one device, for
leaves without a matrix view, and for states made without ``distribute``)
with that per-matrix form. Both must compute the same thing: ``step`` on a
stack of matrices equals ``transform.update`` on the same matrices as leaves
(up to round-off), with ``init``'s arrays in place of the transform's
per-leaf state.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import optax


class OwnerInner(NamedTuple):
  """An inner transform with a slice-wise per-matrix form.

  Attributes:
    transform: the plain ``optax.GradientTransformation`` (one device, the
      leaves without a matrix view, and states made without the owners).
    init: ``init(x) -> tuple of arrays``: the per-matrix state of a stack of
      matrices ``x`` of shape ``(B, rows, cols)`` (the parameters, in the
      wrapper's matrix view), each array with leading axis ``B``.
    step: ``step(x, *state) -> (y, new_state)``: the inner update of a stack
      ``(B, rows, cols)`` (in the compute dtype), ``y`` shaped like ``x`` and
      ``new_state`` a tuple like ``init``'s. Slice-wise: row ``i`` of the
      outputs depends only on row ``i`` of the inputs (batched ``jnp`` ops;
      traced hyperparameters may be closed over).
    cost: ``cost(rows, cols) -> float``: flops of one ``step`` on one
      ``rows × cols`` matrix, for the balance over devices (``None``: 0).
    bind: optional ``bind(transform_state) -> step``: the step at the
      transform's current state (the state before this update, e.g. its step
      count for schedules), when the step depends on it; ``step`` is then
      unused (``None``). The transform itself is still updated each step
      (on the leaves without a matrix view), which advances that state.
    locate: optional ``locate(j) -> (path, matrix_form)``: where ``init``'s
      array ``j`` lives in ``transform``'s one-device state: the path
      (field names and indices) to a tree shaped like the parameters, and
      whether the array is the leaf in matrix form (else the leaf's entry
      as it is). Without it the resident state cannot be moved to another
      placement (:func:`optax_lite.portable_state`).
  """
  transform: optax.GradientTransformation
  init: Callable
  step: Callable | None
  cost: Callable[[int, int], float] | None = None
  bind: Callable | None = None
  locate: Callable | None = None

  def step_for(self, transform_state) -> Callable:
    """The step to use with ``transform_state`` (``bind``'s or ``step``)."""
    return self.step if self.bind is None else self.bind(transform_state)


def plain_transform(inner) -> optax.GradientTransformation:
  """The plain transform of ``inner`` (an :class:`OwnerInner` or a
  ``GradientTransformation``; ``None``: ``optax.identity()``)."""
  if inner is None:
    return optax.identity()
  if isinstance(inner, OwnerInner):
    return inner.transform
  return inner
