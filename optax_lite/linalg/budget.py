r"""The memory budget of the matrix kernels: working sets and chunking.

Batching every same-shape matrix into one kernel call (one call per shape,
:func:`optax_lite.linalg.grouped.grouped_map`) keeps the compiled program
flat in depth, but makes every matrix's temporaries (a Newton–Schulz
iteration's ``s × l`` iterates and ``s × s`` Gram products, an ``eigh``
workspace) live at once. A *budget* bounds one call's working set: a group
of ``N`` items whose item needs ``w`` bytes runs in calls of
``max(1, budget // w)`` items, one after another —

* a ``lax.map`` over the chunks of one stacked array (a scanned
  ``[layers, m, n]`` leaf, or a device's share under owner-computes): one
  compiled kernel however many chunks;
* calls over packs of separate leaves, each pack's gradient made to wait
  for the previous pack's outputs (:func:`wait_for`): stacking the whole
  group first would itself cost the group's bytes.

The order is a data dependence, not an ``optimization_barrier``: XLA:CPU
removes barriers before it schedules, and its default
(concurrency-optimised) scheduler then ran every pack side by side, so a
barrier-chained update kept every pack's temporaries live at once
(measured: 8 chained 256² SOAP-like kernels, 1.5× their parameter bytes
with barriers, 0.25× with :func:`wait_for`; with barriers the optimised
HLO had no barrier left).

The transforms take the budget as a fraction of the bytes of the updates
(``memory_budget="auto"`` is :data:`DEFAULT_MEMORY_BUDGET`) and pass bytes
here. Pure JAX, jit-safe.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Item = tuple  # a tuple of arrays sharing their leading (batch) axis


def _concat(parts):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _split(tree, sizes):
  """Splits every leaf of ``tree`` along axis 0 into pieces of ``sizes``."""
  if len(sizes) == 1:
    return [tree]
  offsets = np.cumsum([0] + list(sizes))
  return [jax.tree.map(lambda y, a=a, b=b: y[a:b], tree)
          for a, b in zip(offsets[:-1], offsets[1:])]


def matrix_bytes(shapes: Sequence[tuple[int, ...]],
                 dtypes: Sequence[Any]) -> int:
  """Default working set of one item's kernel, in bytes.

  Every input and output once, plus a Newton–Schulz iteration's
  temporaries on the first input ``s × l`` (``s ≤ l``): three ``s × l``
  iterates and two ``s × s`` Gram products, in the first input's dtype
  (at least four bytes: products accumulate in float32).
  """
  total = sum(math.prod(s) * jnp.dtype(d).itemsize
              for s, d in zip(shapes, dtypes))
  shape = shapes[0]
  if len(shape) < 2:
    return int(2 * total)
  m, n = shape[-2:]
  s, l = min(m, n), max(m, n)
  size = max(4, jnp.dtype(dtypes[0]).itemsize)
  batch = max(1, math.prod(shape[:-2]))
  return int(2 * total + batch * size * (3 * s * l + 2 * s * s))


def check_memory_budget(memory_budget, name: str = 'memory_budget'
                        ) -> float | None:
  """The budget as a fraction (``None``: unbounded).

  Accepts ``"auto"`` (:data:`DEFAULT_MEMORY_BUDGET`), ``None`` or
  ``"unbounded"`` (each shape group in one call) or a static number
  ``>= 0`` (``0``: one matrix at a time). A string default keeps it out of
  ``optax.inject_hyperparams``' traced numbers.
  """
  if memory_budget is None or memory_budget == 'unbounded':
    return None
  if isinstance(memory_budget, str):
    if memory_budget == 'auto':
      return DEFAULT_MEMORY_BUDGET
    raise ValueError(f'{name} must be "auto", "unbounded", None or a '
                     f'number >= 0, got {memory_budget!r}.')
  if isinstance(memory_budget, jax.core.Tracer):
    raise TypeError(f'{name} is static (it decides the compiled program); '
                    'pass it in static_args of optax.inject_hyperparams.')
  if isinstance(memory_budget, bool) or not isinstance(
      memory_budget, (int, float, np.integer, np.floating)):
    raise TypeError(f'{name} must be "auto", "unbounded", None or a number '
                    f'>= 0, got {type(memory_budget).__name__}.')
  if not (memory_budget >= 0 and math.isfinite(memory_budget)):
    raise ValueError(f'{name} must be a finite number >= 0, got '
                     f'{memory_budget!r}.')
  return float(memory_budget)


# ``memory_budget="auto"`` of the transforms and optimizers: one kernel
# call's working set, as a fraction of the bytes of the updates.
DEFAULT_MEMORY_BUDGET = 0.1


def budget_bytes(memory_budget: float | None, tree) -> float | None:
  """``memory_budget`` (a fraction of ``tree``'s bytes) in bytes."""
  if memory_budget is None:
    return None
  total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(tree))
  return memory_budget * total


def chunk_size(budget: float | None, per_item: float, n_items: int) -> int:
  """Items per kernel call: ``max(1, budget // per_item)``, capped at
  ``n_items`` (``budget=None``: all of them in one call)."""
  if budget is None or per_item <= 0:
    return n_items
  return int(max(1, min(n_items, budget // per_item)))


def _chunked(call, key, stack: Item, chunk: int):
  """``call(key, *stack)`` in ``ceil(N / chunk)`` calls one after another.

  The calls run in one ``lax.map`` over equal chunks (so the kernel is
  compiled once and one chunk's temporaries are live at a time); the chunk
  is evened out to ``ceil(N / calls)`` items and the last chunk is padded
  with copies of the last item (fewer than ``calls`` pad rows, dropped
  after; copies rather than zeros so that no kernel sees a degenerate
  input).
  """
  n = stack[0].shape[0]
  if chunk >= n:
    return call(key, *stack)
  calls = -(-n // chunk)
  chunk = -(-n // calls)
  pad = calls * chunk - n

  def fold(x):
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
    return x.reshape((calls, chunk) + x.shape[1:])

  ys = jax.lax.map(lambda xs: call(key, *xs), tuple(fold(x) for x in stack))
  return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], ys)


def _floating(x) -> bool:
  return bool(getattr(x, 'size', 0)) and jnp.issubdtype(x.dtype, jnp.floating)


def _exact_minus_zero(prev):
  """``-0.0`` (float32) computed from an element of every floating array
  of ``prev``, or ``None`` if it has none. Each term is ``-(|s|·0)`` with
  ``s`` replaced by 0 where it is not finite, so the sum is exactly ``-0``
  whatever ``prev`` holds (no NaN or inf can leak through), but XLA cannot
  know that before run time."""
  terms = []
  for x in jax.tree.leaves(prev):
    if _floating(x):
      # One element by index, not reshape(-1)[0]: under GSPMD a flattening
      # reshape of a sharded array could move the whole array.
      s = jnp.abs(x[(0,) * x.ndim].astype(jnp.float32))
      terms.append(-(jnp.where(jnp.isfinite(s), s, 0.0) * 0.0))
  if not terms:
    return None
  return functools.reduce(jnp.add, terms)


def wait_for(args: tuple, prev, every: bool = False) -> tuple:
  """``args`` with its first floating array (``every``: each of them) made
  to depend on ``prev``.

  The array gains ``-0.0`` computed from every output of ``prev`` (see
  :func:`_exact_minus_zero`): ``x + (-0) == x`` bit for bit for every
  ``x`` (signed zeros included), and everything computed from that array
  (a matrix kernel's whole work derives from its gradient) runs after all
  of ``prev``, so XLA can give both calls' temporaries the same memory.
  Costs one elementwise pass over that array (``every``: over each).
  """
  zero = None if prev is None else _exact_minus_zero(prev)
  if zero is None:
    return tuple(args)
  args = list(args)
  for i, x in enumerate(args):
    if _floating(x):
      args[i] = x + zero.astype(x.dtype)
      if not every:
        break
  return tuple(args)


def _budgeted(call, key, items: Sequence[Item], chunk: int,
              prev=None) -> list:
  """One group's results, at most ``chunk`` items per kernel call.

  A leaf with more than ``chunk`` items (a stacked ``[layers, ...]`` leaf)
  runs through :func:`_chunked` on its own array: one compiled kernel
  whatever the depth, and no copy of the group into one stack. Smaller
  leaves are packed, in order, into calls of at most ``chunk`` items; each
  call's gradient waits for the previous call's outputs (and the first
  for ``prev``, the previous group's; :func:`wait_for`), so the calls run
  one after another and their temporaries can share memory (a stack of the
  whole group would itself be as large as the group).
  """
  out: list[Any] = [None] * len(items)
  packs, cur, n = [], [], 0
  for i, it in enumerate(items):
    b = it[0].shape[0]
    if b > chunk:
      out[i] = _chunked(call, key, wait_for(it, prev), chunk)
      prev = out[i]
      continue
    if n + b > chunk and cur:
      packs.append(cur)
      cur, n = [], 0
    cur.append(i)
    n += b
  if cur:
    packs.append(cur)
  for pack in packs:
    xs = tuple(_concat([items[i][j] for i in pack])
               for j in range(len(items[pack[0]])))
    prev = call(key, *wait_for(xs, prev))
    for i, piece in zip(pack, _split(prev, [items[i][0].shape[0]
                                            for i in pack])):
      out[i] = piece
  return out


def sequential_calls(calls: Sequence[tuple[Callable[..., Any], tuple]],
                     sizes: Sequence[float], memory_budget: float | None,
                     every: bool = False) -> list:
  """``[fn(*args) for fn, args in calls]``, in packs that fit a budget.

  The per-leaf counterpart of :func:`grouped_map`'s budget: consecutive
  calls are packed while their ``sizes`` (working sets, bytes) sum to at
  most ``memory_budget``; each pack's first floating argument (the
  gradient; ``every``: all of them, the state too) waits for the previous
  pack's results (:func:`wait_for`), so packs run one after another and
  their temporaries can share memory. ``every`` is for a kernel with work
  that reads only its state (SOAP's conditional copies of its kept bases),
  which XLA:CPU's default scheduler otherwise runs for every leaf at once
  (SOAP on 8 layers of d = 256, d_ff = 704: 19.4 → 6.4 d_ff² floats of
  temporaries); it costs a copy of one pack's state.
  Values are unchanged, bit for bit. ``memory_budget=None``: plain calls,
  scheduled as XLA likes.
  """
  out, prev, pack, used = [], None, [], 0.0
  for (fn, args), size in zip(calls, sizes):
    if memory_budget is not None and size > 0:
      if pack and used + size > memory_budget:
        prev, pack, used = tuple(pack), [], 0.0
      args = wait_for(args, prev, every=every)
      used += size
    res = fn(*args)
    if memory_budget is not None and size > 0:
      pack.append(res)
    out.append(res)
  return out
