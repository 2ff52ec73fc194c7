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

It is :func:`~optg_jax.methods.scores.trainable_scores` with zero scores, the score optimizer
``optax.trace(0.9)`` + a scale by ``-η_w(t)·p(t)/P``, and :func:`~optg_jax.methods.scores.topk_masks`.
The defaults follow the authors' code (github.com/zyxxmu/OptG at dae1970): sigmoid staircase
``p_e = P·σ(β(e − E/2))`` with β = 1, refresh once per epoch, all kernels in one global pool.

Selection (``selection_rule``). The code keeps ``S >= thr``, ``thr`` the ``int(N·(1−p))``-th
largest score: ``N − ceil(p·N)`` weights when no score ties at ``thr``, and *every* tie at
``thr`` (``selection_rule='reference'`` does exactly that). The default ``'exact'`` keeps exactly
``k = N − floor(p·N)``, ties going to the earlier weight, so every epoch trains at its scheduled
sparsity. The two differ by one weight without ties, and by many with them. Ties are not rare:
besides the initial all-zero scores (the mask starts dense either way, as in the code), weights
that never get a gradient — on always-zero input pixels, of dead units — keep exact-zero scores,
and while the threshold is 0 the reference keeps all of them. Run side by side with the authors'
code on a 784-300-100 network at ``p = 0.45`` (epoch 3), the reference kept 20,261 weights tied
at ``thr = 0`` that the exact rule pruned by index, training that epoch at 37.4% sparsity instead
of 45%.

The final model (``og.final_masks``, ``final``). The authors evaluate the top-k of the final
scores at ``P``, selected by the same rule; but the scores move after the last refresh, so that
mask is one no step trained with. Run from the embedded digits for 2 epochs, it scored 40.2%
where the model it trained scored 90.6%. By default (``final='trained'``) the final model keeps
the mask its last step trained with once that mask is at the target, and selects again from
the final scores only when the ramp never reached it; ``final='reselect'`` is the authors'.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optax

from optg_jax import _checks
from optg_jax import schedules
from optg_jax.methods import scores as scores_lib
from optg_jax.methods.selection import RULES as SELECTION_RULES
from optg_jax.methods.selection import Selection


def mask_optimizer(
    sparsity: float,
    learning_rate: optax.ScalarOrSchedule,
    steps_per_epoch: int | None = None,
    total_epochs: int | None = None,
    *,
    beta: float = 1.0,
    ramp: str = "reference",
    momentum: float = 0.9,
    nesterov: bool = False,
    score_weight_decay: float = 0.0,
    sparsity_schedule: schedules.Schedule | None = None,
    refresh: schedules.Predicate | None = None,
    distribution: str | Callable[..., Any] = "global",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    overrides: Mapping[str, float] | None = None,
    selection_rule: str = "exact",
    min_density: float | None = None,
    final: str = "trained",
) -> optax.GradientTransformation:
  """OptG: trains scores on ``G ⊙ W`` and prunes by their global top-k on a sparsity schedule.

  Put it first in the chain and take the gradient at ``og.effective_params(params, opt_state)``::

    tx = optax.chain(
        og.mask_optimizer(0.98, lr_schedule, steps_per_epoch=spe, total_epochs=E),
        optax.add_decayed_weights(5e-4),   # decays all entries, pruned ones too, as OptG does
        optax.sgd(lr_schedule, momentum=0.9))

  Args:
    sparsity: target sparsity ``P`` of the prunable weights, in [0, 1), a Python float (with
      ``optax.inject_hyperparams`` pass it in ``static_args``).
    learning_rate: the weights' learning rate ``η_w`` (a float or an optax schedule of the step);
      the scores use ``η_w(t) · p(t)/P``.
    steps_per_epoch: optimizer steps per epoch; needed by the default schedule and refresh.
    total_epochs: ``E``, needed by the default sigmoid schedule.
    beta: steepness of the sigmoid schedule, per epoch.
    ramp: ``'reference'``: ``p_e = P·σ(β(e − E/2))``, the authors' (tuned for 100-180 epochs;
      it warns at construction when its last epoch trains below 99.9% of the target);
      ``'budget'``: the same sigmoid compressed into epochs ``[0.1·E, b]`` and reaching ``P``
      exactly at ``b = min(0.6·E, E − 1)`` (the last epoch trains at the target from ``E = 2``
      on; :func:`optg_jax.schedules.sigmoid_window_fraction`), so that short runs train
      their last 40% at the target and the final mask is one they trained with. The default
      ``refresh`` then stops before the last tenth of the run (the last refresh at epoch
      ``max(ceil(b), floor(0.9·E) − 1)``): those epochs train one mask, as GMP's do after its
      window. Refreshing on to the end cost 2.2 points at E = 10, P = 0.95 on the embedded
      digits (5 seeds), where the last epoch, at 2% of the peak learning rate, cannot repair
      a late swap; stopping at the first epoch at the target instead cost up to 0.9 points at
      E = 20 and 40. ``'auto'``: ``'reference'`` for ``E >= 100``, else ``'budget'``.
    momentum: the scores' SGD momentum (PyTorch form: ``v ← μv + g``).
    nesterov: Nesterov momentum for the scores (not in the reference).
    score_weight_decay: L2 decay added to the scores' gradient (0 in the reference).
    sparsity_schedule: ``step -> p(t)`` replacing the sigmoid staircase; the score learning rate
      then uses ``p(t)/P``.
    refresh: ``step -> bool``, when to recompute the mask (default: the first step of each epoch).
    distribution: ``'global'`` (reference), ``'uniform'``, ``'erk'`` or a callable
      ``(shapes, sparsity) -> per-layer sparsities``.
    exclude: path regexes of kernels never pruned (none in the reference); each must match.
    filter_fn: ``(path_str, leaf) -> bool`` choosing prunable leaves (default: ``ndim >= 2``).
    layer_axes: leading layer axis of stacked kernels (pruned per layer with per-layer
      distributions).
    overrides: path regex → sparsity for ``'uniform'`` and ``'erk'`` (refused with ``'global'``).
    selection_rule: ``'exact'``: each pool keeps exactly ``N − floor(p·N)`` of its ``N`` scores,
      ties by position; ``'reference'``: the authors' ``S >= thr``, ``thr`` the
      ``N − ceil(p·N)``-th largest, every tie kept (may keep more; see the module doc). Used
      at every refresh and by ``og.final_masks``; per layer with per-layer distributions.
    min_density: with ``'global'`` (and ``selection_rule='exact'``), each layer keeps at least
      its own top ``ceil(min_density·n_l)`` scores at every refresh and in ``og.final_masks``,
      the rest of the ``N − floor(p·N)`` kept being the global top-k of the other scores (see
      :class:`~optg_jax.methods.selection.Selection`); ``None`` or 0 (the reference) puts no
      floor.
    final: the final model's mask (``og.final_masks``). ``'trained'``: the mask the last step
      trained with once the ramp has reached the target (it keeps no more weights than the
      target's top-k), else the top-k of the final scores at ``P``; ``'reselect'``: always
      the top-k of the final scores at ``P``, the authors' evaluation, a mask no step trained
      with (the scores moved after the last refresh; in short runs it can cost the model tens
      of points). With the default ``refresh`` and ``total_epochs`` known, the mask is never
      refreshed after the last epoch, so the masks in use at the end are the trained ones.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`~optg_jax.methods.scores.ScoresState`.
  """
  target = _checks.sparsity(sparsity)
  if not callable(learning_rate):
    _checks.number(learning_rate, "learning_rate")
  _checks.number(momentum, "momentum")
  _checks.number(score_weight_decay, "score_weight_decay")
  if total_epochs is not None:
    _checks.number(total_epochs, "total_epochs", integer=True)
  if selection_rule not in SELECTION_RULES:
    raise ValueError(f"selection_rule must be one of {SELECTION_RULES}, got {selection_rule!r}")
  selection = Selection(distribution, exclude, filter_fn, layer_axes, overrides,
                        rule=selection_rule, min_density=min_density)
  refresh_end = total_epochs
  if sparsity_schedule is None:
    _require(steps_per_epoch=steps_per_epoch, total_epochs=total_epochs)
    _checks.number(beta, "beta", traced=False)
    fraction, refresh_end = _ramp(ramp, steps_per_epoch, total_epochs, beta)
  else:
    fraction = schedules.fraction_of_target(sparsity_schedule, target)
  if final not in FINALS:
    raise ValueError(f"final must be one of {FINALS}, got {final!r}")
  if refresh is None:
    _require(steps_per_epoch=steps_per_epoch)
    refresh = schedules.epoch_boundaries(steps_per_epoch, end_epoch=refresh_end)
  lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  score_optimizer = optax.chain(
      *([] if _is_zero(score_weight_decay) else [optax.add_decayed_weights(score_weight_decay)]),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_schedule(lambda t: -(lr(t) * fraction(t))))
  return scores_lib.trainable_scores(
      scores_lib.zero_scores, score_optimizer,
      scores_lib.topk_masks(selection, target, fraction), selection=selection, refresh=refresh,
      dense_start=True, final_masks=_final_rule(final, selection, target))


def _final_rule(final: str, selection: Selection, target: float) -> Any:
  at_target = scores_lib.TopKAtTarget(selection, target)
  return scores_lib.TrainedAtTarget(at_target) if final == "trained" else at_target


optg = mask_optimizer
"""The paper's name for :func:`mask_optimizer`."""


FINALS = ("trained", "reselect")
"""The ``final`` values of :func:`mask_optimizer`."""

RAMPS = ("reference", "budget", "auto")
"""The ``ramp`` values of :func:`mask_optimizer`."""


def resolve_ramp(ramp: str, total_epochs: int) -> str:
  """``'auto'`` resolved for a run of ``total_epochs``: ``'reference'`` from 100 epochs on."""
  if ramp not in RAMPS:
    raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
  if ramp == "auto":
    return "reference" if total_epochs >= 100 else "budget"
  return ramp


def _ramp(ramp: str, steps_per_epoch: int, total_epochs: int, beta: float):
  """The fraction of the target, ``step -> p(t)/P``, and the first epoch that no longer
  refreshes the mask by default."""
  if resolve_ramp(ramp, total_epochs) == "budget":
    end = min(0.6 * total_epochs, total_epochs - 1) if total_epochs >= 2 else 0.6
    last_refreshed = max(math.ceil(end), math.floor(0.9 * total_epochs) - 1)
    return (schedules.sigmoid_window_fraction(steps_per_epoch, 0.1 * total_epochs, end),
            min(last_refreshed + 1, total_epochs))
  reached = 1.0 / (1.0 + math.exp(-beta * (total_epochs - 1 - total_epochs / 2)))
  if reached < 0.999:
    warnings.warn(
        f"og.mask_optimizer: the reference ramp p_e = P·σ(β(e − E/2)) trains its last epoch at "
        f"{reached:.4f}·P with E = {total_epochs}, β = {beta}: the final mask at P is one the "
        "weights never trained with. Pass ramp='budget' (or 'auto') for short runs.",
        stacklevel=3)
  return schedules.sigmoid_fraction(steps_per_epoch, total_epochs, beta), total_epochs


def _is_zero(value: Any) -> bool:
  """A Python zero (a traced hyperparameter of ``optax.inject_hyperparams`` is kept)."""
  return isinstance(value, (int, float)) and value == 0


def _require(**kwargs: Any) -> None:
  for name, value in kwargs.items():
    if value is None:
      raise ValueError(f"{name} is required unless you pass your own sparsity_schedule/refresh")
