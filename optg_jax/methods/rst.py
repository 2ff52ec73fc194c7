"""RST, the Dual Lottery Ticket Hypothesis (Bai, Wang, Tao, Li, Fu, ICLR 2022): transform a random
subnetwork of the untrained dense network into a trainable one by "information extrusion".

Per prunable layer ``l`` a subnetwork is chosen from a seed (uniformly at random; the released
code's default, the smallest ``|θ0|``, is ``pick='min'``), removing
``n_l = min(ceil(p_l·N_l), N_l − 1)`` weights. The dense network then trains with a growing L2
penalty on the weights to be removed, added to their gradient: ``g + λ·W``, with ``λ`` raised by
``η`` every ``interval`` steps until it exceeds ``upper_limit``, then held for ``stabilize``
steps; the removed weights are driven to about 0. Then the mask is applied (``W ⊙ M`` forward,
``G ⊙ M`` handed down) and the subnetwork is finetuned. RST-Iter (``cycles = N > 1``) repeats the
ramp ``N`` times on growing removal sets (cumulative sparsity ``1 − (1 − p)^(c/N)`` after cycle
``c``, new removals random among the survivors, ``λ`` reset per cycle), applying the mask after
the last. Reference: github.com/snow12345/DLTH (``reg_pruner.py``); SPEC §4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optg_jax import _checks
from optg_jax import masks as masks_lib
from optg_jax.methods import _trees
from optg_jax.methods import base
from optg_jax.methods.scores import Static
from optg_jax.methods.selection import Selection

PyTree = Any


class RSTState(NamedTuple):
  """State of :func:`rst`.

  Attributes:
    count: int32 scalar, updates done so far.
    rank: int32 per prunable leaf, each weight's place in its layer's removal order (the first
      ``n`` are removed when ``n`` are); ``None`` elsewhere.
    removed: int32 ``(cycles,)`` per prunable leaf: the weights removed after each cycle.
    masks: bool masks of the next forward pass: all-keep while extruding, the subnetwork after.
    target: the sparsity asked for.
    timing: the run's :class:`Phases` (static, in a ``Static``).
  """
  count: jax.Array
  rank: PyTree
  removed: PyTree
  masks: PyTree
  target: float
  timing: Static


def _final_masks(state: RSTState, params: PyTree, sparsity: float | None) -> PyTree:
  if sparsity is not None and sparsity != state.target:
    raise ValueError(f"final_masks: RST's subnetwork is fixed at sparsity {state.target}; it "
                     f"cannot select it again at sparsity={sparsity}")
  return _subnetwork(state, params)


base.register_state(RSTState, final_masks=_final_masks)


class Phases(NamedTuple):
  """The step counts of :func:`rst`: ``ramp_updates`` (``λ`` updates until it exceeds the
  limit), ``cycle_steps`` (steps of one ramp and hold), ``extrusion_steps`` (all cycles: the
  first step that uses the mask)."""
  ramp_updates: int
  cycle_steps: int
  extrusion_steps: int


def phases(*, cycles: int = 1, granularity: float = 1e-4, interval: int = 5,
           upper_limit: float = 1.0, stabilize: int = 40_000) -> Phases:
  """The step counts of an RST run (the reference: 10,001 updates, 90,001 steps per cycle)."""
  ramp = math.floor(upper_limit / granularity) + 1  # the first n with n·η > limit
  cycle = (ramp - 1) * interval + 1 + stabilize
  return Phases(ramp, cycle, cycles * cycle)


def extrusion_dose(learning_rate: float, *, granularity: float = 1e-4, interval: int = 5,
                   upper_limit: float = 1.0, stabilize: int = 40_000) -> float:
  """``Σ_t η_t·λ_t`` over one cycle at a constant learning rate: how far the extrusion shrinks
  the weights to remove (plain SGD: ``W ← W·Π(1 − η λ_t) ≈ W·exp(−dose)``). The reference
  (lr 1e-3, ``λ += 1e-4`` every 5 steps to 1, 40,000 steps held) gives 65.0."""
  timing = phases(granularity=granularity, interval=interval, upper_limit=upper_limit,
                  stabilize=stabilize)
  ramp = timing.ramp_updates
  rising = interval * (ramp - 1) * ramp / 2  # λ = η·n for `interval` steps, n = 1..ramp−1
  held = (timing.cycle_steps - interval * (ramp - 1)) * ramp
  return learning_rate * granularity * (rising + held)


def removal_counts(size: int, sparsity: float, cycles: int, rule: str) -> list[int]:
  """Weights removed from a layer of ``size`` after each cycle ``c = 1..cycles`` at cumulative
  sparsity ``1 − (1 − p)^(c/cycles)``: ``min(ceil(p·N), N − 1)`` (``'reference'``) or
  ``floor(p·N)`` (``'exact'``, the library's keep count)."""
  counts = []
  for c in range(1, cycles + 1):
    p = sparsity if c == cycles else 1.0 - (1.0 - sparsity) ** (c / cycles)
    n = min(math.ceil(p * size), size - 1) if rule == "reference" else math.floor(p * size)
    counts.append(max(n, 0))
  return counts


def rst(
    sparsity: float,
    *,
    cycles: int = 1,
    pick: str = "random",
    seed: int = 0,
    granularity: float = 1e-4,
    interval: int = 5,
    upper_limit: float = 1.0,
    stabilize: int = 40_000,
    count: str = "reference",
    distribution: str | Callable[..., Any] = "uniform",
    exclude: Iterable[str] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
) -> optax.GradientTransformation:
  """RST as an optax transformation, first in the chain; the weights' optimizer follows::

    tx = optax.chain(og.rst(0.7), optax.add_decayed_weights(5e-4),
                     optax.sgd(lr_schedule, momentum=0.9))   # 1e-3 while extruding, then finetune

  Args:
    sparsity: ``p``, the sparsity of each layer (per ``distribution``), in [0, 1).
    cycles: ``N``: 1 is RST, 5 is the paper's RST-Iter.
    pick: ``'random'`` (the paper: uniform, seeded) or ``'min'`` (the code's default: smallest
      ``|θ0|``, ties by index).
    seed: seed of the random subnetwork.
    granularity: ``η``, the step of ``λ``.
    interval: steps between ``λ`` updates (5; the iterative README command uses 1).
    upper_limit: ``λ`` rises until it exceeds this.
    stabilize: steps ``λ`` is held before the mask (40,000; 10,000 for RST-Iter).
    count: ``'reference'`` removes ``min(ceil(p·N_l), N_l − 1)`` per layer; ``'exact'``
      ``floor(p·N_l)``, the library's convention.
    distribution: per-layer sparsities: ``'uniform'`` (the reference, with ``exclude`` for the
      dense stem and classifier), ``'erk'`` or a callable; not ``'global'``.
    exclude, filter_fn: which kernels are pruned.

  Returns:
    An ``optax.GradientTransformation`` with an :class:`RSTState`. The downstream optimizer's
    state carries over from extrusion to finetuning (the reference starts a fresh SGD there).
  """
  target = _checks.sparsity(sparsity)
  if distribution == "global":
    raise ValueError("distribution='global' has no per-layer removal counts; use 'uniform'")
  if pick not in ("random", "min"):
    raise ValueError(f"pick must be 'random' or 'min', got {pick!r}")
  if count not in ("reference", "exact"):
    raise ValueError(f"count must be 'reference' or 'exact', got {count!r}")
  for name, value in (("cycles", cycles), ("interval", interval), ("stabilize", stabilize)):
    _checks.number(value, name, integer=True, traced=False)
  for name, value in (("granularity", granularity), ("upper_limit", upper_limit)):
    _checks.number(value, name, traced=False)
  _checks.number(seed, "seed", integer=True)
  if cycles < 1 or interval < 1 or stabilize < 0 or not granularity > 0:
    raise ValueError("cycles and interval must be >= 1, stabilize >= 0 and granularity > 0")
  selection = Selection(distribution, tuple(exclude), filter_fn)
  timing = phases(cycles=cycles, granularity=granularity, interval=interval,
                  upper_limit=upper_limit, stabilize=stabilize)

  def init_fn(params):
    prunable = selection.prunable(params)
    per_layer = selection.layer_sparsities(params, prunable, target)
    removed = _trees.map_prunable(
        lambda s, p: jnp.asarray(removal_counts(int(np.size(p)), s, cycles, count), jnp.int32),
        per_layer, params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    ranks = [_rank(k, p, pick) for k, p in zip(keys, leaves)]
    rank = _trees.only_prunable(prunable, jax.tree.unflatten(treedef, ranks))
    return RSTState(jnp.zeros((), jnp.int32), rank, removed,
                    masks_lib.all_keep(params, prunable), target, Static(timing))

  def update_fn(grads, state, params=None):
    _trees.require_params(params, "rst")
    t = state.count
    cycle = jnp.minimum(t // timing.cycle_steps, cycles - 1)
    local = t - cycle * timing.cycle_steps
    lam = granularity * jnp.minimum(local // interval + 1, timing.ramp_updates)
    extruding = t < timing.extrusion_steps
    pushed = _trees.map_prunable(
        lambda r, n, g, w: jnp.where(extruding & (r < n[cycle]), g + lam * w, g),
        state.rank, state.removed, grads, params)
    grads = jax.tree.map(lambda g, p: g if p is None else p, grads, pushed,
                         is_leaf=lambda x: x is None)
    next_step = t + 1
    masks = jax.lax.cond(next_step == timing.extrusion_steps,
                         lambda: _subnetwork(state, params), lambda: state.masks)
    return base.masked(grads, state.masks), state._replace(count=next_step, masks=masks)

  return optax.GradientTransformation(init_fn, update_fn)


def _rank(key: jax.Array, leaf: Any, pick: str) -> jax.Array:
  """Each entry's place in the removal order of its layer, int32, the leaf's shape."""
  size = int(np.size(leaf))
  if pick == "random":
    order = jax.random.permutation(key, size)
  else:
    order = jnp.argsort(jnp.abs(jnp.ravel(leaf)), stable=True)
  return jnp.zeros(size, jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32)).reshape(
      np.shape(leaf))


def phase(state: RSTState) -> dict[str, Any]:
  """Where the run is: ``{'phase': 'extrusion' | 'finetune', 'cycle': c}`` (0-based cycle)."""
  timing = state.timing.value
  extruding = int(state.count) < timing.extrusion_steps
  cycle = min(int(state.count) // timing.cycle_steps, timing.extrusion_steps //
              timing.cycle_steps - 1)
  return {"phase": "extrusion" if extruding else "finetune", "cycle": cycle}


def _subnetwork(state: RSTState, params: PyTree) -> PyTree:
  """The masks after the last cycle: a weight is kept unless it is among the removed."""
  return _trees.fill_true(_trees.map_prunable(lambda r, n: r >= n[-1], state.rank, state.removed),
                          params)
