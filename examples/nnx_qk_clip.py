"""MuonClip in Flax NNX: Muon + QK-clip on a tiny causal transformer.

A synthetic copy task (nothing downloaded): predict the token seen
``--lag`` positions earlier, which needs sharp attention, so with a large
learning rate the attention logits grow. The model's attention records each
head's largest logit; ``optax_lite.qk_clip`` rescales the query/key kernels
of any head whose logit passed ``--threshold`` after every step (Kimi K2's
MuonClip). The optimizer also orthogonalises the attention kernels per head
(``flax_matrix_dims(per_head=True)``) with Gram Newton–Schulz
(``method="gram_polar_express"``).

    python examples/nnx_qk_clip.py                  # clipped and unclipped
    python examples/nnx_qk_clip.py --steps 5        # smoke test

The pattern to copy:

1. the attention records its per-head max logit (masked positions
   excluded) with ``sow``; with ``nnx.MultiHeadAttention`` through an
   ``attention_fn`` (it receives ``module=`` when called with
   ``sow_weights=True``), see ``attention_with_max_logits``;
2. the loss function runs the model under ``nnx.capture`` and returns the
   sown values as its aux output; the train step hands them to the
   optimizer::

     def loss_fn(model):
       out, max_logits = nnx.capture(model, nnx.Intermediate)(x)
       return loss(out), max_logits
     (loss, max_logits), grads = nnx.value_and_grad(
         loss_fn, has_aux=True)(model)
     optimizer.update(model, grads, max_logits=max_logits)

   with ``tx = optax.chain(ol.muon(...), ol.qk_clip(threshold))``.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lite as ol

VOCAB, SEQ, D, HEADS = 16, 16, 32, 4


def attention_with_max_logits(query, key, value, *, mask=None, module=None,
                              **kw):
  """``nnx.dot_product_attention`` that sows each head's max logit."""
  logits = jnp.einsum('...qhd,...khd->...hqk', query, key)
  logits = logits / jnp.sqrt(query.shape[-1]).astype(logits.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  module.sow(nnx.Intermediate, 'max_logits',
             jnp.max(logits, axis=tuple(i for i in range(logits.ndim)
                                        if i != logits.ndim - 3)))
  return nnx.dot_product_attention(query, key, value, mask=mask, **kw)


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=D, decode=False,
        attention_fn=attention_with_max_logits, rngs=rngs)
    self.norm2 = nnx.RMSNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, 4 * D, rngs=rngs)
    self.down = nnx.Linear(4 * D, D, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask, sow_weights=True)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Model(nnx.Module):

  def __init__(self, layers: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, D)))
    self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    mask = nnx.make_causal_mask(tokens)
    x = self.embed(tokens) + self.pos[...]
    for block in self.blocks:
      x = block(x, mask)
    return self.head(x)


def make_batch(key, batch, lag):
  tokens = jax.random.randint(key, (batch, SEQ), 0, VOCAB)
  targets = jnp.roll(tokens, lag, axis=1)  # position t: the token at t - lag
  return tokens, targets


def make_tx(learning_rate, threshold):
  """Muon (per-head, Gram NS) on the hidden matrices, then QK-clip."""
  tx = ol.muon(learning_rate, method='gram_polar_express',
               dims=functools.partial(ol.flax_matrix_dims, per_head=True))
  if threshold is None:
    return tx
  return optax.chain(tx, ol.qk_clip(threshold))


def train(threshold, steps, batch, lr, lag, layers=1, seed=0):
  """Returns (losses, max logits per step, seconds)."""
  model = Model(layers, nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make_tx(lr, threshold), wrt=nnx.Param)

  def loss_fn(m, tokens, targets):
    logits, max_logits = nnx.capture(m, nnx.Intermediate)(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, lag:], targets[:, lag:]).mean()
    return loss, max_logits

  @nnx.jit
  def step(m, opt, tokens, targets):
    (loss, max_logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        m, tokens, targets)
    if threshold is None:
      opt.update(m, grads)
    else:
      opt.update(m, grads, max_logits=max_logits)
    return loss, jnp.max(jnp.stack(jax.tree.leaves(max_logits)))

  losses, peaks = [], []
  key = jax.random.PRNGKey(seed)
  t0 = time.perf_counter()
  for _ in range(steps):
    key, sub = jax.random.split(key)
    loss, peak = step(model, optimizer, *make_batch(sub, batch, lag))
    losses.append(float(loss))
    peaks.append(float(peak))
  return losses, peaks, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=150)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--lr', type=float, default=0.05)
  ap.add_argument('--lag', type=int, default=3)
  ap.add_argument('--threshold', type=float, default=10.0)
  args = ap.parse_args(argv)
  results = {}
  print(f'{"run":<14} {"loss@0":>8} {"loss@end":>9} {"max logit":>10} '
        f'{"seconds":>8}')
  for name, tau in (('muon', None), ('muon+qk_clip', args.threshold)):
    losses, peaks, secs = train(tau, args.steps, args.batch, args.lr,
                                args.lag)
    results[name] = (losses, peaks)
    print(f'{name:<14} {losses[0]:8.3f} {losses[-1]:9.3f} '
          f'{max(peaks):10.2f} {secs:8.1f}')
  return results


if __name__ == '__main__':
  main()
