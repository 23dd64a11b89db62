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
