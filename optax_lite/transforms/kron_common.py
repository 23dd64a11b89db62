"""What SOAP and Shampoo share: Kronecker statistics, rotations, the
round-off guard, leaf views, and their transform on the matrix engine.

The math is in :mod:`optax_lite.transforms.kron_precondition` (the public
facade); :mod:`~optax_lite.transforms.soap` and
:mod:`~optax_lite.transforms.shampoo` hold each method.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import engine
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import resident as resident_lib
from optax_lite.linalg.matrices import MatrixView, matrix_view
from optax_lite.transforms import _tree


ACCUMULATIONS = ('ema', 'sum')
GRAFTS = ('adam', 'none')
_HIGHEST = jax.lax.Precision.HIGHEST




# --------------------------------------------------------------------------
# Pure matrix helpers (batched over the leading axis; public for SOAP-LITE).
# --------------------------------------------------------------------------
def has_side(q: jax.Array) -> bool:
  """False for an identity side, stored as a ``(B, 1)`` placeholder.

  The placeholder has one element per batch entry rather than zero because
  orbax-checkpoint refuses zero-size arrays; real factors are ``(B, n, n)``.
  """
  return not _tree.is_identity_placeholder(q, batch_ndim=1)


def _mm(a, b, precision):
  return matmul_lib.matmul(a, b, kernel='kron', precision=precision)


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def rotate(x: jax.Array, q_l: jax.Array, q_r: jax.Array, *,
           precision=_HIGHEST) -> jax.Array:
  """``Q_lᵀ x Q_r`` for ``x`` of shape ``(…, m, n)`` (placeholder: identity)."""
  if has_side(q_l):
    x = _mm(_t(q_l), x, precision)
  if has_side(q_r):
    x = _mm(x, q_r, precision)
  return x


def rotate_back(x: jax.Array, q_l: jax.Array, q_r: jax.Array, *,
                precision=_HIGHEST) -> jax.Array:
  """``Q_l x Q_rᵀ`` (inverse of :func:`rotate` for orthogonal bases)."""
  if has_side(q_l):
    x = _mm(q_l, x, precision)
  if has_side(q_r):
    x = _mm(x, _t(q_r), precision)
  return x


def update_factors(stats_l: jax.Array, stats_r: jax.Array, g: jax.Array,
                   beta: float, *, accumulation: str = 'ema',
                   precision=_HIGHEST) -> tuple[jax.Array, jax.Array]:
  """``L ← β L + (1−β) G Gᵀ``, ``R ← β R + (1−β) Gᵀ G`` (or sums).

  ``accumulation="sum"`` gives ``L + G Gᵀ``. Identity sides (placeholders)
  are returned unchanged. ``g`` is ``(…, m, n)`` in the factors' dtype.
  """
  def acc(s, gram):
    if accumulation == 'sum':
      return s + gram
    b = _decay(beta, s.dtype)
    return b * s + (1.0 - b) * gram

  if has_side(stats_l):
    stats_l = acc(stats_l, _mm(g, _t(g), precision))
  if has_side(stats_r):
    stats_r = acc(stats_r, _mm(_t(g), g, precision))
  return stats_l, stats_r


def _decay(beta, dtype) -> jax.Array:
  """A decay rate in the computing dtype, before ``1 − β`` is formed.

  ``1 − β`` of a Python float is exact in float64, and of the same rate
  injected by ``optax.inject_hyperparams`` (a float32 array) exact in
  float32 but for ``float32(β)``: 1.3e-5 apart for ``β = 0.999``. Rounding
  ``β`` first gives both the same (and weights ``β``, ``1 − β`` that sum
  to exactly 1).
  """
  return jnp.asarray(beta, dtype)


def _vector_view(shape) -> MatrixView:
  """A ``(1, 1, size)`` view: the leaf is kept element-wise (identity)."""
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  return MatrixView(tuple(range(len(shape))), (), 1, size, shape)


def _leaf_view(x, d) -> tuple[MatrixView, bool]:
  """``(view, is_matrix)`` of a leaf under resolved dims ``d``."""
  _checks.check_float_leaf('updates', x)
  if d is None or not x.size or (d is _tree._DEFAULT and x.ndim < 2):
    return _vector_view(x.shape), False  # (an empty matrix: element-wise)
  return matrix_view(x.shape, None if d is _tree._DEFAULT else d), True


def _sides(view: MatrixView, is_matrix: bool, max_precond_dim: int
           ) -> tuple[bool, bool]:
  if not is_matrix:
    return False, False
  return view.rows <= max_precond_dim, view.cols <= max_precond_dim


def _factor(batch: int, size: int, on: bool, dtype, eye: bool = False):
  if not on:
    return _tree.identity_placeholder(dtype, (batch,))  # see has_side
  if eye:
    return jnp.broadcast_to(jnp.eye(size, dtype=dtype), (batch, size, size))
  return jnp.zeros((batch, size, size), dtype)


def _energies(batch: int, size: int, on: bool, dtype):
  """Initial per-column energies (zeros; ``(B, 1)`` on identity sides)."""
  return jnp.zeros((batch, size if on else 1), dtype)


def _auto_exponent(exponent, n_sides: int):
  if exponent is None:
    return 1.0 / (2.0 * max(n_sides, 1))
  return exponent if isinstance(exponent, jax.core.Tracer) else float(exponent)


# --------------------------------------------------------------------------
# On the matrix engine (one device, owner-computes, owner-resident).
# --------------------------------------------------------------------------
def _resolve_init_dims(dims, params):
  """Resolved dims; params without leaves (every one masked) match any
  dims tree, and are their own."""
  if not jax.tree.leaves(params):
    return params
  return _tree.resolve_dims(dims, params)


class _KronSpec(NamedTuple):
  """What SOAP and Shampoo differ in, for :func:`_kron_transform`."""
  state_type: type
  method: engine.MatrixMethod
  init_leaf: Callable      # (x, d) -> the leaf's fields, in state order
  kernel_at: Callable      # count -> kernel(g, *active) -> (u, *new)
  max_precond_dim: Any


def _leaves(tree, resolved, fields, sides_of=None) -> list:
  """The engine's leaves of ``tree`` (updates or params): per leaf its
  view, its fields, and whether it is a matrix item (a preconditioned
  side, read from the state's factors or, with ``sides_of``, from the
  static sides)."""
  g_leaves, treedef = jax.tree.flatten(tree)
  d_leaves = treedef.flatten_up_to(resolved)
  f_leaves = [treedef.flatten_up_to(f) for f in fields]
  out = []
  for i, (g, d) in enumerate(zip(g_leaves, d_leaves)):
    fs = tuple(f[i] for f in f_leaves)
    view, is_matrix = _leaf_view(g, d)
    item = (any(sides_of(view, is_matrix)) if sides_of is not None
            else has_side(fs[2]) or has_side(fs[3]))
    out.append(engine.Leaf(g, view, fs, item))
  return out


def _kron_transform(spec_of: _KronSpec, dims, spec, memory_budget,
                    stack_by_shape: bool = False
                    ) -> optax.GradientTransformation:
  """SOAP's or Shampoo's transform: one step per leaf through the engine.

  Over several devices (``spec``) every matrix's state lives on its owner
  (``state.owned``, made by ``init``); a state made without ``distribute``
  still steps there, its state then travelling each step. On one device
  ``stack_by_shape`` stacks same-shape matrices into one kernel call.
  """
  kind = spec_of.state_type
  n_fields = len(kind._fields) - 2  # without count and owned
  resident = spec is not None and spec.num_shards() > 1
  method = spec_of.method
  shaped = {method.active[k] for k in method.leaf_shaped}
  params_like = [j in shaped for j in range(n_fields)]

  def static_sides(view, is_matrix):
    require_static('the owner of each matrix depends on it',
                   max_precond_dim=spec_of.max_precond_dim)
    return _sides(view, is_matrix, spec_of.max_precond_dim)

  def init_fn(params):
    require_static(max_precond_dim=spec_of.max_precond_dim)
    if _tree.is_params_placeholder(params):
      # Only the momenta are like the parameters; a leaf (not a subtree)
      # lets tree_map_params's non-params rule take OwnerStacks.
      return kind(jnp.zeros([], jnp.int32),
                  *_tree.placeholder_fields(params, params_like),
                  _tree.not_params() if resident else None)
    resolved = _resolve_init_dims(dims, params)
    out = jax.tree.map(spec_of.init_leaf, params, resolved)
    fields = _tree.unzip(out, n_fields, params)
    if not resident:
      return kind(jnp.zeros([], jnp.int32), *fields)
    leaves = _leaves(params, resolved, fields, static_sides)
    per_leaf, owned = engine.own_leaves(
        spec_of.method, engine.placement_for(spec, resident=True), leaves,
        resident_lib.leaf_paths(params),
        lambda x: _tree.identity_placeholder(x.dtype))
    treedef = jax.tree.structure(params)
    fields = [treedef.unflatten([t[j] for t in per_leaf])
              for j in range(n_fields)]
    return kind(jnp.zeros([], jnp.int32), *fields, owned)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    resolved = _tree.resolve_dims(dims, updates)
    fields = tuple(state[1:1 + n_fields])
    owned = isinstance(state.owned, grouped_lib.OwnerStacks)
    placement = engine.placement_for(
        spec, resident=owned, stacked=stack_by_shape,
        memory_budget=grouped_lib.budget_bytes(memory_budget, updates))
    leaves = _leaves(updates, resolved, fields,
                     static_sides if owned else None)
    out = engine.step_leaves(spec_of.method, spec_of.kernel_at(count),
                             placement, leaves,
                             state.owned if owned else None)
    out, owned_out = out if owned else (out, state.owned)
    treedef = jax.tree.structure(updates)
    new_updates, *fields = [treedef.unflatten([t[j] for t in out])
                            for j in range(1 + n_fields)]
    return new_updates, kind(count, *fields, owned_out)

  return optax.GradientTransformation(
      init_fn, distributed_lib.layout_stable(update_fn))


def _kron_flops(m, n, left, right, k, root) -> float:
  """Per step: statistic and products ``4·m²n`` per preconditioned side,
  plus ``root·m³`` every ``k`` steps (QR / eigh / inverse root)."""
  return float(left * (4 * m * m * n + root * m ** 3 / k)
               + right * (4 * m * n * n + root * n ** 3 / k) + m * n)


def _kron_bytes(*arrays) -> float:
  """Working set of one leaf's step: every array (gradient, moments,
  factors, bases) read and written once, plus an ``eigh`` / QR workspace of
  four copies of each square factor."""
  total = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
              for a in arrays)
  square = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in arrays if a.ndim >= 2 and a.shape[-1] == a.shape[-2])
  return float(2 * total + 4 * square)


def _resident_cost(precondition_frequency, max_precond_dim, root):
  """Cost of an owner-resident item, whose only moving array is its
  gradient ``(B, m, n)``: the sides are those ``<= max_precond_dim``."""
  k = _frequency(precondition_frequency)

  def cost(shapes):
    m, n = shapes[0][-2:]
    return _kron_flops(m, n, m <= max_precond_dim, n <= max_precond_dim, k,
                       root)
  return cost


def _frequency(precondition_frequency) -> float:
  """``k`` for the cost model (a traced ``k``: the default 10)."""
  if isinstance(precondition_frequency, int):
    return float(precondition_frequency)
  return 10.0


def _sides_of(shapes, first_factor: int) -> tuple[int, int, bool, bool]:
  m, n = shapes[0][-2:]
  return (m, n, len(shapes[first_factor]) == 2,
          len(shapes[first_factor + 1]) == 2)


def _soap_cost(precondition_frequency):
  """Flops of one SOAP item per step, up to a constant.

  Per step and preconditioned side: the statistic ``G Gᵀ`` and three
  rotations (``G``, ``M̂``, back), ``4·m²n``; every ``k`` steps a QR power
  step (``L Q`` and the QR, ``≈ 4·m³``).
  """
  k = _frequency(precondition_frequency)

  def cost(shapes):
    m, n, left, right = _sides_of(shapes, 3)
    return _kron_flops(m, n, left, right, k, 4)
  return cost


def _shampoo_cost(precondition_frequency, first_factor: int):
  """Flops of one Shampoo item per step, up to a constant.

  Per preconditioned side: the statistic and the product with the root,
  ``4·m²n``; every ``k`` steps an inverse root (``eigh`` or Newton,
  ``≈ 10·m³``). The item's factors start at ``first_factor`` (after the
  gradient, ``M`` and, with grafting, ``V``).
  """
  k = _frequency(precondition_frequency)

  def cost(shapes):
    m, n, left, right = _sides_of(shapes, first_factor)
    return _kron_flops(m, n, left, right, k, 10)
  return cost


# --------------------------------------------------------------------------
# Transforms.
# --------------------------------------------------------------------------
require_static = _checks.require_static


def placement_and_dtypes(distribute, memory_budget, precond_dtype, mu_dtype):
  """SOAP's and Shampoo's ``distribute``, ``memory_budget`` and dtypes,
  checked (each error names its argument); ``mu_dtype=None`` is
  ``precond_dtype``."""
  spec = distributed_lib.check_distribute(distribute)
  memory_budget = grouped_lib.check_memory_budget(memory_budget)
  precond_dtype = _checks.dtype_argument('precond_dtype', precond_dtype)
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  return (spec, memory_budget, precond_dtype,
          precond_dtype if mu_dtype is None else mu_dtype)


def check_stack_by_shape(stack_by_shape) -> bool:
  """``stack_by_shape`` must be a Python bool (it decides the program)."""
  if not isinstance(stack_by_shape, bool):
    raise TypeError('stack_by_shape must be a bool (static), got '
                    f'{type(stack_by_shape).__name__}.')
  return stack_by_shape


def check_soap_args(b1, b2, shampoo_beta, eps, precondition_frequency,
                    max_precond_dim):
  """Validates SOAP's shared hyperparameters (named errors).

  Floats may be traced (``optax.inject_hyperparams``); returns
  ``(precondition_frequency, max_precond_dim)`` as ints, or as the traced
  values themselves (``max_precond_dim`` must then be static when the state
  is created, see :func:`require_static`).
  """
  _checks.check_decay('b1', b1)
  _checks.check_decay('b2', b2)
  _checks.check_decay('shampoo_beta', shampoo_beta)
  _checks.check_positive('eps', eps)
  return (_checks.int_hyperparameter('precondition_frequency',
                                     precondition_frequency, 1),
          _checks.int_hyperparameter('max_precond_dim', max_precond_dim, 0))
