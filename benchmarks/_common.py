"""Shared helpers of the benchmark scripts: registry, timing, progress, JSON.

Everything here uses only the public API of ``optax_lite`` (``import
optax_lite as ol``) and of optax. Optimizers that the installed library does
not export yet are skipped at runtime with a printed note.
"""

from __future__ import annotations

import datetime
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
                 'soap_lite', 'rmnp_lite', 'fismo_lite')
# optax_lite's transforms (timed on single leaves by step_time.py).
OL_TRANSFORMS = ('orthogonalize', 'row_normalize', 'fisher_whiten',
                 'kron_precondition', 'lite_flat_boost')

ADAMW_KW = dict(b1=0.9, b2=0.95, eps=1e-8)


def _accepted(fn, kwargs):
  """The subset of ``kwargs`` that ``fn``'s signature accepts."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return dict(kwargs)
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return dict(kwargs)
  return {k: v for k, v in kwargs.items() if k in params}


def optax_adamw(learning_rate, weight_decay=0.1, **_):
  return optax.adamw(learning_rate, weight_decay=weight_decay, **ADAMW_KW)


def optax_contrib_muon(learning_rate, weight_decay=0.1, **_):
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


def _ol_factory(name):
  fn = getattr(ol, name)

  def factory(learning_rate, **overrides):
    return fn(learning_rate, **_accepted(fn, overrides))

  factory.__name__ = f'ol.{name}'
  return factory


def registry(names=None, *, verbose=True) -> dict[str, Callable[..., Any]]:
  """``{name: factory(learning_rate, **overrides)}`` for the available names.

  ``names=None`` means all: ``adamw`` (optax.adamw), ``optax_muon``
  (optax.contrib.muon) and every optax_lite optimizer in
  :data:`OL_OPTIMIZERS`. Names the library does not export are skipped with a
  printed note. Overrides a factory does not accept (e.g. ``weight_decay``)
  are dropped.
  """
  all_names = ('adamw', 'optax_muon') + OL_OPTIMIZERS
  names = all_names if names is None else tuple(names)
  out = {}
  for name in names:
    if name == 'adamw':
      out[name] = optax_adamw
    elif name == 'optax_muon':
      out[name] = optax_contrib_muon
    elif hasattr(ol, name):
      out[name] = _ol_factory(name)
    elif verbose:
      print(f'[note] optax_lite.{name} is not exported yet: skipped.')
  return out


def skipped(names) -> list[str]:
  return [n for n in names
          if n not in ('adamw', 'optax_muon') and not hasattr(ol, n)]


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
  return {'median_s': statistics.median(times), 'mean_s': statistics.fmean(times),
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
      total += int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def tree_size(tree) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree)
             if hasattr(x, 'shape'))


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
