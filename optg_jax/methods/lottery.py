"""Lottery tickets: iterative magnitude pruning with rewinding (IMP).

Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019 (``rewind_step=0``); Frankle,
Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020
(rewinding to step ``k``), as in OpenLTH (``pruning/sparse_global.py``). See SPEC §7.

Level 0 trains the dense network for ``steps_per_level`` steps (snapshot ``W_k`` at step ``k``);
each later level prunes, among the surviving prunable weights, those with the smallest ``|W|``
at the end of the previous level (one global pool, or per layer), rewinds every weight to
``W_k``, starts a fresh inner optimizer with its schedule resumed at ``k`` and trains
``steps_per_level − k`` steps. After ``L`` pruning levels ``ceil(N·(1 − rate)^L)`` of the ``N``
prunable weights are kept (``N − floor((1 − 0.8^L)·N)`` at the default rate), counted exactly
in Python; pruned weights never come back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optg_jax import _checks
from optg_jax import select
from optg_jax.methods import rounds as rounds_lib
from optg_jax.methods.selection import Selection

PyTree = Any
DISTRIBUTIONS = ("global", "uniform")


def level_keep_counts(n: int, levels: int, rate: float = 0.2) -> tuple[int, ...]:
  """Weights kept out of ``n`` after each level ``1..levels``: ``ceil(n·(1 − rate)^L)``, i.e.
  ``n − floor((1 − (1 − rate)^L)·n)``, in exact rationals (``rate`` read as its shortest
  decimal, so 0.2 is 1/5)."""
  survive = 1 - Fraction(repr(float(rate)))
  return tuple(math.ceil(n * survive**level) for level in range(1, levels + 1))


def total_steps(levels: int, steps_per_level: int, rewind_step: int = 0) -> int:
  """Updates in a whole IMP run: ``T`` for level 0, then ``T − k`` per pruning level."""
  return steps_per_level + levels * (steps_per_level - rewind_step)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MagnitudeLevels:
  """``next_masks`` of IMP: keep the largest ``|W|`` among the survivors, with the exact count of
  the next level (per pool: one global count, or one per prunable leaf).

  Attributes:
    selection: the prunable leaves.
    distribution: ``'global'`` or ``'uniform'`` (each leaf keeps its own count).
    rate: the fraction of the survivors pruned per level.
    levels: the number of pruning levels.
  """
  selection: Selection
  distribution: str
  rate: float
  levels: int

  def __call__(self, params: PyTree, masks: PyTree, boundary: jax.Array,
               aux: PyTree) -> tuple[PyTree, PyTree]:
    prunable = self.selection.prunable(params)
    scores = jax.tree.map(
        lambda keep, w, m: jnp.where(m, jnp.abs(w).astype(jnp.float32), -jnp.inf) if keep
        else None, prunable, params, masks)
    if self.distribution == "global":
      n = sum(int(np.size(p)) for keep, p in zip(jax.tree.leaves(prunable),
                                                 jax.tree.leaves(params)) if keep)
      picked = select.global_topk_masks(scores, self._count(n, boundary))
    else:
      picked = jax.tree.map(
          lambda s: None if s is None else select.topk_mask(s, self._count(s.size, boundary)),
          scores, is_leaf=lambda x: x is None)
    new = jax.tree.map(lambda keep, m, old: m if keep else old, prunable, picked, masks,
                       is_leaf=lambda x: x is None)
    return new, aux

  def _count(self, n: int, boundary: jax.Array) -> jax.Array:
    return jnp.asarray(level_keep_counts(n, self.levels, self.rate), jnp.int32)[boundary]


def lottery_ticket(
    levels: int,
    steps_per_level: int,
    inner: optax.GradientTransformation,
    *,
    rewind_step: int = 0,
    rate: float = 0.2,
    distribution: str = "global",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    topk: str = "unstructured",
    min_density: float | None = None,
) -> optax.GradientTransformation:
  """IMP with rewinding: ``levels`` prunings of ``rate`` of the survivors by ``|W|``.

  Args:
    levels: ``L >= 0`` pruning levels; the run has ``L + 1`` trainings (the dense one first)
      and :func:`total_steps` updates.
    steps_per_level: ``T``, the length of the inner schedule (a dense training).
    inner: the weights' optimizer, e.g. ``optax.chain(optax.add_decayed_weights(1e-4),
      optax.sgd(schedule, momentum=0.9))``; fresh after each rewind with its step counters
      (hence its schedules) at ``rewind_step``.
    rewind_step: ``k`` in ``[0, T)``; 0 is the original LTH (rewind to the initialisation).
    rate: fraction of the surviving prunable weights pruned per level, in (0, 1).
    distribution: ``'global'`` (one magnitude threshold over all prunable weights, the
      reference) or ``'uniform'`` (each prunable leaf keeps ``ceil(N_l·(1 − rate)^L)``: DLTH's
      layerwise LTH baseline).
    exclude, filter_fn: which kernels are pruned (see :class:`optg_jax.Selection`).
    layer_axes: leading layer axis of stacked kernels, with ``'global'`` only.
    topk: the kind of top-k (``'unstructured'``, the only one for now).
    min_density: not supported (each level keeps the exact count of its pool): a floor is a
      ``ValueError``.

  Returns:
    A :func:`~optg_jax.methods.rounds.rounds` transformation; ``og.effective_params`` gives
    ``W ⊙ M``, ``og.get_masks`` and ``og.final_masks`` the current masks. The loop rewinds
    BatchNorm statistics with :func:`optg_jax.sync_rewind`.

  Raises:
    ValueError: bad ``levels``, ``steps_per_level``, ``rewind_step``, ``rate`` or
      ``distribution``.
  """
  if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 0:
    raise ValueError(f"levels must be an int >= 0, got {levels!r}")
  if not 0.0 < float(_checks.number(rate, "rate", traced=False)) < 1.0:
    raise ValueError(f"rate must be in (0, 1), got {rate!r}")
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
  if layer_axes is not None and distribution != "global":
    raise ValueError("layer_axes needs distribution='global' in lottery_ticket")
  if isinstance(steps_per_level, bool) or not isinstance(steps_per_level, (int, np.integer)) \
      or steps_per_level < 1:
    raise ValueError(f"steps_per_level must be an int >= 1, got {steps_per_level!r}")
  if isinstance(rewind_step, (int, np.integer)) and not isinstance(rewind_step, bool) \
      and 0 <= rewind_step < steps_per_level:
    lengths = (steps_per_level,) + (steps_per_level - rewind_step,) * levels
  else:
    raise ValueError(f"rewind_step must be an int in [0, {steps_per_level}), got {rewind_step!r}")
  selection = Selection(exclude=exclude, filter_fn=filter_fn, layer_axes=layer_axes, topk=topk,
                        min_density=min_density)
  if selection.min_density:
    raise ValueError("min_density is not supported by lottery_ticket: each level keeps the "
                     "exact count of its pool (global or per leaf)")
  prune = MagnitudeLevels(selection, distribution, float(rate), int(levels))
  return rounds_lib.rounds(inner, lengths, levels + 1, prune, rewind_step=rewind_step,
                           selection=selection)
