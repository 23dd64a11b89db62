"""The task that ``nnx_train.py`` and ``linen_train.py`` share.

A random two-layer teacher network labels Gaussian inputs (synthetic,
nothing downloaded); each example's ``train`` fits a student to it with one
optimizer, and :func:`main` runs it for every optimizer asked for and
prints a table. The examples differ only in ``train``: the Flax pattern.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import optax_lite as ol

NAMED = ['muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite', 'soap_lite',
         'rmnp_lite', 'fismo_lite']
# Learning rates that work for this task; the RMS-matched ones share AdamW's.
LR = {'rmnp': 0.005, 'rmnp_lite': 0.005}


def make_data(key, n, d_in, d_out):
  k1, k2, k3 = jax.random.split(key, 3)
  w1 = jax.random.normal(k1, (d_in, 64)) / jnp.sqrt(d_in)
  w2 = jax.random.normal(k2, (64, d_out)) / 8.0
  x = jax.random.normal(k3, (n, d_in))
  return x, jnp.tanh(x @ w1) @ w2


def make_optimizer(name: str, learning_rate: float, total_steps: int):
  """``optax_lite.<name>`` with settings for this task (``adamw``: baseline)."""
  if name == 'adamw':
    return optax.adamw(3e-3)
  kw = {}
  if name in ('soap', 'shampoo', 'soap_lite'):
    kw['precondition_frequency'] = 5
  if name.endswith('_lite'):
    kw['total_steps'] = total_steps
  return getattr(ol, name)(learning_rate=learning_rate, **kw)


def main(train, description: str, argv=None):
  """Runs ``train(tx, steps, batch) -> (loss@0, loss@end, seconds)`` for
  each optimizer named on the command line; prints and returns the table."""
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument('--optimizers', nargs='+', default=NAMED + ['adamw'])
  ap.add_argument('--steps', type=int, default=100)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--lr', type=float, default=0.02)
  args = ap.parse_args(argv)
  print(f'{"optimizer":<12} {"loss@0":>9} {"loss@end":>9} {"seconds":>8}')
  results = {}
  for name in args.optimizers:
    tx = make_optimizer(name, LR.get(name, args.lr), args.steps)
    out = train(tx, args.steps, args.batch)
    results[name] = out
    print(f'{name:<12} {out[0]:9.4f} {out[1]:9.4f} {out[2]:8.1f}')
  bad = [n for n, (a, b, _) in results.items() if not b == b or b >= a]
  if bad and args.steps >= 20:
    raise SystemExit(f'loss did not decrease for: {bad}')
  return results
