"""How an N-D parameter is seen as a (batch of) matrices.

Every matrix method in optax_lite works on a stack of 2-D matrices
``(batch, fan_in, fan_out)``. :class:`MatrixDims` says which axes of a leaf
form the rows (the *reduction* or fan-in axes, contracted with the layer input
in ``y = x @ W``) and which form the columns (the *output* or fan-out axes).
All remaining axes are batch axes: each slice is a separate matrix.

Flax layout: a ``Dense`` / ``nnx.Linear`` kernel is ``[in, out]``, so rows are
inputs and columns are output units. PyTorch's ``(out, in)`` is the transpose.

Default rule (:func:`default_dims`):

* 2-D ``[in, out]``                 -> ``MatrixDims(0, 1)``.
* N-D (N > 2), e.g. a conv kernel ``[kh, kw, in, out]`` -> all leading axes
  are reduction axes, the last is the output axis: ``(kh*kw*in, out)``. This
  is the flattening Keller Jordan's Muon uses for convolutions, in Flax order.

Flax attention (:func:`path_dims`, applied wherever ``dims`` is ``None``): the
query/key/value kernels of ``nnx.MultiHeadAttention`` and Linen's
``MultiHeadDotProductAttention`` are ``[d, heads, head_dim]`` and are seen as
``(d, heads*head_dim)`` (``MatrixDims(0, (1, 2))``), one matrix per layer,
not ``(d*heads, head_dim)``; their output kernel ``[heads, head_dim, d]`` is
``(heads*head_dim, d)`` (``MatrixDims((0, 1), 2)``). They are recognised by
path: a rank-3 leaf under a component named ``query``, ``key``, ``value``
(resp. ``out``). :func:`optax_lite.flax_matrix_dims` spells the same rule out
as an explicit tree, and also knows the short names ``q``/``k``/``v``/``o``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

Axes = Union[int, Sequence[int]]


class MatrixDims(NamedTuple):
  """Reduction (fan-in, rows) and output (fan-out, columns) axes of a leaf.

  Axes not named in either field are batch axes.
  """
  reduction_axis: Axes = 0
  output_axis: Axes = 1


def _as_tuple(axes: Axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f'dims: axis {a} is out of range for a leaf of rank {ndim}.')
    out.append(a % ndim)
  return tuple(out)


def default_dims(shape: Sequence[int]) -> MatrixDims:
  """The default :class:`MatrixDims` for a leaf shape (see module doc)."""
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f'dims: a leaf of shape {tuple(shape)} has rank {ndim}; matrix '
        'transforms need rank >= 2. Route vectors and scalars to AdamW '
        '(the named optimizers do) or pass an explicit MatrixDims.')
  return MatrixDims(tuple(range(ndim - 1)), ndim - 1)


def shift_dims(dims: MatrixDims, k: int) -> MatrixDims:
  """``dims`` of a leaf seen behind ``k`` new leading (batch) axes."""
  def shift(axes):
    if isinstance(axes, int):
      return axes + k if axes >= 0 else axes
    return tuple(a + k if a >= 0 else a for a in axes)
  return MatrixDims(shift(dims.reduction_axis), shift(dims.output_axis))


# Path components that mark the kernels of Flax attention modules.
ATTENTION_INPUT_NAMES = ('query', 'key', 'value')
ATTENTION_OUTPUT_NAMES = ('out',)


def path_names(path) -> tuple[str, ...]:
  """The components of a ``jax.tree_util`` key path, as strings.

  A trailing ``value`` (the attribute that holds the array of a ``flax.nnx``
  Variable) is dropped, so NNX and Linen trees give the same names.
  """
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  if names and names[-1] == 'value':
    names = names[:-1]
  return tuple(names)


def path_dims(names: Sequence[str], shape: Sequence[int],
              input_names: Sequence[str] = ATTENTION_INPUT_NAMES,
              output_names: Sequence[str] = ATTENTION_OUTPUT_NAMES
              ) -> MatrixDims | None:
  """The :class:`MatrixDims` a leaf's path implies, or None (no opinion).

  A rank-3 leaf with a path component in ``input_names`` (Flax attention's
  ``[d, heads, head_dim]`` query/key/value kernels) -> ``MatrixDims(0, (1,
  2))``; with a component in ``output_names`` (the ``[heads, head_dim, d]``
  output kernel) -> ``MatrixDims((0, 1), 2)``. Names compare
  case-insensitively.
  """
  if len(shape) != 3:
    return None
  comps = {str(c).lower() for c in names}
  if comps & set(input_names):
    return MatrixDims(0, (1, 2))
  if comps & set(output_names):
    return MatrixDims((0, 1), 2)
  return None


class MatrixView(NamedTuple):
  """Static description of how a leaf maps to ``(batch, rows, cols)``."""
  perm: tuple[int, ...]
  batch_shape: tuple[int, ...]
  rows: int
  cols: int
  permuted_shape: tuple[int, ...]

  @property
  def matrix_shape(self) -> tuple[int, int, int]:
    return (math.prod(self.batch_shape), self.rows, self.cols)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """Leaf -> ``(batch, rows, cols)``."""
    return jnp.transpose(x, self.perm).reshape(self.matrix_shape)

  def from_matrix(self, x: jax.Array) -> jax.Array:
    """``(batch, rows, cols)`` -> leaf (inverse of :meth:`to_matrix`)."""
    inv = [0] * len(self.perm)
    for i, p in enumerate(self.perm):
      inv[p] = i
    return jnp.transpose(x.reshape(self.permuted_shape), inv)


def matrix_view(shape: Sequence[int], dims: MatrixDims | None = None
                ) -> MatrixView:
  """Builds the :class:`MatrixView` of a leaf of ``shape`` under ``dims``."""
  shape = tuple(int(s) for s in shape)
  ndim = len(shape)
  if dims is None:
    dims = default_dims(shape)
  if not isinstance(dims, MatrixDims):
    raise TypeError(f'dims must be a MatrixDims, got {type(dims).__name__}.')
  if ndim < 2:
    raise ValueError(
        f'dims: a leaf of shape {shape} has rank {ndim}, but {dims} needs a '
        'leaf of rank >= 2.')
  red = _as_tuple(dims.reduction_axis, ndim)
  out = _as_tuple(dims.output_axis, ndim)
  if not red or not out:
    raise ValueError(f'dims: {dims} must name at least one reduction and one '
                     'output axis.')
  if set(red) & set(out) or len(set(red)) != len(red) or len(set(out)) != len(
      out):
    raise ValueError(f'dims: reduction and output axes of {dims} overlap or '
                     'repeat.')
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  perm = batch + red + out
  rows = math.prod(shape[a] for a in red)
  cols = math.prod(shape[a] for a in out)
  return MatrixView(perm, tuple(shape[a] for a in batch), rows, cols,
                    tuple(shape[a] for a in perm))


def fan_in_out(shape: Sequence[int], dims: MatrixDims | None = None
               ) -> tuple[int, int]:
  """``(fan_in, fan_out)`` of a leaf: the sizes of its rows and columns."""
  v = matrix_view(shape, dims)
  return v.rows, v.cols
