"""Label a parameter tree by path: which leaves a matrix method should touch.

Matrix optimizers (Muon, RMNP, FISMO, SOAP, Shampoo, LITE) are meant for the
hidden weight matrices of a network. Embedding tables, the output head,
normalisation gains, biases and scalars go to AdamW (Keller Jordan's Muon
README, Moonlight, the LITE paper's Algorithm 5). The default rule of
``optax.contrib.muon`` ("every 2-D leaf is a matrix") sends embeddings and the
LM head to Muon; :func:`label_params` does not.

Labels:

``"matrix"``     hidden weight matrices (rank >= 2, not empty): the matrix
                 method.
``"embedding"``  embedding tables (path contains ``embed``).
``"head"``       the output projection (path component ``head``, ``lm_head``,
                 ``unembed``, ``output_head``, ``logits``; or, if no such
                 name exists, a 2-D kernel shaped ``(d, vocab)`` transposed to
                 the embedding table ``(vocab, d)``).
``"norm"``       gains of normalisation layers (path contains ``norm`` or a
                 component starting with ``ln``), rank < 2.
``"other"``      everything else: biases (a leaf named ``bias`` or ``*_bias``,
                 whatever its rank: the ``(heads, head_dim)`` query/key/value
                 biases of Flax attention are never matrices), scalars,
                 other vectors, and matrices with no entries (a zero-sized
                 axis: no direction to orthogonalise; AdamW's no-op).

Works on plain dicts, Flax Linen ``params`` and ``flax.nnx`` ``State`` trees.

Scanned layers (``nnx.scan`` / ``nn.scan`` over a block, MoE experts) stack
their parameters along a leading axis: a ``(layers, d)`` norm gain, a
``(layers, in, out)`` kernel. Pass ``stacked=`` (a regex on the path) to
:func:`label_params` and :func:`flax_matrix_dims` and that axis is a batch
axis: the gain stays a ``"norm"``, the kernel is ``layers`` matrices of
``in × out``, each orthogonalised / preconditioned on its own. One stacked
leaf per weight also keeps the optimizer's compiled program the same size at
any depth. (The LITE optimizers' AdamW-LITE, on embedding and norm leaves,
keeps one sharp-mask threshold per leaf, shared by a stack's layers.)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Union

import jax

from optax_lite import _checks
from optax_lite.linalg.matrices import (ATTENTION_INPUT_NAMES,
                                        ATTENTION_OUTPUT_NAMES, MatrixDims,
                                        default_dims, path_dims, path_names,
                                        shift_dims)

LABELS = ('matrix', 'embedding', 'head', 'norm', 'other')
DEFAULT_HEAD_NAMES = ('head', 'lm_head', 'unembed', 'output_head', 'logits')


def path_str(path) -> str:
  """``'a/b/kernel'`` for a ``jax.tree_util`` key path (drops NNX ``value``)."""
  return '/'.join(path_names(path))


def _is_bias(name: str) -> bool:
  return name == 'bias' or name.endswith('_bias')


def _stacked_fn(stacked):
  """``path -> number of leading stacking axes`` for a ``stacked=`` regex."""
  if stacked is None:
    return lambda path: 0
  if not isinstance(stacked, str):
    raise TypeError('stacked: expected None or a regex string matched '
                    f'against leaf paths, got {type(stacked).__name__}.')
  try:
    rx = re.compile(stacked)
  except re.error as e:
    raise ValueError(
        f'stacked: {stacked!r} is not a valid regex ({e}).') from None
  return lambda path: 1 if rx.search(path) else 0


def _default_label(path: str, leaf, head_names, n_stacked: int = 0) -> str:
  comps = path.lower().split('/')
  ndim = len(getattr(leaf, 'shape', ())) - n_stacked
  if any('embed' in c for c in comps):
    return 'embedding'
  if any(c in head_names for c in comps):
    return 'head'
  if _is_bias(comps[-1]):
    return 'other'
  if ndim >= 2 and getattr(leaf, 'size', 1):
    return 'matrix'  # (an empty one has no direction: AdamW's no-op)
  if any('norm' in c or c.startswith('ln') for c in comps):
    return 'norm'
  return 'other'


Overrides = Union[Mapping[str, str], Callable[[str, Any], Optional[str]]]


def label_params(params, *, head_names=DEFAULT_HEAD_NAMES,
                 overrides: Overrides | None = None,
                 detect_head_by_shape: bool = True,
                 stacked: str | None = None):
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
    stacked: regex (``re.search`` on the ``'/'``-joined path) of leaves
      with one leading stacking axis (scanned layers, MoE experts), which
      does not count toward their rank; e.g. ``stacked='blocks'``.

  Raises:
    ValueError: an override returns a label outside :data:`LABELS`, or
      ``stacked`` is not a valid regex.
  """
  _checks.check_flag('detect_head_by_shape', detect_head_by_shape)
  n_stacked = _stacked_fn(stacked)
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
    labels.append(lab or _default_label(path, leaf, head_names,
                                        n_stacked(path)))

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


def _is_nnx_variable(x) -> bool:
  """A ``flax.nnx`` Variable (``nnx.Param``, …), recognised without flax."""
  return any(c.__name__ in ('Variable', 'VariableState') and
             c.__module__.startswith('flax.') for c in type(x).__mro__)


def strip_nnx_variables(tree):
  """``tree`` with every ``flax.nnx`` Variable replaced by its value.

  ``nnx.state(model, nnx.Param)`` wraps each array in an ``nnx.Param``, but
  the gradients ``nnx.Optimizer`` passes to a transform are plain arrays; a
  tree without the wrappers is a prefix of both, so it can serve as
  ``labels=`` or ``dims=`` for either.
  """
  def unwrap(x):
    if not _is_nnx_variable(x):
      return x
    inner = jax.tree.leaves(x)
    return inner[0] if len(inner) == 1 else x
  return jax.tree.map(unwrap, tree, is_leaf=_is_nnx_variable)


def _is_nnx_module(x) -> bool:
  return any(c.__name__ in ('Module', 'Object', 'Pytree') and
             c.__module__.startswith('flax.nnx') for c in type(x).__mro__)


def _split_rules(split_sizes):
  """``[(regex, sizes)]`` of a ``split_sizes=`` mapping, checked."""
  if split_sizes is None:
    return []
  if not isinstance(split_sizes, Mapping):
    raise TypeError('split_sizes: expected None or a mapping {path regex: '
                    f'block sizes}}, got {type(split_sizes).__name__}.')
  rules = []
  for rx, sizes in split_sizes.items():
    try:
      pattern = re.compile(rx)
    except (re.error, TypeError) as e:
      raise ValueError(
          f'split_sizes: {rx!r} is not a valid regex ({e}).') from None
    if (not isinstance(sizes, (tuple, list)) or len(sizes) < 2 or
        any(isinstance(v, bool) or not isinstance(v, int) or v < 1
            for v in sizes)):
      raise ValueError(f'split_sizes: {rx!r} needs a tuple of at least 2 '
                       f'positive int block sizes, got {sizes!r}.')
    rules.append((pattern, tuple(sizes)))
  return rules


def _fused_dims(path, shape, sizes, per_head, head_dim) -> MatrixDims:
  """Dims of a fused ``[in, sum(sizes)]`` kernel cut into blocks or heads."""
  if len(shape) != 2 or sum(sizes) != shape[1]:
    raise ValueError(
        f'split_sizes: {sizes} must sum to the output axis of the 2-D fused '
        f'kernel {path!r} of shape {tuple(shape)}.')
  if per_head:
    if head_dim is None:
      raise ValueError('head_dim: per_head=True on a fused kernel '
                       f'({path!r}) needs head_dim= (its head size).')
    if any(v % head_dim for v in sizes):
      raise ValueError(f'head_dim: {head_dim} does not divide every block '
                       f'of split_sizes {sizes} ({path!r}).')
    return MatrixDims(0, 1, split=(1, head_dim))
  if len(set(sizes)) != 1:
    raise ValueError(
        f'split_sizes: unequal blocks {sizes} ({path!r}, e.g. grouped-query '
        'QKV) cannot share one batched view; pass per_head=True with '
        'head_dim=, or keep q, k and v as separate leaves.')
  return MatrixDims(0, 1, split=(1, sizes[0]))


def flax_matrix_dims(params, *, stacked: str | None = None,
                     per_head: bool = False,
                     split_sizes: Mapping[str, Any] | None = None,
                     head_dim: int | None = None):
  """Per-leaf :class:`MatrixDims` for common Flax modules.

  * ``[d, heads, head_dim]`` query/key/value kernels of
    ``MultiHeadAttention`` (a path component ``query``, ``key``, ``value``,
    ``q``, ``k`` or ``v``) -> ``(d, heads·head_dim)``; with ``per_head``,
    ``heads`` matrices ``d × head_dim`` (``MatrixDims(0, 2)``);
  * ``[heads, head_dim, d]`` attention output kernels (``out``, ``o``,
    ``out_proj``) -> ``(heads·head_dim, d)``; with ``per_head``, ``heads``
    matrices ``head_dim × d`` (``MatrixDims(1, 2)``);
  * fused 2-D kernels ``[d, Σ sizes]`` whose path matches a key of
    ``split_sizes`` (e.g. ``{'qkv': (512, 128, 128)}``, q then k then v
    along the output axis): one matrix per block (blocks of equal size),
    or with ``per_head`` one ``d × head_dim`` matrix per head
    (``MatrixDims(0, 1, split=(1, head_dim))``);
  * other leaves of rank >= 2 -> the default rule; rank < 2 -> ``None``;
  * leaves whose path matches ``stacked`` (scanned layers, MoE experts):
    the rule above on all but the leading axis, which becomes a batch axis
    (``(layers, in, out)`` -> ``layers`` matrices ``in × out``).

  Per head, each head's update is orthogonalised (or preconditioned) on its
  own, as if it were a separate parameter (dion's ``num_heads`` /
  ``split_sizes``, MaxText #2546), and ``scaling="rms"`` uses that slice's
  shape, ``0.2·sqrt(max(d, head_dim))``.

  The named optimizers and the matrix transforms already apply the Flax names
  (``query``/``key``/``value``/``out``, whole matrices) when ``dims`` is
  ``None``; pass ``dims=ol.flax_matrix_dims`` (the function), a
  ``functools.partial`` of it with these keywords, or its result.

  Args:
    params: a parameter tree: Linen ``params``, a ``flax.nnx`` ``State``
      such as ``nnx.state(model, nnx.Param)`` (its Variables are unwrapped,
      so the result fits both the ``State`` and the plain gradient tree that
      ``nnx.Optimizer`` hands to the transform), or any pytree of arrays.
    stacked: regex (``re.search`` on the ``'/'``-joined path) of leaves
      with one leading stacking axis; pass the same to :func:`label_params`.
    per_head: orthogonalise attention kernels per head (above).
    split_sizes: ``{path regex: block sizes}`` of fused kernels (first
      match wins; a fused kernel needs at least 2 blocks).
    head_dim: the head size of fused kernels under ``per_head``; it must
      divide every block.

  Returns:
    A tree of ``MatrixDims`` / ``None`` shaped like ``params`` (with NNX
    Variables replaced by their dims), usable as ``dims=``.

  Raises:
    TypeError: ``params`` is an ``nnx.Module`` rather than its state.
    ValueError: ``stacked`` or a ``split_sizes`` key is not a valid regex;
      block sizes that do not sum to the fused kernel's output axis, that
      differ without ``per_head``, or that ``head_dim`` does not divide.
  """
  if _is_nnx_module(params):
    raise TypeError(
        'flax_matrix_dims: params is a flax.nnx Module; pass its parameter '
        'state, flax_matrix_dims(nnx.state(model, nnx.Param)), or pass the '
        'function itself, dims=ol.flax_matrix_dims.')
  if not isinstance(per_head, bool):
    raise TypeError(f'per_head must be a bool, got {per_head!r}.')
  if head_dim is not None and (isinstance(head_dim, bool) or
                               not isinstance(head_dim, int) or
                               head_dim < 1):
    raise ValueError(f'head_dim must be None or a positive int, got '
                     f'{head_dim!r}.')
  n_stacked = _stacked_fn(stacked)
  splits = _split_rules(split_sizes)
  inputs = ATTENTION_INPUT_NAMES + ('q', 'k', 'v')
  outputs = ATTENTION_OUTPUT_NAMES + ('o', 'out_proj')

  def dims(path, leaf):
    name = path_str(path)
    k = n_stacked(name)
    shape = tuple(getattr(leaf, 'shape', ()))[k:]
    if len(shape) < 2:
      return None
    sizes = next((sz for rx, sz in splits if rx.search(name)), None)
    if sizes is not None:
      d = _fused_dims(name, shape, sizes, per_head, head_dim)
    else:
      d = path_dims(path_names(path), shape, inputs, outputs, per_head)
      d = d if d is not None else default_dims(shape)
    return d if k == 0 else shift_dims(d, k)

  return jax.tree_util.tree_map_with_path(dims, strip_nnx_variables(params))
