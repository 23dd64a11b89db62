"""MuonH (hyperball): dion's update rule transcribed in float64.

The reference is dion's ``dion/muonh.py`` on branch ``jcl/muonh-on-main``
(``muonh_update_megabatch_async``, ``_muonh_normalize_finish_compiled``,
``_muonh_apply_step_compiled``), read with ``fetch`` and transcribed as
NumPy below in PyTorch layout ``X: (out, in)``; the Flax kernel is its
transpose. Both sides use the exact polar factor (SVD).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from test_normuon import polar_np, run_x64


def ref_muonh(x0, grads, *, lr, mu=0.95, beta2=0.95, eps=1e-10,
              nesterov=False, normalization=None, adjust_lr=None):
  """dion MuonH on one ``(out, in)`` matrix; the weights after each step."""
  x = np.array(x0, np.float64)
  out_dim, in_dim = x.shape
  radius = np.linalg.norm(x)            # the radius, fixed on step one
  m = np.zeros_like(x)
  red = -1
  if normalization == 'short_axis' and out_dim < in_dim:
    red = -2
  v = np.zeros((out_dim, 1) if red == -1 else (1, in_dim))
  traj = []
  for g in grads:
    m = m * mu + g
    u = polar_np(m * mu + g if nesterov else m)
    if normalization is not None:
      stat = np.sum(u * u, axis=red, keepdims=True) / x.shape[red]
      norm_u = np.linalg.norm(u)
      v = v + (1 - beta2) * (stat - v)
      u = u / (np.sqrt(v) + eps)
      u = u * (norm_u / max(np.linalg.norm(u), eps))
    adjusted = lr if adjust_lr is None else lr * np.sqrt(out_dim / in_dim)
    s = adjusted * radius / max(np.linalg.norm(u), eps)
    cand = x - s * u
    x = radius * cand / max(np.linalg.norm(cand), eps)
    traj.append(x.copy())
  return traj, radius


CASES = {
    'dion_defaults': ({}, {}),
    'nesterov_spectral': (dict(nesterov=True, scaling='spectral'),
                          dict(nesterov=True, adjust_lr='spectral_norm')),
    'neuron': (dict(normalization='neuron'), dict(normalization='neuron')),
    'short_axis': (dict(normalization='short_axis'),
                   dict(normalization='short_axis')),
}


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('shape', [(16, 16), (24, 12), (12, 24)])
def test_muonh_matches_dion_transcription(shape, case):
  """24 steps on square, tall and wide Flax kernels: every step within
  1e-6 of the reference step's length, and the norm stays the radius."""
  ours_kw, ref_kw = CASES[case]
  steps, lr = 24, 0.05
  rng = np.random.default_rng(sum(shape) + 7)
  w0 = rng.standard_normal(shape) * 0.2
  col = np.exp(rng.standard_normal(shape[1]))
  grads = [rng.standard_normal(shape) * col for _ in range(steps)]
  ref, radius = ref_muonh(w0.T, [g.T for g in grads], lr=lr, **ref_kw)
  tx = ol.muonh(lr, method='svd', labels={'w': 'matrix'}, **ours_kw)
  traj = run_x64(tx, w0, grads)
  prev, errs = w0, []
  for got, want in zip(traj, ref):
    errs.append(np.linalg.norm(got - want.T) / np.linalg.norm(want.T - prev))
    prev = want.T
    np.testing.assert_allclose(np.linalg.norm(got), radius, rtol=1e-12)
  assert max(errs) <= 1e-6, max(errs)
  assert np.linalg.norm(ref[-1].T - w0) > 0.1 * radius  # not vacuous


def test_muonh_radius_per_matrix_slice():
  """A batched leaf ``[3, 12, 16]`` (dims (1, 2)): each slice keeps its own
  Frobenius norm, in float32 to 1e-5."""
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 16)) * jnp.asarray(
      [0.1, 1.0, 3.0])[:, None, None]
  params = {'w': w}
  tx = ol.muonh(0.1, labels={'w': 'matrix'},
                dims={'w': ol.MatrixDims(1, 2)})
  state = tx.init(params)
  radius = np.linalg.norm(np.asarray(w), axis=(1, 2))
  step = jax.jit(tx.update)
  for k in range(5):
    g = {'w': jax.random.normal(jax.random.PRNGKey(k + 1), w.shape)}
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(params['w']), axis=(1, 2)), radius,
        rtol=1e-5)
  assert np.linalg.norm(np.asarray(params['w'] - w)) > 0.1


def test_muonh_zero_matrix_is_a_clear_error():
  tx = ol.muonh(0.01)
  params = {'l': {'kernel': jnp.zeros((8, 4))}, 'b': jnp.zeros(4)}
  with pytest.raises(ValueError, match='params'):
    tx.init(params)


def test_muonh_update_is_relative_and_adamw_elsewhere():
  """The matrix step's length is set by the learning rate and the radius
  (not by the gradient's scale); non-matrix leaves get AdamW."""
  params = {'l': {'kernel': jax.random.normal(jax.random.PRNGKey(0),
                                              (16, 8))},
            'b': jnp.ones(8)}
  tx = ol.muonh(0.01, weight_decay=0.0)
  s = tx.init(params)
  g = jax.tree.map(lambda p: jnp.ones_like(p), params)
  u1, _ = tx.update(g, s, params)
  u2, _ = tx.update(jax.tree.map(lambda x: 1e3 * x, g), s, params)
  np.testing.assert_allclose(u1['l']['kernel'], u2['l']['kernel'],
                             rtol=1e-4, atol=1e-7)
  # First Adam step: −lr·sign(g).
  np.testing.assert_allclose(u1['b'], -0.01, rtol=1e-4)


@pytest.mark.parametrize('kwargs, name', [
    (dict(learning_rate=-1.0), 'learning_rate'),
    (dict(momentum=1.0), 'momentum'), (dict(beta2=-0.5), 'beta2'),
    (dict(eps=0.0), 'eps'), (dict(normalization='rows'), 'normalization'),
    (dict(scaling='bogus'), 'scaling'), (dict(weight_decay=-1.0),
                                         'weight_decay'),
])
def test_muonh_bad_hyperparameters(kwargs, name):
  kw = {'learning_rate': 0.01, **kwargs}
  with pytest.raises(ValueError, match=name):
    ol.muonh(**kw)


def test_muonh_inject_every_float_hyperparameter():
  """``inject_hyperparams`` with μ, β₂, ε traced equals the plain MuonH."""
  params = {'l': {'kernel': jax.random.normal(jax.random.PRNGKey(0),
                                              (16, 8))},
            'b': jnp.ones(8)}
  kw = dict(learning_rate=0.02, momentum=0.9, beta2=0.8, eps=1e-9,
            weight_decay=0.05)
  plain = ol.muonh(normalization='neuron', **kw)
  inj = optax.inject_hyperparams(ol.muonh)(normalization='neuron', **kw)
  sp, si = plain.init(params), inj.init(params)
  for k in range(3):
    g = jax.tree.map(lambda p, k=k: jax.random.normal(
        jax.random.PRNGKey(k + 3), p.shape), params)
    a, sp = jax.jit(plain.update)(g, sp, params)
    b, si = jax.jit(inj.update)(g, si, params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, a)
