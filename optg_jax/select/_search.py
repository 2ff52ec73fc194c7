"""The counting search for the k-th largest key of a pool of leaves (any shapes).

A bracket ``lo <= T < hi`` around the k-th largest key ``T`` is kept with
exact per-leaf counts ``#{key >= lo} >= k > #{key >= hi}`` (totals over the
leaves). Each step runs the pass `_plan.plan` chooses and moves the bracket
ends to the measured splits, so the invariant holds whatever the plan; the
search ends when ``hi == lo + 1``. A step that shrinks neither the key range
nor the bracket count by a quarter (and is no extent pass) makes the next
count pass bisect the key range, which bounds the number of steps.

``select(..., planner=False)`` is the baseline the planner is measured
against (benchmarks/mask_refresh.py): no sample, every step one count pass
at the key midpoint of the bracket, about 32 passes; the bracket, and so the
masks, are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optg_jax.select import _passes
from optg_jax.select import _plan
from optg_jax.select import _keys
from optg_jax.select import _sample
from optg_jax.select._keys import KEY_INF, KEY_NAN, KEY_TOP
from optg_jax.select._passes import SLOTS


class Bracket(NamedTuple):
  """Search state: the k-th largest key ``T`` satisfies ``lo <= T < hi``."""

  lo: jax.Array  # int32 key, #{key >= lo} >= k
  hi: jax.Array  # int32 key, #{key >= hi} < k
  c_lo: jax.Array  # per-leaf #{key >= lo}, (L,) int32
  c_hi: jax.Array  # per-leaf #{key >= hi}, (L,) int32
  stall: jax.Array  # bool, the last step failed to shrink the bracket enough
  top_w: jax.Array  # uint32; if > 0 the largest bracket key is >= hi - top_w
  bot_w: jax.Array  # uint32; if > 0 the smallest bracket key is < lo + bot_w
  open_lo: jax.Array  # bool, no non-NaN score lies below lo


def select(leaves: Sequence[jax.Array], k: jax.Array, done: jax.Array, *,
           planner: bool = True) -> Bracket:
  """Bracket with ``hi == lo + 1`` whose ``lo`` is the key of the k-th largest score.

  Args:
    leaves: non-empty score arrays of any shapes.
    k: int32 rank, ``1 <= k <= total`` unless ``done``.
    done: bool; then no pass runs and the bracket is ``[KEY_NAN, KEY_NAN + 1)``
      with every score counted as a tie at ``lo`` (callers use it when every or
      no score is kept).
    planner: False bisects the key range with plain count passes instead (no
      sample, no plan): the same bracket in more passes, for benchmarks.
  """
  total = sum(x.size for x in leaves)
  k = jnp.maximum(k, 1)
  if planner:
    model = _sample.make_model(_sample.sample_keys(leaves, total), total)

  def unfinished(br):
    return lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32) > 1

  def bisect(br):
    # The midpoint of [lo, hi) with hi >= lo + 2 lies above KEY_NAN, as count passes need.
    mid = _keys.key_midpoint(br.lo, br.hi)
    counts = _passes.count_pass(leaves, mid)
    up = jnp.sum(counts) >= k
    return br._replace(lo=jnp.where(up, mid, br.lo), hi=jnp.where(up, br.hi, mid),
                       c_lo=jnp.where(up, counts, br.c_lo), c_hi=jnp.where(up, br.c_hi, counts))

  def step(br):
    plan = _plan.plan(model, br, k)
    splits, per_leaf, width = _measure(leaves, br, plan)
    totals = jnp.sum(per_leaf, axis=0)
    real = splits < KEY_TOP
    up = real & (totals >= k)  # these splits may become lo
    down = real & (totals < k)  # these may become hi
    i_up = jnp.argmax(jnp.where(up, splits, KEY_NAN))
    i_down = jnp.argmin(jnp.where(down, splits, KEY_TOP))
    lo = jnp.where(up.any(), splits[i_up], br.lo)
    hi = jnp.where(down.any(), splits[i_down], br.hi)
    c_lo = jnp.where(up.any(), per_leaf[:, i_up], br.c_lo)
    c_hi = jnp.where(down.any(), per_leaf[:, i_down], br.c_hi)
    old = lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32)
    new = lax.bitcast_convert_type(hi - lo, jnp.uint32)
    fewer_keys = new <= old - old // 4
    fewer_scores = 4 * (jnp.sum(c_lo) - jnp.sum(c_hi)) <= 3 * (
        jnp.sum(br.c_lo) - jnp.sum(br.c_hi))
    extent = (plan.kind == _plan.TOP) | (plan.kind == _plan.BOTTOM)  # these shrink a window
    stall = ~(fewer_keys | fewer_scores | extent) & ~br.stall
    # The bound on the largest bracket score survives a rise of lo but not a
    # fall of hi (and symmetrically for the smallest one).
    top_w = jnp.where(plan.kind == _plan.TOP, width, jnp.where(hi == br.hi, br.top_w, 0))
    bot_w = jnp.where(plan.kind == _plan.BOTTOM, width, jnp.where(lo == br.lo, br.bot_w, 0))
    open_lo = (lo == -KEY_INF) | (br.open_lo & ((lo == br.lo) | (plan.kind == _plan.BOTTOM)))
    return Bracket(lo, hi, c_lo, c_hi, stall, top_w.astype(jnp.uint32),
                   bot_w.astype(jnp.uint32), open_lo)

  start = Bracket(
      lo=jnp.int32(KEY_NAN),
      hi=jnp.where(done, KEY_NAN + 1, KEY_TOP).astype(jnp.int32),
      c_lo=jnp.array([x.size for x in leaves], jnp.int32),
      c_hi=jnp.zeros((len(leaves),), jnp.int32),
      stall=jnp.bool_(False),
      top_w=jnp.uint32(0),
      bot_w=jnp.uint32(0),
      open_lo=jnp.bool_(False))
  return lax.while_loop(unfinished, step if planner else bisect, start)


def _measure(leaves: Sequence[jax.Array], br: Bracket, plan: _plan.Plan):
  """Runs the planned pass.

  Returns ``(splits, counts, width)``: ``(SLOTS,)`` split keys (unused ones
  ``KEY_TOP``), the per-leaf ``#{key >= split}`` of each, ``(L, SLOTS)``, and
  for an extent pass the new uint32 bound on where the extreme bracket score
  lies (0 otherwise, or when it lies outside the window).
  """
  num = len(leaves)
  unused_splits = jnp.full((SLOTS,), KEY_TOP, jnp.int32)
  unused_counts = jnp.zeros((num, SLOTS), jnp.int32)
  none = jnp.uint32(0)

  def by_count(_):
    counts = _passes.count_pass(leaves, plan.splits[0])
    return plan.splits, unused_counts.at[:, 0].set(counts), none

  def by_digits(_):
    sums = _passes.digit_pass(leaves, plan.splits, plan.incs, br.lo, br.hi)
    return plan.splits, _passes.decode(sums, plan.slots, plan.base, br.c_hi), none

  def by_extent(_):
    # Nothing lies above (below) the bucket of the largest (smallest) bracket
    # score, so hi comes down (lo goes up) to the bucket's end; a lone
    # bracket score also pins lo. No bracket score in the window moves the
    # end past the whole window.
    from_top = plan.kind == _plan.TOP
    best = _passes.extent_pass(leaves, br.lo, br.hi, plan.window, plan.shift, from_top)
    weight = jnp.max(best)
    inside = weight >= 2
    start, end = _passes.bucket_range(weight, plan.shift, plan.window)
    width = jnp.where(inside, end - start, none)
    win = lax.bitcast_convert_type(plan.window, jnp.int32)
    start = lax.bitcast_convert_type(start, jnp.int32)
    end = lax.bitcast_convert_type(end, jnp.int32)
    # From the top: the bucket is [hi - win + start, hi - win + end).
    top_edge = br.hi - win
    hi = jnp.where(inside, top_edge + end, top_edge)
    lone = inside & (jnp.sum(br.c_lo - br.c_hi) == 1)
    top_lo = jnp.where(lone, top_edge + start, KEY_TOP)
    # From the bottom: the bucket is [lo + win - end, lo + win - start).
    bottom_edge = br.lo + win
    lo = jnp.where(inside, bottom_edge - end, bottom_edge)
    splits = jnp.where(from_top, unused_splits.at[0].set(top_lo).at[1].set(hi),
                       unused_splits.at[0].set(lo))
    top_counts = unused_counts.at[:, 0].set(br.c_hi + (best >= 2)).at[:, 1].set(br.c_hi)
    counts = jnp.where(from_top, top_counts, unused_counts.at[:, 0].set(br.c_lo))
    return splits, counts, width

  branch = jnp.minimum(plan.kind, _plan.TOP)  # both extents share one kernel
  return lax.switch(branch, (by_count, by_digits, by_extent), None)
