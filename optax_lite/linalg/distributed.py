r"""Spreading polar-factor work over devices, and sharded optimizer state.

Under plain data parallelism every device holds every parameter and so
computes *every* polar factor of a Muon-type step redundantly: with ``D``
devices, ``D − 1`` of them repeat work. Under FSDP-style sharding each matrix
is split across devices and every Newton–Schulz matmul needs collectives.

:func:`sharded_polar` instead

1. groups the matrices by shape (``m × n`` and ``n × m`` go together: tall
   matrices are transposed to the wide orientation the iteration uses),
2. stacks each group along a new batch axis and pads it with zero matrices
   to a multiple of the number of devices ``D`` (a zero matrix has polar
   factor zero, so padding is harmless),
3. runs the iteration inside ``jax.shard_map`` with the stack axis sharded
   over the chosen mesh axes, so each device orthogonalises
   ``ceil(B / D)`` whole matrices with no communication during the
   iteration,
4. un-stacks the results. XLA then inserts the one collective (an
   all-gather, or an all-to-all for sharded parameters) that brings each
   result to the layout its consumer needs: the parameter's sharding, at
   ``optax.apply_updates`` (or ``out_shardings`` of the step).

Compute per device drops from ``Σ cost(Wᵢ)`` to ``≈ Σ cost(Wᵢ) / D`` at the
price of one gather of the updates (``Σ |Wᵢ|`` elements), which the step pays
in any case for sharded parameters. Use it with
``optax_lite.orthogonalize(..., shard_polar=PolarSharding(mesh))``.

:func:`state_shardings` / :func:`sharded_init` give an optimizer state the
sharding of its parameters (leaves shaped like a parameter and found under
that parameter's path) and replicate the rest (counts, Kronecker factors,
scalars), so that ``tx.init`` can be jitted with explicit ``out_shardings``.

Everything here is pure JAX (no optax) and jit-safe.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class PolarSharding(NamedTuple):
  """Where to spread polar-factor work: a mesh and some of its axis names.

  Attributes:
    mesh: a ``jax.sharding.Mesh``.
    axes: mesh axis name(s) over which the stacked matrices are split;
      ``None`` (default) uses all axes of the mesh, i.e. every device gets a
      share. Devices along axes not named here repeat their share.
  """
  mesh: Mesh
  axes: str | tuple[str, ...] | None = None

  def axis_names(self) -> tuple[str, ...]:
    if self.axes is None:
      return tuple(self.mesh.axis_names)
    return (self.axes,) if isinstance(self.axes, str) else tuple(self.axes)

  def num_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axis_names())


def check_polar_sharding(spec: Any, name: str = 'shard_polar'
                         ) -> PolarSharding | None:
  """Validates ``spec``: None, a PolarSharding, a Mesh or ``(mesh, axes)``."""
  if spec is None:
    return None
  if isinstance(spec, Mesh):
    spec = PolarSharding(spec)
  elif isinstance(spec, tuple) and not isinstance(spec, PolarSharding):
    if len(spec) != 2 or not isinstance(spec[0], Mesh):
      raise TypeError(f'{name} must be a PolarSharding, a Mesh or a '
                      f'(mesh, axes) pair, got {spec!r}.')
    spec = PolarSharding(*spec)
  if not isinstance(spec, PolarSharding):
    raise TypeError(f'{name} must be a PolarSharding, a Mesh or a '
                    f'(mesh, axes) pair, got {type(spec).__name__}.')
  for a in spec.axis_names():
    if a not in spec.mesh.axis_names:
      raise ValueError(f'{name}: axis {a!r} is not an axis of the mesh '
                       f'{tuple(spec.mesh.axis_names)}.')
  return spec


def group_by_shape(mats: Sequence[jax.Array]) -> dict[tuple, list[int]]:
  """Indices of ``(batch, m, n)`` matrices grouped by wide shape and dtype."""
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(mats):
    m, n = x.shape[-2:]
    key = (min(m, n), max(m, n), jnp.dtype(x.dtype).name)
    groups.setdefault(key, []).append(i)
  return groups


def sharded_polar(mats: Sequence[jax.Array],
                  polar_fn: Callable[[jax.Array], jax.Array],
                  spec: PolarSharding) -> list[jax.Array]:
  """Applies ``polar_fn`` to every ``(batch, m, n)`` array, spread over devices.

  Args:
    mats: arrays of shape ``(batch, m, n)`` (any batch, any ``m, n``).
    polar_fn: a batched polar factor ``(B, s, l) -> (B, s, l)`` for wide
      inputs (``s ≤ l``) that maps zero matrices to zero, e.g.
      ``lambda x: newton_schulz(x, coeffs)``.
    spec: the :class:`PolarSharding`.

  Returns:
    A list of arrays shaped like ``mats``, each slice ``polar_fn`` of the
    corresponding input slice.
  """
  spec = check_polar_sharding(spec)
  axes = spec.axis_names()
  shards = spec.num_shards()
  out: list[Any] = [None] * len(mats)
  stack_spec = P(axes if len(axes) > 1 else axes[0], None, None)
  mapped = jax.shard_map(polar_fn, mesh=spec.mesh, in_specs=(stack_spec,),
                         out_specs=stack_spec, check_vma=False)
  for (s, l, _), idx in group_by_shape(mats).items():
    parts, sizes = [], []
    for i in idx:
      x = mats[i]
      if x.shape[-2] > x.shape[-1]:
        x = jnp.swapaxes(x, -1, -2)
      parts.append(x)
      sizes.append(x.shape[0])
    total = sum(sizes)
    pad = (-total) % shards
    if pad:
      parts.append(jnp.zeros((pad, s, l), parts[0].dtype))
    stack = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    stack = jax.lax.with_sharding_constraint(
        stack, NamedSharding(spec.mesh, stack_spec))
    res = mapped(stack)
    offset = 0
    for i, size in zip(idx, sizes):
      r = res[offset:offset + size]
      offset += size
      if mats[i].shape[-2] > mats[i].shape[-1]:
        r = jnp.swapaxes(r, -1, -2)
      out[i] = r
  return out


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


def state_shardings(state_shapes, params, mesh: Mesh | None = None):
  """Shardings for an optimizer state: its parameters' where shapes match.

  A state leaf gets the sharding of parameter ``p`` when the state leaf's
  path ends with ``p``'s path and both have the same shape (momenta, Adam
  moments: the usual "state takes the sharding of its parameter"). Every
  other leaf (step counts, Kronecker factors ``m × m``, per-leaf scalars) is
  replicated over ``mesh``.

  Args:
    state_shapes: the state, or ``jax.eval_shape(tx.init, params)``.
    params: the parameters, as committed ``jax.Array``s with shardings.
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
    raise ValueError('mesh: no NamedSharding found in params; pass mesh=.')
  replicated = NamedSharding(mesh, P())
  suffixes = sorted(by_suffix, key=len, reverse=True)

  def pick(path, leaf):
    key = _path_key(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for suf in suffixes:
      if len(suf) <= len(key) and key[len(key) - len(suf):] == suf:
        p = by_suffix[suf]
        if tuple(p.shape) == shape and isinstance(
            getattr(p, 'sharding', None), NamedSharding):
          return p.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state_shapes)


def sharded_init(init_fn: Callable[[Any], Any], params,
                 mesh: Mesh | None = None):
  """``init_fn(params)`` jitted so that the state is sharded like ``params``.

  Example::

    state = sharded_init(tx.init, params)   # params: NamedSharding'd arrays
  """
  shapes = jax.eval_shape(init_fn, params)
  shardings = state_shardings(shapes, params, mesh)
  return jax.jit(init_fn, out_shardings=shardings)(params)
