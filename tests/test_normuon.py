"""NorMuon and NorMuon-LITE: dion's update rule transcribed in float64.

The reference is dion's ``dion/normuon.py`` (``NorMuon``:
``muon_update_pre_orthogonalize``, ``_normuon_normalization_core``,
``muon_update_post_orthogonalize``, ``adjust_lr_*``), read with ``fetch``
and transcribed as NumPy below in PyTorch layout ``X: (out, in)``; the Flax
kernel is its transpose. Both sides use the exact polar factor (SVD), so
the comparison isolates the update rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from conftest import assert_trees_close
from optimizer_zoo import update_trajectory


def polar_np(x):
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  return u @ vt


def ref_normuon(x0, grads, *, lr, mu, beta2, wd, nesterov, adjust_lr,
                cautious, polar=polar_np, normalize=True):
  """dion NorMuon on one ``(out, in)`` matrix; the weights after each step.

  ``normalize=False`` drops the NorMuon step (plain dion Muon), to show that
  a comparison depends on it.
  """
  x = np.array(x0, np.float64)
  out_dim, in_dim = x.shape
  m = np.zeros_like(x)
  v = np.zeros((out_dim, 1))
  traj = []
  for g in grads:
    m = m * mu + g
    u = m * mu + g if nesterov else m
    o = polar(u)
    norm_u = np.linalg.norm(o)
    neuron = np.mean(o * o, axis=-1, keepdims=True)   # over inputs
    v = v + (1 - beta2) * (neuron - v)                  # torch.lerp
    if normalize:
      o = o / (np.sqrt(v) + 1e-8)
      o = o * (norm_u / max(np.linalg.norm(o), 1e-8))
    if adjust_lr == 'spectral_norm':
      adjusted = lr * np.sqrt(out_dim / in_dim)
    else:  # rms_norm
      adjusted = lr * 0.2 * np.sqrt(max(out_dim, in_dim))
    if cautious:
      mask = np.minimum(np.sign(x * o) + 1, 1)
      x = x - lr * wd * x * mask
    else:
      x = x * (1 - lr * wd)
    x = x - adjusted * o
    traj.append(x.copy())
  return traj


# (dion's defaults, the library's defaults) as (ours, reference) settings.
SETTINGS = {
    'dion': (dict(nesterov=False, scaling='spectral', weight_decay=0.01),
             dict(nesterov=False, adjust_lr='spectral_norm', wd=0.01)),
    'library': (dict(nesterov=True, scaling='rms', weight_decay=0.1),
                dict(nesterov=True, adjust_lr='rms_norm', wd=0.1)),
}


def _rel_errors(traj, ref, w0):
  """Per step: ‖ours − ref‖ / ‖ref step‖ (Flax layout)."""
  errs, prev = [], w0
  for got, want in zip(traj, ref):
    errs.append(np.linalg.norm(got - want.T) / np.linalg.norm(want.T - prev))
    prev = want.T
  return errs


def run_x64(tx, w0, grads):
  with jax.enable_x64(True):
    params = {'w': jnp.asarray(w0, jnp.float64)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    traj = []
    for g in grads:
      u, state = step({'w': jnp.asarray(g, jnp.float64)}, state, params)
      assert u['w'].dtype == jnp.float64
      params = optax.apply_updates(params, u)
      traj.append(np.asarray(params['w']))
  return traj


@pytest.mark.parametrize('cautious', [False, True])
@pytest.mark.parametrize('setting', ['dion', 'library'])
@pytest.mark.parametrize('shape', [(16, 16), (24, 12), (12, 24)])
def test_normuon_matches_dion_transcription(shape, setting, cautious):
  """24 steps on square, tall and wide Flax kernels: every step within
  1e-6 of the reference step's length."""
  ours_kw, ref_kw = SETTINGS[setting]
  steps, lr = 24, 0.05
  rng = np.random.default_rng(sum(shape))
  w0 = rng.standard_normal(shape) * 0.2
  # Gradients with uneven column scales, so the per-neuron v differ.
  col = np.exp(rng.standard_normal(shape[1]))
  grads = [rng.standard_normal(shape) * col for _ in range(steps)]
  ref = ref_normuon(w0.T, [g.T for g in grads], lr=lr, mu=0.95, beta2=0.95,
                    cautious=cautious, **ref_kw)
  tx = ol.normuon(lr, method='svd', labels={'w': 'matrix'},
                  cautious_weight_decay=cautious, **ours_kw)
  errs = _rel_errors(run_x64(tx, w0, grads), ref, w0)
  assert max(errs) <= 1e-6, max(errs)
  assert np.linalg.norm(ref[-1].T - w0) > 0.1  # not vacuous


@pytest.mark.parametrize('shape', [(16, 16), (24, 12), (12, 24)])
def test_normuon_matches_dion_with_polar_express(shape):
  """The same rule with Polar Express on both sides (6 steps, the
  reference's coefficients from ``test_lite``): its polar factor is not
  exactly orthogonal, so the per-neuron step acts on square and tall
  kernels too (with the exact factor it only acts where fan_out > fan_in).
  """
  from test_lite import _ref_polar
  ours_kw, ref_kw = SETTINGS['dion']
  steps, lr = 20, 0.05
  rng = np.random.default_rng(3 + sum(shape))
  w0 = rng.standard_normal(shape) * 0.2
  col = np.exp(2 * rng.standard_normal(shape[1]))
  grads = [rng.standard_normal(shape) * col for _ in range(steps)]
  kw = dict(lr=lr, mu=0.95, beta2=0.95, cautious=False, polar=_ref_polar,
            **ref_kw)
  ref = ref_normuon(w0.T, [g.T for g in grads], **kw)
  tx = ol.normuon(lr, method='polar_express', labels={'w': 'matrix'},
                  **ours_kw)
  traj = run_x64(tx, w0, grads)
  assert max(_rel_errors(traj, ref, w0)) <= 1e-6
  plain = ref_normuon(w0.T, [g.T for g in grads], normalize=False, **kw)
  assert max(_rel_errors(traj, plain, w0)) > 1e-3


def test_normuon_variance_is_per_output_neuron():
  """β₂ = 0: v is this step's per-column mean square, so every output
  neuron (Flax column) of the direction has the same RMS; rows do not."""
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((32, 8)) * np.exp(
      rng.standard_normal(8)), jnp.float32)
  tx = ol.neuron_normalize(beta2=0.0)
  o = ol.polar_factor(g, 'svd')
  out, state = tx.update({'w': o}, tx.init({'w': o}))
  assert state.variance['w'].shape == (1, 1, 8)
  col_rms = np.sqrt(np.mean(np.square(np.asarray(out['w'])), axis=0))
  np.testing.assert_allclose(col_rms, col_rms[0], rtol=1e-5)
  row_rms = np.sqrt(np.mean(np.square(np.asarray(out['w'])), axis=1))
  assert np.std(row_rms) > 1e-3 * np.mean(row_rms)
  # The Frobenius norm of the input is kept.
  np.testing.assert_allclose(np.linalg.norm(out['w']), np.linalg.norm(o),
                             rtol=1e-5)


def test_short_axis_reduces_over_the_shorter_side():
  tx = ol.neuron_normalize(axis='short_axis')
  tall, wide = jnp.ones((32, 8)), jnp.ones((8, 32))
  s = tx.init({'t': tall, 'w': wide})
  assert s.variance['t'].shape == (1, 32, 1)   # mean over the 8 columns
  assert s.variance['w'].shape == (1, 1, 32)   # mean over the 8 rows


def _params(key):
  ks = jax.random.split(key, 4)
  return {'emb': {'embedding': jax.random.normal(ks[0], (20, 8))},
          'l1': {'kernel': jax.random.normal(ks[1], (8, 16)) * 0.3,
                 'bias': jnp.zeros(16)},
          'l2': {'kernel': jax.random.normal(ks[2], (16, 8)) * 0.3},
          'ln': {'scale': jnp.ones(8)},
          'head': {'kernel': jax.random.normal(ks[3], (8, 5)) * 0.3}}


def _trajectory(tx, params, steps=5):
  return update_trajectory(tx, params, steps)


@pytest.mark.parametrize('nesterov', [True, False])
def test_normuon_lite_reduces_to_normuon(nesterov):
  params = _params(jax.random.PRNGKey(0))
  base = ol.normuon(0.01, nesterov=nesterov)
  lite = ol.normuon_lite(0.01, chi=1.0, beta1=0.0, beta2=0.0, emb_chi=1.0,
                         nesterov=nesterov)
  for a, b in zip(_trajectory(lite, params), _trajectory(base, params)):
    assert_trees_close(a, b, rtol=0, atol=1e-6)


def test_normuon_lite_boost_changes_the_step():
  """With its defaults (χ = 2, β = (−0.25, 1)) the step differs from
  NorMuon's on the matrix leaves (the boost is not a no-op)."""
  params = _params(jax.random.PRNGKey(1))
  a = _trajectory(ol.normuon_lite(0.01), params, steps=3)[-1]
  b = _trajectory(ol.normuon(0.01), params, steps=3)[-1]
  diff = np.linalg.norm(a['l1']['kernel'] - b['l1']['kernel'])
  assert diff > 0.05 * np.linalg.norm(b['l1']['kernel'])


@pytest.mark.parametrize('kwargs, name', [
    (dict(beta2=-0.1), 'beta2'), (dict(beta2=1.0), 'beta2'),
    (dict(eps=0.0), 'eps'), (dict(eps=-1e-8), 'eps'),
    (dict(momentum=1.0), 'momentum'), (dict(momentum=-0.5), 'momentum'),
    (dict(scaling='bogus'), 'scaling'), (dict(weight_decay=-0.1),
                                         'weight_decay'),
    (dict(learning_rate=-1.0), 'learning_rate'),
])
def test_normuon_bad_hyperparameters(kwargs, name):
  kw = {'learning_rate': 0.01, **kwargs}
  with pytest.raises(ValueError, match=name):
    ol.normuon(**kw)


@pytest.mark.parametrize('kwargs, name', [
    (dict(neuron_beta2=1.5), 'neuron_beta2'), (dict(eps=0.0), 'eps'),
    (dict(chi=0.5), 'chi'), (dict(momentum=1.0), 'momentum'),
])
def test_normuon_lite_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ol.normuon_lite(0.01, **kwargs)


def test_cautious_flag_must_be_a_bool():
  with pytest.raises(TypeError, match='cautious_weight_decay'):
    ol.normuon(0.01, cautious_weight_decay=jnp.asarray(True))


def test_normuon_inject_every_float_hyperparameter():
  """``inject_hyperparams`` with β₂, ε, μ, λ traced equals the plain
  optimizer, and the injected β₂ is the one used."""
  params = _params(jax.random.PRNGKey(2))
  kw = dict(learning_rate=0.01, momentum=0.9, beta2=0.8, eps=1e-7,
            weight_decay=0.05)
  plain = ol.normuon(**kw)
  inj = optax.inject_hyperparams(ol.normuon)(**kw)
  a = _trajectory(plain, params, steps=3)
  b = _trajectory(inj, params, steps=3)
  for x, y in zip(a, b):
    assert_trees_close(y, x, rtol=1e-5, atol=1e-7)
  state = inj.init(params)
  assert set(kw) <= set(state.hyperparams)
