"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

from optg_jax import _checks
from optg_jax import schedules
from optg_jax.methods.pruner import scored_pruner
from optg_jax.methods.selection import Selection


def gmp(
    sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
    *,
    initial_sparsity: float = 0.0,
    power: int = 3,
    distribution: str | Callable[..., Any] = "uniform",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    overrides: Mapping[str, float] | None = None,
    topk: str = "unstructured",
    rule: str = "exact",
    min_density: float | None = None,
) -> optax.GradientTransformation:
  """Gradual magnitude pruning: scores ``|W|``, cubic schedule
  ``p(t) = P + (p0 − P)(1 − (t − t0)/(t1 − t0))³``, mask refreshed every ``frequency`` steps
  from ``begin_step`` to ``end_step`` inclusive.

  Args:
    sparsity: final sparsity ``P`` in [0, 1).
    begin_step, end_step: ``t0`` and ``t1`` of the schedule, in optimizer steps.
    frequency: ``Δt``, steps between mask refreshes.
    initial_sparsity: ``p0``.
    power: exponent of the schedule (3 in the paper).
    distribution: ``'uniform'`` (the paper: the same sparsity per layer), ``'erk'``, ``'global'``
      or a callable (see :class:`~optg_jax.methods.selection.Selection`).
    exclude, filter_fn, layer_axes, overrides, topk, rule, min_density: the fields of
      :class:`~optg_jax.methods.selection.Selection` (``min_density`` with ``'global'``).
      Named one by one (no ``**kwargs``), so that ``optax.inject_hyperparams`` can bind them.

  Returns:
    A :func:`~optg_jax.methods.pruner.scored_pruner` transformation.
  """
  sparsity = _checks.sparsity(sparsity)
  _checks.number(power, "power")
  selection = Selection(distribution, exclude=exclude, filter_fn=filter_fn, layer_axes=layer_axes,
                        overrides=overrides, topk=topk, rule=rule, min_density=min_density)
  sparsity_fn = schedules.polynomial(sparsity, begin_step, end_step, frequency,
                                     initial_sparsity, power)
  refresh = schedules.every_n_steps(frequency, begin_step, end_step + 1)
  if (end_step - begin_step) % frequency:  # off the grid: the last refresh reaches the target
    refresh = schedules.any_of(refresh, schedules.in_window(end_step, end_step + 1))
  return scored_pruner(sparsity, refresh,
                       fraction=schedules.fraction_of_target(sparsity_fn, sparsity),
                       selection=selection)
