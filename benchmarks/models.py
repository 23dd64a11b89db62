"""A LLaMA-style byte-level decoder in Flax NNX, and its data.

Model: token embedding -> ``depth`` x [RMSNorm -> causal self-attention with
RoPE -> residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> untied
output head (``vocab = 256`` bytes). No biases. Parameter paths are chosen so
that ``optax_lite.label_params`` finds ``embed`` (embedding), ``head`` (head),
``*norm*`` (norm gains) and the hidden kernels (matrix).

Data (:func:`load_corpus`): the running interpreter's standard library
source, every ``.py`` file outside ``site-packages``/``dist-packages`` and the
test packages, as raw bytes, no download (about 13 MB on CPython 3.11, so a
CPU run never repeats it). Files are read in sorted path order; a file goes
to the held-out validation stream when the SHA-256 of its relative path
falls in the first ``val_fraction`` of the hash range, so the split is by
file (no validation window shares a file with training) and does not depend
on the other files. Another Python version gives other bytes: the byte
counts and a SHA-256 of each stream are recorded with every results file
(``Corpus.info``). The old corpus, ``pydoc_data.topics`` (466 KB, repeated
within ~800 steps of 8x64 bytes, so long runs measured memorisation), stays
available as ``load_corpus('pydoc')`` for tiny demonstrations.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB = 256


@dataclasses.dataclass(frozen=True)
class Config:
  d_model: int
  depth: int
  n_heads: int
  d_ff: int
  seq_len: int = 128
  vocab: int = VOCAB
  rope_base: float = 10000.0


# Sizes from ~1M to ~20M parameters (counted by ``count_params``).
CONFIGS = {
    'nano': Config(d_model=64, depth=2, n_heads=2, d_ff=176, seq_len=64),
    'tiny': Config(d_model=128, depth=4, n_heads=4, d_ff=344),
    'small': Config(d_model=256, depth=6, n_heads=4, d_ff=688),
    'medium': Config(d_model=384, depth=8, n_heads=6, d_ff=1024),
    'large': Config(d_model=512, depth=6, n_heads=8, d_ff=1376, seq_len=256),
}


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + self.eps) * self.scale[...]


def rope_tables(seq_len: int, head_dim: int, base: float):
  inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
  ang = np.arange(seq_len)[:, None] * inv[None, :]
  return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang),
                                                             jnp.float32)


def apply_rope(x, cos, sin):
  """x: (B, T, H, D); rotates pairs (x[..., :D/2], x[..., D/2:])."""
  t = x.shape[1]
  cos, sin = cos[None, :t, None, :], sin[None, :t, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _dense(din, dout, rngs, scale=1.0):
  init = nnx.initializers.normal(stddev=scale / np.sqrt(din))
  return nnx.Linear(din, dout, use_bias=False, kernel_init=init, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    d = cfg.d_model
    self.n_heads = cfg.n_heads
    self.q = _dense(d, d, rngs)
    self.k = _dense(d, d, rngs)
    self.v = _dense(d, d, rngs)
    self.o = _dense(d, d, rngs, scale=1.0 / np.sqrt(2 * cfg.depth))

  def __call__(self, x, cos, sin):
    b, t, d = x.shape
    h = self.n_heads
    q = self.q(x).reshape(b, t, h, d // h)
    k = self.k(x).reshape(b, t, h, d // h)
    v = self.v(x).reshape(b, t, h, d // h)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // h)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jnp.where(mask, att, jnp.finfo(att.dtype).min)
    att = jax.nn.softmax(att, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, t, d)
    return self.o(y)


class SwiGLU(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.gate = _dense(cfg.d_model, cfg.d_ff, rngs)
    self.up = _dense(cfg.d_model, cfg.d_ff, rngs)
    self.down = _dense(cfg.d_ff, cfg.d_model, rngs,
                       scale=1.0 / np.sqrt(2 * cfg.depth))

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model)
    self.mlp = SwiGLU(cfg, rngs)

  def __call__(self, x, cos, sin):
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, untied embedding and head."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(1.0))
    blocks = [Block(cfg, rngs) for _ in range(cfg.depth)]
    self.blocks = nnx.List(blocks) if hasattr(nnx, 'List') else blocks
    self.final_norm = RMSNorm(cfg.d_model)
    self.head = _dense(cfg.d_model, cfg.vocab, rngs)
    cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_heads,
                           cfg.rope_base)
    self.rope = nnx.Variable(jnp.stack([cos, sin]))

  def __call__(self, tokens):
    cos, sin = self.rope[...][0], self.rope[...][1]
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x, cos, sin)
    return self.head(self.final_norm(x))


def make_model(name_or_cfg, seed: int = 0) -> Decoder:
  cfg = CONFIGS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
  return Decoder(cfg, nnx.Rngs(seed))


def count_params(model) -> int:
  state = nnx.state(model, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def loss_fn(model, tokens):
  """Mean next-byte cross-entropy (nats) of ``tokens`` (B, T+1)."""
  logits = model(tokens[:, :-1])
  import optax
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]).mean()


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train/validation byte streams and what identifies them."""
  train: np.ndarray  # uint8
  val: np.ndarray  # uint8
  info: dict  # name, root, python, files, bytes and sha256 per split

  def __iter__(self):  # ``train, val = load_corpus()``
    return iter((self.train, self.val))


_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests',
                            'idle_test', '__pycache__'})


_TEST_DIRS = frozenset({'test', 'tests', 'idle_test'})


def stdlib_files(root: str | None = None, tests: bool = False) -> list[str]:
  """Relative paths of the stdlib's ``.py`` files, sorted (POSIX separators).

  Skips ``site-packages``/``dist-packages`` (installed packages, not the
  standard library) and, unless ``tests``, the test packages (``test``,
  ``tests``, ``idle_test``: generated and deliberately malformed sources,
  ~18 MB more on CPython 3.11).
  """
  root = root or sysconfig.get_paths()['stdlib']
  excluded = _EXCLUDED_DIRS - _TEST_DIRS if tests else _EXCLUDED_DIRS
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in excluded)
    rel = os.path.relpath(d, root)
    for f in files:
      if f.endswith('.py'):
        out.append(f if rel == '.' else
                   os.path.join(rel, f).replace(os.sep, '/'))
  return sorted(out)


def is_val_file(rel_path: str, val_fraction: float) -> bool:
  """Held-out by the SHA-256 of the path (stable, independent of others)."""
  h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], 'big')
  return h < val_fraction * 2 ** 64


def _info(name, data_train, data_val, **extra):
  return dict(
      name=name, **extra,
      train_bytes=int(data_train.size), val_bytes=int(data_val.size),
      train_sha256=hashlib.sha256(data_train.tobytes()).hexdigest(),
      val_sha256=hashlib.sha256(data_val.tobytes()).hexdigest())


@functools.lru_cache(maxsize=4)
def _stdlib_corpus(root, val_fraction, tests=False):
  root = root or sysconfig.get_paths()['stdlib']
  train, val = [], []
  for rel in stdlib_files(root, tests):
    with open(os.path.join(root, rel), 'rb') as f:
      text = f.read()
    if is_val_file(rel, val_fraction):
      val.append(text)
    else:
      train.append(text)
  # Files end with a newline (nearly all); one more separates them.
  tr = np.frombuffer(b'\n'.join(train), np.uint8).copy()
  va = np.frombuffer(b'\n'.join(val), np.uint8).copy()
  return Corpus(tr, va, _info(
      'stdlib_tests' if tests else 'stdlib', tr, va, root=root,
      python=platform.python_version(), val_fraction=val_fraction,
      train_files=len(train), val_files=len(val)))


def _pydoc_corpus(val_fraction):
  from pydoc_data import topics
  text = '\n\n'.join(topics.topics[k] for k in sorted(topics.topics))
  data = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
  n_val = int(len(data) * val_fraction)
  tr, va = data[:-n_val].copy(), data[-n_val:].copy()
  return Corpus(tr, va, _info('pydoc', tr, va,
                              python=platform.python_version(),
                              val_fraction=val_fraction))


CORPORA = ('stdlib', 'stdlib_tests', 'pydoc')


def load_corpus(name: str = 'stdlib', val_fraction: float = 0.1,
                root: str | None = None) -> Corpus:
  """A :class:`Corpus`; ``train, val = load_corpus()`` unpacks the streams.

  ``'stdlib'`` (default): the standard library's sources, split by file (see
  the module docstring); ``'stdlib_tests'``: the same with the test packages
  (~2.5x the bytes, for budgets that would repeat ``'stdlib'``).
  ``'pydoc'``: ``pydoc_data.topics``, last 10 % of the bytes held out; only
  for tiny demonstrations (it repeats quickly).
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction: must be in (0, 1), got {val_fraction}')
  if name in ('stdlib', 'stdlib_tests'):
    return _stdlib_corpus(root, float(val_fraction), name == 'stdlib_tests')
  if name == 'pydoc':
    return _pydoc_corpus(val_fraction)
  raise ValueError(f'corpus: unknown name {name!r}; one of {CORPORA}')


def sample_batches(key, data, n_batches: int, batch: int, seq_len: int):
  """``(n_batches, batch, seq_len + 1)`` int32 random windows of ``data``."""
  starts = jax.random.randint(key, (n_batches, batch), 0,
                              data.shape[0] - seq_len - 1)
  idx = starts[..., None] + jnp.arange(seq_len + 1)
  return jnp.take(data, idx).astype(jnp.int32)


def val_windows(val, n_windows: int, seq_len: int):
  """Fixed, evenly spaced validation windows ``(n_windows, seq_len + 1)``."""
  n_windows = max(1, min(n_windows, (len(val) - 1) // (seq_len + 1)))
  starts = np.linspace(0, len(val) - seq_len - 2, n_windows).astype(np.int64)
  idx = starts[:, None] + np.arange(seq_len + 1)
  return jnp.asarray(val[idx], jnp.int32)
