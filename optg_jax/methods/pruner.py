"""The scored pruner: masks from a score of the weights, on a sparsity schedule, when told to.

The building block of every method whose mask is a top-k of a score it does not train: gradual
and one-shot magnitude, SNIP, random (and later lottery tickets and RST's random mask). The
forward pass uses ``W ⊙ M`` (``og.effective_params``); the transformation hands ``G ⊙ M`` down the
chain. When ``refresh(t + 1)`` holds, the update of step ``t`` scores the weights the forward
pass of step ``t`` saw, ``W_t``, and the new mask takes effect from the forward pass of step
``t + 1`` (or already masks this update's gradient, with ``mask_this_update``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optg_jax import _checks
from optg_jax import masks as masks_lib
from optg_jax import schedules
from optg_jax.methods import _trees
from optg_jax.methods import base
from optg_jax.methods.selection import Selection

PyTree = Any
ScoreFn = Callable[[PyTree, PyTree | None, PyTree], PyTree]
"""``(params, grads, aux) -> scores``: higher is kept; ``grads`` is ``None`` at ``init`` (see
:func:`scored_pruner`)."""


class PrunerState(NamedTuple):
  """State of :func:`scored_pruner`.

  Attributes:
    count: int32 scalar, updates done so far (the step of the next forward pass).
    masks: bool masks for the next forward pass, the params' treedef.
    aux: per-prunable-leaf arrays the score needs (``None`` elsewhere), e.g. summed gradients;
      ``None`` for a pruner that selects at init only (its refresh predicate statically ends
      by step 1) and has no ``update_aux``.
    target: the final sparsity (static: not an array, kept in the treedef).
  """
  count: jax.Array
  masks: PyTree
  aux: PyTree
  target: float


base.register_state(PrunerState)


def at_target(step: Any) -> float:
  """The fraction of the target reached at any step: 1 (one-shot methods)."""
  del step
  return 1.0


def magnitude_score(params: PyTree, grads: PyTree | None, aux: PyTree) -> PyTree:
  """``|W|``."""
  del grads, aux
  return jax.tree.map(jnp.abs, params)


def scored_pruner(
    sparsity: float,
    refresh: schedules.Predicate,
    *,
    score_fn: ScoreFn = magnitude_score,
    fraction: Callable[[Any], Any] = at_target,
    selection: Selection = Selection(),
    init_aux: Callable[[PyTree, PyTree], PyTree] | None = None,
    update_aux: Callable[[PyTree, PyTree, jax.Array], PyTree] | None = None,
    mask_this_update: bool = False,
) -> optax.GradientTransformation:
  """Masks from the top-k of ``score_fn(params, grads, aux)`` whenever ``refresh`` says so.

  Args:
    sparsity: the final sparsity ``P`` in [0, 1).
    refresh: ``step -> bool``: recompute the mask the forward pass of ``step`` uses (at ``init``
      for step 0, else in the update of ``step - 1``).
    score_fn: ``(params, grads, aux) -> scores``, higher kept (default ``|W|``): a float tree
      of the params' shapes at the prunable leaves (anything elsewhere). It is called with
      ``grads=None`` once, at ``init``: the mask of step 0 is selected there, before any
      gradient exists, and the call is traced even when ``refresh(0)`` is false (both branches
      of the ``lax.cond`` are). A score that uses gradients must handle ``None``, e.g.
      ``jax.tree.map(jnp.abs, params) if grads is None else ...``, or keep what it needs in
      ``aux`` (SNIP sums the gradients there with ``update_aux``); ``init`` re-raises its error
      as a ``TypeError`` that says so. In ``update`` it gets the gradient of the step.
    fraction: ``step -> fraction of P`` the mask of ``step`` prunes (default 1: one-shot).
    selection: pool, per-layer budget and prunable leaves.
    init_aux: ``(params, prunable) -> aux`` (default ``None``).
    update_aux: ``(aux, grads, count) -> aux``, before scoring (default: unchanged).
    mask_this_update: the refreshed mask already masks the gradient this update hands down
      (SNIP: the first weight update is sparse) instead of from the next step on.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`PrunerState`.
  """
  final = _checks.sparsity(sparsity)
  # One-shot at init (magnitude, random): no update refreshes, so none carries the branch.
  init_only = schedules.true_only_before(refresh, 1)

  def select(params, grads, aux, step):
    return selection.masks(score_fn(params, grads, aux), params, fraction(step), final)

  def select_at_init(params, aux):
    try:
      scores = score_fn(params, None, aux)
    except (TypeError, ValueError, AttributeError) as e:  # what using None as a tree raises
      raise TypeError(
          f"scored_pruner: score_fn raised {type(e).__name__} at init, where it is called with "
          "grads=None (the mask of step 0 is selected before any gradient exists; the call is "
          "traced even when refresh(0) is false). A score that uses gradients must handle "
          "grads=None, e.g. return jax.tree.map(jnp.abs, params) or any scores of the params' "
          f"shapes then, or keep what it needs in aux. The error: {e}") from e
    return selection.masks(scores, params, fraction(0), final)

  def init_fn(params):
    prunable = selection.prunable(params)
    aux = None if init_aux is None else init_aux(params, prunable)
    masks = jax.lax.cond(refresh(0), lambda: select_at_init(params, aux),
                         lambda: masks_lib.all_keep(params, prunable))
    if init_only and update_aux is None:
      aux = None  # only the selection at init reads it (random scores: 4 bytes a weight)
    return PrunerState(jnp.zeros((), jnp.int32), masks, aux, final)

  def update_fn(grads, state, params=None):
    _trees.require_params(params, "this pruning method")
    aux = state.aux if update_aux is None else update_aux(state.aux, grads, state.count)
    next_step = state.count + 1
    masks = state.masks if init_only else jax.lax.cond(
        refresh(next_step), lambda: select(params, grads, aux, next_step), lambda: state.masks)
    updates = base.masked(grads, masks if mask_this_update else state.masks)
    return updates, PrunerState(next_step, masks, aux, final)

  return optax.GradientTransformation(init_fn, update_fn)
