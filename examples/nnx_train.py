"""Train a small Flax NNX model with every named optax_lite optimizer.

A teacher–student regression task (synthetic, nothing downloaded): a random
two-layer teacher network labels Gaussian inputs; an NNX student with an
embedding-free MLP (hidden matrices -> the matrix method, biases / norm /
output head -> AdamW, chosen by ``optax_lite.label_params``) learns it.

    python examples/nnx_train.py                       # all optimizers
    python examples/nnx_train.py --optimizers muon soap --steps 200
    python examples/nnx_train.py --steps 5             # smoke test

The pattern to copy into your own code is in ``train``::

    tx = optax_lite.muon(learning_rate=0.02)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ...
    grads = nnx.grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lite as ol

NAMED = ['muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite', 'soap_lite',
         'rmnp_lite', 'fismo_lite']
# Learning rates that work for this task; the RMS-matched ones share AdamW's.
LR = {'rmnp': 0.005, 'rmnp_lite': 0.005}


class Student(nnx.Module):

  def __init__(self, d_in: int, hidden: int, d_out: int, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(d_in, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, d_out, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.gelu(self.norm(self.fc1(x)))
    h = h + jax.nn.gelu(self.fc2(h))
    return self.head(h)


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


def train(tx: optax.GradientTransformation, steps: int, batch: int,
          seed: int = 0):
  """Trains a fresh student with ``tx``; returns (loss@0, loss@end, s)."""
  x, y = make_data(jax.random.PRNGKey(42), 4096, 16, 4)
  model = Student(16, 64, 4, nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(m, xb, yb):
    return jnp.mean(jnp.square(m(xb) - yb))

  @nnx.jit
  def step(m, opt, xb, yb):
    loss, grads = nnx.value_and_grad(loss_fn)(m, xb, yb)
    opt.update(m, grads)
    return loss

  @nnx.jit
  def evaluate(m):
    return loss_fn(m, x[-1024:], y[-1024:])

  start = float(evaluate(model))
  t0 = time.perf_counter()
  key = jax.random.PRNGKey(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    idx = jax.random.randint(sub, (batch,), 0, 3072)
    step(model, optimizer, x[idx], y[idx])
  final = float(evaluate(model))
  return start, final, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
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


if __name__ == '__main__':
  main()
