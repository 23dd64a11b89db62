"""Checkpoints that move between placements (issue 23, point 3).

For every named optimizer: a run with ``distribute=`` on 8 host devices
(FSDP on axis 0 where divisible) is saved with orbax as
``ol.portable_state`` after ``SPLIT`` steps, restored as the portable
state of the *target* optimizer (the abstract target from
``ol.portable_state(tx, jax.eval_shape(tx.init, params), params)``) and
placed with ``ol.place_state`` on 4 devices with ``distribute=``, and on
one device without it; the reverse moves a one-device run onto the 8
devices. Continuing must equal the uninterrupted run within 1e-5 of the
distance travelled (measured ≤ 9e-7: what remains is the different
summation order of 8, 4 and 1 devices' owner assignments in the steps
after the move, not the move itself, which is exact: see
``test_portable_form_does_not_depend_on_placement``).
"""

import numpy as np
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_lite as ol
import multidevice_worker
from optimizer_zoo import NAMED, make

pytestmark = pytest.mark.multidevice

SPLIT, MORE = 2, 2
TOL = 1e-5


def _tree():
  rng = np.random.default_rng(3)
  shapes = {'embed': {'embedding': (96, 32)}, 'norm': {'scale': (32,)}}
  for i in range(2):
    shapes[f'layers_{i}'] = {
        'attn': {n: {'kernel': (32, 32)} for n in 'qk'},
        'mlp': {'up': {'kernel': (32, 88)}, 'down': {'kernel': (88, 32)}}}
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32),
      shapes, is_leaf=is_shape)
  grads = [jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), params)
           for _ in range(SPLIT + MORE)]
  return params, grads


_mesh, _put = multidevice_worker.fsdp_mesh, multidevice_worker.put_fsdp


@pytest.fixture(scope='module')
def shared():
  """Optimizers and first runs shared by this module's tests: one trace
  and compile of each step, and the first ``SPLIT`` steps run once."""
  return {}


def _tx(shared, name, devices):
  """``name`` with ``distribute=`` over the first ``devices`` devices (on
  one device without it when ``devices`` is None)."""
  if ('tx', name, devices) not in shared:
    shared['tx', name, devices] = (
        make(name) if devices is None
        else make(name, distribute=_mesh(devices)))
  return shared['tx', name, devices]


def _first_steps(shared, name, devices):
  """``(tx, mesh, params, init state, state after SPLIT steps, params
  after them)`` from :func:`_tree` on ``devices`` devices (FSDP)."""
  if ('first', name, devices) not in shared:
    params0, grads = _tree()
    tx = _tx(shared, name, devices)
    mesh = None if devices is None else _mesh(devices)
    p = _put(params0, mesh)
    s = tx.init(p) if mesh is None else ol.sharded_init(tx.init, p)
    shared['first', name, devices] = (tx, mesh, p, s) + _run(
        tx, mesh, p, s, grads[:SPLIT])[::-1]
  return shared['first', name, devices]


def _run(tx, mesh, params, state, grads):
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(_put(g, mesh), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def _distance(a, b):
  return float(np.sqrt(sum(
      np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def _save_restore(path, tx, state, params, target_tx, target_params):
  """Saves the portable state; restores it for ``target_tx`` and places it."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, ol.portable_state(tx, state, params))
  ckptr.wait_until_finished()
  like = ol.portable_state(
      target_tx, jax.eval_shape(target_tx.init, target_params),
      target_params)
  restored = ckptr.restore(path, like)
  ckptr.close()
  return ol.place_state(target_tx, restored, target_params)


@pytest.mark.parametrize('name', NAMED)
def test_checkpoint_moves_between_placements(name, tmp_path, shared):
  params0, grads = _tree()
  tx4 = _tx(shared, name, 4)
  tx8, m8, _, _, s8, p8 = _first_steps(shared, name, 8)
  m4 = _mesh(4)
  end8, _ = _run(tx8, m8, p8, s8, grads[SPLIT:])
  travel8 = _distance(end8, params0)

  tx1, _, _, _, s1, p1 = _first_steps(shared, name, None)
  end1, _ = _run(tx1, None, p1, s1, grads[SPLIT:])
  travel1 = _distance(end1, params0)

  errors = {}
  for label, mesh, tx in (('8->4', m4, tx4), ('8->1', None, tx1)):
    q = _put(p8, mesh)
    s = _save_restore(tmp_path / label, tx8, s8, p8, tx, q)
    end, _ = _run(tx, mesh, q, s, grads[SPLIT:])
    errors[label] = _distance(end, end8) / travel8
  q = _put(p1, m8)
  s = _save_restore(tmp_path / '1-8', tx1, s1, p1, tx8, q)
  end, _ = _run(tx8, m8, q, s, grads[SPLIT:])
  errors['1->8'] = _distance(end, end1) / travel1
  assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize('name', ['soap', 'fismo_lite', 'muon_lite'])
def test_portable_form_does_not_depend_on_placement(name, shared):
  """The portable form of a state made on 8 devices, on 4 and on one has
  one tree structure, and the values agree (equal at init: the move is a
  permutation; ``SPLIT`` steps apart only by the steps' own round-off)."""
  forms = []
  for devices in (8, 4, None):
    tx, _, p, s, s_split, _ = _first_steps(shared, name, devices)
    forms.append((ol.portable_state(tx, s, p),
                  ol.portable_state(tx, s_split, p)))
  (init8, step8), others = forms[0], forms[1:]
  for init, step in others:
    assert jax.tree.structure(init) == jax.tree.structure(init8)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(init8)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(step8)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      scale = max(float(np.max(np.abs(b))), 1e-30) if b.size else 1.0
      assert float(np.max(np.abs(a - b), initial=0.0)) <= 1e-5 * scale


def test_place_state_refuses_another_optimizer():
  params0, _ = _tree()
  m8 = _mesh(8)
  p = _put(params0, m8)
  soap = make('soap', distribute=m8)
  portable = ol.portable_state(soap, ol.sharded_init(soap.init, p), p)
  with pytest.raises(ValueError, match='portable'):
    ol.place_state(make('muon', distribute=m8), portable, p)


def test_restore_as_a_user_would(tmp_path):
  """A wrapped optimizer (gradient clipping, then accumulation over 2
  micro-batches) with ``distribute`` over both axes of a 2 × 4
  (data, fsdp) mesh, saved after 2 real steps; restored on one device with
  host (NumPy) parameters, as a checkpoint is read back for evaluation or
  fine-tuning: continuing equals the uninterrupted 8-device run (SOAP:
  owner-resident stacks, its state the most to move)."""
  name = 'soap'
  params0, grads = _tree()
  grads = grads * 2  # 2 micro-batches per step
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'fsdp'))

  def build(distribute):
    kw = {} if distribute is None else {'distribute': distribute}
    return optax.MultiSteps(optax.chain(
        optax.clip_by_global_norm(1.0), make(name, **kw)), 2)

  put = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
      mesh, P('fsdp') if x.ndim >= 2 and x.shape[0] % 4 == 0 else P())), t)
  tx8 = build((mesh, ('data', 'fsdp')))
  p8 = put(params0)
  s8 = ol.sharded_init(tx8.init, p8)
  update8 = jax.jit(tx8.update)
  for g in grads[:4]:
    u, s8 = update8(put(g), s8, p8)
    p8 = optax.apply_updates(p8, u)
  path = tmp_path / 'ckpt'
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, {'params': p8, 'opt': ol.portable_state(tx8, s8, p8)})
  ckptr.wait_until_finished()
  end8 = p8
  for g in grads[4:]:
    u, s8 = update8(put(g), s8, end8)
    end8 = optax.apply_updates(end8, u)

  tx1 = build(None)
  host = jax.tree.map(np.asarray, params0)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = {'params': jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), host),
          'opt': ol.portable_state(tx1, jax.eval_shape(tx1.init, host),
                                   host)}
  restored = ckptr.restore(path, like)
  ckptr.close()
  p1 = jax.tree.map(np.asarray, restored['params'])  # host arrays
  s1 = ol.place_state(tx1, restored['opt'], p1)
  update1 = jax.jit(tx1.update)
  for g in grads[4:]:
    u, s1 = update1(g, s1, p1)
    p1 = optax.apply_updates(p1, u)
  travel = _distance(end8, params0)
  assert _distance(p1, end8) <= TOL * travel, _distance(p1, end8) / travel
