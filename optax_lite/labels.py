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
``"other"``      everything else: biases (a leaf named ``bias`` or ``*_bias``,
                 whatever its rank: the ``(heads, head_dim)`` query/key/value
                 biases of Flax attention are never matrices), scalars,
                 other vectors.

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

from optax_lite.linalg.matrices import (ATTENTION_INPUT_NAMES,
                                        ATTENTION_OUTPUT_NAMES,
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
  if ndim >= 2:
    return 'matrix'
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


def flax_matrix_dims(params, *, stacked: str | None = None):
  """Per-leaf :class:`MatrixDims` for common Flax modules.

  * ``[d, heads, head_dim]`` query/key/value kernels of
    ``MultiHeadAttention`` (a path component ``query``, ``key``, ``value``,
    ``q``, ``k`` or ``v``) -> ``(d, heads·head_dim)``;
  * ``[heads, head_dim, d]`` attention output kernels (``out``, ``o``,
    ``out_proj``) -> ``(heads·head_dim, d)``;
  * other leaves of rank >= 2 -> the default rule; rank < 2 -> ``None``;
  * leaves whose path matches ``stacked`` (scanned layers, MoE experts):
    the rule above on all but the leading axis, which becomes a batch axis
    (``(layers, in, out)`` -> ``layers`` matrices ``in × out``).

  The named optimizers and the matrix transforms already apply the Flax names
  (``query``/``key``/``value``/``out``) when ``dims`` is ``None``; pass
  ``dims=ol.flax_matrix_dims`` (the function) or its result for the short
  names, or to see the rule as a tree.

  Args:
    params: a parameter tree: Linen ``params``, a ``flax.nnx`` ``State``
      such as ``nnx.state(model, nnx.Param)`` (its Variables are unwrapped,
      so the result fits both the ``State`` and the plain gradient tree that
      ``nnx.Optimizer`` hands to the transform), or any pytree of arrays.
    stacked: regex (``re.search`` on the ``'/'``-joined path) of leaves
      with one leading stacking axis; pass the same to :func:`label_params`.

  Returns:
    A tree of ``MatrixDims`` / ``None`` shaped like ``params`` (with NNX
    Variables replaced by their dims), usable as ``dims=``.

  Raises:
    TypeError: ``params`` is an ``nnx.Module`` rather than its state.
    ValueError: ``stacked`` is not a valid regex.
  """
  if _is_nnx_module(params):
    raise TypeError(
        'flax_matrix_dims: params is a flax.nnx Module; pass its parameter '
        'state, flax_matrix_dims(nnx.state(model, nnx.Param)), or pass the '
        'function itself, dims=ol.flax_matrix_dims.')
  n_stacked = _stacked_fn(stacked)
  inputs = ATTENTION_INPUT_NAMES + ('q', 'k', 'v')
  outputs = ATTENTION_OUTPUT_NAMES + ('o', 'out_proj')

  def dims(path, leaf):
    k = n_stacked(path_str(path))
    shape = tuple(getattr(leaf, 'shape', ()))[k:]
    if len(shape) < 2:
      return None
    named = path_dims(path_names(path), shape, inputs, outputs)
    d = named if named is not None else default_dims(shape)
    return d if k == 0 else shift_dims(d, k)

  return jax.tree_util.tree_map_with_path(dims, strip_nnx_variables(params))
