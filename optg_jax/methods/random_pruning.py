"""Random pruning: a uniformly random mask with the exact requested density per pool."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optg_jax import _checks
from optg_jax import schedules
from optg_jax.methods import _trees
from optg_jax.methods.pruner import scored_pruner
from optg_jax.methods.selection import Selection


def random_scores(seed: int):
  """``init_aux`` of :func:`~optg_jax.methods.pruner.scored_pruner`: one ``U[0, 1)`` score per
  prunable weight, leaf ``i`` of the params drawn from ``split(key(seed), #leaves)[i]``."""

  def init_aux(params, prunable):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)]
    return _trees.only_prunable(prunable, jax.tree.unflatten(treedef, drawn))

  return init_aux


def random_pruning(
    sparsity: float,
    seed: int = 0,
    *,
    distribution: str | Callable[..., Any] = "uniform",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    overrides: Mapping[str, float] | None = None,
    topk: str = "unstructured",
    rule: str = "exact",
    min_density: float | None = None,
) -> optax.GradientTransformation:
  """A uniformly random mask at initialisation with exactly the requested density per pool.

  Args:
    sparsity: sparsity in [0, 1).
    seed: seed of the random scores (a ``jax.random.key`` is derived from it).
    distribution: ``'uniform'`` (each layer exactly ``sparsity``), ``'erk'``, ``'global'`` or a
      callable.
    exclude, filter_fn, layer_axes, overrides, topk, rule, min_density: as in
      :func:`optg_jax.gmp`.
  """
  sparsity = _checks.sparsity(sparsity)
  _checks.number(seed, "seed", integer=True)
  selection = Selection(distribution, exclude=exclude, filter_fn=filter_fn, layer_axes=layer_axes,
                        overrides=overrides, topk=topk, rule=rule, min_density=min_density)
  return scored_pruner(sparsity, schedules.in_window(0, 1),
                       score_fn=lambda params, grads, aux: aux, init_aux=random_scores(seed),
                       selection=selection)
