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

Per head (``flax_matrix_dims(params, per_head=True)``): the head axis is a
batch axis, so each head's ``d × head_dim`` slice (``head_dim × d`` for the
output kernel) gets its own polar factor / preconditioner, as dion's
``num_heads`` / ``split_sizes`` do; fused QKV kernels are cut into heads
with ``MatrixDims(..., split=(axis, head_dim))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

Axes = Union[int, Sequence[int]]


class MatrixDims(NamedTuple):
  """Reduction (fan-in, rows) and output (fan-out, columns) axes of a leaf.

  Axes not named in either field are batch axes: each slice is a matrix of
  its own. Per-head attention kernels: ``MatrixDims(0, 2)`` on a
  ``[d, heads, head_dim]`` query/key/value kernel makes ``heads`` a batch
  axis (one ``d × head_dim`` matrix per head); ``MatrixDims(1, 2)`` on the
  ``[heads, head_dim, d]`` output kernel, one ``head_dim × d`` per head.

  ``split=(axis, size)`` first cuts the leaf's ``axis`` (one of the
  reduction or output axes) into consecutive blocks of ``size``, and the
  block index becomes a batch axis: ``MatrixDims(0, 1, split=(1, 64))`` on a
  fused ``[d, (h_q + 2·h_kv)·64]`` QKV kernel is one ``d × 64`` matrix per
  head (dion's ``split_sizes`` / per-head orthogonalisation, in Flax's
  ``[in, out]`` layout).
  """
  reduction_axis: Axes = 0
  output_axis: Axes = 1
  split: tuple[int, int] | None = None


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
  split = None if dims.split is None else (shift(dims.split[0]),
                                           dims.split[1])
  return MatrixDims(shift(dims.reduction_axis), shift(dims.output_axis),
                    split)


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
              output_names: Sequence[str] = ATTENTION_OUTPUT_NAMES,
              per_head: bool = False) -> MatrixDims | None:
  """The :class:`MatrixDims` a leaf's path implies, or None (no opinion).

  A rank-3 leaf with a path component in ``input_names`` (Flax attention's
  ``[d, heads, head_dim]`` query/key/value kernels) -> ``MatrixDims(0, (1,
  2))``; with a component in ``output_names`` (the ``[heads, head_dim, d]``
  output kernel) -> ``MatrixDims((0, 1), 2)``. ``per_head``: the head axis
  is a batch axis instead, ``MatrixDims(0, 2)`` (``d × head_dim`` per head)
  and ``MatrixDims(1, 2)`` (``head_dim × d`` per head). Names compare
  case-insensitively.
  """
  if len(shape) != 3:
    return None
  comps = {str(c).lower() for c in names}
  if comps & set(input_names):
    return MatrixDims(0, 2) if per_head else MatrixDims(0, (1, 2))
  if comps & set(output_names):
    return MatrixDims(1, 2) if per_head else MatrixDims((0, 1), 2)
  return None


class MatrixView(NamedTuple):
  """Static description of how a leaf maps to ``(batch, rows, cols)``.

  ``split_shape``/``leaf_shape``: where :class:`MatrixDims` has a
  ``split``, the leaf is reshaped to ``split_shape`` before ``perm`` (and
  back to ``leaf_shape`` after); ``None`` otherwise.
  """
  perm: tuple[int, ...]
  batch_shape: tuple[int, ...]
  rows: int
  cols: int
  permuted_shape: tuple[int, ...]
  split_shape: tuple[int, ...] | None = None
  leaf_shape: tuple[int, ...] | None = None

  @property
  def matrix_shape(self) -> tuple[int, int, int]:
    return (math.prod(self.batch_shape), self.rows, self.cols)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """Leaf -> ``(batch, rows, cols)``."""
    if self.split_shape is not None:
      x = x.reshape(self.split_shape)
    return jnp.transpose(x, self.perm).reshape(self.matrix_shape)

  def from_matrix(self, x: jax.Array) -> jax.Array:
    """``(batch, rows, cols)`` -> leaf (inverse of :meth:`to_matrix`)."""
    inv = [0] * len(self.perm)
    for i, p in enumerate(self.perm):
      inv[p] = i
    out = jnp.transpose(x.reshape(self.permuted_shape), inv)
    return out if self.leaf_shape is None else out.reshape(self.leaf_shape)


def _split_axes(shape, dims: MatrixDims):
  """``(split_shape, dims)`` with ``dims.split``'s axis cut in two.

  The block index takes the split axis's place (a batch axis), the
  within-block axis follows it and keeps the split axis's role.
  """
  ndim = len(shape)
  if (not isinstance(dims.split, tuple) or len(dims.split) != 2 or
      not all(isinstance(v, int) and not isinstance(v, bool)
              for v in dims.split)):
    raise ValueError(f'dims: split must be None or (axis, size) ints, got '
                     f'{dims.split!r}.')
  (axis,) = _as_tuple(dims.split[0], ndim)
  size = dims.split[1]
  if size < 1 or shape[axis] % size:
    raise ValueError(
        f'dims: split size {size} does not divide axis {axis} of a leaf '
        f'of shape {tuple(shape)}.')
  red = _as_tuple(dims.reduction_axis, ndim)
  out = _as_tuple(dims.output_axis, ndim)
  if axis not in red + out:
    raise ValueError(f'dims: split axis {axis} of {dims} must be one of its '
                     'reduction or output axes.')
  new = lambda a: a + 1 if a >= axis else a  # noqa: E731
  split_shape = shape[:axis] + (shape[axis] // size, size) + shape[axis + 1:]
  return split_shape, MatrixDims(tuple(new(a) for a in red),
                                 tuple(new(a) for a in out))


def matrix_view(shape: Sequence[int], dims: MatrixDims | None = None
                ) -> MatrixView:
  """Builds the :class:`MatrixView` of a leaf of ``shape`` under ``dims``."""
  shape = tuple(int(s) for s in shape)
  if dims is None:
    dims = default_dims(shape)
  if not isinstance(dims, MatrixDims):
    raise TypeError(f'dims must be a MatrixDims, got {type(dims).__name__}.')
  if len(shape) < 2:
    raise ValueError(
        f'dims: a leaf of shape {shape} has rank {len(shape)}, but {dims} '
        'needs a leaf of rank >= 2.')
  if dims.split is not None:
    split_shape, inner = _split_axes(shape, dims)
    view = matrix_view(split_shape, inner)
    return view._replace(split_shape=split_shape, leaf_shape=shape)
  ndim = len(shape)
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
