"""Trainable scores: supermask training, the building block of OptG and the supermask family.

Each prunable weight ``W`` has a real score ``S``; a *mask function* turns the scores into the
mask ``M`` the forward pass multiplies the weights with (``W_eff = W ⊙ M``). Given
``G = dL/dW_eff``, :func:`trainable_scores`

* trains the scores with any optax transformation on ``dL/dS``: straight-through,
  ``dL/dS = G ⊙ W`` (hard masks: top-k of ``S`` or of ``|S|``, ternary ``sign(S)·[|S| > τ]``),
  or the exact chain rule through the mask function (soft masks ``c·σ(β s)``), plus an optional
  penalty ``λ·Σ M``;
* hands ``G ⊙ M`` down the chain (trained weights) or zeros (frozen weights);
* recomputes ``M`` from the new scores when ``refresh`` says so (every step by default).

Mask functions have the signature ``(scores, params, step, aux) -> masks``: ``scores`` holds
float32 arrays at the prunable leaves and ``None`` elsewhere, ``step`` is the step whose forward
pass uses the masks, ``aux`` the constants fixed at init (e.g. ternary thresholds); ``masks`` has
the params' treedef, with bool, signed (int8) or real arrays at prunable leaves and a scalar
``True`` elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optg_jax import initializers
from optg_jax import masks as masks_lib
from optg_jax import schedules
from optg_jax.methods import _trees
from optg_jax.methods import base
from optg_jax.methods.pruner import at_target
from optg_jax.methods.selection import Selection

PyTree = Any
MaskFn = Callable[[PyTree, PyTree, Any, PyTree], PyTree]
FinalFn = Callable[[PyTree, PyTree, float | None], PyTree]
"""``(scores, params, sparsity or None) -> bool masks`` of the final model."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
  """A value kept in the treedef (not an array): how a state selects its final masks."""
  value: Any


class ScoresState(NamedTuple):
  """State of :func:`trainable_scores`.

  Attributes:
    count: int32 scalar, updates done so far (the step of the next forward pass).
    scores: float32 scores ``S`` shaped like each prunable leaf; ``None`` elsewhere.
    score_state: the score optimizer's state.
    masks: the masks of the next forward pass (the params' treedef; bool, int8 or real).
    aux: constants fixed at init (``None`` unless ``init_aux`` is given).
    final: the rule giving the final masks (static).
  """
  count: jax.Array
  scores: PyTree
  score_state: optax.OptState
  masks: PyTree
  aux: PyTree
  final: Static


def _support(masks: PyTree) -> PyTree:
  return jax.tree.map(lambda m: m if jnp.result_type(m) == jnp.bool_ else m != 0, masks)


def _with_masks(state: ScoresState, new: PyTree) -> ScoresState:
  """Bool masks are replaced; signed or real multipliers keep their values where ``new`` keeps."""
  return state._replace(masks=jax.tree.map(
      lambda old, m: m if jnp.result_type(old) == jnp.bool_ else jnp.where(m, old, 0 * old),
      state.masks, new))


def _final_masks(state: ScoresState, params: PyTree, sparsity: float | None) -> PyTree:
  rule = state.final.value
  if rule is None:
    if sparsity is not None:
      raise ValueError("final_masks: this method's final masks are its current masks; it "
                       f"cannot select them at sparsity={sparsity} (omit the argument)")
    return _support(state.masks)
  if isinstance(rule, TrainedAtTarget):
    return rule.of_state(state, params, sparsity)
  return rule(state.scores, params, sparsity)


base.register_state(ScoresState, masks=lambda state: _support(state.masks),
                    final_masks=_final_masks, with_masks=_with_masks)


def trainable_scores(
    init_scores: Callable[[PyTree, PyTree], PyTree],
    score_optimizer: optax.GradientTransformation,
    mask_fn: MaskFn,
    *,
    selection: Selection = Selection(),
    refresh: schedules.Predicate | None = None,
    dense_start: bool = False,
    train_weights: bool = True,
    straight_through: bool = True,
    surrogate: Callable[[jax.Array], jax.Array] | None = None,
    mask_penalty: float = 0.0,
    init_aux: Callable[[PyTree, PyTree], PyTree] | None = None,
    final_masks: FinalFn | None = None,
) -> optax.GradientTransformation:
  """Trains scores ``S`` with ``score_optimizer`` and masks the weights with ``mask_fn(S)``.

  Args:
    init_scores: ``(params, prunable) -> scores`` (float32 at prunable leaves, ``None``
      elsewhere), e.g. :func:`zero_scores`.
    score_optimizer: any optax transformation of the scores' gradient (it gets the scores as
      its ``params``), e.g. ``optax.chain(optax.trace(0.9), optax.scale(-lr))``.
    mask_fn: ``(scores, params, step, aux) -> masks`` (see the module doc).
    selection: which leaves are prunable (and, for :func:`topk_masks`, how they are pooled).
    refresh: ``step -> bool``: recompute the mask for that step's forward pass; ``None``
      recomputes it every step.
    dense_start: the first mask is all-keep instead of ``mask_fn`` of the initial scores.
    train_weights: hand ``G ⊙ M`` down the chain; ``False`` hands ``-0.0`` everywhere (frozen
      weights: ``W + (-0.0)`` is ``W`` bit for bit). Then nothing that changes a zero update may
      follow in the chain: no weight decay, no optimizer with a bias or a decoupled decay.
    straight_through: ``dL/dS = G ⊙ W``; ``False`` takes the exact gradient through ``mask_fn``
      (needs ``refresh=None``, so that the mask is the one of the current scores).
    surrogate: with ``straight_through``, the straight-through gradient passes through this
      elementwise function of a score: ``dL/dS = surrogate'(S) ⊙ G ⊙ W`` (``jnp.abs`` for
      edge-popup's top-k of ``|S|``: ``sign(S) ⊙ G ⊙ W``); ``None`` is the identity.
    mask_penalty: ``λ`` of a penalty ``λ·Σ M`` over the prunable masks (its gradient ``λ`` is
      added to ``dL/dM``).
    init_aux: ``(scores, params) -> aux``, constants fixed at init for ``mask_fn``.
    final_masks: ``(scores, params, sparsity or None) -> bool masks`` of the final model
      (e.g. :class:`TopKAtTarget`), or a :class:`TrainedAtTarget`, which also reads the masks
      in use; default the current masks' support.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ScoresState`.
  """
  if not straight_through and refresh is not None:
    raise ValueError("straight_through=False needs refresh=None: the exact gradient is the one "
                     "of the mask of the current scores")

  def init_fn(params):
    prunable = selection.prunable(params)
    scores = init_scores(params, prunable)
    aux = None if init_aux is None else init_aux(scores, params)
    masks = (masks_lib.all_keep(params, prunable) if dense_start
             else mask_fn(scores, params, jnp.zeros((), jnp.int32), aux))
    return ScoresState(jnp.zeros((), jnp.int32), scores, score_optimizer.init(scores), masks,
                       aux, Static(final_masks))

  def update_fn(grads, state, params=None):
    _trees.require_params(params, "trainable_scores")
    mask_grads = _trees.map_prunable(lambda s, g, w: (g * w).astype(jnp.float32),
                                     state.scores, grads, params)
    if mask_penalty:
      mask_grads = jax.tree.map(lambda g: g + mask_penalty, mask_grads)
    if straight_through and surrogate is None:
      score_grads = mask_grads
    elif straight_through:
      score_grads = _trees.map_prunable(lambda s, g: jax.vjp(surrogate, s)[1](g)[0],
                                        state.scores, mask_grads)
    else:
      prunable = selection.prunable(params)
      _, vjp = jax.vjp(lambda s: _trees.only_prunable(
          prunable, mask_fn(s, params, state.count, state.aux)), state.scores)
      score_grads, = vjp(mask_grads)
    score_updates, score_state = score_optimizer.update(score_grads, state.score_state,
                                                        state.scores)
    scores = optax.apply_updates(state.scores, score_updates)
    next_step = state.count + 1
    if refresh is None:
      masks = mask_fn(scores, params, next_step, state.aux)
    else:
      masks = jax.lax.cond(refresh(next_step), lambda: mask_fn(scores, params, next_step,
                                                                 state.aux), lambda: state.masks)
    updates = (base.masked(grads, state.masks) if train_weights
               else jax.tree.map(lambda g: jnp.full_like(g, -0.0), grads))  # W + (-0) is W
    return updates, ScoresState(next_step, scores, score_state, masks, state.aux, state.final)

  return optax.GradientTransformation(init_fn, update_fn)


def zero_scores(params: PyTree, prunable: PyTree) -> PyTree:
  """``init_scores``: float32 zeros (OptG)."""
  return _trees.zeros(params, prunable)


def random_scores(seed: int, leaf_init: initializers.LeafInit,
                  selection: Selection) -> Callable[[PyTree, PyTree], PyTree]:
  """``init_scores``: float32 draws of ``leaf_init`` (e.g. ``initializers.xavier_uniform_init``)
  at the prunable leaves, seeded as :func:`optg_jax.initializers.reinit` seeds."""

  def init_scores(params, prunable):
    drawn = initializers.reinit(params, jax.random.key(seed), leaf_init,
                                exclude=selection.exclude, filter_fn=selection.filter_fn)
    return _trees.only_prunable(prunable, jax.tree.map(lambda x: x.astype(jnp.float32), drawn))

  return init_scores


@dataclasses.dataclass(frozen=True)
class TopKAtTarget:
  """``final_masks`` rule: the top-k of ``S`` (or ``|S|``) at the target ``sparsity``.

  A frozen value (equal for equal settings), selecting as ``selection`` does: its pool and its
  :attr:`~optg_jax.methods.selection.Selection.rule` (exact counts, or the OptG code's
  threshold keeping every tie).
  """
  selection: Selection
  sparsity: float
  of_magnitude: bool = False

  def __call__(self, scores: PyTree, params: PyTree, sparsity: float | None = None) -> PyTree:
    return topk_masks(self.selection, self.sparsity if sparsity is None else sparsity,
                      of_magnitude=self.of_magnitude)(scores, params, None, None)


@dataclasses.dataclass(frozen=True)
class TrainedAtTarget:
  """``final_masks`` rule: the masks the last step trained with once they are at the target,
  else the top-k of the final scores at the target (:class:`TopKAtTarget`).

  The trained masks are "at the target" when they keep no more prunable weights than the
  top-k at ``sparsity`` does (with ``selection.rule == 'exact'``: the same keep count). A
  ``sparsity`` passed to ``og.final_masks`` always selects again, at that sparsity. Works
  inside ``jit``: both candidates are computed and one is picked by the traced count.

  Why: scores keep moving after the last mask the weights trained with (the last refresh), so
  the top-k of the final scores is a mask no step trained with; in short runs it shares only
  ~93% of its kept weights with the trained one and the model loses up to 50 points.
  """
  reselect: TopKAtTarget

  def of_state(self, state: ScoresState, params: PyTree, sparsity: float | None) -> PyTree:
    selected = self.reselect(state.scores, params, sparsity)
    if sparsity is not None:
      return selected
    trained = _support(state.masks)
    at_target = (masks_lib.sparsity_summary(trained).kept
                 <= masks_lib.sparsity_summary(selected).kept)
    return jax.tree.map(lambda t, s: t if jnp.ndim(t) == 0 else jnp.where(at_target, t, s),
                        trained, selected)

  def __call__(self, scores: PyTree, params: PyTree, sparsity: float | None = None) -> PyTree:
    return self.reselect(scores, params, sparsity)


def topk_masks(selection: Selection, sparsity: float,
               fraction: Callable[[Any], Any] = at_target, *,
               of_magnitude: bool = False) -> MaskFn:
  """Mask function: top-k of ``S`` (or of ``|S|``, edge-popup) at ``fraction(step)`` of the
  ``sparsity`` target, pooled and counted as ``selection`` says (exact by default). Bool
  masks."""

  def mask_fn(scores, params, step, aux):
    del aux
    ranked = _trees.map_prunable(jnp.abs, scores) if of_magnitude else scores
    return selection.masks(ranked, params, fraction(step), sparsity)

  return mask_fn


def max_fraction_thresholds(fraction_of_max: float) -> Callable[[PyTree, PyTree], PyTree]:
  """``init_aux`` for :func:`ternary_masks`: ``τ_l = q · max|S_l(0)|`` per prunable leaf."""
  return lambda scores, params: _trees.map_prunable(
      lambda s: fraction_of_max * jnp.max(jnp.abs(s)), scores)


def ternary_masks(scores: PyTree, params: PyTree, step: Any, aux: PyTree) -> PyTree:
  """Mask function: ``sign(S)·[|S| > τ]`` in {-1, 0, +1} (int8), ``τ`` per leaf from ``aux``
  (signed supermask: keep, hide or invert each weight)."""
  del step
  ternary = _trees.map_prunable(
      lambda s, tau: (jnp.sign(s) * (jnp.abs(s) > tau)).astype(jnp.int8), scores, aux)
  return _trees.fill_true(ternary, params)


def soft_masks(beta: schedules.Schedule, s0: float = 0.0) -> MaskFn:
  """Mask function: ``c·σ(β(t)·S)`` with ``c = 1/σ(s0)``, exactly 1 at ``S = s0 = 0``
  (Continuous Sparsification). Real masks; use with ``straight_through=False``."""
  scale = 1.0 / jax.nn.sigmoid(s0)

  def mask_fn(scores, params, step, aux):
    del aux
    soft = _trees.map_prunable(lambda s: scale * jax.nn.sigmoid(beta(step) * s), scores)
    return _trees.fill_true(soft, params)

  return mask_fn
