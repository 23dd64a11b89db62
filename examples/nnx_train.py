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

import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import teacher_student  # examples/teacher_student.py: data, CLI


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


def train(tx: optax.GradientTransformation, steps: int, batch: int,
          seed: int = 0):
  """Trains a fresh student with ``tx``; returns (loss@0, loss@end, s)."""
  x, y = teacher_student.make_data(jax.random.PRNGKey(42), 4096, 16, 4)
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
  return teacher_student.main(train, __doc__.split('\n')[0], argv)


if __name__ == '__main__':
  main()
