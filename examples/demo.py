"""optax_lite demo: a byte-level Flax NNX model with adamw, muon, muon_lite.

Data: the Python standard library's sources, the corpus of the benchmarks
(``benchmarks/models.py``'s ``load_corpus('stdlib')``: the interpreter's
own ``.py`` files, held out by file), so nothing is downloaded. The model
predicts the next byte from the previous ``--context`` bytes. Shows a
progress bar per optimizer, prints a validation-loss table and writes
``demo_out/demo_loss.png``.

    ./run demo                 # ~1–2 minutes on 2 CPU cores
    ./run demo --steps 600     # longer
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optax_lite as ol

# The benchmarks' corpus loader, so the demo trains on the same data.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir, 'benchmarks'))
import models  # noqa: E402


class ByteMLP(nnx.Module):
  """Embed the last ``context`` bytes, two hidden layers, predict the next."""

  def __init__(self, context: int, d: int, hidden: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.fc1 = nnx.Linear(context * d, hidden, rngs=rngs)
    self.norm = nnx.RMSNorm(hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.lm_head = nnx.Linear(hidden, 256, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x).reshape(x.shape[0], -1)
    h = jax.nn.gelu(self.norm(self.fc1(h)))
    h = h + jax.nn.gelu(self.fc2(h))
    return self.lm_head(h)


def batches(data, context, batch, seed):
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(data) - context - 1, size=batch)
    x = np.stack([data[i:i + context] for i in idx])
    y = data[idx + context]
    yield jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)


def train(name, tx, data, val, args):
  model = ByteMLP(args.context, 32, 256, nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(m, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(m, opt, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(m, x, y)
    opt.update(m, grads)
    return loss

  @nnx.jit
  def evaluate(m, x, y):
    return loss_fn(m, x, y)

  vx, vy = next(batches(val, args.context, 2048, seed=123))
  curve, t0 = [], time.perf_counter()
  bar = tqdm(zip(range(args.steps), batches(data, args.context, args.batch,
                                            seed=0)),
             total=args.steps, desc=name, dynamic_ncols=True, leave=False)
  for i, (x, y) in bar:
    loss = step(model, opt, x, y)
    if i % args.eval_every == 0 or i == args.steps - 1:
      curve.append((i, float(loss), float(evaluate(model, vx, vy))))
      bar.set_postfix(val_loss=f'{curve[-1][2]:.3f}')
  bar.close()
  return curve, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--steps', type=int, default=500)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--context', type=int, default=8)
  ap.add_argument('--eval-every', type=int, default=50)
  ap.add_argument('--lr', type=float, default=1e-2)
  ap.add_argument('--out', default='demo_out')
  args = ap.parse_args(argv)

  corpus = models.load_corpus('stdlib')
  train_data, val_data = corpus.train, corpus.val
  print(f'Python {corpus.info["python"]} standard library sources: '
        f'{corpus.info["train_files"]} files ({len(train_data):,} bytes) to '
        f'train on, {corpus.info["val_files"]} held out; '
        f'device: {jax.devices()[0].device_kind}')
  schedule = lambda peak: optax.warmup_cosine_decay_schedule(
      0.0, peak, args.steps // 10, args.steps, peak * 0.1)
  # One peak learning rate for all: muon's 0.2·sqrt(max(m, n)) scaling
  # matches AdamW's update RMS, so AdamW's learning rate carries over.
  lr = args.lr
  runs = {
      f'optax.adamw (peak lr {lr:g})': optax.adamw(
          schedule(lr), b1=0.9, b2=0.95, weight_decay=0.1),
      f'optax_lite.muon (peak lr {lr:g})': ol.muon(schedule(lr)),
      f'optax_lite.muon_lite (peak lr {lr:g})': ol.muon_lite(
          schedule(lr), total_steps=args.steps, warmup_steps=args.steps // 10),
  }
  results = {}
  for name, tx in runs.items():
    curve, secs = train(name, tx, train_data, val_data, args)
    results[name] = (curve, secs)
    print(f'  trained {name:32s} in {secs:5.1f} s')

  steps = [c[0] for c in next(iter(results.values()))[0]]
  width = max(len(n) for n in results) + 2
  header = f'{"step":>6}' + ''.join(f'{n:>{width}}' for n in results)
  print('\nvalidation loss (nats/byte)')
  print(header)
  for j, s in enumerate(steps):
    print(f'{s:>6}' + ''.join(f'{results[n][0][j][2]:>{width}.4f}'
                              for n in results))

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'demo_loss.png')
  plot(results, schedule(lr), args, path)
  print(f'\nwrote {path}')


def plot(results, lr_schedule, args, path):
  """Validation loss from the first evaluation after step 0, log scale.

  The step-0 loss (ln 256 ≈ 5.5 nats/byte) is left out: on a linear axis
  it squeezes the curves together. The y axis is clipped to the curves
  from 20% of the run on (earlier points run off the top), so their gaps
  stay visible; the learning-rate schedule they share is drawn in grey on
  the right axis.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  styles = [('-', 'o'), ('--', 's'), ('-.', '^'), (':', 'D')]
  warmup = args.steps // 10
  clip_from = args.steps // 5
  lows, highs = [], []
  for (name, (curve, _)), (ls, mk) in zip(results.items(), styles):
    c = np.array(curve)
    c = c[c[:, 0] > 0]
    ax.plot(c[:, 0], c[:, 2], ls, marker=mk, markersize=4, label=name)
    lows.append(c[:, 2].min())
    after = c[c[:, 0] >= clip_from, 2]
    highs.append(after.max() if after.size else c[:, 2].max())
  lo, hi = min(lows), max(highs)
  ax.set_yscale('log')
  ax.set_ylim(lo / 1.02, hi * 1.05)
  ticks = matplotlib.ticker.FormatStrFormatter('%.2f')
  ax.yaxis.set_major_formatter(ticks)
  ax.yaxis.set_minor_formatter(ticks)
  ax.set_xlim(0, args.steps)
  ax.set_xlabel('step')
  ax.set_ylabel('validation loss (nats/byte, log scale)')
  ax.set_title('Byte-level MLP LM on the Python standard library')
  ax.grid(True, which='both', alpha=0.3)
  lr_ax = ax.twinx()
  t = np.arange(args.steps)
  lr_ax.plot(t, [float(lr_schedule(i)) for i in t], color='0.6', lw=1,
             label=f'learning rate: warmup {warmup} steps, cosine to 10%')
  lr_ax.set_ylabel('learning rate (shared schedule)', color='0.4')
  lr_ax.set_ylim(0, None)
  lines = ax.get_legend_handles_labels()
  lr_lines = lr_ax.get_legend_handles_labels()
  ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], fontsize=8,
            loc='upper right')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
