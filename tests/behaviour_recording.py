"""Records what every named optimizer does, to prove a refactor changes none.

``tests/test_behaviour_fixture.py`` runs each optimizer of
``optimizer_zoo.NAMED`` for :data:`STEPS` steps on a small model-shaped tree
(:func:`init_params`, :func:`gradients`), on one device (placement ``one``)
and with ``distribute=`` on 8 host devices (``distribute8``), and compares
what it sees with ``tests/fixtures/behaviour_<placement>.npz``, recorded
from the code as it was. This module runs and summarises (:func:`run`,
:func:`summarise_state`), compares summaries (:func:`bit_differences`,
:func:`close_differences`, :func:`state_differences`) and, run as a script,
records the fixtures.

What is recorded, per optimizer:

* per step, the sha256 of the update leaves' float32 bytes (bit identity);
  per update leaf its Frobenius norm and 4 projections ``Σ u·R_k`` on fixed
  random unit-norm ``R_k`` (float64);
* after the last step, the full parameters (float32) and their sha256;
* the final state as a multiset of *pieces*, robust to renamed state fields
  and to a different stacking of owner-resident state: every state leaf of
  rank ≥ 3 is cut into its trailing 2-D slices (one per stacked matrix),
  size-1 axes are squeezed (``(1, n)`` is ``(n,)``), pieces that are
  exactly zero (padding slots, sentinels) are dropped, and each remaining
  piece is kept as (shape, dtype, norm, 2 projections on random unit-norm
  arrays that depend only on the piece's shape). The comparison matches
  pieces of the same shape and dtype one to one. (Rank-2 stacks of vectors,
  such as ``(8, 32)`` owner slots of eigenvalues, stay one piece: a
  different number of slots changes their shape.) Besides, a fingerprint
  per state dtype that no regrouping or padding changes: the number of
  non-zero elements, Σx, Σ|x|, Σx² and 11 quantiles of the non-zero
  values.

Recording (``python tests/behaviour_recording.py``) overwrites the fixtures.
Run it ONLY when a change of behaviour is intended and explained in the commit
(and CHANGELOG), or on a new CI machine (after checking, at the recorded
commit, that the old recording's machine and the new one differ only by that
machine's round-off); never to make a failing comparison pass: a refactor that
should not change behaviour must pass the comparison as recorded. The script
compiles with XLA's default settings, as the comparison runs
(``OPTAX_LITE_FAST_COMPILE=0``); the fixtures keep :func:`machine`. It records
``one`` in this process (which must see exactly one device, as the
single-device tests do) and ``distribute8`` in a child process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the ``distribute8``
fixture stores its final parameters as the exact float32 difference from
``one``'s, so the two are always recorded together.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optax_lite as ol  # noqa: E402
from optimizer_zoo import NAMED, make  # noqa: E402

STEPS = 12
DEVICES = 8
PLACEMENTS = ('one', 'distribute8')
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'fixtures')
PARAM_SEED, GRAD_SEED = 2212, 2213
UPDATE_PROJ_SEED, STATE_PROJ_SEED = 2214, 2215
UPDATE_PROJECTIONS, STATE_PROJECTIONS = 4, 2
QUANTILES = np.linspace(0.0, 1.0, 11)
TINY = 1e-30


# The CPU features that pick XLA's code and OpenBLAS's (LAPACK) kernels.
ISA_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'avx512f', 'avx512dq',
             'avx512bw', 'avx512vl', 'avx512_vnni', 'avx512_bf16',
             'avx512vbmi', 'amx_tile')


def machine() -> str:
  """What decides this machine's bits: the CPU (vendor, family, model,
  ISA), jaxlib (XLA) and SciPy (the OpenBLAS that jaxlib's LAPACK calls).
  Another CPU gives other bytes, and other round-off wherever ``eigh`` or
  QR decide a basis (``tests/test_behaviour_fixture.py``)."""
  import platform  # noqa: PLC0415
  import scipy  # noqa: PLC0415
  info = {}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  flags = set(info.get('flags', '').split())
  cpu = ' '.join(info.get(k, '?') for k in ('vendor_id', 'cpu family',
                                             'model'))
  # What stands in for another CPU here (XLA's ISA, OpenBLAS's kernels).
  chosen = [f for f in os.environ.get('XLA_FLAGS', '').split()
            if f.startswith('--xla_cpu_max_isa')]
  if os.environ.get('OPENBLAS_CORETYPE'):
    chosen.append(f'OPENBLAS_CORETYPE={os.environ["OPENBLAS_CORETYPE"]}')
  return (f'{platform.machine()} {cpu} {info.get("model name", "?")!r} '
          f'isa={",".join(f for f in ISA_FLAGS if f in flags)} '
          f'jaxlib={jax.lib.__version__} scipy={scipy.__version__}'
          + ''.join(f' {c}' for c in chosen))


def fixture_path(placement: str) -> str:
  return os.path.join(FIXTURES, f'behaviour_{placement}.npz')


def param_shapes() -> dict:
  """The model-shaped tree: an embedding, 2 blocks, a norm, a rank-3 leaf.

  The rank-3 ``[2, 16, 24]`` leaf is one ``32 × 24`` matrix under the
  default dims (treating it as 2 stacked matrices would need ``dims=``).
  """
  shapes = {'embed': {'embedding': (48, 32)}, 'norm': {'scale': (32,)},
            'proj3': {'kernel': (2, 16, 24)}}
  for i in range(2):
    shapes[f'layers_{i}'] = {
        'attn': {n: {'kernel': (32, 32)} for n in 'qkvo'},
        'mlp': {'up': {'kernel': (32, 88), 'bias': (88,)},
                'down': {'kernel': (88, 32)}}}
  return shapes


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def init_params() -> dict:
  """Gaussian ``/ √fan_in`` kernels, unit norm gain, zero biases (float32)."""
  rng = np.random.default_rng(PARAM_SEED)

  def init(path, shape):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return np.ones(shape, np.float32)
    if 'bias' in name:
      return np.zeros(shape, np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, param_shapes(),
                                          is_leaf=_is_shape)


def gradients(params) -> list:
  """``g_t = A + 0.3·B_t``: a steady direction plus fresh noise each step."""
  rng = np.random.default_rng(GRAD_SEED)
  normal = lambda: jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  steady = normal()
  return [jax.tree.map(lambda a, b: (a + np.float32(0.3) * b), steady,
                       normal()) for _ in range(STEPS)]


def leaf_paths(tree) -> list[str]:
  return [jax.tree_util.keystr(p)
          for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def host_mesh() -> Mesh:
  devices = jax.devices()
  if len(devices) < DEVICES:
    raise RuntimeError(
        f'distribute8 needs {DEVICES} devices, got {len(devices)}: set '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}')
  return Mesh(np.asarray(devices[:DEVICES]), ('fsdp',))


def fsdp_put(tree, mesh: Mesh):
  """FSDP placement: axis 0 over the mesh where divisible, else replicated."""
  def put(x):
    split = x.ndim >= 2 and x.shape[0] % DEVICES == 0
    return jax.device_put(x, NamedSharding(mesh, P('fsdp') if split else P()))
  return jax.tree.map(put, tree)


# ---------------------------------------------------------------- summaries


def _sha(leaves) -> np.ndarray:
  h = hashlib.sha256()
  for x in leaves:
    h.update(np.ascontiguousarray(x).tobytes())
  return np.frombuffer(h.digest(), np.uint8).copy()


def _unit_directions(seed, shape, k) -> np.ndarray:
  """``k`` fixed random directions of unit Frobenius norm, ``(k, size)``."""
  rng = np.random.default_rng(seed)
  r = rng.standard_normal((k, int(np.prod(shape, dtype=np.int64))))
  return r / np.linalg.norm(r, axis=1, keepdims=True)


def _norm_and_projections(x, directions):
  flat = np.asarray(x, np.float64).ravel()
  return float(np.linalg.norm(flat)), directions @ flat


def _state_pieces(state):
  """Rank ≥ 3 leaves cut into trailing 2-D slices, size-1 axes squeezed
  (``(1, n)`` and ``(n,)`` alike); all-zero pieces (padding) dropped."""
  pieces = []
  for leaf in jax.tree.leaves(state):
    x = np.asarray(leaf)
    for piece in (x.reshape((-1,) + x.shape[-2:]) if x.ndim >= 3 else [x]):
      if np.any(piece):
        pieces.append(np.squeeze(piece))
  return pieces


def _state_fingerprint(state):
  """Per dtype: non-zero count, Σx, Σ|x|, Σx², quantiles of non-zeros."""
  by_dtype = {}
  for leaf in jax.tree.leaves(state):
    x = np.asarray(leaf)
    by_dtype.setdefault(str(x.dtype), []).append(
        x.astype(np.float64).ravel())
  dtypes = sorted(by_dtype)
  rows = []
  for d in dtypes:
    v = np.concatenate(by_dtype[d])
    v = v[v != 0]
    q = np.quantile(v, QUANTILES) if v.size else np.zeros(len(QUANTILES))
    rows.append(np.concatenate([[v.size, v.sum(), np.abs(v).sum(),
                                 (v * v).sum()], q]))
  return np.asarray(dtypes), np.asarray(rows, np.float64)


def summarise_state(state) -> dict:
  """The state's pieces sorted by (shape, dtype, norm), and fingerprint."""
  entries = []
  for piece in _state_pieces(state):
    shape = tuple(piece.shape)
    directions = _unit_directions(
        [STATE_PROJ_SEED, len(shape), *shape], shape, STATE_PROJECTIONS)
    norm, proj = _norm_and_projections(piece, directions)
    entries.append((shape, str(piece.dtype), norm, proj))
  entries.sort(key=lambda e: (e[0], e[1], e[2]))
  dtypes, fingerprint = _state_fingerprint(state)
  return {
      'state_shape': np.asarray(['x'.join(map(str, e[0])) for e in entries]),
      'state_dtype': np.asarray([e[1] for e in entries]),
      'state_norm': np.asarray([e[2] for e in entries], np.float64),
      'state_proj': np.asarray([e[3] for e in entries],
                               np.float64).reshape(-1, STATE_PROJECTIONS),
      'fingerprint_dtype': dtypes, 'fingerprint': fingerprint}


class _UpdateSummary:
  """Per-step hash, norms and projections of the update leaves."""

  def __init__(self, params):
    self.directions = [
        _unit_directions([UPDATE_PROJ_SEED, i], x.shape, UPDATE_PROJECTIONS)
        for i, x in enumerate(jax.tree.leaves(params))]
    self.sha, self.norm, self.proj = [], [], []

  def add(self, updates):
    leaves = [np.asarray(u) for u in jax.tree.leaves(updates)]
    self.sha.append(_sha(leaves))
    stats = [_norm_and_projections(u, d)
             for u, d in zip(leaves, self.directions)]
    self.norm.append([s[0] for s in stats])
    self.proj.append([s[1] for s in stats])

  def arrays(self) -> dict:
    return {'update_sha': np.stack(self.sha),
            'update_norm': np.asarray(self.norm, np.float64),
            'update_proj': np.asarray(self.proj, np.float64)}


def run(name: str, placement: str) -> dict:
  """Steps ``name`` :data:`STEPS` times; returns its summary (see module)."""
  params = jax.tree.map(jnp.asarray, init_params())
  grads = gradients(params)
  if placement == 'one':
    tx = make(name)
    state = tx.init(params)
  elif placement == 'distribute8':
    mesh = host_mesh()
    tx = make(name, distribute=mesh)
    params = fsdp_put(params, mesh)
    grads = [fsdp_put(g, mesh) for g in grads]
    state = ol.sharded_init(tx.init, params)
  else:
    raise ValueError(f'placement: expected one of {PLACEMENTS}, got '
                     f'{placement!r}')
  update = jax.jit(tx.update)
  summary = _UpdateSummary(params)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    summary.add(updates)
  final = [np.asarray(p) for p in jax.tree.leaves(params)]
  out = summary.arrays()
  out['params_sha'] = _sha(final)
  out['params'] = final
  out.update(summarise_state(state))
  return out


# --------------------------------------------------------------- comparison


def bit_differences(recorded: dict, current: dict) -> list[str]:
  """Steps whose update bytes differ, and whether the final params do."""
  steps = [t + 1 for t in range(STEPS) if not np.array_equal(
      recorded['update_sha'][t], current['update_sha'][t])]
  out = []
  if steps:
    out.append(f'update bytes differ at steps {steps} (of {STEPS})')
  if not np.array_equal(recorded['params_sha'], current['params_sha']):
    out.append('final parameter bytes differ')
  return out


def relative_differences(recorded: dict, current: dict):
  """``(per step and update leaf, per final parameter leaf)`` differences.

  Updates: the larger of the norms' and the projections' (on unit
  directions) differences, over the recorded norm ``‖u‖``. Parameters:
  ``max|Δp| / max|p|`` per leaf. NaN where a value is not finite.
  """
  scale = np.maximum(recorded['update_norm'], TINY)
  d_norm = np.abs(current['update_norm'] - recorded['update_norm']) / scale
  d_proj = np.max(np.abs(current['update_proj'] - recorded['update_proj']),
                  axis=-1) / scale
  updates = np.where(np.isfinite(d_norm) & np.isfinite(d_proj),
                     np.maximum(d_norm, d_proj), np.nan)
  params = np.asarray([
      np.max(np.abs(c.astype(np.float64) - r)) / max(np.max(np.abs(r)), TINY)
      for r, c in zip(recorded['params'], current['params'])])
  return updates, params


def close_differences(recorded: dict, current: dict, paths: list[str],
                      rtol: float) -> list[str]:
  """Updates and final params further apart than ``rtol`` (relative, as
  :func:`relative_differences` measures them), largest first."""
  updates, params = relative_differences(recorded, current)
  found = []
  for t, i in zip(*np.nonzero(~(updates <= rtol))):
    found.append((updates[t, i], f'step {t + 1} update {paths[i]}: relative '
                  f'difference {updates[t, i]:.3g} (norm '
                  f'{recorded["update_norm"][t, i]:.6g} recorded, '
                  f'{current["update_norm"][t, i]:.6g} now)'))
  for i in np.nonzero(~(params <= rtol))[0]:
    found.append((params[i], f'final params {paths[i]}: max |difference| / '
                  f'max |p| = {params[i]:.3g}'))
  found.sort(key=lambda f: -np.nan_to_num(f[0], nan=np.inf))
  return [f[1] for f in found]


def _group(summary: dict) -> dict:
  groups = {}
  for k, (shape, dtype) in enumerate(zip(summary['state_shape'],
                                         summary['state_dtype'])):
    groups.setdefault((str(shape), str(dtype)), []).append(k)
  return groups


def _match(recorded, current, rec_idx, cur_idx, rtol):
  """Worst relative mismatch of the best one-to-one pairing of pieces."""
  r = np.column_stack([recorded['state_norm'][rec_idx],
                       recorded['state_proj'][rec_idx]])
  c = np.column_stack([current['state_norm'][cur_idx],
                       current['state_proj'][cur_idx]])
  scale = np.maximum(r[:, :1], TINY)
  cost = np.max(np.abs(r[:, None, :] - c[None, :, :]), axis=-1) / scale
  rows, cols = linear_sum_assignment(cost)
  worst = cost[rows, cols]
  return [(rec_idx[i], float(w)) for i, w in zip(rows, worst) if w > rtol]


def state_differences(recorded: dict, current: dict, rtol: float
                      ) -> list[str]:
  """What differs between the final states' pieces and fingerprints."""
  out = []
  rec, cur = _group(recorded), _group(current)
  for key in sorted(set(rec) | set(cur)):
    n_rec, n_cur = len(rec.get(key, [])), len(cur.get(key, []))
    if n_rec != n_cur:
      out.append(f'state pieces of shape {key[0]} {key[1]}: {n_rec} '
                 f'recorded, {n_cur} now')
      continue
    for k, w in _match(recorded, current, rec[key], cur[key], rtol):
      out.append(f'state piece {key[0]} {key[1]} (recorded norm '
                 f'{recorded["state_norm"][k]:.6g}): no current piece within '
                 f'{rtol:g}, nearest {w:.3g}')
  rd, cd = list(recorded['fingerprint_dtype']), list(
      current['fingerprint_dtype'])
  if rd != cd:
    out.append(f'state dtypes: {rd} recorded, {cd} now')
    return out
  for d, r, c in zip(rd, recorded['fingerprint'], current['fingerprint']):
    if r[0] != c[0]:
      out.append(f'state {d}: {int(r[0])} non-zero elements recorded, '
                 f'{int(c[0])} now')
    sums = np.abs(c[1:4] - r[1:4]) > rtol * max(r[2], TINY)
    sums[2] = abs(c[3] - r[3]) > rtol * max(r[3], TINY)
    quant = np.abs(c[4:] - r[4:]) > rtol * max(np.max(np.abs(r[4:])), TINY)
    if np.any(sums) or np.any(quant):
      out.append(f'state {d}: element fingerprint (Σx, Σ|x|, Σx², '
                 f'quantiles) differs by more than {rtol:g}: recorded '
                 f'{r[1:4]}, now {c[1:4]}')
  return out


# ------------------------------------------------------------------ storage


def _planes(x: np.ndarray) -> np.ndarray:
  """float32 bytes as 4 byte planes (exponents compress well together)."""
  return np.frombuffer(x.astype('<f4').tobytes(), np.uint8).reshape(-1, 4).T


def _unplanes(planes: np.ndarray, shape) -> np.ndarray:
  return np.frombuffer(np.ascontiguousarray(planes.T).tobytes(),
                       '<f4').reshape(shape).astype(np.float32)


def save(placement: str, records: dict, paths: list[str],
         base_params: dict | None = None) -> None:
  """Writes ``records`` (name → summary). ``distribute8`` stores its final
  params as the exact float32 difference from ``base_params`` (``one``'s)."""
  arrays = {'meta/paths': np.asarray(paths),
            'meta/names': np.asarray(list(records)),
            'meta/versions': np.asarray([jax.__version__, np.__version__]),
            'meta/machine': np.asarray(machine())}
  for name, rec in records.items():
    for key, value in rec.items():
      if key != 'params':
        arrays[f'{name}/{key}'] = value
    params = rec['params']
    if base_params is not None:
      base = base_params[name]
      diff = [p - b for p, b in zip(params, base)]
      if not all(np.array_equal(b + d, p)
                 for b, d, p in zip(base, diff, params)):
        raise AssertionError(f'{name}: float32 difference is not exact')
      arrays[f'{name}/base_params_sha'] = _sha(base)
      params = diff
    for i, p in enumerate(params):
      arrays[f'{name}/params/{i}'] = _planes(p)
  os.makedirs(FIXTURES, exist_ok=True)
  np.savez_compressed(fixture_path(placement), **arrays)


def recorded_machine(placement: str) -> str:
  """:func:`machine` where the fixture was recorded."""
  with np.load(fixture_path(placement), allow_pickle=False) as f:
    return (str(f['meta/machine']) if 'meta/machine' in f.files
            else 'a machine that was not written down')


def load(placement: str) -> tuple[dict, list[str]]:
  """``(name → summary, leaf paths)`` as :func:`save` wrote them."""
  shapes = [tuple(x.shape) for x in jax.tree.leaves(init_params())]

  def read(path):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}

  raw = read(fixture_path(placement))
  base = load('one')[0] if placement == 'distribute8' else None
  records = {}
  for name in raw['meta/names']:
    rec = {k.split('/', 1)[1]: v for k, v in raw.items()
           if k.startswith(f'{name}/') and '/params/' not in k}
    params = [_unplanes(raw[f'{name}/params/{i}'], s)
              for i, s in enumerate(shapes)]
    if base is not None:
      if not np.array_equal(rec['base_params_sha'], base[name]['params_sha']):
        raise AssertionError(
            f'{name}: behaviour_distribute8.npz was recorded against another '
            'behaviour_one.npz; record both together (module docstring)')
      params = [b + d for b, d in zip(base[name]['params'], params)]
    rec['params'] = params
    records[str(name)] = rec
  return records, [str(p) for p in raw['meta/paths']]


def main(argv) -> None:
  placement = argv[0] if argv else 'all'
  paths = leaf_paths(init_params())
  if placement in ('all', 'one'):
    if len(jax.devices()) != 1:
      raise SystemExit('record "one" in a process with one device (unset '
                       'XLA_FLAGS), as the single-device tests run')
    save('one', {n: run(n, 'one') for n in NAMED}, paths)
    print(f'wrote {fixture_path("one")}', flush=True)
  if placement == 'all':
    env = dict(os.environ, XLA_FLAGS=(
        f'--xla_force_host_platform_device_count={DEVICES}'))
    subprocess.run([sys.executable, os.path.abspath(__file__),
                    'distribute8'], env=env, check=True)
  if placement == 'distribute8':
    base = {n: r['params'] for n, r in load('one')[0].items()}
    save('distribute8', {n: run(n, 'distribute8') for n in NAMED}, paths,
         base_params=base)
    print(f'wrote {fixture_path("distribute8")}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
