"""Shared test helpers (small equivalents of optax's private test_utils)."""

import importlib.metadata
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# A persistent XLA compilation cache shared by the two xdist workers, the
# multi-device run and later runs: most of this suite's CPU time is compiling
# optimizer steps, often the same ones in different test files. Set
# OPTAX_LITE_JAX_CACHE=0 to compile everything afresh; JAX's own
# JAX_COMPILATION_CACHE_DIR chooses another folder.
if os.environ.get('OPTAX_LITE_JAX_CACHE', '1') != '0':
  os.environ.setdefault(
      'JAX_COMPILATION_CACHE_DIR',
      os.path.join(tempfile.gettempdir(), 'optax_lite_jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

# OPTAX_LITE_FAST_COMPILE=1 (``./run test`` and ``test-quick`` set it) has
# XLA:CPU compile without LLVM's optimisations and with its classic
# elemental emitters instead of the MLIR fusion emitters: an optimizer step
# compiles 3-6 times faster (SOAP's: 4.0 s of CPU down to 0.7 s) and runs a
# little slower, which is the right trade for a suite of small, short tests
# that spends most of its time compiling. The programs compute the same
# functions; only float round-off may differ from the default compiler's,
# so the tests marked ``default_compiler`` (those of
# tests/test_behaviour_fixture.py, which compare bytes with a recording made
# by the default compiler, and a few round-off-sized bounds) run with it
# unset (``./run test`` does). One LLVM module per program instead of
# several compiled in parallel (``--xla_cpu_parallel_codegen_split_count=1``)
# cuts another ~20% of the compile CPU: on two cores the xdist workers keep
# both busy anyway, and each split repeats per-module work. The
# flags are the jaxlib 0.10 names: XLA aborts on a flag it does not know, so
# another jaxlib compiles with its defaults.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',
                          '--xla_cpu_use_fusion_emitters=false',
                          '--xla_cpu_parallel_codegen_split_count=1')
if (os.environ.get('OPTAX_LITE_FAST_COMPILE', '0') == '1'
    and os.environ.get('JAX_PLATFORMS') == 'cpu'
    and importlib.metadata.version('jaxlib').startswith('0.10.')):
  _flags = os.environ.get('XLA_FLAGS', '').split()
  os.environ['XLA_FLAGS'] = ' '.join(
      _flags + [f for f in FAST_COMPILE_XLA_FLAGS if f not in _flags])

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

jax.config.update('jax_enable_x64', False)
settings.register_profile('ci', max_examples=25, deadline=None,
                          derandomize=True)
settings.load_profile('ci')


def assert_trees_close(actual, desired, rtol=1e-6, atol=0.0):
  a_leaves, a_def = jax.tree.flatten(actual)
  d_leaves, d_def = jax.tree.flatten(desired)
  assert a_def == d_def, f'tree structures differ:\n{a_def}\n{d_def}'
  for a, d in zip(a_leaves, d_leaves):
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(d, np.float64), rtol=rtol, atol=atol)


def assert_tree_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), leaf


def assert_injected_matches_plain(plain, injected, params, steps):
  """``injected`` (``optax.inject_hyperparams`` of ``plain``'s factory)
  gives ``plain``'s updates step for step on gradients drawn from
  ``PRNGKey(i)``, up to float32 round-off of the hyperparameters as arrays
  (relative to each leaf's update). Returns ``(state, grads)``: the
  injected state after ``steps`` steps and the last gradients."""
  sp, si = plain.init(params), injected.init(params)
  up, ui = jax.jit(plain.update), jax.jit(injected.update)
  for i in range(steps):
    g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i),
                                                      p.shape), params)
    a, sp = up(g, sp, params)
    b, si = ui(g, si, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert float(jnp.linalg.norm(y - x)) <= 1e-5 * float(
          jnp.linalg.norm(x)) + 1e-9, (i, x.shape)
  return si, g


def nnx_losses(model, tx, loss_fn, steps):
  """Trains the NNX ``model`` in place with ``nnx.Optimizer(model, tx)``
  for ``steps`` jitted steps; returns ``loss_fn(model)`` before each."""
  from flax import nnx
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt)) for _ in range(steps)]


@pytest.fixture(params=[False, True], ids=['nojit', 'jit'])
def maybe_jit(request):
  """Runs a test with and without ``jax.jit`` (chex-style variants)."""
  return jax.jit if request.param else (lambda f, **kw: f)


def host_mesh(shape=(8,), names=('fsdp',)):
  """A mesh of the first 8 devices (multidevice tests: 8 host devices)."""
  from jax.sharding import Mesh
  devices = jax.devices()
  assert len(devices) >= 8, (
      f'multidevice tests need 8 devices, got {len(devices)}: run with '
      'XLA_FLAGS=--xla_force_host_platform_device_count=8')
  return Mesh(np.asarray(devices[:8]).reshape(shape), names)


def fsdp_put(tree, mesh):
  """Each leaf on ``mesh``, FSDP style: a matrix's first axis split over
  ``'fsdp'`` where the axis divides evenly, the rest replicated."""
  from jax.sharding import NamedSharding, PartitionSpec
  def put(x):
    parts = [None] * x.ndim
    if x.ndim >= 2 and x.shape[0] % mesh.shape['fsdp'] == 0:
      parts[0] = 'fsdp'
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*parts)))
  return jax.tree.map(put, tree)


def param_mirrors(state, params, by_size=False):
  """``(state path, param path, state leaf, param)`` for each state leaf
  that mirrors a parameter: its path ends with the parameter's path and it
  has the parameter's shape (``by_size``: its number of elements, as SOAP's
  momentum in the ``(batch, fan_in, fan_out)`` matrix view of the leaf)."""
  attr = 'size' if by_size else 'shape'
  p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    for ppath, p in p_flat:
      if (len(path) >= len(ppath) and tuple(path[-len(ppath):]) == tuple(ppath)
          and getattr(leaf, attr) == getattr(p, attr)):
        out.append((path, ppath, leaf, p))
  return out


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Drops JAX's in-memory caches after each test module.

  A worker otherwise keeps every program it compiled (hundreds of optimizer
  steps) until it exits: 4.8 GB resident at the end of the suite. The
  persistent compilation cache above still serves programs compiled again
  in a later module.
  """
  yield
  jax.clear_caches()


# A watchdog for the multi-device tests: a collective that never completes
# (an XLA:CPU deadlock) fails its test after this many seconds instead of
# blocking CI. The thread method dumps every thread's stack and ends the
# process, which also works when the main thread is stuck inside XLA.
MULTIDEVICE_TIMEOUT_S = 600


# The recordings hold the default compiler's bytes (the file is the
# recording's own, so its marker is added here).
DEFAULT_COMPILER_MODULES = ('test_behaviour_fixture.py',)


# Modules whose tests take longest (tens of seconds each on 2 cores): run
# first, so that no worker is left finishing one of them alone at the end
# (test_memory_budget's SOAP depth test, 16 s, ran alone as the last test of
# the single-device run: 17 s of one idle core).
LONGEST_FIRST = ('test_multiprocess.py', 'test_stack_by_shape.py',
                 'test_multisteps.py', 'test_memory_budget.py',
                 'test_benchmarks_smoke.py', 'test_no_hang_multidevice.py',
                 'test_multidevice.py')


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)
  for item in items:
    if item.path.name in DEFAULT_COMPILER_MODULES:
      item.add_marker(pytest.mark.default_compiler)
    if (item.get_closest_marker('multidevice') is not None
        and item.get_closest_marker('timeout') is None):
      item.add_marker(pytest.mark.timeout(MULTIDEVICE_TIMEOUT_S,
                                          method='thread'))
