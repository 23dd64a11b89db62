"""Precision policy, accelerator emulation and bfloat16 Newton–Schulz.

Every test that runs an optimizer runs it under both emulations
(:func:`optax_lite.testing.emulate_matmul_precision`): ``"bfloat16"`` (a
TPU's one-pass default) and ``"tensorfloat32"`` (a GPU's default). The
bounds asserted here are the ones documented in docs/precision.md ("Precision on
accelerators").
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from optax_lite.linalg import matmul as mm_lib
from optax_lite.linalg import subspace
from optax_lite.testing import emulate_matmul_precision
import optimizer_zoo as zoo

EMULATIONS = ('bfloat16', 'tensorfloat32')
P = jax.lax.Precision


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _matrix(m, n, spectrum, seed=0):
  r = np.random.default_rng(seed)
  u, _ = np.linalg.qr(r.standard_normal((m, m)))
  v, _ = np.linalg.qr(r.standard_normal((n, n)))
  k = min(m, n)
  return jnp.asarray((u[:, :k] * np.asarray(spectrum)) @ v[:, :k].T,
                     jnp.float32)


def _band(p):
  s = np.linalg.svd(np.asarray(p, np.float64), compute_uv=False)
  return float(np.max(np.abs(s - 1.0)))


# --------------------------------------------------------------------------
# The emulation itself
# --------------------------------------------------------------------------


def test_round_significand_matches_bfloat16_and_a_float64_rule():
  x = jax.random.normal(jax.random.PRNGKey(0), (4096,)) * 1e3
  bf = mm_lib.round_significand(x, 8)
  np.testing.assert_array_equal(bf, x.astype(jnp.bfloat16).astype(jnp.float32))
  # TF32: 11 significand bits, nearest (ties to even), in float64 NumPy.
  xd = np.asarray(x, np.float64)
  mant, ex = np.frexp(xd)  # |mant| in [0.5, 1): 11 bits -> scale by 2^11
  want = np.ldexp(np.round(mant * 2.0**11) / 2.0**11, ex)
  np.testing.assert_array_equal(np.asarray(mm_lib.round_significand(x, 11)),
                                want.astype(np.float32))
  special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float32)
  out = np.asarray(mm_lib.round_significand(special, 8))
  assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
  assert out[3] == 0.0


@pytest.mark.parametrize('name', ['float16', 'bf16', 'float32', None, 8])
def test_unknown_emulation_is_a_value_error(name):
  with pytest.raises(ValueError, match='name'):
    with emulate_matmul_precision(name):
      pass


def test_bad_precision_and_kernel():
  with pytest.raises(ValueError, match='precision'):
    mm_lib.check_precision('precision', 'bf8')
  with pytest.raises(TypeError, match='precision'):
    mm_lib.check_precision('precision', 3.0)
  with pytest.raises(ValueError, match='kernel'):
    mm_lib.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), kernel='nope')
  with pytest.raises(TypeError, match='ns_dtype'):
    ol.polar_factor(jnp.ones((4, 4)), ns_dtype=jnp.int32)
  with pytest.raises(ValueError, match='precision'):
    ol.orthogonalize(precision='half')


def test_emulated_product_is_the_hardware_product():
  a = jax.random.normal(jax.random.PRNGKey(1), (64, 48))
  b = jax.random.normal(jax.random.PRNGKey(2), (48, 32))
  exact = a @ b
  with emulate_matmul_precision('bfloat16'):
    got = mm_lib.matmul(a, b, kernel='polar')
    kept = mm_lib.matmul(a, b, kernel='kron')  # policy: float32
    forced = mm_lib.matmul(a, b, kernel='kron', precision='default')
  want = jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(kept, exact)
  np.testing.assert_allclose(forced, want, rtol=1e-5, atol=1e-5)
  assert _rel(got, exact) > 1e-3  # the emulation is real
  with emulate_matmul_precision('tensorfloat32'):
    tf = mm_lib.matmul(a, b, kernel='polar')
  assert 1e-5 < _rel(tf, exact) < _rel(got, exact)
  # Outside the context: the plain float32 product.
  np.testing.assert_array_equal(mm_lib.matmul(a, b, kernel='polar'), exact)


def test_emulation_retraces_under_jit_and_is_a_noop_outside():
  x = _matrix(32, 48, np.logspace(0, -2, 32))
  f = jax.jit(lambda x: ol.polar_factor(x))
  before = f(x)
  with emulate_matmul_precision('bfloat16'):
    inside = f(x)
  with emulate_matmul_precision('tensorfloat32'):
    inside_tf = f(x)
  after = f(x)
  np.testing.assert_array_equal(after, before)
  assert _rel(inside, before) > 1e-4
  assert _rel(inside_tf, before) > 1e-6
  assert _rel(inside_tf, before) < _rel(inside, before)


# --------------------------------------------------------------------------
# Polar band and bfloat16 Newton–Schulz
# --------------------------------------------------------------------------

_COND100 = _matrix(48, 96, np.logspace(0, -2, 48), seed=3)


@pytest.fixture(scope='module')
def polar_fns():
  return {(m, ns): jax.jit(lambda x, m=m, ns=ns: ol.polar_factor(
      x, m, ns_dtype=ns))
          for ns in (None, jnp.bfloat16)
          for m in ('polar_express', 'gram_polar_express')}


# Documented band (docs/precision.md): max|σ−1| of Polar Express (6 steps) at
# condition 1e2 is 0.0025 in float32; bounds leave room for seeds/shapes.
# Gram Newton–Schulz (the same polynomial on the 48×48 Gram side of this
# 48×96 matrix) is held to the same bounds: 0.0023 / 0.0027 (TF32) / 0.012
# (bfloat16 products) / 0.0094 (bfloat16 iterates) measured.
@pytest.mark.parametrize('method', ['polar_express', 'gram_polar_express'])
@pytest.mark.parametrize('emulation', (None,) + EMULATIONS)
@pytest.mark.parametrize('ns', [None, 'bfloat16'])
def test_polar_band_at_condition_100(polar_fns, emulation, ns, method):
  f = polar_fns[method, None if ns is None else jnp.bfloat16]
  if emulation is None:
    out = f(_COND100)
  else:
    with emulate_matmul_precision(emulation):
      out = f(_COND100)
  assert out.dtype == jnp.float32
  bound = 0.005 if (ns is None and emulation != 'bfloat16') else 0.02
  assert _band(out) <= bound


def test_ns_dtype_runs_in_bfloat16_with_float32_accumulation():
  x = _COND100
  out = ol.polar_factor(x, ns_dtype=jnp.bfloat16)
  # The iterates are bfloat16: the output is exactly representable in it.
  np.testing.assert_array_equal(out, out.astype(jnp.bfloat16).astype(out.dtype))
  exact = ol.polar_factor(x, 'svd')
  assert _rel(out, exact) < 0.02
  # bfloat16 leaves keep their dtype.
  assert ol.polar_factor(x.astype(jnp.bfloat16),
                         ns_dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_muon_ns_dtype_update_close_to_float32():
  params = {'layer': {'kernel': jnp.zeros((48, 96))}}
  g = {'layer': {'kernel': _COND100}}
  outs = []
  for ns in (None, jnp.bfloat16):
    tx = ol.muon(0.1, ns_dtype=ns, weight_decay=0.0)
    u, _ = tx.update(g, tx.init(params), params)
    outs.append(u['layer']['kernel'])
  assert 0 < _rel(outs[1], outs[0]) < 0.02


# --------------------------------------------------------------------------
# The LITE filter: sharp rank on a gapped spectrum
# --------------------------------------------------------------------------


@pytest.mark.parametrize('emulation', EMULATIONS)
def test_lite_filter_rank_on_gapped_spectrum_unchanged(emulation):
  # 4 sharp directions (σ in [8, 10]) and a flat bulk (σ <= 1), τ = 3.
  spec = np.concatenate([np.linspace(10, 8, 4), np.linspace(1, 0.05, 28)])
  m = _matrix(32, 64, spec, seed=4)

  @jax.jit
  def rank(m):
    o = ol.polar_factor(m)
    p = subspace.small_side_projector(m, o, jnp.float32(3.0))
    return jnp.sum(jnp.square(p)), p

  r32, p32 = rank(m)
  with emulate_matmul_precision(emulation):
    r_emu, p_emu = rank(m)
  assert abs(float(r32) - 4.0) < 0.05
  assert abs(float(r_emu) - float(r32)) < 0.05
  assert _rel(p_emu, p32) < 0.02


# --------------------------------------------------------------------------
# Every named optimizer under both emulations
# --------------------------------------------------------------------------

STEPS = 40
LR = {'muon': 0.2, 'rmnp': 0.1, 'fismo': 0.2, 'soap': 0.2, 'shampoo': 0.05,
      'muon_lite': 0.2, 'soap_lite': 0.2, 'rmnp_lite': 0.1,
      'fismo_lite': 0.2, 'normuon': 0.2, 'normuon_lite': 0.2, 'muonh': 0.1}
_rng = np.random.default_rng(0)
_X = jnp.asarray(_rng.standard_normal((64, 16)), jnp.float32)
_Y = _X @ jnp.asarray(_rng.standard_normal((16, 24)) / 2, jnp.float32)
_P0 = {'layer': {'kernel': jnp.zeros((16, 24), jnp.float32)}}
# MuonH keeps each matrix on the sphere of its initial norm: it starts from
# a random kernel with the solution's norm (a zero kernel has no sphere).
_W = np.linalg.lstsq(np.asarray(_X), np.asarray(_Y), rcond=None)[0]
_P0_SPHERE = {'layer': {'kernel': jnp.asarray(
    _rng.standard_normal((16, 24)) * np.linalg.norm(_W) / np.sqrt(16 * 24),
    jnp.float32)}}
START = {'muonh': _P0_SPHERE}


def _loss(p):
  return jnp.mean(jnp.square(_X @ p['layer']['kernel'] - _Y))


_TRAIN = {}


def _trainer(name):
  """A jitted 40-step least-squares run -> (final loss, first update)."""
  if name not in _TRAIN:
    kw = {'weight_decay': 0.0}
    if 'total_steps' in inspect.signature(zoo.get(name)).parameters:
      kw['total_steps'] = STEPS
    tx = zoo.make(name, learning_rate=optax.linear_schedule(
        LR[name], 0.0, STEPS), **kw)

    @jax.jit
    def train(p):
      s = tx.init(p)

      def body(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(_loss)(p), s, p)
        return (optax.apply_updates(p, u), s), u['layer']['kernel']

      (p, s), us = jax.lax.scan(body, (p, s), None, length=STEPS)
      finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                                  for x in jax.tree.leaves(s)
                                  if jnp.issubdtype(x.dtype, jnp.floating)]))
      return _loss(p), us, finite

    _TRAIN[name] = train
  return _TRAIN[name]


@pytest.mark.parametrize('emulation', EMULATIONS)
@pytest.mark.parametrize('name', zoo.NAMED)
def test_optimizer_trains_under_emulation(name, emulation):
  train = _trainer(name)
  p0 = START.get(name, _P0)
  with emulate_matmul_precision(emulation):
    loss, updates, finite = train(p0)
  assert bool(finite), 'non-finite optimizer state'
  assert np.all(np.isfinite(np.asarray(updates)))
  assert float(loss) <= 0.05 * float(_loss(p0))


@pytest.mark.parametrize('emulation', EMULATIONS)
def test_muon_lite_update_within_10_percent_of_float32(emulation):
  params = {'layer': {'kernel': _matrix(32, 64, np.logspace(0, -2, 32), 5)}}
  grads = [{'layer': {'kernel': _matrix(32, 64, np.logspace(0, -1, 32), s)}}
           for s in range(6, 9)]
  tx = ol.muon_lite(0.02, total_steps=10)
  upd = jax.jit(tx.update)

  def run():
    s, u = tx.init(params), None
    for g in grads:
      u, s = upd(g, s, params)
    return u['layer']['kernel']

  ref = run()
  with emulate_matmul_precision(emulation):
    emu = run()
  assert _rel(emu, ref) <= 0.10


# --------------------------------------------------------------------------
# The policy's float32 kernels and the per-optimizer override
# --------------------------------------------------------------------------


def test_float32_kernels_are_never_rounded():
  q, _ = np.linalg.qr(np.random.default_rng(7).standard_normal((24, 24)))
  a = jnp.asarray((q * np.logspace(0, -3, 24)) @ q.T, jnp.float32)
  f = jax.jit(lambda a: (ol.linalg.inverse_root(a, 2, method='newton'),
                         ol.linalg.inverse_root(a, 2, method='eigh')))
  ref = f(a)
  for emulation in EMULATIONS:
    with emulate_matmul_precision(emulation):
      got = f(a)
    for x, y in zip(got, ref):
      np.testing.assert_array_equal(x, y)


def _one_update(name, **kw):
  params = {'layer': {'kernel': jnp.zeros((16, 24), jnp.float32)}}
  grads = {'layer': {'kernel': _matrix(16, 24, np.logspace(0, -1, 16), 9)}}
  tx = zoo.make(name, learning_rate=0.1, **kw)
  return jax.jit(lambda: tx.update(grads, tx.init(params), params)[0])


@pytest.mark.parametrize('name', ['muon', 'fismo', 'muon_lite'])
def test_precision_override_per_optimizer(name):
  """``precision="highest"`` keeps every product in float32 under emulation;
  the default (policy) does not."""
  highest, policy = _one_update(name, precision='highest'), _one_update(name)
  ref = highest()
  with emulate_matmul_precision('bfloat16'):
    got_highest, got_policy = highest(), policy()
  np.testing.assert_array_equal(got_highest['layer']['kernel'],
                                ref['layer']['kernel'])
  assert _rel(got_policy['layer']['kernel'], ref['layer']['kernel']) > 1e-4


@pytest.mark.parametrize('name', ['muon_lite', 'fismo'])
def test_ns_dtype_on_muon_family(name):
  """bf16 Newton–Schulz inside muon_lite / fismo: close to float32."""
  ref = _one_update(name)()['layer']['kernel']
  bf = _one_update(name, ns_dtype=jnp.bfloat16)()['layer']['kernel']
  assert bf.dtype == jnp.float32
  assert 0 < _rel(bf, ref) <= 0.05
