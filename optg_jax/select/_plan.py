"""The search's planner: which pass to run next, and at which split keys.

Only speed depends on the plan: every split is measured by an exact pass,
and the search keeps its invariant whatever the splits are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optg_jax.select import _keys
from optg_jax.select import _passes
from optg_jax.select import _sample
from optg_jax.select._keys import KEY_INF, KEY_NAN, KEY_TOP
from optg_jax.select._passes import SLOTS

if TYPE_CHECKING:
  from optg_jax.select._search import Bracket

MARGIN = 1.5  # a count pivot overshoots the target by this many estimated standard errors
CURVATURE = 0.02  # relative error allowance of linear interpolation, per rank
SPREAD = 1.0  # a digit pass covers the target's rank +- this many standard errors

COUNT, DIGITS, TOP, BOTTOM = range(4)  # kinds of pass


class Plan(NamedTuple):
  """What the next pass measures."""

  kind: jax.Array  # int32, one of COUNT, DIGITS, TOP, BOTTOM
  splits: jax.Array  # (SLOTS,) int32 ascending keys, unused ones KEY_TOP
  incs: jax.Array  # (SLOTS,) uint8 weight increments of a digit pass (count: [1, 0, ...])
  slots: jax.Array  # int32, used splits of a digit pass
  base: jax.Array  # int32, digit base of a digit pass
  window: jax.Array  # uint32, keys an extent pass buckets, at the bracket's top or bottom
  shift: jax.Array  # uint32, an extent pass's buckets are 2**shift keys wide


def plan(model: _sample.Model, br: Bracket, k: jax.Array) -> Plan:
  """Chooses the next pass from the bracket, the sample and the target rank ``k``."""
  c_lo = jnp.sum(br.c_lo).astype(jnp.float32)
  c_hi = jnp.sum(br.c_hi).astype(jnp.float32)
  kf = k.astype(jnp.float32)
  count = c_lo - c_hi
  span = lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32)
  j = jnp.arange(SLOTS, dtype=jnp.int32)

  widest = jnp.max(br.c_lo - br.c_hi)  # digits must stay below the base per leaf
  slots, base = _passes.digit_slots(widest)
  digits = widest <= _passes.MAX_DIGIT_BRACKET
  lone = (count == 1.0) & (span.astype(jnp.float32) - 1.0 > slots)
  # A target among the scores above (below) every sample point, with no
  # sampled tie there: pin the largest (smallest) score first, by extent
  # passes over shrinking windows, then the sample brackets the target.
  top_tail, bottom_tail = _tails(model, br, kf, c_lo, c_hi)
  # Digit passes spread their splits by value, so they need finite ends; an
  # open end is first closed by the sample if it has points in the bracket,
  # else by an extent pass.
  open_top = ~jnp.isfinite(_keys.key_value(br.hi))
  open_bottom = ~jnp.isfinite(_keys.key_value(br.lo))
  i_lo, i_hi = _sample.sample_range(model, br)
  sampled = i_hi > i_lo
  top = (top_tail | (digits & open_top & ~sampled)) & (br.top_w != 1)
  bottom = (bottom_tail | (digits & br.open_lo & open_bottom & ~sampled)) & (br.bot_w != 1)
  nan_end = (br.lo == KEY_NAN) & ((c_lo - kf < 2.0 * model.weight) | digits)
  digits = digits & ~open_top & ~open_bottom
  kind = jnp.where(
      lone | top, TOP,
      jnp.where(bottom, BOTTOM, jnp.where(digits, DIGITS, COUNT)))
  top_window = jnp.where((br.top_w > 0) & (br.top_w < span), br.top_w, span)
  bot_window = jnp.where((br.bot_w > 0) & (br.bot_w < span), br.bot_w, span)
  window = jnp.where(kind == BOTTOM, bot_window, top_window)

  one = _one_pivot(model, br, kf, c_lo, c_hi, top_tail | bottom_tail)
  one = jnp.where(nan_end, _live_pivot(jnp.int32(-KEY_INF), br), one)  # non-NaN scores first
  # A pinned extreme that is the target itself: split just off it.
  one = jnp.where(top_tail & (br.top_w == 1) & (kf - c_hi == 1.0), br.hi - 1, one)
  one = jnp.where(bottom_tail & (br.bot_w == 1) & (c_lo == kf), br.lo + 1, one)
  many = _many_pivots(br, kf, c_lo, c_hi, slots, span)
  used = j < slots
  splits = jnp.where(digits, jnp.where(used, many, KEY_TOP),
                     jnp.where(j == 0, one, KEY_TOP))
  power = _passes.powers(base, slots)
  inc = power - jnp.concatenate([jnp.zeros((1,), jnp.int32), power[:-1]])
  incs = jnp.where(digits, jnp.where(used, inc, 0), jnp.where(j == 0, 1, 0))
  # Smallest shift with (window - 1) >> shift <= 253: extent weights 2..255.
  shift = jnp.sum(((window - 1)[None] >> jnp.arange(32, dtype=jnp.uint32)) > 253)
  return Plan(kind.astype(jnp.int32), splits.astype(jnp.int32),
              incs.astype(jnp.uint8), slots, base, window,
              shift.astype(jnp.uint32))


def _tails(model: _sample.Model, br: Bracket, kf, c_lo, c_hi):
  """Whether the target lies in the open top (bottom) tail beyond the sample.

  Open top: nothing at or above ``hi``; open bottom: no non-NaN score below
  ``lo``. The target is in the tail if it is among the ``2 * weight``
  extreme scores there and no sampled tie (3 equal sample keys) sits at the
  sample's edge in the bracket.
  """
  s = model.sample
  size = s.shape[0]
  beyond = 2.0 * model.weight
  i_lo, i_hi = _sample.sample_range(model, br)
  tied_top = (i_hi - i_lo >= 3) & (s[jnp.clip(i_hi - 3, 0, size - 1)]
                                   == s[jnp.clip(i_hi - 1, 0, size - 1)])
  tied_bottom = (i_hi - i_lo >= 3) & (s[jnp.clip(i_lo, 0, size - 1)]
                                      == s[jnp.clip(i_lo + 2, 0, size - 1)])
  top = (c_hi == 0.0) & (kf - c_hi < beyond) & ~tied_top
  bottom = br.open_lo & (c_lo - kf + 1.0 < beyond) & ~tied_bottom
  return top, bottom


def _linear_inverse(br: Bracket, c_lo, c_hi, targets):
  """Keys where a CDF linear in value between the bracket ends reaches ``targets``.

  Falls back to the key midpoint where the interpolated value is not finite.
  """
  v_lo = _keys.key_value(br.lo)
  v_hi = _keys.key_value(br.hi)
  frac = (targets - c_hi) / jnp.maximum(c_lo - c_hi, 1.0)
  value = v_hi - frac * (v_hi - v_lo)
  ok = jnp.isfinite(value)
  key = _keys.keys(jnp.where(ok, value, 0.0))
  return jnp.where(ok, key, _keys.key_midpoint(br.lo, br.hi))


def _one_pivot(model: _sample.Model, br: Bracket, kf, c_lo, c_hi, tail) -> jax.Array:
  """The split of a count pass: past the target so that the farther bracket end moves close.

  Placed by the rescaled sample or by linear interpolation, whichever has
  the smaller estimated error; in a tail beyond the sample (``tail``) the
  sample, which puts it on the last sample key before the tail. After a
  stalled step, the key midpoint.
  """
  count = c_lo - c_hi
  d_lo = c_lo - kf + 1.0  # scores at or above lo that the target lies below
  d_hi = kf - c_hi
  near = jnp.minimum(d_lo, d_hi)
  infinite = (br.lo == KEY_NAN) | (br.hi == KEY_TOP)
  sample_err = jnp.sqrt(near * model.weight) + model.weight
  linear_err = jnp.sqrt(near * (count - near) / jnp.maximum(count, 1.0)) + 1.0
  linear_err = linear_err + CURVATURE * near
  i_lo, i_hi = _sample.sample_range(model, br)
  atom = model.atoms[i_hi] > model.atoms[i_lo]
  use_sample = infinite | atom | tail | (sample_err < linear_err)
  err = jnp.where(use_sample, sample_err, linear_err)
  target = jnp.where(d_lo >= d_hi, kf + MARGIN * err, kf - MARGIN * err)
  target = jnp.clip(target, c_hi, c_lo)[None]
  smp, mass = _sample.sample_inverse(model, br, c_lo, c_hi, target)
  lin = _linear_inverse(br, c_lo, c_hi, target)
  pivot = jnp.where(use_sample & (mass > 0), smp, lin)[0]
  pivot = jnp.where(br.stall, _keys.key_midpoint(br.lo, br.hi), pivot)
  return _live_pivot(pivot, br)


def _live_pivot(pivot: jax.Array, br: Bracket) -> jax.Array:
  """Clips a pivot into ``[lo + 1, hi - 1]``, off the key ranges no float maps to."""
  pivot = jnp.clip(pivot, br.lo + 1, br.hi - 1)
  pivot = jnp.where(pivot < -KEY_INF,
                    jnp.where(br.hi <= -KEY_INF, br.lo + 1, -KEY_INF), pivot)
  return jnp.minimum(pivot, KEY_INF)


def _many_pivots(br: Bracket, kf, c_lo, c_hi, slots, span) -> jax.Array:
  """The ``slots`` ascending splits of a digit pass, spread over where the target likely lies."""
  j = jnp.arange(SLOTS, dtype=jnp.int32)
  count = jnp.maximum(c_lo - c_hi, 1.0)
  # Where the target lies as a fraction of the bracket from the top, if the
  # bracket scores were uniform in value, and its standard error; the splits
  # cover +-SPREAD errors around it.
  rank = (kf - c_hi - 0.5) / count
  spread = jnp.sqrt(rank * (1.0 - rank) / (count + 2.0)) + 0.5 / count
  edge = 0.5 / (count + 1.0)
  top = jnp.clip(rank - SPREAD * spread, edge, 1.0 - edge)
  bottom = jnp.clip(rank + SPREAD * spread, edge, 1.0 - edge)
  step = (bottom - top) / jnp.maximum(slots - 1, 1).astype(jnp.float32)
  frac = bottom - step * j  # j = 0 is the lowest key
  pivots = _linear_inverse(br, c_lo, c_hi, c_hi + frac * count)
  spanf = span.astype(jnp.float32)
  offsets = ((j + 1) * spanf / (slots + 1)).astype(jnp.uint32)  # span may pass 2**31
  even = br.lo + lax.bitcast_convert_type(offsets, jnp.int32)
  finite = jnp.isfinite(_keys.key_value(br.lo)) & jnp.isfinite(_keys.key_value(br.hi))
  pivots = jnp.where(br.stall | ~finite, even, pivots)
  pivots = _spread_keys(pivots, slots, br.lo + 1, br.hi - 1)
  every = spanf - 1.0 <= slots.astype(jnp.float32)  # one split per remaining key
  return jnp.where(every, jnp.minimum(br.lo + 1 + j, br.hi - 1), pivots)


def _spread_keys(keys, slots, low, high):
  """Makes ``keys[:slots]`` strictly increasing inside ``[low, high]``.

  Needs ``high - low + 1 >= slots``; ``u_j = key_j - j`` must then be
  non-decreasing and lie in ``[low, high - slots + 1]``.
  """
  j = jnp.arange(SLOTS, dtype=jnp.int32)
  keys = jnp.sort(jnp.where(j < slots, keys, jnp.iinfo(jnp.int32).max - SLOTS))
  u = lax.cummax(jnp.maximum(keys, low + j) - j)
  return jnp.minimum(u, high - slots + 1) + j
