"""One-shot magnitude pruning: keep the largest ``|W|`` once, at a chosen step."""

from __future__ import annotations

from typing import Any

import optax

from optg_jax import schedules
from optg_jax.methods.pruner import scored_pruner
from optg_jax.methods.selection import Selection


def magnitude(
    sparsity: float, step: int = 0, *, distribution: str = "global", **selection_kwargs: Any
) -> optax.GradientTransformation:
  """One-shot magnitude pruning: at ``step`` (0: at initialisation), keep the largest ``|W|``.

  Args:
    sparsity: sparsity in [0, 1), applied once and kept.
    step: the step whose forward pass first uses the mask.
    distribution: ``'global'``, ``'uniform'``, ``'erk'`` or a callable.
    **selection_kwargs: as in :func:`optg_jax.gmp`.
  """
  return scored_pruner(sparsity, schedules.in_window(step, step + 1),
                       selection=Selection(distribution, **selection_kwargs))
