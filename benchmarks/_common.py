"""Shared helpers of the benchmark scripts: registry, timing, progress, JSON.

Everything here uses only the public API of ``optax_lite`` (``import
optax_lite as ol``) and of optax.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lite as ol

try:  # tqdm is a bench/dev dependency; degrade to a plain iterator without it.
  from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
  _tqdm = None

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'results')

# ---------------------------------------------------------------------------
# Optimizer registry: name -> factory(learning_rate, **overrides).
# ---------------------------------------------------------------------------

# optax_lite's named optimizers (each takes ``learning_rate`` first and routes
# embeddings / head / norms / biases to AdamW by path labels).
OL_OPTIMIZERS = ('muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite',
                 'soap_lite', 'rmnp_lite', 'fismo_lite', 'normuon',
                 'normuon_lite', 'muonh')
# Named variants: (optimizer, fixed keyword arguments) raced under their own
# name, e.g. Muon with cautious weight decay beside plain Muon.
VARIANTS = {'muon_cautious': ('muon', {'cautious_weight_decay': True})}
# optax_lite's transforms (timed on single leaves by step_time.py).
OL_TRANSFORMS = ('orthogonalize', 'row_normalize', 'fisher_whiten',
                 'kron_precondition', 'lite_flat_boost')

ADAMW_KW = dict(b1=0.9, b2=0.95, eps=1e-8)


def _accepted(fn, kwargs, name=None):
  """``kwargs`` after checking that ``fn``'s signature accepts every key.

  An override the optimizer does not take (``root_evry`` for ``root_every``)
  raises ``TypeError`` naming it, instead of silently building a default
  optimizer while the results file records the override as applied.
  """
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return dict(kwargs)
  unknown = sorted(k for k in kwargs if k not in params)
  if unknown:
    raise TypeError(
        f'{name or fn.__name__}: unknown override(s) {unknown}; it accepts '
        f'{sorted(k for k in params if k != "learning_rate")}')
  return dict(kwargs)


def optax_adamw(learning_rate, weight_decay=0.1):
  return optax.adamw(learning_rate, weight_decay=weight_decay, **ADAMW_KW)


def optax_contrib_muon(learning_rate, weight_decay=0.1):
  """``optax.contrib.muon`` with Moonlight RMS scaling and ol's labels.

  ``consistent_rms=0.2`` makes its matrix update RMS match AdamW's (as in
  ``ol.muon``), so one learning rate serves both parts, and leaves that
  ``ol.label_params`` does not call "matrix" (embedding, head, norms) go to
  its AdamW, as in ``ol.muon``. Everything else is optax's default (5 steps of
  Keller Jordan's quintic, Nesterov 0.95).
  """

  def dim_nums(params):
    labels = ol.label_params(params)
    return jax.tree.map(
        lambda lab: optax.contrib.MuonDimensionNumbers(0, 1)
        if lab == 'matrix' else None, labels)

  return optax.contrib.muon(
      learning_rate, weight_decay=weight_decay, adam_weight_decay=weight_decay,
      adam_b2=ADAMW_KW['b2'], consistent_rms=0.2,
      muon_weight_dimension_numbers=dim_nums)


def _checked(fn, name):
  """``fn`` as a registry factory that rejects overrides it does not take."""

  def factory(learning_rate, **overrides):
    return fn(learning_rate, **_accepted(fn, overrides, name))

  factory.__name__ = name
  return factory


ALL_NAMES = ('adamw', 'optax_muon') + OL_OPTIMIZERS + tuple(VARIANTS)


def registry(names=None) -> dict[str, Callable[..., Any]]:
  """``{name: factory(learning_rate, **overrides)}``.

  ``names=None`` means all of :data:`ALL_NAMES`: ``adamw`` (optax.adamw),
  ``optax_muon`` (optax.contrib.muon) and every optax_lite optimizer in
  :data:`OL_OPTIMIZERS`. An unknown name raises ``ValueError``; an override
  a factory does not accept raises ``TypeError`` when the factory is called.
  """
  names = ALL_NAMES if names is None else tuple(names)
  unknown = [n for n in names if n not in ALL_NAMES]
  if unknown:
    raise ValueError(f'optimizers: unknown name(s) {unknown}; known: '
                     f'{list(ALL_NAMES)}')
  out = {}
  for name in names:
    if name == 'adamw':
      out[name] = _checked(optax_adamw, name)
    elif name == 'optax_muon':
      out[name] = _checked(optax_contrib_muon, name)
    elif name in VARIANTS:
      base, fixed = VARIANTS[name]
      out[name] = _checked(functools.partial(getattr(ol, base), **fixed), name)
    else:
      out[name] = _checked(getattr(ol, name), name)
  return out


# ---------------------------------------------------------------------------
# Device, timing, progress.
# ---------------------------------------------------------------------------


def device_kind() -> str:
  return jax.devices()[0].device_kind


def device_slug() -> str:
  """A file-name-safe device name: ``cpu``, ``nvidia_h100_80gb_hbm3``…"""
  return re.sub(r'[^a-z0-9]+', '_', device_kind().lower()).strip('_') or 'dev'


def block(tree):
  return jax.tree.map(
      lambda x: x.block_until_ready() if hasattr(x, 'block_until_ready')
      else x, tree)


def time_fn(fn, *args, warmup: int = 1, repeats: int = 5,
            max_seconds: float | None = None, min_repeats: int = 2,
            carry: bool = False) -> dict:
  """Median / mean / min wall time of ``fn(*args)`` after warm-up.

  ``carry=True``: ``fn`` returns the next ``args`` (a tuple), so consecutive
  calls run consecutive optimizer steps (refresh steps of SOAP-like methods
  then land in the mean). ``max_seconds`` stops early, after at least
  ``min_repeats`` timed calls.
  """
  args = tuple(args)
  for _ in range(warmup):
    out = block(fn(*args))
    if carry:
      args = tuple(out)
  times = []
  t_start = time.perf_counter()
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = block(fn(*args))
    times.append(time.perf_counter() - t0)
    if carry:
      args = tuple(out)
    if (max_seconds is not None and len(times) >= min_repeats and
        time.perf_counter() - t_start > max_seconds):
      break
  return {'median_s': statistics.median(times),
          'mean_s': statistics.fmean(times),
          'min_s': min(times), 'repeats': len(times)}


def progress(iterable=None, total=None, desc=None, disable=None):
  """A tqdm progress bar (plain iterator if tqdm is missing)."""
  if disable is None:
    disable = bool(os.environ.get('BENCH_NO_PROGRESS'))
  if _tqdm is None:
    return iterable if iterable is not None else range(total or 0)
  return _tqdm(iterable, total=total, desc=desc, disable=disable,
               dynamic_ncols=True, leave=False)


def tree_bytes(tree) -> int:
  """Bytes of all array leaves (works on ``jax.eval_shape`` output too)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      n = int(np.prod(x.shape, dtype=np.int64))
      total += n * np.dtype(x.dtype).itemsize
  return total


def tree_size(tree) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64))
             for x in jax.tree.leaves(tree) if hasattr(x, 'shape'))


def state_bytes_per_param(tx, params) -> float:
  """Optimizer-state bytes per parameter, from shapes only (no allocation)."""
  state = jax.eval_shape(tx.init, params)
  return tree_bytes(state) / max(tree_size(params), 1)


# ---------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------


def metadata(args=None) -> dict:
  dev = jax.devices()[0]
  return {
      'device_kind': device_kind(),
      'platform': dev.platform,
      'device_count': jax.device_count(),
      'jax': jax.__version__,
      'optax': optax.__version__,
      'optax_lite': getattr(ol, '__version__', '?'),
      'python': platform.python_version(),
      'host': platform.machine(),
      'cpu_count': os.cpu_count(),
      'argv': sys.argv,
      'args': vars(args) if args is not None and hasattr(args, '__dict__')
              else args,
      'utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
  }


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, jnp.ndarray)) and np.ndim(x) == 0:
    x = np.asarray(x).item()
  elif isinstance(x, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None if np.isnan(x) else ('inf' if x > 0 else '-inf')
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def write_json(path: str, data: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(_jsonable(data), f, indent=1, sort_keys=False)
    f.write('\n')
  print(f'wrote {path}')
  return path


def arg_parser(doc: str) -> argparse.ArgumentParser:
  """A benchmark's command line: its docstring ``doc`` as the help, laid
  out as written, and ``--quick`` (the small run the smoke test takes)."""
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--quick', action='store_true')
  return p


def result_path(stem: str, out_dir: str | None = None, ext: str = 'json',
                quick: bool = False) -> str:
  """``<out_dir>/<stem>[_quick]_<device>.<ext>``."""
  out_dir = out_dir or RESULTS_DIR
  tag = '_quick' if quick else ''
  return os.path.join(out_dir, f'{stem}{tag}_{device_slug()}.{ext}')


def setup_matplotlib():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str, dpi: int = 110) -> None:
  """Lays out ``fig``, writes it to ``path``, closes it and says so."""
  plt = setup_matplotlib()
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  print(f'wrote {path}')


def rand_like(key, tree, scale=1.0):
  """A tree shaped like ``tree`` of ``scale`` times standard normals."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


def time_step(tx, params, grads, timing):
  """Step time of ``tx`` (update + apply) with the state carried across calls.

  ``timing`` holds ``time_fn``'s keyword arguments. The result is
  ``time_fn``'s plus ``wall_incl_compile_s`` (wall time including the jit).
  """

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, g

  state = jax.jit(tx.init)(params)
  t0 = time.perf_counter()
  res = time_fn(step, params, state, grads, carry=True, **timing)
  res['wall_incl_compile_s'] = time.perf_counter() - t0
  return res


def compiled_train_step(tx, params, grads):
  """``(step, args)``: a jitted update + apply whose result is its next
  ``args`` (the state carried), compiled and run once."""

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, g

  state = jax.jit(tx.init)(params)
  return step, block(step(params, state, grads))


def interleaved_times(runs: dict, rounds: int, steps: int) -> dict:
  """Seconds per step of each ``label: (step, args)`` of ``runs``, one entry
  per round: every round runs ``steps`` steps of each in turn, so that the
  machine's load falls on all alike (``runs`` carries the states on)."""
  times = {label: [] for label in runs}
  for _ in range(rounds):
    for label, (step, args) in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        args = block(step(*args))
      times[label].append((time.perf_counter() - t0) / steps)
      runs[label] = (step, args)
  return times


def require_devices(n: int = 8) -> list:
  """``jax.devices()``, or a SystemExit saying how to get ``n`` CPU devices."""
  devices = jax.devices()
  if len(devices) < n:
    raise SystemExit(f'needs {n} devices, got {len(devices)}; set XLA_FLAGS='
                     f'--xla_force_host_platform_device_count={n} before JAX '
                     'starts.')
  return devices
