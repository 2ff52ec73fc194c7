"""Training in rounds: snapshot, train, prune, rewind, retrain (IMP, and the round structure of
Continuous Sparsification and RST).

:func:`rounds` wraps the weights' optimizer (``inner``, any optax transformation, e.g.
``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, 0.9))``) the way
``optax.MultiSteps`` does: it owns the inner state and decides, step by step, what the inner
chain sees and what comes out:

* every step: the forward pass uses ``W ⊙ M`` (``og.effective_params``), the inner chain gets
  ``G ⊙ M`` and its updates come out masked (pruned weights stay where they are);
* step ``k`` of round 0 (``rewind_step``; 0 is the init): the weights ``W_k`` are kept as the
  snapshot;
* the last step of a round (``steps_per_round`` updates): the next masks come from
  ``next_masks(W_end, masks, round, aux)``, where ``W_end`` is what ``apply_updates`` would give
  after the inner step; if the boundary rewinds, the update is ``W_k − W`` (so ``apply_updates``
  lands on ``W_k``, see :func:`sync_rewind` for the exact landing) instead of the inner step's;
  the inner state is re-initialised (or kept) and its step counters, which drive optax's
  learning-rate schedules, are set to ``schedule_step`` (the rewind step ``k``: the schedule
  resumes at ``k``; 0: it restarts; ``None``: left as they are).

Everything lives in :class:`RoundsState` (arrays, with the Python configuration kept static in
the treedef), so jit, checkpoints and exact resume need no special case. What no optimizer sees
(Flax ``batch_stats``) is rewound by the training loop with :func:`sync_rewind`.

Per-step behaviour is pluggable (``step_fn``, ``aux``), so methods that train their own mask
variables in rounds (Continuous Sparsification's logits) are policies of this one primitive and
:class:`RoundsState` stays the one registered method state in the chain: ``inner`` must not hold
another sparsity method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optg_jax import masks as masks_lib
from optg_jax.methods import _trees
from optg_jax.methods import base
from optg_jax.methods.scores import Static
from optg_jax.methods.selection import Selection

PyTree = Any
NextMasksFn = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[PyTree, PyTree]]
"""``(end_params, masks, round, aux) -> (masks, aux)`` at the end of round ``round`` (traced int)."""
StepFn = Callable[[PyTree, "RoundsState", PyTree], tuple[PyTree, PyTree, PyTree]]
"""``(grads, state, params) -> (inner_grads, masks, aux)`` every step (default ``G ⊙ M``)."""

NO_EVENT, REWOUND, BOUNDARY = 0, 1, 2
"""Values of :attr:`RoundsState.event`: what the update just applied did."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RoundsConfig:
  """The static configuration of :func:`rounds` (hashable; kept in the state's treedef).

  Attributes:
    lengths: updates per round, one int per round.
    rewind_step: ``k``, the step of round 0 whose weights are the snapshot.
    rewind: per boundary (after round ``i``), whether the weights go back to the snapshot.
    reset_inner: per boundary, whether the inner state is re-initialised.
    schedule_step: per boundary, the inner step counters' new value (-1: left as they are).
    mask_updates: the inner updates are masked (pruned weights do not move).
    masks_view: ``state -> bool masks`` for ``og.get_masks`` (``None``: the support of masks).
    final_fn: ``(state, params, sparsity) -> bool masks`` for ``og.final_masks`` (``None``: the
      current masks).
    mask_values: ``(state, bool masks) -> masks`` for ``og.with_masks``: the multipliers the
      forward pass uses for given bool masks (``None``: the bool masks themselves).
  """
  lengths: tuple[int, ...]
  rewind_step: int
  rewind: tuple[bool, ...]
  reset_inner: tuple[bool, ...]
  schedule_step: tuple[int, ...]
  mask_updates: bool = True
  masks_view: Callable[[Any], PyTree] | None = None
  final_fn: Callable[[Any, PyTree, float | None], PyTree] | None = None
  mask_values: Callable[[Any, PyTree], PyTree] | None = None

  @property
  def has_snapshot(self) -> bool:
    return any(self.rewind)


class RoundsState(NamedTuple):
  """State of :func:`rounds`.

  Attributes:
    count: int32 scalar, updates done in all (the step of the next forward pass).
    round: int32 scalar, the current round (0-based; stays at the last one once it ends).
    round_step: int32 scalar, updates done in the current round.
    masks: the masks of the next forward pass (the params' treedef; bool, or real multipliers for
      soft-mask policies).
    snapshot: ``W_k`` (the params' treedef), or ``None`` when no boundary rewinds.
    inner_state: the inner optimizer's state.
    aux: the policy's own arrays (``None`` for IMP).
    event: int32 scalar, what the update just applied did: ``NO_EVENT``, ``REWOUND`` (weights
      sent back to the snapshot) or ``BOUNDARY`` (a round ended without rewinding).
    config: the :class:`RoundsConfig` (static).
  """
  count: jax.Array
  round: jax.Array
  round_step: jax.Array
  masks: PyTree
  snapshot: PyTree
  inner_state: optax.OptState
  aux: PyTree
  event: jax.Array
  config: Static


def _support(masks: PyTree) -> PyTree:
  return jax.tree.map(lambda m: m if jnp.result_type(m) == jnp.bool_ else m != 0, masks)


def _masks_view(state: RoundsState) -> PyTree:
  view = state.config.value.masks_view
  return _support(state.masks) if view is None else view(state)


def _final_masks(state: RoundsState, params: PyTree, sparsity: float | None) -> PyTree:
  final = state.config.value.final_fn
  if final is not None:
    return final(state, params, sparsity)
  if sparsity is not None:
    raise ValueError("final_masks: this method's final masks are its current masks (those of "
                     f"its last round); it cannot select them at sparsity={sparsity} (omit it)")
  return _masks_view(state)


def _with_masks(state: RoundsState, masks: PyTree) -> RoundsState:
  values = state.config.value.mask_values
  return state._replace(masks=masks if values is None else values(state, masks))


base.register_state(RoundsState, masks=_masks_view, final_masks=_final_masks,
                    with_masks=_with_masks)


def per_boundary(value: Any, n: int, name: str) -> tuple:
  """``value`` once per boundary: a scalar repeated ``n`` times, or a sequence of length ``n``."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} must have one entry per round boundary ({n}), got {len(value)}")
    return tuple(value)
  return (value,) * n


def _lengths(steps_per_round: int | Sequence[int], num_rounds: int) -> tuple[int, ...]:
  if isinstance(num_rounds, bool) or not isinstance(num_rounds, (int, np.integer)) \
      or num_rounds < 1:
    raise ValueError(f"num_rounds must be an int >= 1, got {num_rounds!r}")
  lengths = per_boundary(steps_per_round, num_rounds, "steps_per_round")
  for n in lengths:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"steps_per_round must be ints >= 1, got {steps_per_round!r}")
  return tuple(int(n) for n in lengths)


def _schedule_steps(schedule_step: Any, n: int) -> tuple[int, ...]:
  steps = per_boundary(schedule_step, n, "schedule_step")
  for s in steps:
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0):
      raise ValueError(f"schedule_step must be None or ints >= 0, got {schedule_step!r}")
  return tuple(-1 if s is None else int(s) for s in steps)


def set_counts(inner_state: optax.OptState, value: Any) -> optax.OptState:
  """``inner_state`` with every ``count`` field (optax's step counters: schedules, Adam's bias
  correction, ``inject_hyperparams``) set to ``value`` (an int scalar, maybe traced)."""

  def is_counted(x):
    return isinstance(x, tuple) and hasattr(x, "_fields") and "count" in x._fields

  def reset(x):
    if not is_counted(x):
      return x
    return x._replace(count=jnp.asarray(value, jnp.result_type(x.count)))

  return jax.tree.map(reset, inner_state, is_leaf=is_counted)


def mask_grads(grads: PyTree, state: RoundsState, params: PyTree):
  """The default step: ``G ⊙ M`` down the chain, masks and aux unchanged."""
  del params
  return base.masked(grads, state.masks), state.masks, state.aux


def pick(flag: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  """``a`` where the scalar ``flag`` holds, else ``b`` (same structures)."""
  return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def rounds(
    inner: optax.GradientTransformation,
    steps_per_round: int | Sequence[int],
    num_rounds: int,
    next_masks: NextMasksFn,
    *,
    rewind_step: int = 0,
    rewind: bool | Sequence[bool] = True,
    reset_inner: bool | Sequence[bool] = True,
    schedule_step: int | None | Sequence[int | None] = "rewind",
    mask_updates: bool = True,
    selection: Selection = Selection(),
    init_masks: Callable[[PyTree, PyTree], PyTree] | None = None,
    init_aux: Callable[[PyTree, PyTree], PyTree] | None = None,
    step_fn: StepFn | None = None,
    masks_view: Callable[[RoundsState], PyTree] | None = None,
    final_masks: Callable[[RoundsState, PyTree, float | None], PyTree] | None = None,
    mask_values: Callable[[RoundsState, PyTree], PyTree] | None = None,
) -> optax.GradientTransformation:
  """Trains with ``inner`` in ``num_rounds`` rounds, with new masks (and maybe a rewind) between.

  Args:
    inner: the weights' optimizer (it must not hold another sparsity method).
    steps_per_round: updates per round: one int, or one per round (IMP: ``T`` for round 0 and
      ``T − k`` after each rewind, as the schedule resumes at ``k``).
    num_rounds: number of rounds ``R >= 1``; there are ``R − 1`` boundaries. After the last
      round nothing more happens (further steps train with the last masks).
    next_masks: ``(end_params, masks, round, aux) -> (masks, aux)``, called at the end of round
      ``round`` (a traced int32) with the weights that round ended at.
    rewind_step: ``k``: the weights the forward pass of step ``k`` of round 0 uses are the
      snapshot (``0``: the initial weights, the original LTH).
    rewind: per boundary (one bool, or one per boundary): send the weights back to the snapshot.
    reset_inner: per boundary: re-initialise the inner state (from the weights of the new round).
    schedule_step: per boundary: the value the inner step counters get (``'rewind'``: the
      rewind step, so schedules resume there; ``0``: restart; ``None``: untouched).
    mask_updates: mask the inner updates so pruned weights do not move (weight decay included).
    selection: the prunable leaves (for the initial all-keep masks).
    init_masks: ``(params, prunable) -> masks`` (default all-keep).
    init_aux: ``(params, prunable) -> aux`` (default ``None``).
    step_fn: ``(grads, state, params) -> (inner_grads, masks, aux)`` every step, before the
      inner update (default: ``G ⊙ M``, masks and aux unchanged). Soft-mask policies train their
      own variables here (the chain rule into them) and return their new masks.
    masks_view: ``state -> bool masks`` for ``og.get_masks`` (default the support of ``masks``).
    final_masks: ``(state, params, sparsity) -> bool masks`` for ``og.final_masks`` (default the
      current masks).
    mask_values: ``(state, bool masks) -> masks`` the forward pass multiplies with, for
      ``og.with_masks`` (default the bool masks; CS's ticket scales them by ``1/σ(s0)``).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`RoundsState`.

  Raises:
    ValueError: a bad round length or count, a per-boundary sequence of the wrong length, or a
      rewind step not inside round 0; at ``init``, an ``inner`` holding a sparsity method.
  """
  lengths = _lengths(steps_per_round, num_rounds)
  if isinstance(rewind_step, bool) or not isinstance(rewind_step, (int, np.integer)) \
      or not 0 <= rewind_step < lengths[0]:
    raise ValueError(f"rewind_step must be an int in [0, {lengths[0]}) (inside round 0), got "
                     f"{rewind_step!r}")
  n = num_rounds - 1
  schedule_step = rewind_step if schedule_step == "rewind" else schedule_step
  config = RoundsConfig(lengths, int(rewind_step), per_boundary(rewind, n, "rewind"),
                        per_boundary(reset_inner, n, "reset_inner"),
                        _schedule_steps(schedule_step, n), mask_updates, masks_view, final_masks,
                        mask_values)
  step = step_fn or mask_grads

  def init_fn(params):
    prunable = selection.prunable(params)
    masks = (init_masks or masks_lib.all_keep)(params, prunable)
    aux = None if init_aux is None else init_aux(params, prunable)
    zero = jnp.zeros((), jnp.int32)
    snapshot = params if config.has_snapshot else None
    inner_state = inner.init(params)
    if base.has_state(inner_state):
      raise ValueError("rounds: inner holds a sparsity method of its own; it must be the "
                       "weights' optimizer only (the rounds state is the one method state)")
    return RoundsState(zero, zero, zero, masks, snapshot, inner_state, aux, zero,
                       Static(config))

  def update_fn(grads, state, params=None):
    _trees.require_params(params, "rounds")
    snapshot = _take_snapshot(state, params)
    inner_grads, masks, aux = step(grads, state._replace(snapshot=snapshot), params)
    updates, inner_state = inner.update(inner_grads, state.inner_state, params)
    if config.mask_updates:
      updates = base.masked(updates, state.masks)
    done = state.round_step + 1
    lengths_arr = jnp.asarray(config.lengths, jnp.int32)
    ends = (done == lengths_arr[state.round]) & (state.round < num_rounds - 1)
    moved = state._replace(snapshot=snapshot, masks=masks, aux=aux, inner_state=inner_state)
    if n == 0:
      return updates, _advance(moved, jnp.bool_(False), jnp.int32(NO_EVENT), done)
    return jax.lax.cond(ends, lambda: _boundary(moved, params, updates),
                        lambda: (updates, _advance(moved, jnp.bool_(False),
                                                   jnp.int32(NO_EVENT), done)))

  def _take_snapshot(state, params):
    if not config.has_snapshot:
      return None
    take = (state.round == 0) & (state.round_step == config.rewind_step)
    return pick(take, params, state.snapshot)

  def _boundary(state, params, updates):
    """The last update of a round: next masks, maybe the rewind, the inner state's reset."""
    r = state.round
    end = optax.apply_updates(params, updates)
    masks, aux = next_masks(end, state.masks, r, state.aux)
    if config.has_snapshot:
      back = jnp.asarray(config.rewind)[r]
      start = pick(back, state.snapshot, end)
      rewind_updates = jax.tree.map(lambda s, p, u: (s - p).astype(jnp.result_type(u)),
                                    state.snapshot, params, updates)
      updates = pick(back, rewind_updates, updates)
      event = jnp.where(back, REWOUND, BOUNDARY).astype(jnp.int32)
    else:
      start, event = end, jnp.int32(BOUNDARY)
    inner_state = pick(jnp.asarray(config.reset_inner)[r], inner.init(start), state.inner_state)
    sched = jnp.asarray(config.schedule_step, jnp.int32)[r]
    inner_state = pick(sched >= 0, set_counts(inner_state, sched), inner_state)
    moved = state._replace(masks=masks, aux=aux, inner_state=inner_state)
    return updates, _advance(moved, jnp.bool_(True), event, jnp.int32(0))

  def _advance(state, ends, event, round_step):
    return state._replace(count=state.count + 1, round=state.round + ends.astype(jnp.int32),
                          round_step=round_step, event=event)

  return optax.GradientTransformation(init_fn, update_fn)


def rounds_state(opt_state: Any) -> RoundsState | None:
  """The :class:`RoundsState` inside ``opt_state``, or ``None`` (no round-based method)."""
  if not base.has_state(opt_state):
    return None
  state = base.find_state(opt_state)
  return state if isinstance(state, RoundsState) else None


def rewinds_next(opt_state: Any) -> bool:
  """Whether the next update ends a round and sends the weights back to the snapshot (a host
  read of two scalars): a training loop that evaluates the round's trained weights must do so
  before that update, whose result is ``W_k``."""
  state = rounds_state(opt_state)
  if state is None:
    return False
  config, r = state.config.value, int(state.round)
  ends_round = r < len(config.rewind) and int(state.round_step) + 1 == config.lengths[r]
  return ends_round and config.rewind[r]


def sync_rewind(params: PyTree, opt_state: Any, extra: PyTree = None,
                saved: PyTree = None) -> tuple[PyTree, PyTree, PyTree]:
  """The training loop's hook, called after every ``apply_updates`` (inside jit or not).

  It rewinds what the optimizer cannot: state no optimizer sees (``extra``, e.g. Flax
  ``batch_stats``), and the last rounding of the weights' rewind. ``apply_updates`` adds
  ``W_k − W`` to ``W`` in float arithmetic, which lands within rounding of ``W_k`` but not
  bitwise on it when ``|W_k| ≪ |W|`` (no float ``u`` makes ``W + u == W_k`` then); after a
  rewind this returns the snapshot itself.

  * the update just applied rewound (``event == REWOUND``): ``params ← W_k`` exactly and
    ``extra ← saved``;
  * the next forward pass is step ``k`` of round 0: ``saved ← extra`` (the statistics the
    snapshot's forward pass starts from);
  * otherwise, and for optimizer states without rounds: all three unchanged.

  Start the loop with ``saved = extra`` (the statistics at init, which ``k = 0`` rewinds to)
  and carry ``saved`` (checkpoint it with the rest)::

    saved = batch_stats
    for batch in data:
      params, batch_stats, opt_state = train_step(params, batch_stats, opt_state, batch)
      params, batch_stats, saved = og.sync_rewind(params, opt_state, batch_stats, saved)

  Args:
    params: the params after ``apply_updates``.
    opt_state: the optimizer state after the update.
    extra: the loop's other state after the step (any pytree), or ``None``.
    saved: the loop's copy of ``extra`` at the rewind step (``extra``'s structure), or ``None``.

  Returns:
    ``(params, extra, saved)``.
  """
  state = rounds_state(opt_state)
  if state is None:
    return params, extra, saved
  rewound = state.event == REWOUND
  if state.snapshot is not None:
    params = pick(rewound, state.snapshot, params)
  if extra is None:
    return params, extra, saved
  saved = extra if saved is None else saved
  at_k = ((state.round == 0) & (state.round_step == state.config.value.rewind_step)
          & ~rewound)
  return params, pick(rewound, saved, extra), pick(at_k, extra, saved)
