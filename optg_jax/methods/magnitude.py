"""One-shot magnitude pruning: keep the largest ``|W|`` once, at a chosen step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

from optg_jax import _checks
from optg_jax import schedules
from optg_jax.methods.pruner import scored_pruner
from optg_jax.methods.selection import Selection


def magnitude(
    sparsity: float,
    step: int = 0,
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
  """One-shot magnitude pruning: at ``step`` (0: at initialisation), keep the largest ``|W|``.

  Args:
    sparsity: sparsity in [0, 1), applied once and kept.
    step: the step whose forward pass first uses the mask.
    distribution: ``'global'``, ``'uniform'``, ``'erk'`` or a callable.
    exclude, filter_fn, layer_axes, overrides, topk, rule, min_density: as in
      :func:`optg_jax.gmp`.
  """
  sparsity = _checks.sparsity(sparsity)
  step = _checks.number(step, "step", integer=True, traced=False)
  selection = Selection(distribution, exclude=exclude, filter_fn=filter_fn, layer_axes=layer_axes,
                        overrides=overrides, topk=topk, rule=rule, min_density=min_density)
  return scored_pruner(sparsity, schedules.in_window(step, step + 1), selection=selection)
