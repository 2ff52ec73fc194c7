"""The baselines OptG is compared with: gradual magnitude (GMP), one-shot magnitude, random, SNIP.

Each is an optax transformation with the contract of :func:`optg_jax.mask_optimizer`: the
forward pass uses ``W ⊙ M`` (``og.effective_params``), the transformation hands ``G ⊙ M`` down
the chain, and the mask for the next step is recomputed when the refresh predicate says so.
A refresh decided in the update of step ``t`` scores the weights the forward pass of step ``t``
saw, ``W_t``, and takes effect from the forward pass of step ``t + 1``.
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
from optg_jax.methods import base

PyTree = Any
ScoreFn = Callable[[PyTree, PyTree, PyTree], PyTree]


class PruningState(NamedTuple):
  """State of the score-based baselines.

  Attributes:
    count: int32 scalar, updates done so far.
    masks: bool masks for the next forward pass, the params' treedef.
    aux: per-prunable-leaf arrays the score needs (``None`` elsewhere): fixed random scores for
      :func:`random_pruning`, the summed gradients for :func:`snip`, else ``None``.
  """
  count: jax.Array
  masks: PyTree
  aux: PyTree


base.register_state(PruningState)


def _at_target(step: Any) -> float:
  del step
  return 1.0


def _magnitude_score(params: PyTree, grads: PyTree, aux: PyTree) -> PyTree:
  del grads, aux
  return jax.tree.map(jnp.abs, params)


def _pruner(
    final: float,
    fraction_fn: Callable[[Any], Any],
    refresh: schedules.Predicate,
    selection: base.Selection,
    score_fn: ScoreFn = _magnitude_score,
    init_aux: Callable[[PyTree, PyTree], PyTree] = lambda params, prunable: None,
    update_aux: Callable[[PyTree, PyTree, jax.Array], PyTree] = lambda aux, grads, count: aux,
) -> optax.GradientTransformation:
  """Masks from ``score_fn(params, grads, aux)``, top-k at ``fraction_fn(t)`` of the way to
  the ``final`` sparsity, whenever ``refresh(t)``."""

  def init_fn(params):
    prunable = selection.prunable(params)
    aux = init_aux(params, prunable)
    masks = jax.lax.cond(
        refresh(0),
        lambda: selection.masks(score_fn(params, None, aux), params, fraction_fn(0), final),
        lambda: masks_lib.all_keep(params, prunable))
    return PruningState(jnp.zeros((), jnp.int32), masks, aux)

  def update_fn(grads, state, params=None):
    base.require_params(params, "this pruning method")
    aux = update_aux(state.aux, grads, state.count)
    next_step = state.count + 1
    masks = jax.lax.cond(
        refresh(next_step),
        lambda: selection.masks(score_fn(params, grads, aux), params, fraction_fn(next_step),
                                final),
        lambda: state.masks)
    return base.mask_gradients(grads, state.masks), PruningState(next_step, masks, aux)

  return optax.GradientTransformation(init_fn, update_fn)


def gmp(
    sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
    *,
    initial_sparsity: float = 0.0,
    power: int = 3,
    distribution: str = "uniform",
    **selection_kwargs: Any,
) -> optax.GradientTransformation:
  """Gradual magnitude pruning (Zhu & Gupta 2017): scores ``|W|``, cubic schedule
  ``p(t) = P + (p0 − P)(1 − (t − t0)/(t1 − t0))³``, mask refreshed every ``frequency`` steps
  from ``begin_step`` to ``end_step`` inclusive.

  Args:
    sparsity: final sparsity ``P`` in [0, 1).
    begin_step, end_step: ``t0`` and ``t1`` of the schedule, in optimizer steps.
    frequency: ``Δt``, steps between mask refreshes.
    initial_sparsity: ``p0``.
    power: exponent of the schedule (3 in the paper).
    distribution: ``'uniform'`` (the paper: the same sparsity per layer), ``'erk'``, ``'global'``.
    **selection_kwargs: ``exclude``, ``filter_fn``, ``layer_axes``, ``overrides`` as in
      :class:`optg_jax.methods.base.Selection`.
  """
  sparsity_fn = schedules.polynomial(sparsity, begin_step, end_step, frequency,
                                     initial_sparsity, power)
  refresh = schedules.every_n_steps(frequency, begin_step, end_step + 1)
  return _pruner(float(sparsity), schedules.fraction_of_target(sparsity_fn, sparsity), refresh,
                 base.Selection(distribution, **selection_kwargs))


def magnitude(
    sparsity: float, step: int = 0, *, distribution: str = "global", **selection_kwargs: Any
) -> optax.GradientTransformation:
  """One-shot magnitude pruning: at ``step`` (0: at initialisation), keep the largest ``|W|``.

  Args:
    sparsity: sparsity in [0, 1), applied once and kept.
    step: the step whose forward pass first uses the mask.
    distribution: ``'global'``, ``'uniform'`` or ``'erk'``.
    **selection_kwargs: as in :func:`gmp`.
  """
  return _pruner(_checks.sparsity(sparsity), _at_target, schedules.in_window(step, step + 1),
                 base.Selection(distribution, **selection_kwargs))


def random_pruning(
    sparsity: float, seed: int = 0, *, distribution: str = "uniform", **selection_kwargs: Any
) -> optax.GradientTransformation:
  """A uniformly random mask at initialisation with exactly the requested density per pool.

  Args:
    sparsity: sparsity in [0, 1).
    seed: seed of the random scores (a ``jax.random.key`` is derived from it).
    distribution: ``'uniform'`` (each layer exactly ``sparsity``), ``'erk'`` or ``'global'``.
    **selection_kwargs: as in :func:`gmp`.
  """

  def init_aux(params, prunable):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    random = [jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)]
    return base.only_prunable(prunable, jax.tree.unflatten(treedef, random))

  return _pruner(_checks.sparsity(sparsity), _at_target, schedules.in_window(0, 1),
                 base.Selection(distribution, **selection_kwargs),
                 score_fn=lambda params, grads, aux: aux, init_aux=init_aux)


def snip(
    sparsity: float, num_batches: int = 1, *, distribution: str = "global",
    **selection_kwargs: Any
) -> optax.GradientTransformation:
  """SNIP (Lee et al. 2019): one-shot saliency ``|W ⊙ Ḡ|`` with ``Ḡ`` the mean gradient of the
  first ``num_batches`` steps, taken at the current weights.

  The mask is computed in the update of step ``num_batches − 1`` and already masks the gradient
  that update hands down, so the first weight update is a sparse one. With ``num_batches > 1``
  the earlier steps train the dense network.

  Args:
    sparsity: sparsity in [0, 1).
    num_batches: batches whose gradients are averaged, >= 1.
    distribution: ``'global'`` (the paper), ``'uniform'`` or ``'erk'``.
    **selection_kwargs: as in :func:`gmp`.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  selection = base.Selection(distribution, **selection_kwargs)
  final = _checks.sparsity(sparsity)

  def init_fn(params):
    prunable = selection.prunable(params)
    zeros = jax.tree.map(lambda keep, p: jnp.zeros(jnp.shape(p), jnp.float32) if keep else None,
                         prunable, params)
    return PruningState(jnp.zeros((), jnp.int32), masks_lib.all_keep(params, prunable),
                        zeros)

  def update_fn(grads, state, params=None):
    base.require_params(params, "snip")
    scoring = state.count < num_batches
    aux = base.map_prunable(lambda a, g: jnp.where(scoring, a + g, a), state.aux, grads)
    masks = jax.lax.cond(
        state.count == num_batches - 1,
        lambda: selection.masks(base.map_prunable(lambda a, w: jnp.abs(a * w), aux, params), params,
                                1.0, final),
        lambda: state.masks)
    return base.mask_gradients(grads, masks), PruningState(state.count + 1, masks, aux)

  return optax.GradientTransformation(init_fn, update_fn)
