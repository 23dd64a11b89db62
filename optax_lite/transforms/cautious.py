r"""``add_cautious_decayed_weights``: decoupled decay where it agrees.

Cautious weight decay (Chen et al. 2025) applies the decoupled decay only to
the coordinates where the step and the weight agree in sign:

.. math::
   u \leftarrow u + λ\,\mathbb{1}[u ⊙ w \ge 0] ⊙ w,

where ``u`` is the descent direction *before* the learning rate (the update
this transform receives inside a chain that ends in
``optax.scale_by_learning_rate``, which then applies ``−η``). So the decay
acts exactly where ``−η u`` already moves ``w`` towards zero (and where
``u`` or ``w`` is zero); where the step pushes ``w`` away from zero the decay
is left out. This is the rule of dion (``muon_update_post_orthogonalize``,
``adamw_update``: ``sign(U·X) + 1`` clipped to 1, i.e. ``U·X ≥ 0``) and of
modded-nanogpt's NorMuon update (``grad * p >= 0``); modded-nanogpt's Adam
branch uses the strict ``> 0``, which differs only where ``u·w = 0``.

References:
  Chen et al., `Cautious Weight Decay <https://arxiv.org/abs/2510.12402>`_,
  2025.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_lite import _checks


def add_cautious_decayed_weights(weight_decay=0.0, mask=None
                                 ) -> optax.GradientTransformation:
  """``u + λ·𝟙[u⊙w ≥ 0]⊙w`` (see the module doc); needs ``params``.

  Args:
    weight_decay: ``λ ≥ 0`` (a float or an array, e.g. from
      ``optax.inject_hyperparams``).
    mask: as for ``optax.add_decayed_weights``: a tree of bools (or a
      callable returning one) saying which leaves are decayed.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """
  _checks.check_positive('weight_decay', weight_decay, allow_zero=True)

  def leaf(u, w):
    ct = jnp.promote_types(u.dtype, w.dtype)
    uc, wc = u.astype(ct), w.astype(ct)
    agree = uc * wc >= 0
    return (uc + weight_decay * jnp.where(agree, wc, 0)).astype(u.dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('params: add_cautious_decayed_weights needs params '
                       'in update() (the decay is proportional to them).')
    return jax.tree.map(leaf, updates, params), state

  tx = optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
  return tx if mask is None else optax.masked(tx, mask)
