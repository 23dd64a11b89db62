"""Optimizer state bytes per parameter, for each named optimizer.

Counts the bytes of ``tx.init(params)`` from ``jax.eval_shape`` (nothing is
allocated, so large shapes cost nothing) for ``mu_dtype=float32`` and
``mu_dtype=bfloat16`` (and, for the Kronecker optimizers, the factor dtype
``precond_dtype`` / ``factor_dtype`` set to the same dtype), on:

* ``matrix_1024x1024`` / ``matrix_1024x4096``: one hidden matrix (the matrix
  method only);
* ``transformer_block``: a GPT-like block at d=512 (q/k/v/o, MLP 4d, two
  norms) with a 8192×512 embedding and an untied 512×8192 head — the mix a
  user actually trains (embedding, head, norms, biases go to AdamW).

Writes ``benchmarks/results/state_bytes.json``:

  {"meta": {...},
   "models": {model: {"n_params": int, "shapes": {path: [dims]}}},
   "rows": [{"optimizer": str, "state_dtype": "float32"|"bfloat16",
             "model": str, "n_params": int, "state_bytes": int,
             "bytes_per_param": float}, ...],
   }

  python benchmarks/state_bytes.py
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import optax

import optax_lite as ol
from _common import RESULTS_DIR, metadata, write_json

NAMED = ['muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite', 'soap_lite',
         'rmnp_lite', 'fismo_lite']
FACTOR_DTYPE_ARGS = ('precond_dtype', 'factor_dtype')


def models() -> dict:
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  d, v = 512, 8192
  block = {
      'embed': {'embedding': f(v, d)},
      'block': {
          'ln1': {'scale': f(d)},
          'attn': {'q': {'kernel': f(d, d)}, 'k': {'kernel': f(d, d)},
                   'v': {'kernel': f(d, d)}, 'o': {'kernel': f(d, d)}},
          'ln2': {'scale': f(d)},
          'mlp': {'fc1': {'kernel': f(d, 4 * d), 'bias': f(4 * d)},
                  'fc2': {'kernel': f(4 * d, d), 'bias': f(d)}},
      },
      'ln_f': {'scale': f(d)},
      'head': {'kernel': f(d, v)},
  }
  return {
      'matrix_1024x1024': {'layer': {'kernel': f(1024, 1024)}},
      'matrix_1024x4096': {'layer': {'kernel': f(1024, 4096)}},
      'transformer_block': block,
  }


def make(name: str, dtype):
  if name == 'adamw':
    return optax.adamw(1e-3, mu_dtype=dtype)
  fn = getattr(ol, name)
  sig = inspect.signature(fn).parameters
  kw = {'mu_dtype': dtype}
  for k in FACTOR_DTYPE_ARGS:
    if k in sig:
      kw[k] = dtype
  return fn(learning_rate=1e-3, **kw)


def state_bytes(tx, params) -> int:
  shapes = jax.eval_shape(tx.init, params)
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(shapes))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default=os.path.join(RESULTS_DIR,
                                                'state_bytes.json'))
  args = ap.parse_args(argv)
  names = ['adamw'] + NAMED
  ms = models()
  out = {'meta': metadata(args), 'models': {}, 'rows': []}
  for mname, params in ms.items():
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    n = sum(math.prod(x.shape) for _, x in flat)
    out['models'][mname] = {
        'n_params': n,
        'shapes': {jax.tree_util.keystr(p): list(x.shape) for p, x in flat}}
  print(f'{"optimizer":<12} {"dtype":<9}' + ''.join(
      f'{m:>20}' for m in ms))
  for name in names:
    for dtype in (jnp.float32, jnp.bfloat16):
      line = f'{name:<12} {jnp.dtype(dtype).name:<9}'
      for mname, params in ms.items():
        b = state_bytes(make(name, dtype), params)
        n = out['models'][mname]['n_params']
        out['rows'].append({'optimizer': name,
                            'state_dtype': jnp.dtype(dtype).name,
                            'model': mname, 'n_params': n, 'state_bytes': b,
                            'bytes_per_param': b / n})
        line += f'{b / n:>20.2f}'
      print(line)
  write_json(args.out, out)
  return out


if __name__ == '__main__':
  main()
