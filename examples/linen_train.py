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

import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import teacher_student  # examples/teacher_student.py: data, CLI


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


def train(tx: optax.GradientTransformation, steps: int, batch: int,
          seed: int = 0):
  """Trains a fresh student with ``tx``; returns (loss@0, loss@end, s)."""
  x, y = teacher_student.make_data(jax.random.PRNGKey(42), 4096, 16, 4)
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
  return teacher_student.main(train, __doc__.split('\n')[0], argv)


if __name__ == '__main__':
  main()
