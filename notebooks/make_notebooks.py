"""Builds the notebooks in this folder with nbformat (no hand-written JSON).

    .venv/bin/python notebooks/make_notebooks.py

They are executed by ``./run test`` (``pytest --nbmake notebooks``), so each
uses small settings and runs in well under a minute on a CPU.
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(s):
  return new_markdown_cell(s.strip('\n'))


def code(s):
  return new_code_cell(s.strip('\n'))


SETUP = code('''
import os
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import jax
import jax.numpy as jnp
import numpy as np
import optax
import matplotlib
matplotlib.use('Agg')  # headless in CI; the figures still show in Jupyter
import matplotlib.pyplot as plt
%matplotlib inline
import optax_lite as ol
''')

# ---------------------------------------------------------------------------
quickstart = [
    md('''
# optax_lite quickstart

`optax_lite` gives matrix-aware optimizers (Muon, RMNP, FISMO, SOAP, Shampoo and
their LITE variants) as ordinary `optax.GradientTransformation`s. Every named
optimizer takes `learning_rate` first, sends the **hidden weight matrices** to
its matrix method and everything else (embeddings, output head, norms, biases)
to AdamW, chosen by the parameter path.
'''),
    SETUP,
    md('## 1. A small Flax NNX model and its labels'),
    code('''
from flax import nnx

class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 64, rngs=rngs)
    self.norm = nnx.LayerNorm(64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 64, rngs=rngs)
    self.head = nnx.Linear(64, 4, rngs=rngs)
  def __call__(self, x):
    h = jax.nn.gelu(self.norm(self.fc1(x)))
    return self.head(h + jax.nn.gelu(self.fc2(h)))

model = MLP(nnx.Rngs(0))
labels = ol.label_params(nnx.state(model, nnx.Param))
for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]:
  print(f'{jax.tree_util.keystr(path):32s} -> {lab}')
'''),
    md('''
`fc1/kernel` and `fc2/kernel` are the matrices (Muon); the head, the norm and
the biases use AdamW. Pass `labels=` to any optimizer to override this.

## 2. Train with `nnx.Optimizer`
'''),
    code('''
k1, k2, k3 = jax.random.split(jax.random.PRNGKey(42), 3)
W1 = jax.random.normal(k1, (16, 64)) / 4.0
W2 = jax.random.normal(k2, (64, 4)) / 8.0
X = jax.random.normal(k3, (2048, 16))
Y = jnp.tanh(X @ W1) @ W2

def loss_fn(m, x, y):
  return jnp.mean(jnp.square(m(x) - y))

def train(tx, steps=60):
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(m, x, y)
    opt.update(m, grads)
    return loss

  losses = []
  for i in range(steps):
    idx = (np.arange(128) + 128 * i) % 2048
    losses.append(float(step(model, opt, X[idx], Y[idx])))
  return losses

curves = {
    'adamw': train(optax.adamw(3e-3)),
    'muon': train(ol.muon(learning_rate=0.02)),
    'muon_lite': train(ol.muon_lite(learning_rate=0.02, total_steps=60)),
}
for k, v in curves.items():
  print(f'{k:10s} first {v[0]:.4f}  last {v[-1]:.4f}')
'''),
    code('''
fig, ax = plt.subplots(figsize=(6, 3.5))
for k, v in curves.items():
  ax.plot(v, label=k)
ax.set(xlabel='step', ylabel='train MSE', yscale='log', title='teacher-student regression')
ax.legend(); plt.show()
'''),
    md('''
## 3. The building blocks

A named optimizer is a chain of small transforms. Muon's matrix part, written
by hand (for a tree of matrices only; the named `ol.muon` adds AdamW for the
rest):
'''),
    code('''
my_muon = optax.chain(
    ol.momentum(0.95, nesterov=True),   # m = 0.95 m + g ; u = 0.95 m + g
    ol.orthogonalize('polar_express'),  # u -> polar(u) = U V^T
    ol.scale_by_shape('rms', 0.2),      # RMS 0.2, AdamW's learning rate carries over
    optax.add_decayed_weights(0.1),
    optax.scale_by_learning_rate(0.02),
)
params = {'w': jnp.ones((8, 12))}
g = {'w': jax.random.normal(jax.random.PRNGKey(0), (8, 12))}
u, _ = my_muon.update(g, my_muon.init(params), params)
print('update RMS:', float(jnp.sqrt(jnp.mean(u['w'] ** 2))))
o, _ = ol.orthogonalize().update(g, optax.EmptyState())
print('singular values of polar(g):', np.round(np.linalg.svd(np.asarray(o['w']), compute_uv=False), 3))
'''),
    md('''
## 4. Save and resume with orbax

Optimizer states are plain pytrees of arrays, so orbax saves and restores them
(`tests/test_checkpoint.py` checks that a resumed run is bit-identical).
'''),
    code('''
import tempfile, orbax.checkpoint as ocp
tx = ol.soap(learning_rate=3e-3, precondition_frequency=2)
params = {'layer': {'kernel': jnp.ones((8, 6))}, 'bias': jnp.zeros((6,))}
state = tx.init(params)
with tempfile.TemporaryDirectory() as d:
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(d, 'opt'), state)
  ckptr.wait_until_finished()
  restored = ckptr.restore(os.path.join(d, 'opt'),
                           jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
print(jax.tree.structure(restored) == jax.tree.structure(state))
'''),
]

# ---------------------------------------------------------------------------
lite = [
    md(r'''
# LITE explained: sharp and flat directions of a momentum matrix

LITE (Zhu et al. 2026) splits each Muon step into the **sharp** directions of
the momentum $M = U\Sigma V^\top$ (large singular values: the curvature is
high, the step must stay small) and the **flat** ones (small singular values:
progress is slow), and boosts the step along the flat ones by $\chi\ge1$:

$$U_{\text{LITE}} = \mathrm{polar}(\tilde M)\,\bigl(P + \chi (I-P)\bigr) \quad(\text{Muon-LITE, eq. 5, without the Nesterov terms})$$

where $P$ projects onto the sharp singular vectors. In Flax layout a kernel is
`(fan_in, fan_out)`, the transpose of PyTorch's, so the projector acts on the
**input side, from the left**.
'''),
    SETUP,
    md('## 1. A momentum matrix with a few sharp directions'),
    code('''
rng = np.random.default_rng(0)
m, n, k = 48, 32, 4          # fan_in x fan_out, k sharp directions
U0, _ = np.linalg.qr(rng.standard_normal((m, n)))
V0, _ = np.linalg.qr(rng.standard_normal((n, n)))
sigma = np.concatenate([[12., 10., 8., 7.], 1.5 * np.exp(-np.arange(n - k) / 10)])
M = jnp.asarray((U0 * sigma) @ V0.T, jnp.float32)
s = np.linalg.svd(np.asarray(M), compute_uv=False)
tau = 3.0
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogy(s, 'o-', ms=3, label='σ_i(M)')
ax.axhline(tau, color='r', ls='--', label='τ')
ax.set(xlabel='i', title='spectrum of the momentum'); ax.legend(); plt.show()
'''),
    md(r'''
## 2. The spectral filter: two polar factors, no SVD

$T = \tfrac12\,\mathrm{polar}(M) + \tfrac12\,\mathrm{polar}(M/\tau - \mathrm{polar}(M)) = U\,\mathrm{diag}(\mathbb 1[\sigma_i>\tau])\,V^\top$
(Appendix B.1). Its singular values are 1 on the sharp directions and 0 on the
flat ones; $P = T T^\top$ is the sharp projector on the input side.
'''),
    code('''
T = ol.linalg.spectral_filter(M, tau)
P = ol.linalg.sharp_projector(M, tau, side='left')
Uex = np.linalg.svd(np.asarray(M))[0][:, :k]
P_exact = Uex @ Uex.T
print('singular values of T:', np.round(np.linalg.svd(np.asarray(T), compute_uv=False)[:8], 3), '...')
print('rank(P) = tr(P) =', float(jnp.trace(P)).__round__(3))
print('||P - P_exact||_F =', float(np.linalg.norm(np.asarray(P) - P_exact)))
fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
axes[0].imshow(np.asarray(P), cmap='RdBu', vmin=-1, vmax=1); axes[0].set_title('P (Polar Express)')
axes[1].imshow(P_exact, cmap='RdBu', vmin=-1, vmax=1); axes[1].set_title('P exact (SVD)')
plt.show()
'''),
    md('## 3. The sharp/flat split and the boosted update'),
    code('''
chi = 2.0
O = ol.polar_factor(M)                       # Muon's direction, all σ = 1
I = jnp.eye(m)
sharp, flat = P @ O, (I - P) @ O
boosted = sharp + chi * flat
for name, x in [('polar(M)', O), ('sharp part P·O', sharp), ('flat part (I-P)·O', flat),
                ('LITE update', boosted)]:
  sv = np.linalg.svd(np.asarray(x), compute_uv=False)
  print(f'{name:20s} σ: {np.round(sv[:6], 3)} ... {np.round(sv[-3:], 3)}')
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(np.linalg.svd(np.asarray(O), compute_uv=False), 'o-', ms=3, label='Muon: polar(M)')
ax.plot(np.linalg.svd(np.asarray(boosted), compute_uv=False), 's-', ms=3, label=f'LITE, χ={chi}')
ax.set(xlabel='i', ylabel='σ_i(update)', title='flat directions get a χ× larger step')
ax.legend(); plt.show()
'''),
    md(r'''
Muon gives every direction the same step size (all singular values 1); LITE
keeps the $k$ sharp directions at 1 and moves $\chi\times$ faster along the
$n-k$ flat ones.

## 4. The same through the transform

`lite_flat_boost(muon_geometry())` does this per leaf, with the threshold
$\tau = l\,\lVert \tilde M\rVert_F$ adapted every step so that the rank of $P$
tracks the target $d_s$ (here 10% of $\min(m,n)$). With $\chi = 1$,
$\beta_1=\beta_2=0$ it is exactly Muon's direction.
'''),
    code('''
from optax_lite.transforms import lite as lite_tx
G = {'w': M}
params = {'w': jnp.zeros((m, n))}
for chi_ in (1.0, 2.0):
  tx = lite_tx.lite_flat_boost(lite_tx.muon_geometry(sharp_ratio=k / n), chi=chi_)
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(20):   # let the threshold controller settle
    u, state = update(G, state, params)
  sv = np.linalg.svd(np.asarray(u['w']), compute_uv=False)
  print(f'chi={chi_}: σ(update) = {np.round(sv[:6], 2)} ... {np.round(sv[-3:], 2)}')
'''),
]

# ---------------------------------------------------------------------------
comparison = [
    md('''
# Optimizer comparison from the benchmark results

Reads `benchmarks/results/*.json` written by the scripts in `benchmarks/`
(`step_time.py`, `lm.py`, `synthetic.py`, `state_bytes.py`,
`distributed_polar.py`). Nothing is recomputed here; a missing file is
reported, not an error. Regenerate with `./run bench <name> [--quick]`.
'''),
    SETUP,
    code('''
import glob, json, math, pathlib
root = pathlib.Path.cwd()
while not (root / 'benchmarks').is_dir() and root != root.parent:
  root = root.parent
RESULTS = root / 'benchmarks' / 'results'

def load(stem):
  """The newest-named results file for a benchmark, or None (and say so)."""
  files = sorted(RESULTS.glob(f'{stem}*.json'), key=lambda f: ('_quick' in f.name, f.name))
  if not files:
    print(f'[missing] no benchmarks/results/{stem}*.json - run ./run bench {stem}')
    return None, None
  path = files[0]
  try:
    data = json.loads(path.read_text())
  except Exception as e:
    print(f'[unreadable] {path.name}: {e}')
    return None, None
  meta = data.get('meta', {}) if isinstance(data, dict) else {}
  print(f'{path.name}: device {meta.get("device_kind", "?")}, {meta.get("utc", "")}')
  return path, data

def table(rows, cols, fmt='{:.3g}'):
  widths = [max(len(str(c)), 10) for c in cols]
  print('  '.join(str(c).ljust(w) for c, w in zip(cols, widths)))
  for r in rows:
    cells = []
    for c, w in zip(cols, widths):
      v = r.get(c, '')
      cells.append((fmt.format(v) if isinstance(v, float) else str(v)).ljust(w))
    print('  '.join(cells))

print(sorted(p.name for p in RESULTS.glob('*.json')) if RESULTS.is_dir() else 'no results folder')
'''),
    md('## State bytes per parameter'),
    code('''
path, data = load('state_bytes')
if data:
  models = list(data['models'])
  by = {}
  for r in data['rows']:
    by.setdefault((r['optimizer'], r['state_dtype']), {})[r['model']] = r['bytes_per_param']
  rows = [dict(optimizer=o, dtype=d, **v) for (o, d), v in by.items()]
  table(rows, ['optimizer', 'dtype'] + models, fmt='{:.2f}')
'''),
    md('## Step time'),
    code('''
path, data = load('step_time')
if data:
  for leaf in data.get('leaves', []) + data.get('models', []):
    print(f"\\n{leaf.get('name')} ({leaf.get('n_params')} params)")
    rows = []
    for name, r in leaf.get('optimizers', {}).items():
      row = {'optimizer': name}
      row.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
      rows.append(row)
    cols = ['optimizer'] + sorted({k for r in rows for k in r if k != 'optimizer'})[:6]
    table(rows, cols)
  for k, v in data.get('headline', {}).items():
    print(f'{k}: {v:.3g}' if isinstance(v, float) else f'{k}: {v}')
'''),
    md('## Language model'),
    code('''
path, data = load('lm')
if data:
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, entry in data.get('results', {}).items():
    for r in entry.get('runs', [])[:1]:
      ax.plot(r.get('val_steps', []), r.get('val_loss', []), label=name)
  ax.set(xlabel='step', ylabel='val loss'); ax.legend(fontsize=7); plt.show()
'''),
    md('## Synthetic problems'),
    code('''
path, data = load('synthetic')
if data:
  for r in data.get('muon_vs_gd', []):
    finals = {k: v for k, v in r.items() if k.endswith('final_rel')}
    print(r.get('problem'), {k: f'{v:.2e}' for k, v in finals.items()})
  runs = data.get('muon_vs_gd', [])
  if runs and 'curves' in runs[0]:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in runs[0]['curves'].items():
      ys = [v for k, v in c.items() if k != 'step'][0]
      ax.semilogy(c['step'], ys, label=name)
    ax.set(title=runs[0].get('problem', ''), xlabel='step'); ax.legend(); plt.show()
'''),
    md('## Spreading the polar factor over devices'),
    code('''
path, data = load('distributed_polar')
if data:
  table(data['rows'], ['layout', 'per_leaf_s', 'shard_polar_s', 'speedup', 'flops_ratio', 'max_abs_diff'])
'''),
]


def write(name, cells):
  nb = new_notebook(cells=cells)
  for i, cell in enumerate(nb.cells):  # stable ids: regenerating is no churn
    cell.id = f'{name.split(".")[0]}-{i}'
  nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3',
                               'language': 'python'}
  nb.metadata['language_info'] = {'name': 'python'}
  path = os.path.join(HERE, name)
  nbformat.validate(nb)
  nbformat.write(nb, path)
  print('wrote', path)


if __name__ == '__main__':
  write('quickstart.ipynb', quickstart)
  write('lite_explained.ipynb', lite)
  write('comparison.ipynb', comparison)
