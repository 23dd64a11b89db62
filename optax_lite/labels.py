"""Label a parameter tree by path: which leaves a matrix method should touch.

Matrix optimizers (Muon, RMNP, FISMO, SOAP, Shampoo, LITE) are meant for the
hidden weight matrices of a network. Embedding tables, the output head,
normalisation gains, biases and scalars go to AdamW (Keller Jordan's Muon
README, Moonlight, the LITE paper's Algorithm 5). The default rule of
``optax.contrib.muon`` ("every 2-D leaf is a matrix") sends embeddings and the
LM head to Muon; :func:`label_params` does not.

Labels:

``"matrix"``     hidden weight matrices (rank >= 2): the matrix method.
``"embedding"``  embedding tables (path contains ``embed``).
``"head"``       the output projection (path component ``head``, ``lm_head``,
                 ``unembed``, ``output_head``, ``logits``; or, if no such
                 name exists, a 2-D kernel shaped ``(d, vocab)`` transposed to
                 the embedding table ``(vocab, d)``).
``"norm"``       gains of normalisation layers (path contains ``norm`` or a
                 component starting with ``ln``), rank < 2.
``"other"``      everything else: biases, scalars, other vectors.

Works on plain dicts, Flax Linen ``params`` and ``flax.nnx`` ``State`` trees.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax

LABELS = ('matrix', 'embedding', 'head', 'norm', 'other')
DEFAULT_HEAD_NAMES = ('head', 'lm_head', 'unembed', 'output_head', 'logits')


def path_str(path) -> str:
  """``'a/b/kernel'`` for a ``jax.tree_util`` key path (drops NNX ``value``)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  if parts and parts[-1] == 'value':
    parts = parts[:-1]
  return '/'.join(parts)


def _default_label(path: str, leaf, head_names) -> str:
  comps = path.lower().split('/')
  ndim = len(getattr(leaf, 'shape', ()))
  if any('embed' in c for c in comps):
    return 'embedding'
  if any(c in head_names for c in comps):
    return 'head'
  if ndim >= 2:
    return 'matrix'
  if any('norm' in c or c.startswith('ln') for c in comps):
    return 'norm'
  return 'other'


def label_params(params, *, head_names=DEFAULT_HEAD_NAMES,
                 overrides: Mapping[str, str] | Callable[[str, Any],
                                                         str | None] | None = None,
                 detect_head_by_shape: bool = True):
  """Returns a tree of labels (strings) shaped like ``params``.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct`` leaves).
    head_names: path components that mark the output head.
    overrides: either a mapping ``{regex: label}`` matched (``re.search``)
      against the ``'/'``-joined path, first match wins, or a callable
      ``(path, leaf) -> label | None``. Overrides win over the defaults.
    detect_head_by_shape: if no leaf is named like a head, label as
      ``"head"`` the last 2-D leaf shaped ``(d, vocab)`` where an embedding
      table is ``(vocab, d)`` (an untied output projection).

  Raises:
    ValueError: an override returns a label outside :data:`LABELS`.
  """
  head_names = tuple(h.lower() for h in head_names)
  if isinstance(overrides, Mapping):
    rules = [(re.compile(k), v) for k, v in overrides.items()]

    def override_fn(path, leaf):
      del leaf
      for rx, lab in rules:
        if rx.search(path):
          return lab
      return None
  else:
    override_fn = overrides

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  labels = []
  for path, (_, leaf) in zip(paths, flat):
    lab = override_fn(path, leaf) if override_fn else None
    if lab is not None and lab not in LABELS + ('adam',):
      raise ValueError(f'overrides: label {lab!r} for {path!r} is not one of '
                       f'{LABELS + ("adam",)}.')
    labels.append(lab or _default_label(path, leaf, head_names))

  if detect_head_by_shape and 'head' not in labels:
    emb_shapes = {tuple(leaf.shape) for (_, leaf), lab in zip(flat, labels)
                  if lab == 'embedding' and len(leaf.shape) == 2}
    for i in reversed(range(len(flat))):
      shape = tuple(getattr(flat[i][1], 'shape', ()))
      if (labels[i] == 'matrix' and len(shape) == 2 and
          (shape[1], shape[0]) in emb_shapes):
        if override_fn is None or override_fn(paths[i], flat[i][1]) is None:
          labels[i] = 'head'
        break
  return jax.tree_util.tree_unflatten(treedef, labels)


def flax_matrix_dims(params):
  """Per-leaf :class:`MatrixDims` for common Flax modules.

  * ``[d, heads, head_dim]`` query/key/value kernels of
    ``MultiHeadAttention`` -> ``(d, heads·head_dim)``;
  * ``[heads, head_dim, d]`` attention output kernels -> ``(heads·head_dim,
    d)``;
  * other leaves of rank >= 2 -> the default rule; rank < 2 -> ``None``.
  """
  from optax_lite.linalg.matrices import MatrixDims, default_dims

  def dims(path, leaf):
    comps = path_str(path).lower().split('/')
    nd = len(getattr(leaf, 'shape', ()))
    if nd < 2:
      return None
    if nd == 3 and any(c in ('query', 'key', 'value', 'q', 'k', 'v')
                       for c in comps):
      return MatrixDims(0, (1, 2))
    if nd == 3 and any(c in ('out', 'o', 'out_proj') for c in comps):
      return MatrixDims((0, 1), 2)
    return default_dims(leaf.shape)

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(
      treedef, [dims(p, x) for p, x in flat])
