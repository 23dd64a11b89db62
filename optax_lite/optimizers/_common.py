"""Shared plumbing of the named optimizers: labels -> transforms, AdamW."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks
from optax_lite import labels as labels_lib
from optax_lite.linalg import distributed as distributed_lib
from optax_lite.transforms import _tree
from optax_lite.transforms.cautious import add_cautious_decayed_weights
from optax_lite.transforms.lite import check_mask_args

# Labels produced by ``label_params`` plus "adam", a catch-all a user may use
# in a hand-written label tree.
ALL_LABELS = labels_lib.LABELS + ('adam',)


def weight_decay_tx(weight_decay, mask=None, cautious: bool = False
                    ) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` or its cautious form (``cautious``)."""
  if cautious:
    return add_cautious_decayed_weights(weight_decay, mask)
  return optax.add_decayed_weights(weight_decay, mask)


def adamw(learning_rate, *, b1: float, b2: float, eps: float,
          weight_decay: float, mu_dtype=None, nesterov: bool = False,
          weight_decay_mask=None, cautious: bool = False
          ) -> optax.GradientTransformation:
  """``optax.adamw`` with validated arguments (for the non-matrix leaves).

  ``cautious``: the decay only where Adam's direction and the weight agree
  in sign (:func:`optax_lite.add_cautious_decayed_weights`), dion's
  ``adamw_update(cautious_wd=True)``; the chain is ``optax.adamw``'s own
  (``scale_by_adam``, decay, ``−learning_rate``) with the decay swapped.
  """
  _checks.check_learning_rate('adam_learning_rate', learning_rate)
  _checks.check_decay('adam_b1', b1)
  _checks.check_decay('adam_b2', b2)
  _checks.check_positive('adam_eps', eps)
  _checks.check_positive('adam_weight_decay', weight_decay, allow_zero=True)
  mu_dtype = _checks.dtype_argument('mu_dtype', mu_dtype, allow_none=True)
  _checks.check_flag('adam_nesterov', nesterov)
  if not _checks.check_flag('cautious_weight_decay', cautious):
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay, mu_dtype=mu_dtype,
                       nesterov=nesterov, mask=weight_decay_mask)
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                          nesterov=nesterov),
      add_cautious_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))


def adamw_for_rest(learning_rate, adam_learning_rate, *, b1, b2, eps,
                   weight_decay, adam_weight_decay, mu_dtype=None,
                   nesterov=False, cautious=False
                   ) -> optax.GradientTransformation:
  """AdamW for the non-matrix leaves of a named optimizer.

  ``adam_learning_rate`` / ``adam_weight_decay`` of ``None`` fall back to the
  matrix leaves' ``learning_rate`` / ``weight_decay``.
  """
  return adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate,
      b1=b1, b2=b2, eps=eps,
      weight_decay=weight_decay if adam_weight_decay is None
      else adam_weight_decay, mu_dtype=mu_dtype, nesterov=nesterov,
      cautious=cautious)


class WarmupDecayState(NamedTuple):
  count: jax.Array        # int32 scalar
  warm: Any               # bool scalar per leaf: no decay on step 1
  inner: optax.OptState   # add_decayed_weights' state


def decay_after_warmup(weight_decay, weight_decay_mask, warmup_fn,
                       cautious: bool = False
                       ) -> optax.GradientTransformation:
  """``add_decayed_weights``, skipped on step 1 where ``warmup_fn`` says.

  SOAP's reference skips its whole statistics-only first step, weight decay
  included. ``warmup_fn(params)`` returns a tree of Python bools shaped
  like ``params`` (True: no decay on step 1 for that leaf); it is evaluated
  once, in ``init``. ``cautious``: see :func:`weight_decay_tx`.
  """
  inner = weight_decay_tx(weight_decay, weight_decay_mask, cautious)

  def init_fn(params):
    # A per-leaf scalar: not like the parameters for tree_map_params.
    warm = (_tree.not_params() if _tree.is_params_placeholder(params) else
            jax.tree.map(jnp.asarray, warmup_fn(params)))
    return WarmupDecayState(jnp.zeros([], jnp.int32), warm,
                            inner.init(params))

  def update_fn(updates, state, params=None):
    decayed, inner_state = inner.update(updates, state.inner, params)
    first = state.count == 0
    out = jax.tree.map(lambda u, d, w: jnp.where(first & w, u, d),
                       updates, decayed, state.warm)
    return out, WarmupDecayState(optax.safe_increment(state.count),
                                 state.warm, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def decay_and_learning_rate(learning_rate, weight_decay, weight_decay_mask=None,
                            *, warmup_fn=None, cautious: bool = False
                            ) -> list[optax.GradientTransformation]:
  """Decoupled weight decay then ``−learning_rate`` (the optax way).

  ``warmup_fn``: see :func:`decay_after_warmup` (None: decay every step).
  ``cautious``: the decay only where the direction (the update before the
  learning rate) and the weight agree in sign
  (:func:`optax_lite.add_cautious_decayed_weights`).
  """
  _checks.check_learning_rate('learning_rate', learning_rate)
  _checks.check_positive('weight_decay', weight_decay, allow_zero=True)
  _checks.check_flag('cautious_weight_decay', cautious)
  out = []
  if not (_checks.is_static_number(weight_decay) and float(weight_decay) == 0):
    if warmup_fn is None:
      out.append(weight_decay_tx(weight_decay, weight_decay_mask, cautious))
    else:
      out.append(decay_after_warmup(weight_decay, weight_decay_mask,
                                    warmup_fn, cautious))
  out.append(optax.scale_by_learning_rate(learning_rate))
  return out


def resolve_labels(labels, params):
  """``labels`` is None (``label_params``), a callable or a label tree."""
  if labels is None:
    tree = labels_lib.label_params(params)
  elif callable(labels):
    tree = labels(params)
  else:
    tree = labels_lib.strip_nnx_variables(labels)  # e.g. an nnx.State's labels
  for lab in jax.tree.leaves(tree):
    if lab not in ALL_LABELS:
      raise ValueError(f'labels: {lab!r} is not one of {ALL_LABELS}.')
  return tree


def partition(by_label: Mapping[str, optax.GradientTransformation], labels
              ) -> optax.GradientTransformation:
  """``optax.partition`` over the label set, ``"adam"`` aliased to "other".

  ``by_label`` must have a transform for every label in :data:`ALL_LABELS`
  except ``"adam"``.
  """
  txs = dict(by_label)
  txs.setdefault('adam', txs['other'])

  def label_fn(params):
    return resolve_labels(labels, params)

  # The whole state (AdamW's moments included) leaves a jitted update with
  # the shardings it came in with: one compile, no re-layout.
  tx = optax.partition(txs, label_fn)
  return refuse_non_float(optax.GradientTransformationExtraArgs(
      tx.init, distributed_lib.layout_stable(tx.update)))


def refuse_non_float(tx: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
  """``tx`` with integer and boolean leaves refused, their paths named.

  Without this an int or bool leaf labelled "other" would reach AdamW and
  be trained silently as a float; the check reads only dtypes, so it costs
  nothing under ``jit``.
  """
  def init_fn(params):
    _checks.check_float_tree('params', params)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    _checks.check_float_tree('updates', updates)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AdamRest(NamedTuple):
  """A named optimizer's ``adam_*`` settings for its non-matrix leaves.

  ``learning_rate`` / ``weight_decay`` of ``None`` inherit the matrix
  leaves' (see :func:`adamw_for_rest`).
  """
  learning_rate: Any
  b1: Any
  b2: Any
  eps: Any
  weight_decay: Any
  nesterov: bool


# fisher_whiten's keywords, which FISMO and FISMO-LITE take as they are.
WHITENING_ARGS = ('gamma', 'damping', 'root_method', 'root_iters',
                  'warm_iters', 'root_eps', 'min_eig', 'trace_damping',
                  'factor_dtype', 'root_every', 'max_factor_size',
                  'scale_invariant', 'dims', 'precision', 'distribute',
                  'memory_budget')


def whitening_settings(args: Mapping[str, Any]) -> dict[str, Any]:
  """The :func:`optax_lite.fisher_whiten` keywords of a named optimizer's
  arguments (the same names in ``fismo`` and ``fismo_lite``)."""
  return {k: args[k] for k in WHITENING_ARGS}


# The on/off switches of the named optimizers, under the same names in each.
# (``adam_nesterov`` is checked where AdamW is built, :func:`adamw`.)
FLAGS = ('nesterov', 'ema', 'scale_invariant', 'skip_first_update',
         'reference_schedules')


def check_emb_ratios(args: Mapping[str, Any], smooth: str) -> None:
  """A LITE optimizer's AdamW-LITE ratios (and its ``flat_weight_decay``
  switch), checked under the names the user gave them (AdamW-LITE's own
  checks would name ``sharp_ratio`` / ``smooth_ratio``). ``smooth``: the
  argument holding the smooth ratio."""
  check_mask_args(args['emb_sharp_ratio'], args[smooth],
                  names=('emb_sharp_ratio', smooth))
  _checks.check_flag('flat_weight_decay', args['flat_weight_decay'])


def adam_rest(args: Mapping[str, Any]) -> AdamRest:
  """The ``adam_*`` settings, read by name from a named optimizer's
  arguments (``adam_nesterov`` where it has one). Every named optimizer
  passes its arguments here, so its switches (:data:`FLAGS`) are checked
  here too: a string such as ``"false"`` would otherwise read as true."""
  for name in FLAGS:
    if name in args:
      _checks.check_flag(name, args[name])
  return AdamRest(args['adam_learning_rate'], args['adam_b1'],
                  args['adam_b2'], args['adam_eps'], args['adam_weight_decay'],
                  args.get('adam_nesterov', False))


def matrix_and_adamw(labels, rest: AdamRest, learning_rate, weight_decay,
                     weight_decay_mask, mu_dtype,
                     *matrix_txs: optax.GradientTransformation,
                     warmup_fn=None, cautious: bool = False
                     ) -> optax.GradientTransformation:
  """The tail every named optimizer shares.

  ``chain(*matrix_txs, decay, −learning_rate)`` on the "matrix" leaves
  (:func:`decay_and_learning_rate`) and AdamW with ``rest`` on the others
  (:func:`adamw_for_rest`, :func:`with_adamw`). ``cautious``
  (``cautious_weight_decay=True``): both decays are cautious, as dion's
  ``cautious_wd`` applies to its Muon and AdamW groups alike.
  """
  matrix_tx = optax.chain(
      *matrix_txs,
      *decay_and_learning_rate(learning_rate, weight_decay,
                               weight_decay_mask, warmup_fn=warmup_fn,
                               cautious=cautious))
  adam = adamw_for_rest(
      learning_rate, rest.learning_rate, b1=rest.b1, b2=rest.b2,
      eps=rest.eps, weight_decay=weight_decay,
      adam_weight_decay=rest.weight_decay, mu_dtype=mu_dtype,
      nesterov=rest.nesterov, cautious=cautious)
  return with_adamw(matrix_tx, labels, adam)


def named_optimizer(args: Mapping[str, Any],
                    *matrix_txs: optax.GradientTransformation,
                    warmup_fn=None) -> optax.GradientTransformation:
  """:func:`matrix_and_adamw` with the settings every named optimizer takes
  under the same names (``learning_rate``, ``weight_decay``,
  ``weight_decay_mask``, ``mu_dtype``, ``labels``,
  ``cautious_weight_decay``, ``adam_*``), read from its arguments."""
  return matrix_and_adamw(
      args['labels'], adam_rest(args), args['learning_rate'],
      args['weight_decay'], args['weight_decay_mask'], args['mu_dtype'],
      *matrix_txs, warmup_fn=warmup_fn,
      cautious=args['cautious_weight_decay'])


def with_adamw(matrix_tx: optax.GradientTransformation, labels,
               adam: optax.GradientTransformation,
               overrides: (Mapping[str, optax.GradientTransformation]
                           | None) = None
               ) -> optax.GradientTransformation:
  """``matrix_tx`` for "matrix" leaves, ``adam`` for the rest (or overrides)."""
  by_label = {lab: adam for lab in labels_lib.LABELS}
  by_label['matrix'] = matrix_tx
  by_label.update(overrides or {})
  return partition(by_label, labels)
