r"""Where per-matrix work runs: the placement spec (a leaf module).

A :class:`PolarSharding` (a mesh and some of its axes) names the devices
over which whole matrices are spread ("owner-computes"); every transform
and named optimizer with super-linear per-matrix work accepts one as
``distribute=`` (also a bare ``Mesh`` or ``(mesh, axes)``). It lives here,
below both :mod:`optax_lite.linalg.grouped` (which places the work) and
:mod:`optax_lite.linalg.distributed` (state shardings), so that neither
imports the other's users.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from jax.sharding import Mesh


LAYOUTS = ('sharded', 'replicated')


class PolarSharding(NamedTuple):
  """Where to spread per-matrix work: a mesh, some of its axes, a layout.

  Attributes:
    mesh: a ``jax.sharding.Mesh``.
    axes: mesh axis name(s) over which whole matrices are spread;
      ``None`` (default) uses all axes of the mesh, i.e. every device gets a
      share. Devices along axes not named here repeat their share.
    layout: how the parameters (and so the gradients) are laid out:
      ``"sharded"`` (default; FSDP / tensor parallel: the inputs reach their
      owner by one all-to-all, ``≈ |W| / D`` bytes per device) or
      ``"replicated"`` (data parallel: each device slices its own inputs,
      no input collective). Either is correct for any layout; the other
      one moves more bytes (``"sharded"`` on replicated parameters makes
      XLA shard the preceding elementwise work and gather it back).
  """
  mesh: Mesh
  axes: str | tuple[str, ...] | None = None
  layout: str = 'sharded'

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
    if len(spec) not in (2, 3) or not isinstance(spec[0], Mesh):
      raise TypeError(f'{name} must be a PolarSharding, a Mesh or a '
                      f'(mesh, axes[, layout]) tuple, got {spec!r}.')
    spec = PolarSharding(*spec)
  if not isinstance(spec, PolarSharding):
    # A Mesh is callable, so optax.inject_hyperparams takes it for a
    # schedule and passes a function on.
    hint = (f" (optax.inject_hyperparams turns a Mesh into a schedule: pass "
            f"static_args=('{name}',) to it)" if callable(spec) else '')
    raise TypeError(f'{name} must be a PolarSharding, a Mesh or a '
                    f'(mesh, axes) pair, got {type(spec).__name__}{hint}.')
  if spec.layout not in LAYOUTS:
    raise ValueError(f'{name}: layout must be one of {LAYOUTS}, got '
                     f'{spec.layout!r}.')
  for a in spec.axis_names():
    if a not in spec.mesh.axis_names:
      raise ValueError(f'{name}: axis {a!r} is not an axis of the mesh '
                       f'{tuple(spec.mesh.axis_names)}.')
  return spec


def check_distribute(distribute: Any, shard_polar: Any = None
                     ) -> PolarSharding | None:
  """``distribute=`` with its alias ``shard_polar=`` (at most one given)."""
  if distribute is not None and shard_polar is not None:
    raise ValueError('distribute: pass either distribute= or its alias '
                     'shard_polar=, not both.')
  if shard_polar is not None:
    return check_polar_sharding(shard_polar, 'shard_polar')
  return check_polar_sharding(distribute, 'distribute')
