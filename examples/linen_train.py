"""Train a small Flax Linen model with every named optax_lite optimizer.

Same teacher–student task as ``nnx_train.py``, written the Linen way: a
``flax.training.train_state.TrainState`` holds params and the optax_lite
optimizer state; ``state.apply_gradients`` runs the optimizer. A small CNN
front end shows that conv kernels ``[kh, kw, in, out]`` go to the matrix
method as ``(kh·kw·in, out)`` matrices.

    python examples/linen_train.py                      # all optimizers
    python examples/linen_train.py --optimizers muon_lite --steps 200
    python examples/linen_train.py --steps 5            # smoke test

The pattern::

    tx = optax_lite.soap(learning_rate=3e-3)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    grads = jax.grad(loss_fn)(state.params, x, y)
    state = state.apply_gradients(grads=grads)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import optax_lite as ol

NAMED = ['muon', 'rmnp', 'fismo', 'soap', 'shampoo', 'muon_lite', 'soap_lite',
         'rmnp_lite', 'fismo_lite']
LR = {'rmnp': 0.005, 'rmnp_lite': 0.005}


class Student(nn.Module):
  hidden: int = 64
  d_out: int = 4

  @nn.compact
  def __call__(self, x):  # x: (batch, 4, 4, 1) "images"
    h = nn.Conv(8, (3, 3), name='conv')(x)
    h = jax.nn.gelu(h).reshape(x.shape[0], -1)
    h = jax.nn.gelu(nn.LayerNorm(name='norm')(nn.Dense(self.hidden,
                                                       name='fc1')(h)))
    h = h + jax.nn.gelu(nn.Dense(self.hidden, name='fc2')(h))
    return nn.Dense(self.d_out, name='head')(h)


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
  x = x.reshape(-1, 4, 4, 1)
  model = Student()
  params = model.init(jax.random.PRNGKey(seed), x[:1])['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)

  def loss_fn(p, xb, yb):
    return jnp.mean(jnp.square(model.apply({'params': p}, xb) - yb))

  @jax.jit
  def step(state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, xb, yb)
    return state.apply_gradients(grads=grads), loss

  evaluate = jax.jit(lambda p: loss_fn(p, x[-1024:], y[-1024:]))
  start = float(evaluate(state.params))
  t0 = time.perf_counter()
  key = jax.random.PRNGKey(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    idx = jax.random.randint(sub, (batch,), 0, 3072)
    state, _ = step(state, x[idx], y[idx])
  final = float(evaluate(state.params))
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
