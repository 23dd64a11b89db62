"""Tree plumbing shared by the transforms: per-leaf matrix dims and states."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_lite import _checks
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg.matrices import (MatrixDims, MatrixView, matrix_view,
                                        path_dims, path_names)

# ``dims`` accepted by every matrix transform:
#   None                  -> Flax attention kernels by path
#                            (``linalg.matrices.path_dims``), else the
#                            default rule of ``linalg.default_dims``;
#   MatrixDims            -> the same spec for every leaf;
#   a tree (or prefix)    -> per-leaf MatrixDims, ``None`` = leave untouched;
#   a callable(params)    -> returns such a tree.
DimsSpec = Any

_DEFAULT = object()


def _is_dims_leaf(x) -> bool:
  return x is None or isinstance(x, MatrixDims)


def resolve_dims(dims: DimsSpec, tree) -> Any:
  """A tree shaped like ``tree`` whose leaves are MatrixDims, None or _DEFAULT.

  Subtrees of ``tree`` without leaves (``optax.MaskedNode``) stay empty.
  """
  if callable(dims) and not isinstance(dims, MatrixDims):
    dims = dims(tree)
  if dims is None:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: path_dims(path_names(p), getattr(x, 'shape', ()))
        or _DEFAULT, tree)
  if isinstance(dims, MatrixDims):
    return jax.tree.map(lambda _: dims, tree)
  return jax.tree.map(
      lambda d, sub: jax.tree.map(lambda _: d, sub, is_leaf=lambda z: False),
      dims, tree, is_leaf=_is_dims_leaf)


def leaf_view(x, d, name: str) -> MatrixView | None:
  """The MatrixView of leaf ``x`` under resolved dims ``d`` (None: skip)."""
  _checks.check_float_leaf(name, x)
  if d is None or not x.size:
    # An empty matrix has no direction to orthogonalise or precondition
    # (and its shape would divide by zero): it steps as a non-matrix leaf.
    return None
  return matrix_view(x.shape, None if d is _DEFAULT else d)


def matrix_views(tree, dims: DimsSpec, name: str):
  """Flattened leaves, treedef and MatrixView (or None) of every leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  resolved = treedef.flatten_up_to(resolve_dims(dims, tree))
  views = [leaf_view(x, d, name) for x, d in zip(leaves, resolved)]
  return leaves, treedef, views


def map_leaves(fn: Callable, tree, *rest, dims: DimsSpec = _DEFAULT,
               name: str = 'updates'):
  """``fn(view, leaf, *rest_leaves)`` over every leaf of ``tree``.

  ``view`` is the leaf's :class:`MatrixView` (``None`` where its dims are
  ``None``). With ``dims=_DEFAULT`` no view is computed and ``view`` is None.
  """
  if dims is _DEFAULT:
    return jax.tree.map(lambda x, *r: fn(None, x, *r), tree, *rest)
  resolved = resolve_dims(dims, tree)
  return jax.tree.map(lambda x, d, *r: fn(leaf_view(x, d, name), x, *r),
                      tree, resolved, *rest,
                      is_leaf=None)


def view_bytes(view, x, *rest) -> float:
  """Default working set of one matrix leaf's step: its matrix and every
  array next to it, as :func:`optax_lite.linalg.grouped.matrix_bytes`."""
  arrays = [a for a in (x,) + rest if hasattr(a, 'shape')]
  shapes = [view.matrix_shape] + [tuple(a.shape) for a in arrays[1:]]
  return grouped_lib.matrix_bytes(shapes, [a.dtype for a in arrays])


def unzip(tree, n: int, like):
  """Splits a tree whose leaves (at ``like``'s leaf positions) are n-tuples."""
  treedef = jax.tree.structure(like)
  leaves = treedef.flatten_up_to(tree)
  return tuple(treedef.unflatten([leaf[i] for leaf in leaves])
               for i in range(n))


def identity_placeholder(dtype, batch_shape: tuple[int, ...] = ()
                         ) -> jax.Array:
  """State leaf standing for an identity (not stored) Kronecker side.

  Shape ``batch_shape + (1,)``: ``(1,)`` for one matrix (``fisher_whiten``),
  ``(B, 1)`` for a batch of ``B`` (``kron_precondition``). A stored factor
  has shape ``batch_shape + (d, d)``, one more dimension, which is how
  :func:`is_identity_placeholder` tells them apart. One element, not zero:
  orbax-checkpoint refuses zero-size arrays.
  """
  return jax.numpy.zeros(tuple(batch_shape) + (1,), dtype)


def is_identity_placeholder(x, batch_ndim: int = 0) -> bool:
  """True for a leaf made by :func:`identity_placeholder` (static: by rank)."""
  return x.ndim == batch_ndim + 1


def get_at(node, path):
  """The subtree of ``node`` at ``path`` (NamedTuple field names, dict keys
  and sequence indices)."""
  for k in path:
    node = getattr(node, k) if isinstance(k, str) and hasattr(
        node, '_fields') else node[k]
  return node


def set_at(node, path, value):
  """``node`` with the subtree at ``path`` (as :func:`get_at`) replaced by
  ``value``."""
  if not path:
    return value
  k, rest = path[0], path[1:]
  if isinstance(k, str) and hasattr(node, '_fields'):
    return node._replace(**{k: set_at(getattr(node, k), rest, value)})
  if isinstance(node, dict):
    return {**node, k: set_at(node[k], rest, value)}
  items = list(node)
  items[k] = set_at(items[k], rest, value)
  return type(node)(*items) if hasattr(node, '_fields') else type(node)(
      items)


# ``optax.tree_utils.tree_map_params`` (the optax way to derive a state's
# shardings from the parameters') calls ``init`` with a stand-in for the
# parameters and maps its function over the state's subtrees that come back
# as that stand-in. A per-leaf field that is not shaped like its parameter
# (a Kronecker factor, a per-matrix scalar, a stacked array) must then come
# back as something else: a leaf, which its non-params rule takes whole.
_PROBE_SHAPE = (5, 3)


def is_params_placeholder(tree) -> bool:
  """True for ``tree_map_params``'s stand-in parameters (a leafless node)."""
  return (type(tree).__name__ == '_ParamsPlaceholder'
          and not jax.tree.leaves(tree))


def not_params() -> jax.Array:
  """The leaf standing, at init on the stand-in, for a field of per-leaf
  entries not shaped like the parameter (see :func:`placeholder_fields`)."""
  return jnp.zeros((), jnp.int32)


def placeholder_fields(params, params_like):
  """The fields an init returns on ``tree_map_params``'s stand-in ``params``:
  ``params`` itself where ``params_like[i]`` (entries shaped like the
  parameter), else :func:`not_params`."""
  return tuple(params if like else not_params() for like in params_like)


def params_like_outputs(init_leaf: Callable) -> tuple[bool, ...]:
  """Which outputs of a per-leaf ``init_leaf(view, param)`` are shaped like
  the parameter, read from its abstract trace on a probe matrix (static;
  nothing is computed)."""
  view = matrix_view(_PROBE_SHAPE, None)
  out = jax.eval_shape(lambda p: init_leaf(view, p),
                       jax.ShapeDtypeStruct(_PROBE_SHAPE, jnp.float32))
  out = tuple(out) if isinstance(out, tuple) else (out,)
  return tuple(getattr(x, 'shape', None) == _PROBE_SHAPE for x in out)
