"""SNIP (Lee, Ajanthan, Torr, ICLR 2019): one-shot pruning by connection sensitivity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import optax

from optg_jax import _checks
from optg_jax import schedules
from optg_jax.methods import _trees
from optg_jax.methods.pruner import scored_pruner
from optg_jax.methods.selection import Selection


def snip(
    sparsity: float,
    num_batches: int = 1,
    *,
    distribution: str | Callable[..., Any] = "global",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    overrides: Mapping[str, float] | None = None,
    topk: str = "unstructured",
    rule: str = "exact",
    min_density: float | None = None,
) -> optax.GradientTransformation:
  """SNIP: one-shot saliency ``|W ⊙ Ḡ|`` with ``Ḡ`` the summed gradient of the first
  ``num_batches`` steps, taken at the current weights.

  The mask is computed in the update of step ``num_batches − 1`` and already masks the gradient
  that update hands down, so the first weight update is a sparse one. With ``num_batches > 1``
  the earlier steps train the dense network.

  Args:
    sparsity: sparsity in [0, 1).
    num_batches: batches whose gradients are summed, >= 1.
    distribution: ``'global'`` (the paper), ``'uniform'``, ``'erk'`` or a callable.
    exclude, filter_fn, layer_axes, overrides, topk, rule, min_density: as in
      :func:`optg_jax.gmp`.
  """
  sparsity = _checks.sparsity(sparsity)
  _checks.number(num_batches, "num_batches", integer=True, traced=False)
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  selection = Selection(distribution, exclude=exclude, filter_fn=filter_fn, layer_axes=layer_axes,
                        overrides=overrides, topk=topk, rule=rule, min_density=min_density)

  def update_aux(aux, grads, count):
    return _trees.map_prunable(lambda a, g: jnp.where(count < num_batches, a + g, a), aux, grads)

  def saliency(params, grads, aux):
    del grads
    return _trees.map_prunable(lambda a, w: jnp.abs(a * w), aux, params)

  return scored_pruner(sparsity, schedules.in_window(num_batches, num_batches + 1),
                       score_fn=saliency, init_aux=_trees.zeros, update_aux=update_aux,
                       mask_this_update=True, selection=selection)
