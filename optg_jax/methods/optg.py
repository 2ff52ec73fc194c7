"""OptG's mask optimizer (Zhang, Lin, Chen, Chao, Ji, arXiv 2201.12826), as an optax transformation.

Supermask training folded into gradient-driven pruning. Each prunable weight ``W`` has a score
``S`` (init 0) and the forward pass uses ``W ⊙ M`` with ``M`` the global top-k of ``S``. Given
``G = dL/d(W ⊙ M)``, the transformation

* trains the scores with ``dL/dS = G ⊙ W`` (straight-through: removed entries too) by SGD with
  momentum 0.9, no weight decay, at the learning rate ``η_w(t) · p(t)/P`` — the weights' rate
  tied to the fraction of the target sparsity reached (the "supermask optimizer"), so that with
  plain SGD ``S_T = -Σ_t η_s(t) G_t ⊙ W_t``, the accumulated first-order criterion;
* hands ``G ⊙ M`` down the chain (removed weights get zero loss gradient but keep training under
  weight decay and momentum, and come back with their stored values when their score recovers);
* refreshes ``M`` by exact global top-k of ``S`` at the scheduled sparsity at every epoch start.

The defaults follow the authors' code (github.com/zyxxmu/OptG at dae1970): sigmoid staircase
``p_e = P·σ(β(e − E/2))`` with β = 1, refresh once per epoch, all kernels in one global pool.
One deliberate difference: the code keeps every score tied at the threshold (so it may keep more
than ``k``); here exactly ``k = N − floor(p·N)`` are kept, ties going to the earlier weight. The
initial all-zero scores are the one big tie where that matters, so the mask starts dense, as in
the code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optg_jax import _checks
from optg_jax import masks as masks_lib
from optg_jax import schedules
from optg_jax.methods import base

PyTree = Any


class MaskOptimizerState(NamedTuple):
  """State of :func:`mask_optimizer`.

  Attributes:
    count: int32 scalar, updates done so far (the step of the next forward pass).
    scores: float32 scores ``S``, shaped like each prunable leaf; ``None`` elsewhere.
    momentum: the scores' momentum buffer, like ``scores``.
    masks: bool masks for the next forward pass, the params' treedef.
  """
  count: jax.Array
  scores: PyTree
  momentum: PyTree
  masks: PyTree


base.register_state(MaskOptimizerState)


def mask_optimizer(
    sparsity: float,
    learning_rate: optax.ScalarOrSchedule,
    steps_per_epoch: int | None = None,
    total_epochs: int | None = None,
    *,
    beta: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    score_weight_decay: float = 0.0,
    sparsity_schedule: schedules.Schedule | None = None,
    refresh: schedules.Predicate | None = None,
    distribution: str = "global",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    overrides: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
  """OptG: trains scores on ``G ⊙ W`` and prunes by their global top-k on a sparsity schedule.

  Put it first in the chain and take the gradient at ``og.effective_params(params, opt_state)``::

    tx = optax.chain(
        og.mask_optimizer(0.98, lr_schedule, steps_per_epoch=spe, total_epochs=E),
        optax.add_decayed_weights(5e-4),   # decays all entries, pruned ones too, as OptG does
        optax.sgd(lr_schedule, momentum=0.9))

  Args:
    sparsity: target sparsity ``P`` of the prunable weights, in [0, 1).
    learning_rate: the weights' learning rate ``η_w`` (a float or an optax schedule of the step);
      the scores use ``η_w(t) · p(t)/P``.
    steps_per_epoch: optimizer steps per epoch; needed by the default schedule and refresh.
    total_epochs: ``E``, needed by the default sigmoid schedule.
    beta: steepness of the sigmoid schedule, per epoch.
    momentum: the scores' SGD momentum (PyTorch form: ``v ← μv + g``).
    nesterov: Nesterov momentum for the scores (not in the reference).
    score_weight_decay: L2 decay added to the scores' gradient (0 in the reference).
    sparsity_schedule: ``step -> p(t)`` replacing the sigmoid staircase; the score learning rate
      then uses ``p(t)/P``.
    refresh: ``step -> bool``, when to recompute the mask (default: the first step of each epoch).
    distribution: ``'global'`` (reference), ``'uniform'`` or ``'erk'`` per-leaf selection.
    exclude: path regexes of kernels never pruned (none in the reference).
    filter_fn: ``(path_str, leaf) -> bool`` choosing prunable leaves (default: ``ndim >= 2``).
    layer_axes: leading layer axis of stacked kernels (pruned per layer with per-leaf
      distributions).
    overrides: path regex → sparsity for the per-leaf distributions.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`MaskOptimizerState`.
  """
  final = _checks.sparsity(sparsity)
  selection = base.Selection(distribution, exclude, filter_fn, layer_axes, overrides)
  if sparsity_schedule is None:
    _require(steps_per_epoch=steps_per_epoch, total_epochs=total_epochs)
    fraction = schedules.sigmoid_fraction(steps_per_epoch, total_epochs, beta)
  else:
    fraction = schedules.fraction_of_target(sparsity_schedule, final)
  if refresh is None:
    _require(steps_per_epoch=steps_per_epoch)
    refresh = schedules.epoch_boundaries(steps_per_epoch)
  lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    prunable = selection.prunable(params)
    scores = jax.tree.map(lambda keep, p: jnp.zeros(jnp.shape(p), jnp.float32) if keep else None,
                          prunable, params)
    # All scores start at 0, one big tie, which the reference keeps whole (it keeps every score
    # >= the threshold): the first epoch trains the dense network.
    masks = masks_lib.all_keep(params, prunable)
    momentum = jax.tree.map(jnp.zeros_like, scores)  # its own buffers, so donation works
    return MaskOptimizerState(jnp.zeros((), jnp.int32), scores, momentum, masks)

  def update_fn(grads, state, params=None):
    base.require_params(params, "mask_optimizer")
    score_grads = base.map_prunable(
        lambda s, g, w: (g * w).astype(jnp.float32) + score_weight_decay * s,
        state.scores, grads, params)
    new_momentum = jax.tree.map(lambda v, g: momentum * v + g, state.momentum, score_grads)
    direction = (jax.tree.map(lambda v, g: g + momentum * v, new_momentum, score_grads)
                 if nesterov else new_momentum)
    score_lr = lr(state.count) * fraction(state.count)
    scores = jax.tree.map(lambda s, d: s - score_lr * d, state.scores, direction)
    next_step = state.count + 1
    masks = jax.lax.cond(
        refresh(next_step),
        lambda: selection.masks(scores, params, fraction(next_step), final),
        lambda: state.masks)
    updates = base.mask_gradients(grads, state.masks)
    return updates, MaskOptimizerState(next_step, scores, new_momentum, masks)

  return optax.GradientTransformation(init_fn, update_fn)


def _require(**kwargs: Any) -> None:
  for name, value in kwargs.items():
    if value is None:
      raise ValueError(f"{name} is required unless you pass your own sparsity_schedule/refresh")
