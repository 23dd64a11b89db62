"""Full-batch SOAP on 8 host devices equals one device (issue 23, point 4).

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. In a
full-batch run SOAP's first step is zero, so the parameters do not move and
the next gradient equals the first: the rotated gradient is then diagonal
and its off-diagonal entries are round-off, which Adam's ratio would turn
into ±1 steps if the round-off guard missed them; those steps differ with
the arithmetic (0.146 between 8 devices and one on a 128 × 32 leaf whose
largest update entry was 0.138, before the guard worked in amplitude units
and per coordinate). Here the gradient is the same for the first three
calls and then varies, with ``precondition_frequency=2`` so that the QR
refresh (and the ``eigh`` re-derivation of the null columns of the
128 × 32 leaf's 128 × 128 left basis) runs within the compared steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lite as ol
from conftest import host_mesh

pytestmark = pytest.mark.multidevice

SHAPES = {'tall': (128, 32), 'square': (64, 64), 'wide': (32, 96),
          'bias': (32,)}
N_FIXED = 3      # calls with the same (full-batch) gradient
N_STEPS = 6      # then varying gradients


def _put(tree, mesh):
  """FSDP: axis 0 over the 8 devices where divisible, else replicated."""
  def spec(x):
    if x.ndim >= 2 and x.shape[0] % 8 == 0:
      return NamedSharding(mesh, P('fsdp'))
    return NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)


def _tree(rng, scale=1.0):
  return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)
          for k, s in SHAPES.items()}


@pytest.mark.parametrize('name', ['soap', 'soap_lite'])
def test_full_batch_soap_equals_one_device(name):
  """Per step and per leaf, ``max|u₈ − u₁| <= 1e-5 · max|u₁|`` (relative to
  the step's largest entry: stricter than ``1e-5`` of the step's Frobenius
  norm, which is ``>= max|u₁|``), with ``max|u₁| > 0`` after the first
  call (the statistics-only step, zero on both)."""
  mesh = host_mesh()
  rng = np.random.default_rng(23)
  params = _tree(rng, 0.05)
  full_batch = _tree(rng)
  make = getattr(ol, name)
  tx1 = make(1e-2, precondition_frequency=2)
  tx8 = make(1e-2, precondition_frequency=2, distribute=mesh)
  s1 = tx1.init(params)
  p8 = _put(params, mesh)
  s8 = ol.sharded_init(tx8.init, p8)
  step1, step8 = jax.jit(tx1.update), jax.jit(tx8.update)
  p1 = params
  for t in range(N_STEPS):
    g = full_batch if t < N_FIXED else _tree(rng)
    u1, s1 = step1(g, s1, p1)
    u8, s8 = step8(_put(g, mesh), s8, p8)
    for k in SHAPES:
      a = np.asarray(u1[k], np.float64)
      b = np.asarray(u8[k], np.float64)
      top = np.abs(a).max()
      if t == 0 and k != 'bias':
        assert top == 0 and np.abs(b).max() == 0, (t, k)
        continue
      assert top > 0, (t, k)
      err = np.abs(b - a).max() / top
      assert err <= 1e-5, f'call {t + 1}, {k}: {err:.3g} of max|u1|'
    p1 = optax.apply_updates(p1, u1)
    p8 = optax.apply_updates(p8, u8)
