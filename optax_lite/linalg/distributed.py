r"""Where matrix work runs across devices, and sharded optimizer state.

Under plain data parallelism every device holds every parameter and so
computes *every* polar factor (or eigendecomposition, inverse root) of a
matrix optimizer's step redundantly: with ``D`` devices, ``D − 1`` of them
repeat work. Under FSDP-style sharding each matrix is split across devices
and every Newton–Schulz matmul needs collectives.

A :class:`PolarSharding` (a mesh and some of its axes) names the devices
over which whole matrices are spread instead ("owner-computes"); every
transform and named optimizer with super-linear per-matrix work accepts one
as ``distribute=`` (also a bare ``Mesh`` or ``(mesh, axes)``). The work is
done by :func:`optax_lite.linalg.grouped.grouped_map`: matrices grouped by
shape, assigned to devices by cost, moved in and out with one all-gather per
shape group, no communication inside an iteration. :func:`sharded_polar` is
the polar-factor special case.

:func:`state_shardings` / :func:`sharded_init` give an optimizer state the
sharding of its parameters (leaves shaped like a parameter and found under
that parameter's path) and replicate the rest (counts, Kronecker factors,
scalars), so that ``tx.init`` can be jitted with explicit ``out_shardings``.
:func:`~optax_lite.linalg.layout.keep_layout` (``layout_stable`` on an
``update``) returns every new state leaf with the sharding its old leaf came
in with, so that the state is a fixed point of a jitted update: one
compile, no re-layout, its donated buffers reused.

Everything here is pure JAX (no optax) and jit-safe.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Re-exported: the transforms make their update a fixed point with these.
from optax_lite.linalg.layout import keep_layout  # noqa: F401
from optax_lite.linalg.layout import layout_stable  # noqa: F401
from optax_lite.linalg import grouped
# The placement spec lives in a leaf module; re-exported here.
from optax_lite.linalg.placement import LAYOUTS  # noqa: F401
from optax_lite.linalg.placement import PolarSharding  # noqa: F401
from optax_lite.linalg.placement import check_distribute  # noqa: F401
from optax_lite.linalg.placement import check_polar_sharding


def sharded_polar(mats: Sequence[jax.Array],
                  polar_fn: Callable[[jax.Array], jax.Array],
                  spec: PolarSharding | None, *,
                  memory_budget: float | None = None,
                  item_bytes=None) -> list[jax.Array]:
  """Applies ``polar_fn`` to every ``(batch, m, n)`` array, spread over devices.

  Args:
    mats: arrays of shape ``(batch, m, n)`` (any batch, any ``m, n``).
    polar_fn: a batched polar factor ``(B, s, l) -> (B, s, l)`` for wide
      inputs (``s ≤ l``), e.g. ``lambda x: newton_schulz(x, coeffs)``.
    spec: the :class:`PolarSharding` (``None``: one device, grouped only).
    memory_budget: bytes for one kernel call's working set (``None``:
      each shape group in one call); see
      :func:`optax_lite.linalg.grouped.grouped_map`.
    item_bytes: ``item_bytes(shapes, dtypes)``, one item's working set
      (default :func:`optax_lite.linalg.grouped.matrix_bytes`).

  Returns:
    A list of arrays shaped like ``mats``, each slice ``polar_fn`` of the
    corresponding input slice (tall inputs are transposed to wide and back,
    so ``m × n`` and ``n × m`` matrices share a kernel).
  """
  spec = check_polar_sharding(spec)
  wide = [jnp.swapaxes(m, -1, -2) if m.shape[-2] > m.shape[-1] else m
          for m in mats]
  outs = grouped.grouped_map(polar_fn, [(w,) for w in wide], spec=spec,
                             memory_budget=memory_budget,
                             item_bytes=item_bytes)
  return [jnp.swapaxes(o, -1, -2) if m.shape[-2] > m.shape[-1] else o
          for m, o in zip(mats, outs)]


# ----------------------------------------------------------------------------
# Optimizer state sharding.


def _path_key(path) -> tuple:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(('k', str(k.key)))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(('k', k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(('i', k.idx))
    else:
      out.append(('k', str(getattr(k, 'key', k))))
  return tuple(out)


def _stacks_mesh(state_shapes) -> Mesh | None:
  """The mesh of the first owner-resident stacks in a state, if any."""
  for x in jax.tree.leaves(
      state_shapes, is_leaf=lambda y: isinstance(y, grouped.OwnerStacks)):
    if isinstance(x, grouped.OwnerStacks):
      return x.mesh
  return None


def _one_device(p_flat) -> jax.sharding.Sharding:
  """The device of parameters that are not on a mesh: that of the first
  committed array, else JAX's default device."""
  for _, leaf in p_flat:
    sh = getattr(leaf, 'sharding', None)
    if isinstance(sh, jax.sharding.SingleDeviceSharding):
      return sh
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def state_shardings(state_shapes, params, mesh: Mesh | None = None):
  """Shardings for an optimizer state: its parameters' where shapes match.

  A state leaf gets the sharding of parameter ``p`` when the state leaf's
  path ends with ``p``'s path and both have the same shape (momenta, Adam
  moments: the usual "state takes the sharding of its parameter"). The
  leaves of an owner-resident :class:`~optax_lite.linalg.grouped.OwnerStacks`
  (``distribute=``) are split along their first axis over its mesh axes,
  each device holding the state of the matrices it owns. Every other leaf
  (step counts, Kronecker factors ``m × m``, per-leaf scalars) is replicated
  over ``mesh``. The optimizers return every leaf with the sharding it came
  in with (:func:`keep_layout`), so these are also the shardings after any
  number of jitted updates.

  Each sharding is given by the name a jitted update returns it under, so
  that the state's shardings are one jit cache key: ``jax.jit`` names an
  output after its *first* input leaf when they are equivalent and of the
  same rank (here the first parameter, i.e. the first leaf of the
  gradients or parameters passed before the state), and with a canonical
  spec otherwise (:func:`canonical_spec`: ``P('fsdp', None)`` as
  ``P('fsdp')``, ``P(None)`` as ``P()``).

  Args:
    state_shapes: the state, or ``jax.eval_shape(tx.init, params)``.
    params: the parameters, as ``jax.Array`` values with shardings. On
      no mesh (one device, or host arrays such as NumPy values), every
      leaf gets the parameters' device (JAX's default device for host
      arrays), except that a state with owner-resident stacks takes their
      mesh.
    mesh: the mesh to replicate the other leaves on; default: the mesh of
      the first ``NamedSharding`` found in ``params``.

  Returns:
    A tree of ``jax.sharding.Sharding`` shaped like ``state_shapes``.
  """
  p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
  by_suffix = {}
  for path, leaf in p_flat:
    by_suffix[_path_key(path)] = leaf
  if mesh is None:
    for _, leaf in p_flat:
      sh = getattr(leaf, 'sharding', None)
      if isinstance(sh, NamedSharding):
        mesh = sh.mesh
        break
  if mesh is None:
    mesh = _stacks_mesh(state_shapes)
  if mesh is None:
    # Parameters on one device (committed there, or host arrays such as a
    # restored checkpoint's NumPy values): the whole state on that device.
    one = _one_device(p_flat)
    return jax.tree.map(lambda _: one, state_shapes)
  replicated = NamedSharding(mesh, P())
  suffixes = sorted(by_suffix, key=len, reverse=True)
  first = getattr(p_flat[0][1], 'sharding', None) if p_flat else None
  first_ndim = len(getattr(p_flat[0][1], 'shape', ())) if p_flat else -1
  if not isinstance(first, NamedSharding):
    first = None

  def as_jit_names_it(sh, ndim):
    if (first is not None and ndim == first_ndim
        and sh.is_equivalent_to(first, ndim)):
      return first
    return canonical_sharding(sh)

  def pick(path, leaf):
    key = _path_key(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for suf in suffixes:
      if len(suf) <= len(key) and key[len(key) - len(suf):] == suf:
        p = by_suffix[suf]
        if tuple(p.shape) == shape and isinstance(
            getattr(p, 'sharding', None), NamedSharding):
          return as_jit_names_it(p.sharding, len(shape))
    return as_jit_names_it(replicated, len(shape))

  def pick_node(path, x):
    # Owner-resident stacks (grouped.OwnerStacks) carry their own sharding.
    if isinstance(x, grouped.OwnerStacks):
      sh = x.sharding()
      return jax.tree.map(lambda a: as_jit_names_it(sh, len(a.shape)), x)
    return pick(path, x)

  return jax.tree_util.tree_map_with_path(
      pick_node, state_shapes,
      is_leaf=lambda x: isinstance(x, grouped.OwnerStacks))


def sharded_init(init_fn: Callable[[Any], Any], params,
                 mesh: Mesh | None = None):
  """``init_fn(params)`` jitted so that the state is sharded like ``params``.

  Example::

    state = sharded_init(tx.init, params)   # params: NamedSharding'd arrays
  """
  shapes = jax.eval_shape(init_fn, params)
  shardings = state_shardings(shapes, params, mesh)
  return jax.jit(init_fn, out_shardings=shardings)(params)


def canonical_spec(spec: P) -> P:
  """``spec`` without its trailing ``None`` entries.

  ``P('fsdp', None)`` and ``P('fsdp')`` place an array alike, but they are
  different jit cache keys; ``jax.jit`` names its outputs in the short form
  (unless it names one after its first input, see :func:`state_shardings`).
  """
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def canonical_sharding(sharding):
  """A ``NamedSharding`` with :func:`canonical_spec`; others as given."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(sharding.mesh, canonical_spec(sharding.spec),
                       memory_kind=sharding.memory_kind)
