r"""``qk_clip``: MuonClip's per-head rescaling of query and key kernels.

After each optimizer step, every attention head ``h`` whose largest
pre-softmax logit in the step's forward pass exceeded the threshold ``τ``
has its query and key weights shrunk so that logit would sit at ``τ``
(Kimi K2, Algorithm 1):

.. math::
   S^h_{\max} = \max_{X \in B} \max_{i,j}\ \tfrac{1}{\sqrt{d}}\,
                q^h_i \cdot k^h_j, \qquad
   γ_h = \min\bigl(1, τ / S^h_{\max}\bigr),

   W^h_q \leftarrow \sqrt{γ_h}\, W^h_q, \qquad
   W^h_k \leftarrow \sqrt{γ_h}\, W^h_k .

``q^h_i \cdot k^h_j`` is bilinear in ``(W_q^h, W_k^h)``, so the logits of
head ``h`` are multiplied by exactly ``γ_h``; heads with ``S^h_{\max} ≤ τ``
are untouched. Rotary embeddings rotate ``q`` and ``k`` by the same
orthogonal matrix and do not change this. Biases (Flax's ``(heads,
head_dim)`` query/key biases) are scaled with their kernels, so the product
still scales by ``γ_h``.

Shared keys. Where a head's key is shared by several query heads — K2's
multi-head latent attention shares its rotary key ``k^R`` across heads;
grouped-query and multi-query attention share each key head — scaling the
key would clip heads that did not exceed ``τ``. K2 leaves its shared
``k^R`` alone and scales the per-head rotary query ``q^R`` by ``γ_h`` (and
the per-head ``q^C, k^C`` by ``√γ_h``). Here: leaves matched by
``query_rotary`` are scaled by ``γ_h``; and in a module whose key leaves
have fewer heads than the logits (grouped-query, multi-query) or that has
no key leaf, the query leaves take all of ``γ_h`` and the keys are left
alone (an extension of K2's rule to GQA: the per-query-head clip then never
couples heads).

The transform returns an *update* (optax convention): with parameters ``W``
and the incoming update ``u`` (the optimizer's step) it returns
``u + (f − 1)(W + u)`` with ``f`` the per-head factor, so that
``optax.apply_updates`` gives ``f·(W + u)``: the step, then the clip, as in
K2. Heads with ``f = 1`` keep ``u`` bit for bit.

Where the logits come from. The step's forward pass must produce the
per-head maximum logits ``S_max`` (shape ``(heads,)``, the max over batch,
query and key positions, masked positions excluded) of each attention
module, and the caller passes them as ``max_logits=`` through optax's
extra arguments: ``tx.update(grads, state, params, max_logits=...)``, or
with ``flax.nnx``: ``optimizer.update(model, grads, max_logits=...)``. A
Flax NNX module records them with ``self.sow(nnx.Intermediate,
'max_logits', m)`` (``m = jnp.max(logits, axis=(0, 2, 3))`` for logits
``(batch, heads, q, k)``; with ``nnx.MultiHeadAttention``, through a custom
``attention_fn``, which receives ``module=`` when the layer is called with
``sow_weights=True``), and the loss function runs the model as
``out, max_logits = nnx.capture(model, nnx.Intermediate)(x)`` and returns
``max_logits`` as its aux output (``nnx.value_and_grad(...,
has_aux=True)``); ``examples/nnx_qk_clip.py`` has the whole step. Any pytree
works: each array leaf belongs to the attention module whose path is the
part of the leaf's path before its last ``logits_name`` component (the
sown ``…/attn/max_logits/0`` -> ``…/attn``), or the whole path when there
is none (a flat ``{'blocks/0/attn': m}``). Several values for one module
(a module called twice) are combined by their maximum.

Which leaves are queries and keys. Regexes on the ``'/'``-joined parameter
path (``re.search``); a leaf's attention module is the part of its path
before the match. The defaults match Flax's ``MultiHeadAttention`` (Linen
and NNX): ``…/query/kernel`` ``[d, heads, head_dim]`` and
``…/query/bias`` ``[heads, head_dim]`` (and ``key``; the short names
``q``/``k``), whose head axis is ``-2`` (``head_axis``). Fused QKV kernels
have no head axis of their own and are not supported: keep q and k as
separate leaves (or reshape them to expose the head axis).

References:
  Kimi Team, `Kimi K2: Open Agentic Intelligence
  <https://arxiv.org/abs/2507.20534>`_, 2025 (MuonClip, Algorithm 1).

  Su, `QK-Clip: Taking Muon One Step Further on the Path to Scaling Up
  <https://kexue.fm/archives/11126>`_, 2025.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite.linalg.matrices import path_names

DEFAULT_QUERY = r'(^|/)(query|q)/(kernel|bias)$'
DEFAULT_KEY = r'(^|/)(key|k)/(kernel|bias)$'
ROLES = ('query', 'key', 'query_rotary')


def _compile(name: str, pattern):
  if pattern is None:
    return None
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f'{name}: {pattern!r} is not a valid regex '
                     f'({e}).') from None


def logits_by_module(max_logits, logits_name: str = 'max_logits'
                     ) -> dict[str, jax.Array]:
  """``{attention module path: (heads,) max logits}`` from any pytree.

  See the module doc for how a leaf's module path is read; values of one
  module are combined by their maximum.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(max_logits)[0]:
    comps = list(path_names(path))
    if logits_name in comps:
      comps = comps[:len(comps) - 1 - comps[::-1].index(logits_name)]
    module = '/'.join(comps)
    leaf = jnp.asarray(leaf)
    if leaf.ndim != 1:
      raise ValueError(
          f'max_logits: the value for {module!r} has shape {leaf.shape}; '
          'expected (heads,), the max over batch and positions.')
    out[module] = leaf if module not in out else jnp.maximum(out[module],
                                                            leaf)
  return out


def _leaf_roles(paths, patterns):
  """``{module: [(leaf index, role)]}`` for the leaves a pattern matches."""
  modules = collections.defaultdict(list)
  for i, path in enumerate(paths):
    for role, rx in zip(ROLES, patterns):
      m = rx.search(path) if rx is not None else None
      if m:
        modules[path[:m.start()].rstrip('/')].append((i, role))
        break
  return modules


def _head_factors(shapes, members, gamma, head_axis, module):
  """``{leaf index: factor array}`` for one module's q/k leaves."""
  heads = gamma.shape[0]

  def n_heads(i):
    shape = shapes[i]
    if not -len(shape) <= head_axis < len(shape):
      raise ValueError(f'head_axis: {head_axis} is out of range for the '
                       f'leaf of shape {shape} in {module!r}.')
    return shape[head_axis]

  for i, role in members:
    if role != 'key' and n_heads(i) != heads:
      raise ValueError(
          f'max_logits: {module!r} has {heads} heads but its {role} leaf '
          f'has {n_heads(i)} along head_axis={head_axis} (shape '
          f'{shapes[i]}).')
  keys = [i for i, role in members if role == 'key']
  key_heads = {n_heads(i) for i in keys}
  split = bool(keys) and key_heads == {heads}
  if keys and not split and any(heads % k for k in key_heads):
    raise ValueError(f'max_logits: {module!r} has {heads} heads, which its '
                     f'key leaves\' head counts {sorted(key_heads)} do not '
                     'divide.')
  root = jnp.sqrt(gamma)
  out = {}
  for i, role in members:
    if role == 'key' and not split:
      continue  # a shared key: its query heads take all of γ
    f = root if (split and role != 'query_rotary') else gamma
    shape = [1] * len(shapes[i])
    shape[head_axis] = heads
    out[i] = f.reshape(shape)
  return out


def qk_clip(threshold: float, *, query: str = DEFAULT_QUERY,
            key: str = DEFAULT_KEY, query_rotary: str | None = None,
            head_axis: int | None = None, logits_name: str = 'max_logits'
            ) -> optax.GradientTransformationExtraArgs:
  """Rescales the query/key weights of heads whose max logit exceeds ``τ``.

  Chain it after the optimizer, ``optax.chain(ol.muon(lr), ol.qk_clip(τ))``,
  and pass the forward pass's per-head maximum logits to every update:
  ``update(updates, state, params, max_logits=...)`` (see the module doc for
  the rule, the layouts and how a Flax NNX model returns them).

  Args:
    threshold: ``τ > 0``, on the logits as the model computes them (after
      its ``1/sqrt(head_dim)``); K2 uses 100. An array under
      ``optax.inject_hyperparams``.
    query: regex of the query leaves (scaled by ``√γ``, or ``γ`` when the
      keys are shared).
    key: regex of the key leaves (scaled by ``√γ`` when they have one head
      per logit head; left alone when shared).
    query_rotary: regex of K2's per-head rotary query leaves (``q^R``),
      scaled by ``γ``; ``None``: none.
    head_axis: the head axis of every matched leaf; ``None``: ``-2``, that
      of Flax's ``[d, heads, head_dim]`` kernels and ``[heads, head_dim]``
      biases. Structural: under ``optax.inject_hyperparams`` an int given
      here goes in ``static_args``.
    logits_name: the component that ends a module path in ``max_logits``
      (the name passed to ``sow``).

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``; its update needs
    ``params`` and ``max_logits``.

  Raises:
    ValueError: ``threshold <= 0``, an invalid regex, a non-int
      ``head_axis`` (a TypeError for an array); at update: missing
      ``params`` / ``max_logits``, a module in ``max_logits`` without query
      leaves or one with query leaves but no logits, head counts that do
      not match.
  """
  _checks.check_positive('threshold', threshold)
  patterns = tuple(_compile(name, p) for name, p in
                   zip(ROLES, (query, key, query_rotary)))
  if head_axis is None:
    head_axis = -2
  elif hasattr(head_axis, 'shape') or hasattr(head_axis, 'dtype'):
    raise TypeError('head_axis is structural and cannot be an array or a '
                    'traced value; with optax.inject_hyperparams pass '
                    "static_args=('head_axis',).")
  elif isinstance(head_axis, bool) or not isinstance(head_axis, int):
    raise ValueError(f'head_axis must be None or an int, got '
                     f'{head_axis!r}.')
  if not isinstance(logits_name, str) or not logits_name:
    raise ValueError(f'logits_name must be a non-empty string, got '
                     f'{logits_name!r}.')

  def update_fn(updates, state, params=None, *, max_logits=None,
                **extra_args):
    del extra_args
    if params is None:
      raise ValueError('qk_clip: params are required (update(updates, '
                       'state, params, max_logits=...)).')
    if max_logits is None:
      raise ValueError('max_logits: qk_clip needs the per-head max logits '
                       'of the step, update(..., max_logits=...).')
    logits = logits_by_module(max_logits, logits_name)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    u_leaves = treedef.flatten_up_to(updates)
    paths = ['/'.join(path_names(p)) for p, _ in flat]
    shapes = [tuple(x.shape) for _, x in flat]
    modules = _leaf_roles(paths, patterns)
    unused = sorted(m for m in logits
                    if not any(r != 'key' for _, r in modules.get(m, [])))
    if unused:
      raise ValueError(f'max_logits: no query leaves under {unused}; query '
                       f'leaves are under {sorted(modules)}.')
    factors = {}
    for module, members in modules.items():
      if module not in logits:
        raise ValueError(f'max_logits: no entry for the attention module '
                         f'{module!r} (entries: {sorted(logits)}).')
      s = logits[module].astype(jnp.float32)
      gamma = jnp.where(s > threshold, threshold / s, 1.0)
      factors.update(_head_factors(shapes, members, gamma, head_axis,
                                   module))
    out = list(u_leaves)
    for i, f in factors.items():
      w, u = flat[i][1], u_leaves[i]
      dt = jnp.promote_types(u.dtype, jnp.float32)
      stepped = w.astype(dt) + u.astype(dt)
      out[i] = (u.astype(dt) + (f.astype(dt) - 1) * stepped).astype(u.dtype)
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(
      lambda _: optax.EmptyState(), update_fn)

