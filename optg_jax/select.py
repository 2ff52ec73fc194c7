"""Exact top-k selection for sparsity masks: keep counts, k-th values, masks.

Everything here is exact, deterministic and jit/vmap friendly, and a global
selection over a whole pytree never concatenates its leaves.

Ordering. Scores are ranked by their float32 value through an order-preserving
int32 *key* (see `_keys`): ``-0.0`` and ``+0.0`` are one value (a tie), and NaN
ranks below ``-inf``, so NaN scores are pruned first. Ties at the threshold are
broken by position: the lower flat (row-major) index is kept, and across the
leaves of a tree the earlier leaf (``jax.tree_util.tree_leaves`` order) is
kept first. The ranking uses the keys, never float comparisons, so it is the
same with or without denormals-are-zero hardware modes and on every backend.

Algorithm (selection of the k-th largest key ``T``). A strided sample of about
64k scores is sorted (an int32 sort, a few ms) and gives a first guess. Then a
bracket ``lo <= T < hi`` is kept with the exact counts ``#{key >= lo} >= k >
#{key >= hi}``, per leaf. Each step is one streaming pass over all scores: an
elementwise kernel writes one uint8 per score and a plain sum reduces it (f32
sums of uint8 are exact below 2**24 per chunk). While the bracket holds many
scores the pass counts the scores above one pivot, placed from the sample or
by interpolation between the exact bracket counts; once it holds at most 254
scores, one pass counts up to 8 sub-buckets at once by giving each bucket a
uint8 weight ``W**j`` (``W`` greater than the bracket count) and decoding the
digits of the sum. A bisection step is forced whenever a step fails to halve
the bracket, so the worst case is about 70 passes and a typical one 6 to 10.
Finally one more pass writes the masks; only if the threshold value is tied
and its ties straddle the cut inside one leaf does a cumulative sum over that
leaf place the cut (``lax.cond``). Pools of at most 65,536 scores skip all
this: one stable sort of their keys ranks them, faster to compile and to run.
"""

from __future__ import annotations

import fractions
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_KEY_NAN = -(2**31)  # the key of every NaN: lowest of all
_KEY_INF = 0x7F800000  # the key of +inf; -inf is -_KEY_INF
_KEY_TOP = _KEY_INF + 1  # one above every key
_CHUNK = 1 << 24  # f32 sums of 0/1 are exact up to this many terms
_SLOTS = 4  # most split keys counted by one pass
_MAX_DIGIT_BRACKET = 254  # bracket counts for which the digit trick is exact
_SAMPLE = 1 << 16  # target sample size for the first guesses
_MARGIN = 1.5  # pivot overshoot, in estimated standard errors
_CURVATURE = 0.02  # relative error allowance of linear interpolation
_SPREAD = 1.0  # digit pass covers the target rank +- this many standard errors

_SMALL_TOTAL = 1 << 16  # pools up to this size are ranked by one sort instead

_SCORE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------
# Keep counts.
# ----------------------------------------------------------------------------


def keep_count(n: int, sparsity: Any) -> int | jax.Array:
  """Number of weights kept out of ``n`` at ``sparsity``: ``n - floor(sparsity * n)``.

  Args:
    n: total number of weights, a non-negative Python int (at most
      ``2**31 - 1`` when ``sparsity`` is an array).
    sparsity: fraction pruned. A Python or NumPy scalar in ``[0, 1)`` gives an
      exact Python int, reading the float as the shortest decimal that
      represents it (0.7 is 7/10, so 0.7 of 200 prunes 140) and taking the
      product in rationals. A JAX array (for
      instance a schedule value inside ``jit``) is read as float32 and gives
      an int32 scalar array, exactly ``n - floor(p * n)`` for that float32
      ``p``; traced values cannot raise, so the result is clipped to
      ``[0, n]`` instead (``p <= 0`` keeps ``n``, ``p >= 1`` keeps 0, NaN keeps
      ``n``).

  Returns:
    The keep count ``k``.

  Raises:
    ValueError: ``n < 0``, or a concrete ``sparsity`` outside ``[0, 1)`` or NaN.
    TypeError: ``n`` is not an integer or ``sparsity`` is not a real scalar.
  """
  n = _check_n(n)
  if isinstance(sparsity, jax.Array):
    if n > 2**31 - 1:
      raise ValueError(f"n must be < 2**31 for an array sparsity, got {n}.")
    return _keep_count_array(n, sparsity)
  _concrete_sparsity(sparsity)
  return n - math.floor(_shortest_decimal(sparsity) * n)


def _check_n(n: Any) -> int:
  if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
    raise TypeError(f"n must be an int, got {type(n).__name__}: {n!r}.")
  n = int(n)
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}.")
  return n


def _shortest_decimal(sparsity: Any) -> fractions.Fraction:
  """The shortest decimal that rounds to ``sparsity`` in its own precision, as a fraction, so
  that 0.7 of 200 prunes 140 (its float64 value, 0.69999…, would prune 139)."""
  if isinstance(sparsity, np.ndarray):
    sparsity = sparsity[()]
  if isinstance(sparsity, np.floating):
    return fractions.Fraction(np.format_float_positional(sparsity, unique=True, trim="0"))
  return fractions.Fraction(repr(float(sparsity)))


def _concrete_sparsity(sparsity: Any) -> float:
  if isinstance(sparsity, np.ndarray) and sparsity.ndim == 0:
    sparsity = sparsity[()]
  if not isinstance(sparsity, (numbers.Real, np.floating, np.integer)):
    raise TypeError(
        "sparsity must be a real scalar or a JAX array, got "
        f"{type(sparsity).__name__}: {sparsity!r}.")
  p = float(sparsity)
  if not 0.0 <= p < 1.0:  # also rejects NaN
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
  return p


def _keep_count_array(n: int, sparsity: jax.Array) -> jax.Array:
  """Exact ``n - floor(p * n)`` for float32 ``p``, by 12-bit limb products."""
  p = jnp.asarray(sparsity).astype(jnp.float32)
  bits = lax.bitcast_convert_type(p, jnp.int32)
  biased = (bits >> 23) & 0xFF
  frac = bits & 0x7FFFFF
  # p = mant * 2**-shift with a 24-bit integer mantissa; shift >= 24 for p < 1.
  mant = jnp.where(biased == 0, frac, frac | 0x800000)
  shift = jnp.where(biased == 0, 149, 150 - biased)
  a0, a1 = mant & 0xFFF, mant >> 12
  b0, b1, b2 = n & 0xFFF, (n >> 12) & 0xFFF, n >> 24
  # Columns of the base-2**12 product mant * n; each fits in int32.
  c0 = a0 * b0
  c1 = a1 * b0 + a0 * b1 + (c0 >> 12)
  c2 = a1 * b1 + a0 * b2 + (c1 >> 12)
  c3 = a1 * b2 + (c2 >> 12)
  # floor(mant * n / 2**24): the two lowest digits only feed the fraction.
  high = c3 * 4096 + (c2 & 0xFFF)  # < 2**31 because mant * n < 2**55
  q = shift - 24
  dropped = jnp.where(q >= 31, 0, high >> jnp.clip(q, 0, 30))
  keep = n - dropped
  keep = jnp.where(p >= 1.0, 0, keep)
  keep = jnp.where((p <= 0.0) | jnp.isnan(p), n, keep)
  return keep.astype(jnp.int32)


# ----------------------------------------------------------------------------
# Keys.
# ----------------------------------------------------------------------------


def _check_scores(x: Any, where: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype == jnp.float64:
    raise TypeError(
        f"scores{where} has dtype float64; selection works on float32 keys, "
        "cast the scores to float32 first.")
  if not any(x.dtype == d for d in _SCORE_DTYPES):
    raise TypeError(
        f"scores{where} must be float32, bfloat16 or float16, got {x.dtype}.")
  return x


def _keys(x: jax.Array) -> jax.Array:
  """Order-preserving int32 keys of float scores (any shape).

  ``key(a) < key(b)`` iff ``a < b`` for non-NaN floats, ``key(-0.) ==
  key(0.) == 0``, and every NaN maps to ``_KEY_NAN``, below ``key(-inf)``.
  bfloat16/float16 are upcast to float32 first (exact).
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  mag = bits & 0x7FFFFFFF
  key = jnp.where(bits < 0, -mag, mag)
  return jnp.where(mag > _KEY_INF, _KEY_NAN, key)


def _key_value(key: jax.Array) -> jax.Array:
  """float32 value of a key (``_KEY_NAN`` gives -inf, ``_KEY_TOP`` +inf)."""
  bits = jnp.where(key >= 0, key, (-key) | _KEY_NAN)
  value = lax.bitcast_convert_type(bits, jnp.float32)
  value = jnp.where(key <= _KEY_NAN, -jnp.inf, value)
  return jnp.where(key >= _KEY_TOP, jnp.inf, value)


def _key_midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """``lo + (hi - lo) // 2`` without int32 overflow (wrapping arithmetic)."""
  span = lax.bitcast_convert_type(hi - lo, jnp.uint32)
  return lo + lax.bitcast_convert_type(span >> 1, jnp.int32)


# ----------------------------------------------------------------------------
# Counting passes.
# ----------------------------------------------------------------------------


def _chunks(n: int) -> list[tuple[int, int]]:
  return [(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]


def _weight_sum(x: jax.Array, weight_fn) -> jax.Array:
  """Exact int32 sum over a flat leaf of uint8 ``weight_fn(keys)``."""
  total = jnp.int32(0)
  for a, b in _chunks(x.shape[0]):
    w = weight_fn(_keys(x[a:b])).astype(jnp.uint8)
    total = total + jnp.sum(w.astype(jnp.float32)).astype(jnp.int32)
  return total


def _count_pass(leaves: Sequence[jax.Array], pivot: jax.Array) -> jax.Array:
  """Per-leaf ``#{key >= pivot}``, shape ``(L,)``."""
  return jnp.stack([_weight_sum(x, lambda key: key >= pivot) for x in leaves])


def _digit_pass(
    leaves: Sequence[jax.Array],
    splits: jax.Array,
    incs: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
) -> jax.Array:
  """Per-leaf ``sum of W**(j-1)`` over bracket scores in sub-bucket ``j``.

  A score with ``lo <= key < hi`` and ``j`` splits at or below it weighs
  ``sum(incs[:j])``; scores outside the bracket weigh 0. Shape ``(L,)``.
  """

  def weight(key):
    w = jnp.zeros(key.shape, jnp.uint8)
    for j in range(_SLOTS):
      w = w + jnp.where(key >= splits[j], incs[j], jnp.uint8(0))
    return jnp.where((key >= lo) & (key < hi), w, jnp.uint8(0))

  return jnp.stack([_weight_sum(x, weight) for x in leaves])


# ----------------------------------------------------------------------------
# Sample.
# ----------------------------------------------------------------------------


def _sample_keys(leaves: Sequence[jax.Array], total: int) -> jax.Array:
  """Sorted keys of a strided sample of about ``_SAMPLE`` scores."""
  parts = []
  for x in leaves:
    n = x.shape[0]
    want = n if total <= _SAMPLE else round(n * _SAMPLE / total)
    if want < 1:
      continue
    stride = max(1, n // want)
    if stride > 1:
      stride |= 1  # an odd stride does not lock onto even channel counts
    parts.append(_keys(x[::stride]))
  return jnp.sort(jnp.concatenate(parts))


# ----------------------------------------------------------------------------
# Search for the k-th largest key.
# ----------------------------------------------------------------------------


class _Bracket(NamedTuple):
  lo: jax.Array  # int32 key, #{key >= lo} >= k
  hi: jax.Array  # int32 key, #{key >= hi} < k
  c_lo: jax.Array  # per-leaf #{key >= lo}, (L,)
  c_hi: jax.Array  # per-leaf #{key >= hi}, (L,)
  stall: jax.Array  # bool, last step failed to halve the bracket


def _digit_slots(count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Split count and digit base when no leaf holds more than ``count`` bracket scores."""
  base = count + 1
  powers = jnp.cumprod(jnp.full((_SLOTS,), base, jnp.float32)) / base
  slots = jnp.sum(powers <= 255.0).astype(jnp.int32)
  return jnp.maximum(slots, 1), base


class _Model(NamedTuple):
  """Estimates of where the k-th key lies, from the sample and the bracket."""

  sample: jax.Array  # sorted sample keys
  atoms: jax.Array  # prefix count of sample positions inside a run of 3 equal keys
  weight: float  # scores per sample point
  total: int


def _make_model(sample: jax.Array, total: int) -> _Model:
  run = jnp.concatenate(
      [sample[2:] == sample[:-2], jnp.zeros((2,), bool)]) if sample.size > 2 else (
          jnp.zeros(sample.shape, bool))
  atoms = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(run.astype(jnp.int32))])
  return _Model(sample, atoms, total / sample.shape[0], total)


def _sample_inverse(model: _Model, br: _Bracket, c_lo, c_hi, targets):
  """Keys where the sample CDF, rescaled to the exact bracket counts, hits ``targets``."""
  s = model.sample
  size = s.shape[0]
  i_lo = jnp.searchsorted(s, br.lo, side="left")
  i_hi = jnp.searchsorted(s, br.hi, side="left")
  e_lo = (size - i_lo).astype(jnp.float32)
  e_hi = (size - i_hi).astype(jnp.float32)
  span = jnp.maximum(c_lo - c_hi, 1.0)
  est = e_hi + (targets - c_hi) * (e_lo - e_hi) / span  # sample points above
  pos = jnp.clip(size - est, 0.0, size - 1.0)
  i0 = jnp.floor(pos).astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, size - 1)
  gap = lax.bitcast_convert_type(s[i1] - s[i0], jnp.uint32).astype(jnp.float32)
  step = ((pos - i0) * gap).astype(jnp.uint32)  # keys are too wide for float32
  return s[i0] + lax.bitcast_convert_type(step, jnp.int32), e_lo - e_hi


def _linear_inverse(br: _Bracket, c_lo, c_hi, targets):
  """Keys where a CDF linear in value between the bracket ends hits ``targets``."""
  v_lo = _key_value(br.lo)
  v_hi = _key_value(br.hi)
  frac = (targets - c_hi) / jnp.maximum(c_lo - c_hi, 1.0)
  value = v_hi - frac * (v_hi - v_lo)
  ok = jnp.isfinite(value)
  key = _keys(jnp.where(ok, value, 0.0))
  return jnp.where(ok, key, _key_midpoint(br.lo, br.hi))


_COUNT, _DIGITS, _TOP, _BOTTOM = range(4)  # kinds of pass


class _Plan(NamedTuple):
  """What the next pass measures."""

  kind: jax.Array  # one of _COUNT, _DIGITS, _TOP, _BOTTOM
  splits: jax.Array  # (_SLOTS,) ascending keys, unused ones _KEY_TOP
  incs: jax.Array  # (_SLOTS,) uint8 weight increments of the digit pass
  slots: jax.Array  # used splits of the digit pass
  base: jax.Array  # digit base of the digit pass
  shift: jax.Array  # extent passes bucket keys by 2**shift


def _plan(model: _Model, br: _Bracket, k: jax.Array) -> _Plan:
  """Chooses the next pass from the bracket, the sample and the target rank."""
  c_lo = jnp.sum(br.c_lo).astype(jnp.float32)
  c_hi = jnp.sum(br.c_hi).astype(jnp.float32)
  kf = k.astype(jnp.float32)
  count = c_lo - c_hi
  span = lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32)
  j = jnp.arange(_SLOTS, dtype=jnp.int32)

  widest = jnp.max(br.c_lo - br.c_hi)  # digits must stay below the base per leaf
  slots, base = _digit_slots(widest)
  digits = widest <= _MAX_DIGIT_BRACKET
  lone = (count == 1.0) & (span.astype(jnp.float32) - 1.0 > slots)
  # Targets beyond the sample's extremes: first pin the data's max (or min).
  beyond = 2.0 * model.weight
  top = (br.hi == _KEY_TOP) & (kf - c_hi < beyond) & ~br.stall
  low_end = c_lo - kf < beyond
  nan_end = (br.lo == _KEY_NAN) & low_end  # count the non-NaN scores first
  bottom = (br.lo == -_KEY_INF) & low_end & ~br.stall
  kind = jnp.where(
      lone, _TOP,
      jnp.where(digits, _DIGITS,
                jnp.where(top, _TOP, jnp.where(bottom, _BOTTOM, _COUNT))))

  one = _one_pivot(model, br, kf, c_lo, c_hi)
  one = jnp.where(nan_end, _live_pivot(jnp.int32(-_KEY_INF), br), one)
  many = _many_pivots(br, kf, c_lo, c_hi, slots, span)
  used = j < slots
  splits = jnp.where(digits, jnp.where(used, many, _KEY_TOP),
                     jnp.where(j == 0, one, _KEY_TOP))
  power = _powers(base, slots)
  inc = power - jnp.concatenate([jnp.zeros((1,), jnp.int32), power[:-1]])
  incs = jnp.where(digits, jnp.where(used, inc, 0), jnp.where(j == 0, 1, 0))
  # Smallest shift with (span - 1) >> shift <= 254.
  shift = jnp.sum(((span - 1)[None] >> jnp.arange(32, dtype=jnp.uint32)) > 254)
  return _Plan(kind.astype(jnp.int32), splits.astype(jnp.int32),
               incs.astype(jnp.uint8), slots, base, shift.astype(jnp.uint32))


def _powers(base, slots):
  """``base**j`` for the used slots, 1 beyond (no int32 overflow)."""
  j = jnp.arange(_SLOTS, dtype=jnp.int32)
  factors = jnp.where((j > 0) & (j < slots), base, 1)
  return jnp.cumprod(factors)


def _one_pivot(model: _Model, br: _Bracket, kf, c_lo, c_hi) -> jax.Array:
  """A pivot overshooting the target so that the farther bracket end moves close."""
  count = c_lo - c_hi
  d_lo = c_lo - kf + 1.0  # scores at or above lo that the target lies below
  d_hi = kf - c_hi
  near = jnp.minimum(d_lo, d_hi)
  infinite = (br.lo == _KEY_NAN) | (br.hi == _KEY_TOP)
  sample_err = jnp.sqrt(near * model.weight) + model.weight
  linear_err = jnp.sqrt(near * (count - near) / jnp.maximum(count, 1.0)) + 1.0
  linear_err = linear_err + _CURVATURE * near
  i_lo = jnp.searchsorted(model.sample, br.lo, side="left")
  i_hi = jnp.searchsorted(model.sample, br.hi, side="left")
  atom = model.atoms[i_hi] > model.atoms[i_lo]
  use_sample = infinite | atom | (sample_err < linear_err)
  err = jnp.where(use_sample, sample_err, linear_err)
  target = jnp.where(d_lo >= d_hi, kf + _MARGIN * err, kf - _MARGIN * err)
  target = jnp.clip(target, c_hi, c_lo)[None]
  smp, mass = _sample_inverse(model, br, c_lo, c_hi, target)
  lin = _linear_inverse(br, c_lo, c_hi, target)
  pivot = jnp.where(use_sample & (mass > 0), smp, lin)[0]
  pivot = jnp.where(br.stall, _key_midpoint(br.lo, br.hi), pivot)
  return _live_pivot(pivot, br)


def _live_pivot(pivot: jax.Array, br: _Bracket) -> jax.Array:
  """Clips a pivot into the bracket, off the key ranges no float maps to.

  Keys strictly between ``_KEY_NAN`` and ``-_KEY_INF`` or above ``_KEY_INF``
  hold no scores; a pivot there would measure nothing new.
  """
  pivot = jnp.clip(pivot, br.lo + 1, br.hi - 1)
  pivot = jnp.where(pivot < -_KEY_INF,
                    jnp.where(br.hi <= -_KEY_INF, br.lo + 1, -_KEY_INF), pivot)
  return jnp.minimum(pivot, _KEY_INF)


def _many_pivots(br: _Bracket, kf, c_lo, c_hi, slots, span) -> jax.Array:
  """``slots`` ascending pivots spread over where the target likely lies."""
  j = jnp.arange(_SLOTS, dtype=jnp.int32)
  count = jnp.maximum(c_lo - c_hi, 1.0)
  # Position of the target as a fraction of the bracket, from the top, if
  # the bracket scores were uniform in value, with its rough spread.
  rank = (kf - c_hi - 0.5) / count
  spread = jnp.sqrt(rank * (1.0 - rank) / (count + 2.0)) + 0.5 / count
  edge = 0.5 / (count + 1.0)
  top = jnp.clip(rank - _SPREAD * spread, edge, 1.0 - edge)
  bottom = jnp.clip(rank + _SPREAD * spread, edge, 1.0 - edge)
  step = (bottom - top) / jnp.maximum(slots - 1, 1).astype(jnp.float32)
  frac = bottom - step * j  # j = 0 is the lowest key
  pivots = _linear_inverse(br, c_lo, c_hi, c_hi + frac * count)
  spanf = span.astype(jnp.float32)
  even = br.lo + ((j + 1) * spanf / (slots + 1)).astype(jnp.int32)
  pivots = jnp.where(br.stall, even, pivots)
  pivots = _spread_keys(pivots, slots, br.lo + 1, br.hi - 1)
  every = spanf - 1.0 <= slots.astype(jnp.float32)  # one split per remaining key
  return jnp.where(every, jnp.minimum(br.lo + 1 + j, br.hi - 1), pivots)


def _spread_keys(keys, slots, low, high):
  """Makes ``keys[:slots]`` strictly increasing inside ``[low, high]``.

  Needs ``high - low + 1 >= slots``; ``u_j = key_j - j`` must then be
  non-decreasing and lie in ``[low, high - slots + 1]``.
  """
  j = jnp.arange(_SLOTS, dtype=jnp.int32)
  keys = jnp.sort(jnp.where(j < slots, keys, jnp.iinfo(jnp.int32).max - _SLOTS))
  u = lax.cummax(jnp.maximum(keys, low + j) - j)
  return jnp.minimum(u, high - slots + 1) + j


def _decode(sums, plan: _Plan, c_hi):
  """Per-leaf counts ``#{key >= split_j}`` from digit sums, ``(L, 8)``."""
  j = jnp.arange(_SLOTS)
  used = j < plan.slots
  power = _powers(plan.base, plan.slots)
  digit = (sums[:, None] // power[None, :]) % plan.base
  digit = jnp.where(used[None, :], digit, 0)
  above = lax.cumsum(digit, axis=1, reverse=True)
  return jnp.where(used[None, :], c_hi[:, None] + above, 0)


def _extent_pass(leaves, lo, hi, shift, from_top: bool) -> jax.Array:
  """Per-leaf max over bracket scores of ``1 + distance >> shift``, ``(L,)``.

  The distance is ``key - lo`` (``from_top``) or ``hi - 1 - key``, so the
  result is ``1 +`` the bucket of the leaf's largest (smallest) bracket
  score, or 0 for a leaf without any.
  """

  def weight(key):
    distance = key - lo if from_top else hi - 1 - key
    bucket = lax.bitcast_convert_type(distance, jnp.uint32) >> shift
    return jnp.where((key >= lo) & (key < hi), bucket + 1, 0)

  out = []
  for x in leaves:
    best = jnp.float32(0)
    for a, b in _chunks(x.shape[0]):
      w = weight(_keys(x[a:b])).astype(jnp.uint8)
      best = jnp.maximum(best, jnp.max(w.astype(jnp.float32)))
    out.append(best.astype(jnp.int32))
  return jnp.stack(out)


def _measure(leaves, br: _Bracket, plan: _Plan):
  """Runs the planned pass: ``(splits, per-leaf #{key >= split})``.

  Splits come back ascending, with unused ones at ``_KEY_TOP``.
  """
  num = len(leaves)
  span = lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32)
  unused_splits = jnp.full((_SLOTS,), _KEY_TOP, jnp.int32)
  unused_counts = jnp.zeros((num, _SLOTS), jnp.int32)

  def by_count(_):
    counts = _count_pass(leaves, plan.splits[0])
    return plan.splits, unused_counts.at[:, 0].set(counts)

  def by_digits(_):
    sums = _digit_pass(leaves, plan.splits, plan.incs, br.lo, br.hi)
    return plan.splits, _decode(sums, plan, br.c_hi)

  def by_top(_):
    # Nothing lies above the bucket of the largest bracket score, so hi can
    # come down to its end; a lone bracket score also pins lo.
    best = _extent_pass(leaves, br.lo, br.hi, plan.shift, from_top=True)
    bucket = lax.bitcast_convert_type(jnp.max(best), jnp.uint32)  # 1-based
    end = jnp.minimum(bucket << plan.shift, span)
    start = (bucket - 1) << plan.shift
    hi = br.lo + lax.bitcast_convert_type(end, jnp.int32)
    lo = br.lo + lax.bitcast_convert_type(start, jnp.int32)
    lone = jnp.sum(br.c_lo - br.c_hi) == 1
    splits = unused_splits.at[0].set(jnp.where(lone, lo, _KEY_TOP)).at[1].set(hi)
    counts = unused_counts.at[:, 0].set(br.c_hi + (best > 0)).at[:, 1].set(br.c_hi)
    return splits, counts

  def by_bottom(_):
    # Nothing in the bracket lies below the bucket of its smallest score.
    best = _extent_pass(leaves, br.lo, br.hi, plan.shift, from_top=False)
    bucket = lax.bitcast_convert_type(jnp.max(best), jnp.uint32)
    depth = jnp.minimum(bucket << plan.shift, span)
    lo = br.hi - lax.bitcast_convert_type(depth, jnp.int32)
    return unused_splits.at[0].set(lo), unused_counts.at[:, 0].set(br.c_lo)

  return lax.switch(plan.kind, (by_count, by_digits, by_top, by_bottom), None)


def _search(leaves, k, model: _Model, skip: jax.Array) -> _Bracket:
  """Bracket with ``hi == lo + 1``: ``lo`` is the key of the k-th largest score.

  With ``skip`` no pass runs and the bracket is ``[_KEY_NAN, _KEY_NAN + 1)``
  with made-up counts; callers use it when every or no score is kept.
  """
  num = len(leaves)
  start = _Bracket(
      lo=jnp.int32(_KEY_NAN),
      hi=jnp.where(skip, _KEY_NAN + 1, _KEY_TOP).astype(jnp.int32),
      c_lo=jnp.array([x.shape[0] for x in leaves], jnp.int32),
      c_hi=jnp.zeros((num,), jnp.int32),
      stall=jnp.bool_(False))

  def unfinished(br):
    return lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32) > 1

  def step(br):
    splits, per_leaf = _measure(leaves, br, _plan(model, br, k))
    totals = jnp.sum(per_leaf, axis=0)
    real = splits < _KEY_TOP
    up = real & (totals >= k)  # these splits may become lo
    down = real & (totals < k)  # these may become hi
    i_up = jnp.argmax(jnp.where(up, splits, _KEY_NAN))
    i_down = jnp.argmin(jnp.where(down, splits, _KEY_TOP))
    lo = jnp.where(up.any(), splits[i_up], br.lo)
    hi = jnp.where(down.any(), splits[i_down], br.hi)
    c_lo = jnp.where(up.any(), per_leaf[:, i_up], br.c_lo)
    c_hi = jnp.where(down.any(), per_leaf[:, i_down], br.c_hi)
    old = lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32)
    new = lax.bitcast_convert_type(hi - lo, jnp.uint32)
    # Progress is a quarter off the key range or off the bracket count;
    # otherwise the next step bisects the key range, which bounds the steps.
    fewer_keys = new <= old - old // 4
    fewer_scores = 4 * (jnp.sum(c_lo) - jnp.sum(c_hi)) <= 3 * (
        jnp.sum(br.c_lo) - jnp.sum(br.c_hi))
    stall = ~(fewer_keys | fewer_scores) & ~br.stall
    return _Bracket(lo, hi, c_lo, c_hi, stall)

  return lax.while_loop(unfinished, step, start)


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def _tie_cut(x: jax.Array, key: jax.Array, keep: jax.Array) -> jax.Array:
  """Flat index just after the ``keep``-th (1-based) score equal to ``key``."""
  eq = _keys(x) == key

  def first(_):
    return jnp.argmax(eq).astype(jnp.int32) + 1

  def later(_):
    seen = jnp.cumsum(eq.astype(jnp.int32))
    return jnp.argmax(seen >= keep).astype(jnp.int32) + 1

  return lax.cond(keep == 1, first, later, None)


def _masks_from_bracket(leaves, k, br: _Bracket) -> list[jax.Array]:
  """Per-leaf flat masks: ``key > T``, plus the first ties at ``T``."""
  sizes = jnp.array([x.shape[0] for x in leaves], jnp.int32)
  eq = br.c_lo - br.c_hi
  ties = k - jnp.sum(br.c_hi)  # how many scores equal to T are kept
  before = jnp.cumsum(eq) - eq
  keep = jnp.clip(ties - before, 0, eq)
  thresh = jnp.where(k > 0, br.lo, _KEY_TOP)
  masks = []
  for i, x in enumerate(leaves):
    partial = (keep[i] > 0) & (keep[i] < eq[i])
    cut = lax.cond(partial, lambda x=x, i=i: _tie_cut(x, thresh, keep[i]),
                   lambda i=i: jnp.where(keep[i] > 0, sizes[i], 0))
    key = _keys(x)
    index = lax.iota(jnp.int32, x.shape[0])
    masks.append((key > thresh) | ((key == thresh) & (index < cut)))
  return masks


def _clip_k(k: Any, total: int) -> jax.Array:
  if isinstance(k, (bool, np.bool_)):
    raise TypeError(f"k must be an integer, got {k!r}.")
  if isinstance(k, (int, np.integer)):
    return jnp.int32(min(max(int(k), 0), total))
  k = jnp.asarray(k)
  if not jnp.issubdtype(k.dtype, jnp.integer):
    raise TypeError(f"k must be an integer, got dtype {k.dtype}.")
  if k.ndim != 0:
    raise ValueError(f"k must be a scalar, got shape {k.shape}.")
  return jnp.clip(k, 0, total).astype(jnp.int32)


def _flat_leaves(scores: Any) -> tuple[list[jax.Array], Any, list[tuple[int, ...]]]:
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(scores)
  leaves, shapes = [], []
  for path, leaf in paths_leaves:
    where = jax.tree_util.keystr(path) if path else ""
    x = _check_scores(leaf, where)
    shapes.append(x.shape)
    leaves.append(x.reshape(-1))
  total = sum(x.shape[0] for x in leaves)
  if total > 2**31 - 1:
    raise ValueError(f"scores has {total} entries; at most 2**31 - 1 are supported.")
  return leaves, treedef, shapes


def _select(leaves: list[jax.Array], k: jax.Array, skip: jax.Array) -> _Bracket:
  total = sum(x.shape[0] for x in leaves)
  model = _make_model(_sample_keys(leaves, total), total)
  k = jnp.maximum(k, 1)
  br = _search(leaves, k, model, skip)
  return lax.cond(_holds(br, k), lambda: br, lambda: _bisect(leaves, k))


def _holds(br: _Bracket, k: jax.Array) -> jax.Array:
  """The bracket invariant: one key wide, ``#{key >= lo} >= k > #{key >= hi}``."""
  width = lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32)
  return (width == 1) & (jnp.sum(br.c_lo) >= k) & (jnp.sum(br.c_hi) < k)


def _bisect(leaves: list[jax.Array], k: jax.Array) -> _Bracket:
  """Plain bisection of the key range, 32 counting passes: the guaranteed fallback for any
  input on which the guided search ends without its invariant (a far outlier at the top)."""
  num = len(leaves)
  start = _Bracket(jnp.int32(_KEY_NAN), jnp.int32(_KEY_TOP),
                   jnp.array([x.shape[0] for x in leaves], jnp.int32),
                   jnp.zeros((num,), jnp.int32), jnp.bool_(False))

  def step(br):
    mid = _key_midpoint(br.lo, br.hi)
    counts = _count_pass(leaves, mid)
    up = jnp.sum(counts) >= k
    return _Bracket(jnp.where(up, mid, br.lo), jnp.where(up, br.hi, mid),
                    jnp.where(up, counts, br.c_lo), jnp.where(up, br.c_hi, counts), br.stall)

  return lax.while_loop(
      lambda br: lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32) > 1, step, start)


def global_topk_masks(scores: Any, k: Any) -> Any:
  """Masks keeping exactly the ``k`` largest scores over a whole pytree.

  Works leaf by leaf (the leaves are never concatenated) and jits and vmaps.

  Args:
    scores: a pytree of float32/bfloat16/float16 arrays, any shapes.
    k: number of scores kept in total, a Python int or an integer (traced)
      scalar; clipped to ``[0, total size]``.

  Returns:
    A pytree of bool arrays with the structure and shapes of ``scores`` and
    exactly ``k`` True entries in total. Ties at the threshold keep the
    earlier leaf, then the lower flat index; NaN ranks below ``-inf`` and
    ``-0.0`` equals ``+0.0``.
  """
  leaves, treedef, shapes = _flat_leaves(scores)
  masks = _global_topk_flat(leaves, k)
  return jax.tree_util.tree_unflatten(
      treedef, [m.reshape(shape) for m, shape in zip(masks, shapes)])


@jax.jit
def _global_topk_flat(leaves: list[jax.Array], k: Any) -> list[jax.Array]:
  """Flat bool masks of flat leaves (jitted, so calls outside ``jit`` compile once per shape)."""
  total = sum(x.shape[0] for x in leaves)
  k = _clip_k(k, total)
  if total == 0:
    return [jnp.zeros(x.shape, bool) for x in leaves]
  if total <= _SMALL_TOTAL:
    return _sorted_masks(leaves, k)
  live = [x for x in leaves if x.shape[0] > 0]
  # Keeping all scores needs no threshold: the bracket is then
  # [_KEY_NAN, _KEY_NAN + 1) with every score counted as a kept tie.
  br = _select(live, k, (k == 0) | (k >= total))
  flat = iter(_masks_from_bracket(live, k, br))
  return [next(flat) if x.shape[0] else jnp.zeros(x.shape, bool) for x in leaves]


def _sorted_masks(leaves: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Small pools: rank by one stable sort of the concatenated keys (cheap to run and compile)."""
  keys = jnp.concatenate([_keys(x) for x in leaves])
  order = jnp.argsort(~keys, stable=True)  # ~key reverses the order without overflow
  ranks = jnp.zeros(keys.shape, jnp.int32).at[order].set(jnp.arange(keys.size, dtype=jnp.int32))
  keep = ranks < k
  bounds = np.cumsum([0] + [x.shape[0] for x in leaves])
  return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def topk_mask(scores: jax.Array, k: Any) -> jax.Array:
  """Bool mask of ``scores``' shape keeping exactly its ``k`` largest entries.

  Args:
    scores: float32/bfloat16/float16 array of any shape.
    k: Python int or integer (traced) scalar, clipped to ``[0, scores.size]``.
      Under ``jax.vmap`` it may differ per row.

  Returns:
    A bool array, True at the ``k`` largest scores; ties at the threshold keep
    the lower flat (row-major) index, NaN ranks below ``-inf``.
  """
  return global_topk_masks(_check_scores(scores, ""), k)


def kth_largest(scores: Any, k: Any) -> jax.Array:
  """The ``k``-th largest score over a pytree (1-based), as float32.

  The masks of `global_topk_masks` keep every score above this value and
  some of the ties equal to it. ``k`` is clipped to ``[0, total size]``;
  ``k == 0`` gives ``+inf``, a NaN k-th score gives NaN, a zero gives
  ``+0.0``.
  """
  leaves, _, _ = _flat_leaves(scores)
  total = sum(x.shape[0] for x in leaves)
  k = _clip_k(k, total)
  live = [x for x in leaves if x.shape[0] > 0]
  if not live:
    return jnp.float32(jnp.inf)
  br = _select(live, k, k == 0)
  value = _key_value(br.lo)
  value = jnp.where(br.lo == _KEY_NAN, jnp.nan, value)
  return jnp.where(k > 0, value, jnp.inf).astype(jnp.float32)
