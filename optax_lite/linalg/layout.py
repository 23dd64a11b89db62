r"""An optimizer state that leaves a jitted update as it came in.

A pretraining step is compiled once and run for days with its state donated
(``jax.jit(step, donate_argnums=...)``). Without a constraint XLA picks the
layout of every output: a Kronecker factor that goes in replicated comes
out split like its parameter's side, the second call compiles again, the
state is re-laid out, and the donated input buffer no longer fits the
output. :func:`keep_layout` ties every new state leaf to the old leaf at the
same place (a Shardy *sharding group*: both get one sharding, and the old
one is fixed by the committed input), so that the state is a fixed point of
the update whatever its layout; :func:`layout_stable` applies it to an
``update`` function.

``jax.experimental.shard_alike`` does the same for one pair, but in
jax 0.10 its lowering is cached per shape, so every pair of the same shape
and dtype lands in one group (a replicated ``(8,)`` norm statistic and an
owner-split ``(8,)`` stack then get one sharding), and its group ids count
per process, so that equal programs differ. :data:`same_layout_p` is that
primitive with an uncached lowering and ids counted per module.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import jax
from jax.experimental.shard_alike import shard_alike
from jax.extend import core as jex_core
from jax.extend.mlir.dialects import sdy
from jax.interpreters import ad, batching, mlir

# Far above jax's own shard_alike ids (one counter per process from 0), so
# that the two never share a group in one module.
_FIRST_GROUP = 1 << 40
_COUNTER_KEY = 'optax_lite.layout.group_ids'

same_layout_p = jex_core.Primitive('optax_lite_same_layout')
same_layout_p.multiple_results = True
same_layout_p.def_impl(lambda x, y: (x, y))  # eager: nothing to place
same_layout_p.def_abstract_eval(lambda x, y: (x, y))


def _lowering(ctx, x, y):
  # Ids in lowering order, per module: the same program lowers the same.
  ids = ctx.module_context.cached_primitive_lowerings.setdefault(
      _COUNTER_KEY, itertools.count(_FIRST_GROUP))
  group = next(ids)
  sdy.sharding_group(x, group)
  sdy.sharding_group(y, group)
  return x, y


mlir.register_lowering(same_layout_p, _lowering, cacheable=False)


def _jvp(primals, tangents):
  return same_layout_p.bind(*primals), list(tangents)


ad.primitive_jvps[same_layout_p] = _jvp


def _batching(args, dims):
  if dims[0] == dims[1]:
    return same_layout_p.bind(*args), list(dims)
  return list(args), list(dims)  # mixed batching: leave the layout free


batching.primitive_batchers[same_layout_p] = _batching


def _same_layout(new, old):
  if not jax.config.jax_use_shardy_partitioner:
    return shard_alike(new, old)[0]  # GSPMD: jax's own (see module doc)
  return same_layout_p.bind(new, old)[0]


def keep_layout(new_state, state):
  """``new_state`` with every array sharded like the same leaf of ``state``.

  Inside ``jax.jit`` each traced leaf of ``new_state`` is put in one
  sharding group with the leaf of ``state`` at the same place (same
  shape): the sharding ``state`` came in with (``ol.sharded_init``'s, or
  whatever the caller committed) is also the output's. Outside a trace,
  with one device in all (nothing to place; the program stays as it was),
  or if the trees differ, ``new_state`` is returned as is.
  """
  if jax.device_count() == 1:
    return new_state
  new_leaves, treedef = jax.tree.flatten(new_state)
  old_leaves, old_treedef = jax.tree.flatten(state)
  if treedef != old_treedef:
    return new_state
  out = []
  for new, old in zip(new_leaves, old_leaves):
    if (isinstance(new, jax.core.Tracer)
        and jax.numpy.shape(new) == jax.numpy.shape(old)):
      new = _same_layout(new, old)
    out.append(new)
  return treedef.unflatten(out)


def layout_stable(update_fn: Callable) -> Callable:
  """``update_fn(updates, state, ...)`` whose new state :func:`keep_layout`."""

  @functools.wraps(update_fn)
  def update(updates, state, *args, **kwargs):
    new_updates, new_state = update_fn(updates, state, *args, **kwargs)
    return new_updates, keep_layout(new_state, state)
  return update
