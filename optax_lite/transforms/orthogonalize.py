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

from optax_lite import _checks
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.linalg import engine
from optax_lite.linalg import grouped as grouped_lib
from optax_lite.linalg import matmul as matmul_lib
from optax_lite.linalg import polar as polar_lib
from optax_lite.transforms import _tree


def polar_kernel(method, steps, eps, precision, ns_dtype=None):
  """The batched polar factor ``(B, m, n) -> (B, m, n)`` of a method."""
  def fn(x):
    return polar_lib.polar_by_method(x, method, steps, eps=eps,
                                     precision=precision, ns_dtype=ns_dtype)
  return fn


# Stateless; tall matrices run as their transpose, so that m × n and n × m
# leaves share a kernel.
_METHOD = engine.MatrixMethod(names=(), active=(), leaf_shaped=(),
                              transpose_tall=True)


def _update(updates, dims, fn, spec, memory_budget=None):
  """``orthogonalize``'s update on the matrix engine: same-shape matrices
  in one batched kernel (on one device, or spread over ``spec``)."""
  x_leaves, treedef, views = _tree.matrix_views(updates, dims, 'updates')
  leaves = [engine.Leaf(x, v, (), v is not None)
            for x, v in zip(x_leaves, views)]
  placement = engine.placement_for(
      spec, resident=False, stacked=True,
      memory_budget=grouped_lib.budget_bytes(memory_budget, updates))
  out = engine.step_leaves(_METHOD, lambda x: (fn(x),), placement, leaves,
                           local=lambda leaf: (leaf.g,))
  return treedef.unflatten([u for u, *_ in out])


def orthogonalize(method: str = 'polar_express', steps: int | None = None,
                  dims: _tree.DimsSpec = None, *, eps: float = polar_lib.EPS,
                  precision=None, distribute=None, ns_dtype=None,
                  shard_polar=None,
                  memory_budget: float | str | None = 'auto'
                  ) -> optax.GradientTransformation:
  """Maps each matrix leaf ``G`` to ``≈ polar(G) = U Vᵀ``.

  Args:
    method: ``"polar_express"`` (default, 6 steps),
      ``"gram_polar_express"`` (6; the same polynomial by Gram
      Newton–Schulz, fewer flops on rectangular matrices), ``"jordan"`` (5),
      ``"cubic"`` (12) or ``"svd"`` (exact); see
      :func:`optax_lite.polar_factor`.
    steps: iteration count (static), ``None`` for the method's default.
    dims: how leaves are seen as matrices: ``None`` (default rule), a
      :class:`MatrixDims`, a tree of them (``None`` entries pass through
      unchanged) or a callable returning such a tree.
    eps: Frobenius-norm regulariser; zero leaves map to zero.
    precision: ``jax.lax.Precision`` for the matrix products (``None``:
      the ``"polar"`` policy of :mod:`optax_lite.linalg.matmul`).
    distribute: ``None`` (default: one device; same-shape matrices are
      still stacked into one batched kernel, so the compiled program grows
      with the number of distinct shapes, not with depth) or a
      :class:`optax_lite.PolarSharding` / ``Mesh`` / ``(mesh, axes)``:
      owner-computes — each device orthogonalises whole matrices assigned
      to it by cost, inputs and results move in one all-gather each, none
      inside the iteration (:mod:`optax_lite.linalg.grouped`). Same math,
      up to round-off.
    ns_dtype: ``None`` or e.g. ``jnp.bfloat16``: the Newton–Schulz iterates
      in that dtype with float32 accumulation (see
      :func:`optax_lite.linalg.polar.newton_schulz`); the output keeps the
      leaf's dtype.
    shard_polar: the former name of ``distribute`` (an alias).
    memory_budget: the working set of one batched kernel call, as a
      fraction of the bytes of the updates (the parameter bytes): each
      shape group runs in chunks of ``max(1, budget // per-matrix working
      set)`` matrices, one chunk after another (a ``lax.map``, so the
      kernel is compiled once). ``0`` runs one matrix at a time; ``None``
      runs each group in one call (fastest, temporaries grow with the
      number of same-shape matrices). With ``distribute`` over several
      devices it does not apply: each device runs its share in one call.

  Returns:
    A stateless ``optax.GradientTransformation`` (state ``optax.EmptyState``).

  Raises:
    ValueError: unknown method, ``steps < 1``, or a leaf of rank < 2 under
      the default dims.
  """
  steps = polar_lib.check_method(method, steps)
  spec = distributed_lib.check_distribute(distribute, shard_polar)
  precision = matmul_lib.check_precision('precision', precision)
  ns_dtype = polar_lib.check_ns_dtype(ns_dtype)
  _checks.check_positive('eps', eps)
  fn = polar_kernel(method, steps, eps, precision, ns_dtype)
  memory_budget = grouped_lib.check_memory_budget(memory_budget)

  def update_fn(updates, state, params=None):
    del params
    return _update(updates, dims, fn, spec, memory_budget), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
