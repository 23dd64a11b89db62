"""What a user meets first: one run length for LITE, refusals as promised."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lite as ol
from conftest import assert_trees_close
from optimizer_zoo import NAMED, make


def _reference_cosine(step, warmup, total, peak, min_ratio=0.1):
  """The LITE reference's ``cosine_lr_schedule`` (muonlite.py), in NumPy."""
  if step < warmup:
    return peak * (step + 1) / warmup
  frac = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
  return min_ratio * peak + (peak - min_ratio * peak) * 0.5 * (
      1 + np.cos(np.pi * frac))


def _reference_wsd(step, warmup, total, peak, stable_ratio, min_ratio):
  """The reference's ``get_wsd_schedule_with_min_lr`` lambda, times peak."""
  if step < warmup:
    return peak * step / max(1, warmup)
  if step < int(stable_ratio * total):
    return peak
  rate = (total - step) / (total - int(stable_ratio * total))
  return peak * (min_ratio + (1 - min_ratio) * rate)


def test_lite_schedule_is_the_reference_learning_rate():
  cos = ol.lite_schedule(3e-3, total_steps=200, warmup_steps=20)
  wsd = ol.lite_schedule(3e-3, total_steps=200, warmup_steps=20, kind='wsd',
                         min_lr_ratio=0.0, stable_ratio=0.8)
  for t in [0, 5, 19, 20, 21, 100, 159, 160, 161, 199, 200]:
    np.testing.assert_allclose(cos(t), _reference_cosine(t, 20, 200, 3e-3),
                               rtol=1e-5)
    np.testing.assert_allclose(wsd(t), _reference_wsd(t, 20, 200, 3e-3, 0.8,
                                                      0.0),
                               rtol=1e-5, atol=1e-12)


def _tree():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {'embed': {'embedding': jax.random.normal(k[0], (16, 8))},
          'dense': {'kernel': jax.random.normal(k[1], (8, 12))},
          'head': {'kernel': jax.random.normal(k[2], (12, 5))}}


@pytest.mark.parametrize('name', ['muon_lite', 'rmnp_lite', 'normuon_lite'])
def test_lite_schedule_gives_the_ramps_their_run_length(name):
  """``learning_rate=lite_schedule(...)`` equals passing T and W twice."""
  params = _tree()
  sched = ol.lite_schedule(0.02, total_steps=12, warmup_steps=3)
  once = make(name, learning_rate=sched)
  twice = make(name, learning_rate=sched, total_steps=12, warmup_steps=3,
               schedule='cosine')
  plain = make(name, learning_rate=sched, reference_schedules=False)
  s1, s2, s3 = once.init(params), twice.init(params), plain.init(params)
  step1, step2, step3 = (jax.jit(tx.update) for tx in (once, twice, plain))
  moved = 0.0
  for i in range(8):
    g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params)
    u1, s1 = step1(g, s1, params)
    u2, s2 = step2(g, s2, params)
    u3, s3 = step3(g, s3, params)
    assert_trees_close(u1, u2, rtol=0, atol=0)
    moved = max(moved, max(float(jnp.max(jnp.abs(a - b)))
                           for a, b in zip(jax.tree.leaves(u1),
                                           jax.tree.leaves(u3))))
  assert moved > 1e-6  # the ramps are really on (χ > 1 after warmup)


def test_lite_schedule_disagreement_names_each_argument():
  sched = ol.lite_schedule(0.02, total_steps=100, warmup_steps=10)
  with pytest.raises(ValueError, match='total_steps=50.*warmup_steps=5'):
    ol.muon_lite(sched, total_steps=50, warmup_steps=5)
  with pytest.raises(ValueError, match='schedule'):
    ol.soap_lite(sched, schedule='wsd')


@pytest.mark.parametrize('kw, match', [
    ({'total_steps': 0}, 'total_steps'),
    ({'total_steps': 10, 'warmup_steps': 10}, 'warmup_steps'),
    ({'total_steps': 10, 'kind': 'linear'}, 'kind'),
    ({'total_steps': 10, 'min_lr_ratio': 2.0}, 'min_lr_ratio'),
])
def test_lite_schedule_bad_arguments(kw, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ol.lite_schedule(1e-3, **kw)


@pytest.mark.parametrize('name, structural', [
    ('muon_lite', ('steps', 'total_steps', 'warmup_steps')),
    ('soap_lite', ('precondition_frequency', 'max_precond_dim', 'total_steps',
                   'warmup_steps')),
    ('fismo_lite', ('steps', 'total_steps', 'warmup_steps')),
    ('rmnp_lite', ('total_steps', 'warmup_steps')),
    ('normuon_lite', ('steps', 'total_steps', 'warmup_steps')),
])
def test_inject_hyperparams_lists_every_structural_argument(name, structural):
  """One error names the whole ``static_args`` tuple, not one per run."""
  kw = {k: 4 for k in structural}
  tx = optax.inject_hyperparams(getattr(ol, name))(0.01, **kw)
  with pytest.raises(TypeError) as err:
    jax.jit(tx.init)({'w': jnp.ones((8, 4))})
  assert repr(tuple(structural)) in str(err.value), str(err.value)


def _with_bad_leaf(kind):
  good = {'w': jnp.ones((8, 4), jnp.float32), 'b': jnp.zeros((4,))}
  bad = {'int_scalar': jnp.asarray(3),
         'bool_vector': jnp.ones((4,), bool),
         'int_matrix': jnp.ones((8, 4), jnp.int32),
         'python_int': 7,
         'uint_tensor': jnp.ones((2, 3, 4), jnp.uint8)}[kind]
  return {**good, 'extra': {kind: bad}}


@pytest.mark.parametrize('kind', ['int_scalar', 'bool_vector', 'int_matrix',
                                  'python_int', 'uint_tensor'])
@pytest.mark.parametrize('name', NAMED + ['adamw_lite'])
def test_integer_and_boolean_leaves_are_refused_by_path(name, kind):
  params = _with_bad_leaf(kind)
  tx = (ol.adamw_lite(1e-2) if name == 'adamw_lite' else make(name))
  with pytest.raises(TypeError, match=rf"\['extra'\]\['{kind}'\]"):
    tx.init(params)
  # The updates are checked too (a float state, an int gradient leaf).
  floats = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.float32),
                        params)
  state = tx.init(floats)
  with pytest.raises(TypeError, match=rf"updates\['extra'\]\['{kind}'\]"):
    tx.update(params, state, floats)


# The public transforms with what each needs besides its keywords
# (``kron_precondition`` forwards its keywords to the two below).
_TRANSFORMS = {
    'orthogonalize': ol.orthogonalize,
    'row_normalize': ol.row_normalize,
    'fisher_whiten': lambda **kw: ol.fisher_whiten(ol.orthogonalize(), **kw),
    'scale_by_soap': ol.scale_by_soap,
    'scale_by_shampoo': ol.scale_by_shampoo,
    'momentum': ol.momentum,
    'neuron_normalize': ol.neuron_normalize,
    'scale_by_shape': ol.scale_by_shape,
    'lite_flat_boost': lambda **kw: ol.lite_flat_boost(ol.muon_geometry(),
                                                       **kw),
    'muon_geometry': ol.muon_geometry,
    'normuon_geometry': ol.normuon_geometry,
    'soap_geometry': ol.soap_geometry,
    'row_norm_geometry': ol.row_norm_geometry,
    'diagonal_geometry': ol.diagonal_geometry,
}


def _switches_and_numbers(fn):
  """The keyword parameters of ``fn`` whose defaults are a bool (a switch)
  or a number, by name."""
  import inspect
  switches, numbers = [], []
  for name, p in inspect.signature(fn).parameters.items():
    if isinstance(p.default, bool):
      switches.append(name)
    elif isinstance(p.default, (int, float)):
      numbers.append(name)
  return switches, numbers


def _assert_refused(build, fn, name):
  """Every switch of ``fn`` refuses a string (``"false"`` reads as true),
  every number refuses NaN, each with an error naming the parameter."""
  switches, numbers = _switches_and_numbers(fn)
  for p in switches:
    with pytest.raises(TypeError, match=rf'\b{p}\b'):
      build(**{p: 'false'})
  for p in numbers:
    with pytest.raises((ValueError, TypeError), match=rf'\b{p}\b'):
      build(**{p: float('nan')})
  assert switches or numbers, name


@pytest.mark.parametrize('name', NAMED + ['adamw_lite'])
def test_named_optimizers_refuse_string_switches_and_nan_numbers(name):
  fn = getattr(ol, name)
  _assert_refused(lambda **kw: fn(1e-2, **kw), fn, name)


@pytest.mark.parametrize('name', sorted(_TRANSFORMS))
def test_transforms_refuse_string_switches_and_nan_numbers(name):
  _assert_refused(_TRANSFORMS[name], getattr(ol, name), name)


@pytest.mark.parametrize('name, kw, match', [
    ('muon_lite', {'rms': -0.2}, r'\brms\b'),
    ('normuon_lite', {'rms': 0.0}, r'\brms\b'),
    ('fismo_lite', {'rms': -1.0}, r'\brms\b'),
    ('muon_lite', {'threshold_cap': -1.0}, r'\bthreshold_cap\b'),
    ('normuon_lite', {'threshold_cap': 0.0}, r'\bthreshold_cap\b'),
    ('soap_lite', {'emb_sharp_ratio': 1.5}, r'\bemb_sharp_ratio\b'),
    ('muon_lite', {'emb_smooth_ratio': -0.1}, r'\bemb_smooth_ratio\b'),
    ('fismo_lite', {'scaling': 'bogus'}, r'\bscaling\b'),
])
def test_lite_settings_out_of_range_name_themselves(name, kw, match):
  """Refused when built, not turned into a NaN update or an error that
  names another function's parameter."""
  with pytest.raises((ValueError, TypeError), match=match):
    getattr(ol, name)(1e-2, **kw)


@pytest.mark.parametrize('eps', [-1e-7, 0.0])
def test_polar_eps_must_be_positive(eps):
  """``eps`` keeps a zero matrix at zero (0 / (0 + eps)); zero or negative
  would divide by zero or flip the sign."""
  with pytest.raises(ValueError, match=r'\beps\b'):
    ol.orthogonalize(eps=eps)
  with pytest.raises(ValueError, match=r'\beps\b'):
    ol.polar_factor(jnp.ones((3, 4)), eps=eps)


@pytest.mark.parametrize('name', NAMED + ['adamw_lite'])
def test_integer_mu_dtype_is_refused(name):
  """An integer momentum would truncate the statistics without a word."""
  with pytest.raises(TypeError, match=r'mu_dtype must be a floating dtype'):
    getattr(ol, name)(1e-2, mu_dtype=jnp.int32)


@pytest.mark.parametrize('build, match', [
    (lambda: ol.chi_schedule(0.5, mode='ramp', total_steps=10), r'\bchi\b'),
    (lambda: ol.chi_schedule(float('nan'), mode='decay', total_steps=10),
     r'\bchi\b'),
    (lambda: ol.chi_schedule(2.0, mode='ramp', total_steps=0),
     r'\btotal_steps\b'),
    (lambda: ol.chi_schedule(2.0, mode='ramp', total_steps=10,
                             warmup_steps=10), r'\bwarmup_steps\b'),
    (lambda: ol.chi_schedule(2.0, mode='ramp', total_steps=10,
                             flat_warmup=0.0), r'\bflat_warmup\b'),
    (lambda: ol.beta2_ramp(1.0, 0.5, total_steps=10), r'\bbeta2\b'),
    (lambda: ol.beta2_ramp(float('nan'), 1.0, total_steps=10), r'\bbeta1\b'),
    (lambda: ol.beta2_ramp(0.0, 1.0, total_steps=0), r'\btotal_steps\b'),
])
def test_ramp_schedules_refuse_bad_arguments(build, match):
  """Built with bad arguments the ramps gave χ < 1, NaN or a β₂ falling
  below β₁, which ``lite_flat_boost`` refuses as plain numbers."""
  with pytest.raises((ValueError, TypeError), match=match):
    build()


def test_helpers_refuse_a_string_switch_and_a_nan_eps():
  with pytest.raises(TypeError, match=r'\bdetect_head_by_shape\b'):
    ol.label_params({'w': jnp.ones((4, 4))}, detect_head_by_shape='no')
  with pytest.raises(ValueError, match=r'\beps\b'):
    ol.diagonal_dominance(jnp.ones((3, 3)), eps=float('nan'))
