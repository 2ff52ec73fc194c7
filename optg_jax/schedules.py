"""Sparsity and mask-refresh schedules: pure, jit-traceable functions of the step.

Two kinds of callables, both built from Python values and then called with the optimizer step
(a Python int or an int32 jax scalar, possibly traced under ``jit`` or ``vmap``):

* sparsity schedules, ``step -> sparsity`` (a float32 jax scalar, the fraction of prunable
  weights that are zero), in the style of ``optax.Schedule``;
* refresh predicates, ``step -> bool`` (a bool jax scalar), telling a method when to recompute
  its mask.

Arguments are validated when a schedule is built and a bad one raises ``ValueError`` naming it.
The step itself is not checked: a traced step cannot raise, so steps before the start of a
schedule simply read its initial value (or ``False``).

Example::

  sparsity_fn = schedules.polynomial(0.9, begin_step=1000, end_step=9000, frequency=100)
  refresh_fn = schedules.every_n_steps(100, begin_step=1000, end_step=9000)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from optg_jax import _checks

Schedule = Callable[[chex.Numeric], chex.Numeric]
"""``step -> sparsity`` (float32 scalar), like ``optax.Schedule``."""

Predicate = Callable[[chex.Numeric], chex.Array]
"""``step -> bool`` (bool scalar): whether to refresh the mask at this step."""


# ---------------------------------------------------------------------------------------------
# Validation of construction-time (Python) arguments.


def _check_int(value: Any, name: str, minimum: int) -> int:
  _checks.concrete(value, name)
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an integer, got {value!r}.") from None
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return value


def _check_end(end: Any, begin: int, name: str, begin_name: str, strict: bool) -> int | None:
  if end is None:
    return None
  end = _check_int(end, name, 0)
  if end < begin or (strict and end == begin):
    relation = "after" if strict else "at or after"
    raise ValueError(f"{name} ({end}) must be {relation} {begin_name} ({begin}).")
  return end


def _check_finite(value: Any, name: str) -> float:
  value = float(_checks.number(value, name, traced=False))
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  return value


def _as_step(step: chex.Numeric) -> chex.Array:
  return jnp.asarray(step, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Sparsity schedules.


def constant(sparsity: float) -> Schedule:
  """The same sparsity at every step.

  Args:
    sparsity: fraction of prunable weights that are zero, in [0, 1).

  Returns:
    ``step -> sparsity`` as a float32 scalar.
  """
  sparsity = _checks.sparsity(sparsity, "sparsity")

  def schedule(step: chex.Numeric) -> chex.Array:
    return jnp.full(jnp.shape(step), sparsity, dtype=jnp.float32)

  return schedule


def one_shot(sparsity: float, step: int, initial_sparsity: float = 0.0) -> Schedule:
  """Jumps from ``initial_sparsity`` to ``sparsity`` at one step (one-shot pruning).

  Args:
    sparsity: fraction of prunable weights that are zero from ``step`` on, in [0, 1).
    step: first optimizer step (count of updates, from 0) at ``sparsity``.
    initial_sparsity: sparsity before ``step``, in [0, 1).

  Returns:
    ``t -> initial_sparsity if t < step else sparsity`` as a float32 scalar.
  """
  sparsity = _checks.sparsity(sparsity, "sparsity")
  initial_sparsity = _checks.sparsity(initial_sparsity, "initial_sparsity")
  boundary = _check_int(step, "step", 0)

  def schedule(t: chex.Numeric) -> chex.Array:
    return jnp.where(_as_step(t) < boundary, initial_sparsity, sparsity).astype(jnp.float32)

  return schedule


def polynomial(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    initial_sparsity: float = 0.0,
    power: float = 3,
) -> Schedule:
  """Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

  ``p(t) = P + (p0 - P) * (1 - (t - t0) / (t1 - t0)) ** power`` for ``t0 <= t <= t1``, ``p0``
  before ``t0`` and ``P`` from ``t1`` on. The value only changes every ``frequency`` steps counted
  from ``t0`` (``t`` is rounded down to ``t0 + k * frequency``), so a mask refreshed every
  ``frequency`` steps from ``t0`` sees a constant target in between. ``P`` is reached at ``t1``
  even when ``t1 - t0`` is not a multiple of ``frequency``.

  Args:
    final_sparsity: ``P``, the sparsity at and after ``end_step``, in [0, 1).
    begin_step: ``t0``, the step at which the ramp starts (still at ``p0``).
    end_step: ``t1``, the step at which ``P`` is reached; must be after ``begin_step``.
    frequency: steps between changes of the value (``Δt`` in the paper), >= 1.
    initial_sparsity: ``p0``, the sparsity up to ``begin_step``, in [0, 1).
    power: exponent of the ramp (3 in the paper), finite and > 0.

  Returns:
    ``step -> sparsity`` as a float32 scalar.
  """
  final_sparsity = _checks.sparsity(final_sparsity, "final_sparsity")
  initial_sparsity = _checks.sparsity(initial_sparsity, "initial_sparsity")
  begin_step = _check_int(begin_step, "begin_step", 0)
  end_step = _check_end(end_step, begin_step, "end_step", "begin_step", strict=True)
  if end_step is None:
    raise ValueError("end_step is required.")
  frequency = _check_int(frequency, "frequency", 1)
  power = _check_finite(power, "power")
  if power <= 0:
    raise ValueError(f"power must be > 0, got {power!r}.")

  def schedule(step: chex.Numeric) -> chex.Array:
    t = jnp.maximum(_as_step(step), begin_step)
    t = begin_step + (t - begin_step) // frequency * frequency
    t = jnp.where(_as_step(step) >= end_step, end_step, t)
    remaining = (end_step - t).astype(jnp.float32) / (end_step - begin_step)
    remaining = jnp.clip(remaining, 0.0, 1.0)  # XLA may divide by a rounded reciprocal
    value = final_sparsity + (initial_sparsity - final_sparsity) * remaining**power
    return value.astype(jnp.float32)

  return schedule


def sigmoid_fraction(steps_per_epoch: int, total_epochs: int, beta: float = 1.0) -> Schedule:
  """OptG's fraction of the target sparsity reached: ``σ(beta * (e - total_epochs / 2))``.

  ``e = step // steps_per_epoch`` is the epoch index, so the value is a per-epoch staircase:
  about 0 for the first half of training, 0.5 at the middle epoch and about 1 after it. OptG
  multiplies both the sparsity target (see :func:`sigmoid`) and the learning rate of its scores
  (the "supermask optimizer") by this fraction.

  Args:
    steps_per_epoch: optimizer steps per epoch, >= 1.
    total_epochs: ``E``, the number of training epochs, >= 1.
    beta: steepness of the logistic ramp, in 1/epochs (1 in every OptG config); finite.

  Returns:
    ``step -> fraction`` in (0, 1), a float32 scalar.
  """
  steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch", 1)
  total_epochs = _check_int(total_epochs, "total_epochs", 1)
  beta = _check_finite(beta, "beta")
  middle = total_epochs / 2

  def schedule(step: chex.Numeric) -> chex.Array:
    epoch = (_as_step(step) // steps_per_epoch).astype(jnp.float32)
    return jax.nn.sigmoid(beta * (epoch - middle)).astype(jnp.float32)

  return schedule


def sigmoid_window_fraction(steps_per_epoch: int, begin_epoch: float,
                            end_epoch: float) -> Schedule:
  """OptG's sigmoid ramp compressed into the epochs ``[begin_epoch, end_epoch]``, reaching the
  target exactly at ``end_epoch``.

  ``min(1, σ(β(e − c)) / σ(β(b − c)))`` with ``c`` the window's middle and ``β = 10/(b − a)``, so
  the ramp spans the window as the reference's ``β = 1`` spans its 10 middle epochs; exactly 1
  from epoch ``b`` on. A per-epoch staircase, like :func:`sigmoid_fraction`.

  Args:
    steps_per_epoch: optimizer steps per epoch, >= 1.
    begin_epoch, end_epoch: ``a < b``, in epochs (fractional allowed).

  Returns:
    ``step -> fraction`` in (0, 1], a float32 scalar.
  """
  steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch", 1)
  begin, end = _check_finite(begin_epoch, "begin_epoch"), _check_finite(end_epoch, "end_epoch")
  if not 0 <= begin < end:
    raise ValueError(f"need 0 <= begin_epoch < end_epoch, got {begin} and {end}.")
  middle, beta = (begin + end) / 2, 10.0 / (end - begin)
  top = 1.0 / (1.0 + math.exp(-beta * (end - middle)))

  def schedule(step: chex.Numeric) -> chex.Array:
    epoch = (_as_step(step) // steps_per_epoch).astype(jnp.float32)
    ramp = jax.nn.sigmoid(beta * (epoch - middle)) / top
    return jnp.where(epoch >= end, 1.0, jnp.minimum(ramp, 1.0)).astype(jnp.float32)

  return schedule


def fraction_of_target(schedule: Schedule, final_sparsity: float) -> Schedule:
  """``step -> schedule(step) / final_sparsity``, the fraction of the target reached (1 where
  ``final_sparsity`` is 0). Mask builders use it to count exactly at the target itself."""
  final_sparsity = _checks.sparsity(final_sparsity, "final_sparsity")

  def fraction(step: chex.Numeric) -> chex.Array:
    if final_sparsity == 0:
      return jnp.ones((), jnp.float32)
    return (jnp.asarray(schedule(step), jnp.float32) / final_sparsity).astype(jnp.float32)

  return fraction


def sigmoid(
    final_sparsity: float, steps_per_epoch: int, total_epochs: int, beta: float = 1.0
) -> Schedule:
  """OptG's per-epoch sparsity staircase ``p_e = P * σ(beta * (e - total_epochs / 2))``.

  Args:
    final_sparsity: ``P``, the target sparsity approached at the end, in [0, 1).
    steps_per_epoch: optimizer steps per epoch, >= 1.
    total_epochs: ``E``, the number of training epochs, >= 1.
    beta: steepness of the logistic ramp, in 1/epochs; finite.

  Returns:
    ``step -> sparsity`` as a float32 scalar; ``P * sigmoid_fraction(...)(step)``.
  """
  final_sparsity = _checks.sparsity(final_sparsity, "final_sparsity")
  fraction = sigmoid_fraction(steps_per_epoch, total_epochs, beta)

  def schedule(step: chex.Numeric) -> chex.Array:
    return (final_sparsity * fraction(step)).astype(jnp.float32)

  return schedule


# ---------------------------------------------------------------------------------------------
# Refresh predicates.


def _periodic(period: int, begin_step: int, end_step: int | None) -> Predicate:
  def predicate(step: chex.Numeric) -> chex.Array:
    t = _as_step(step)
    hit = (t >= begin_step) & ((t - begin_step) % period == 0)
    if end_step is not None:
      hit = hit & (t < end_step)
    return hit

  predicate.end_step = end_step  # static: no step from here on is True (see true_only_before)
  return predicate


def true_only_before(predicate: Predicate, step: int) -> bool:
  """Whether ``predicate`` is statically known to be False at ``step`` and after: a predicate of
  this module whose ``end_step`` is at most ``step`` (a method then needs no refresh branch
  in its updates). ``False`` for any other callable."""
  end = getattr(predicate, "end_step", None)
  return isinstance(end, int) and end <= step


def every_n_steps(n: int, begin_step: int = 0, end_step: int | None = None) -> Predicate:
  """True at ``begin_step, begin_step + n, ...``, and only before ``end_step`` if given.

  Args:
    n: steps between refreshes, >= 1.
    begin_step: first step that refreshes, >= 0.
    end_step: first step that no longer refreshes (exclusive), or ``None`` for no end.

  Returns:
    ``step -> bool`` as a bool scalar.
  """
  n = _check_int(n, "n", 1)
  begin_step = _check_int(begin_step, "begin_step", 0)
  end_step = _check_end(end_step, begin_step, "end_step", "begin_step", strict=False)
  return _periodic(n, begin_step, end_step)


def epoch_boundaries(
    steps_per_epoch: int, begin_epoch: int = 0, end_epoch: int | None = None
) -> Predicate:
  """True on the first step of every epoch in ``[begin_epoch, end_epoch)``.

  OptG recomputes its mask at the start of every epoch: use ``epoch_boundaries(spe)``.

  Args:
    steps_per_epoch: optimizer steps per epoch, >= 1.
    begin_epoch: first epoch (from 0) whose first step refreshes.
    end_epoch: first epoch that no longer refreshes (exclusive), or ``None`` for no end.

  Returns:
    ``step -> bool`` as a bool scalar.
  """
  steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch", 1)
  begin_epoch = _check_int(begin_epoch, "begin_epoch", 0)
  end_epoch = _check_end(end_epoch, begin_epoch, "end_epoch", "begin_epoch", strict=False)
  end_step = None if end_epoch is None else end_epoch * steps_per_epoch
  return _periodic(steps_per_epoch, begin_epoch * steps_per_epoch, end_step)


def in_window(begin_step: int, end_step: int, every: int = 1) -> Predicate:
  """True on the steps of ``[begin_step, end_step)`` that are ``begin_step + k * every``.

  Args:
    begin_step: first step of the window, >= 0.
    end_step: first step after the window (exclusive), >= ``begin_step``.
    every: steps between ``True`` values, >= 1.

  Returns:
    ``step -> bool`` as a bool scalar.
  """
  begin_step = _check_int(begin_step, "begin_step", 0)
  end_step = _check_end(end_step, begin_step, "end_step", "begin_step", strict=False)
  if end_step is None:
    raise ValueError("end_step is required.")
  every = _check_int(every, "every", 1)
  return _periodic(every, begin_step, end_step)


def any_of(*predicates: Predicate) -> Predicate:
  """True where at least one of ``predicates`` is true."""
  if not predicates:
    raise ValueError("predicates: any_of needs at least one predicate.")
  return lambda step: jnp.any(jnp.stack([jnp.asarray(p(step)) for p in predicates]), axis=0)


def all_of(*predicates: Predicate) -> Predicate:
  """True where every one of ``predicates`` is true."""
  if not predicates:
    raise ValueError("predicates: all_of needs at least one predicate.")
  return lambda step: jnp.all(jnp.stack([jnp.asarray(p(step)) for p in predicates]), axis=0)
