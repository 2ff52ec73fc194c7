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
64k scores is sorted (an int32 sort, ~2 ms) and gives first guesses. A bracket
``lo <= T < hi`` is kept with exact per-leaf counts ``#{key >= lo} >= k >
#{key >= hi}``. Each step is one streaming pass over all scores: an
elementwise kernel writes one uint8 per score and a plain reduction of the
uint8s (f32 sums of them are exact below 2**24 per chunk) gives per-leaf
numbers. On XLA:CPU this pair runs at memory speed (~5 ms for 25.5M scores),
where a compare inside a reduction would run ~6x slower. The passes:

* count: the scores at or above one pivot, placed by the sample or by
  interpolation between the exact bracket counts, past the target by a
  margin so that the far bracket end moves close;
* digits: once no leaf holds more than 254 bracket scores, up to 4 pivots at
  once, bucket ``j`` weighing ``W**j`` with ``W`` above any leaf's bracket
  count, decoded from the digits of the per-leaf sums;
* extent: the uint8 max of a bucketed distance pins where the largest
  (smallest) bracket score lies, 8 bits of the key per pass: used for targets
  beyond the sample's extremes and for a bracket holding one score.

A step that fails to shrink the bracket by a quarter forces a bisection of
the key range next, so a search needs at most about 70 passes; on 25.5M
scores it typically needs 6 to 9 (2 when the threshold is a big tie, such as
all-zero scores). One more pass writes the masks; only if the ties at ``T``
straddle the cut inside one leaf does a cumulative sum over that leaf place
it (``lax.cond``). Under ``jax.vmap`` the rows are searched one at a time
(``lax.map``, via ``custom_vmap``), since batching would turn every
``lax.cond``/``lax.switch`` into selects that run all the branches. Pools of
at most 65,536 scores skip all this: one stable sort of their keys ranks them,
faster to compile and to run.
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
_ALIGN = 256  # chunk lengths are multiples of this, but for a leaf's tail
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
      product in rationals. A JAX array (for instance a schedule value inside
      ``jit``) is read as float32 and gives an int32 scalar array, exactly
      ``n - floor(p * n)`` for that float32 value ``p`` (no decimal reading:
      ``float32(0.7)`` is a little below 0.7); traced values cannot raise, so
      the result is clipped to ``[0, n]`` instead (``p <= 0`` keeps ``n``,
      ``p >= 1`` keeps 0, NaN keeps ``n``).

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
  """Ranges of at most ``_CHUNK`` scores; all but a last short one 256-aligned.

  Inside the search loop XLA:CPU reduces buffers whose length is not a
  multiple of 4 bytes ~2.5x slower, so a leaf's ragged tail is split off.
  """
  whole = n - n % _ALIGN
  bounds = list(range(0, whole, _CHUNK)) + [whole]
  ranges = [(a, min(a + _CHUNK, whole)) for a in bounds[:-1]]
  return ranges + ([(whole, n)] if whole < n else [])


def _reduce(x: jax.Array, weight_fn, op=jnp.sum) -> jax.Array:
  """Exact int32 ``op`` (sum or max) over a flat leaf of uint8 ``weight_fn(chunk)``.

  The uint8 is written by one elementwise kernel and converted to f32 inside
  the reduction, the form XLA:CPU reduces fastest; chunks of at most 2**24
  scores keep f32 sums of weights up to 255 over a bracket exact.
  """
  parts = []
  for a, b in _chunks(x.shape[0]):
    w = weight_fn(x[a:b]).astype(jnp.uint8)
    parts.append(op(w.astype(jnp.float32)).astype(jnp.int32))
  return parts[0] if len(parts) == 1 else op(jnp.stack(parts))


def _at_least(x: jax.Array, pivot: jax.Array) -> jax.Array:
  """``_keys(x) >= pivot`` from the raw bits, for ``pivot > _KEY_NAN``.

  Non-negative floats have their key as bits; a negative float with
  magnitude bits ``m`` has key ``-m``, and its bits are ``_KEY_NAN + m``.
  Cheaper than forming the keys, which matters in the most frequent pass.
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  positive = (bits >= jnp.maximum(pivot, 0)) & (bits <= _KEY_INF)
  below = _KEY_NAN + jnp.minimum(-jnp.minimum(pivot, 0), _KEY_INF)
  negative = (bits <= below) & (pivot <= 0)
  return positive | negative


def _count_pass(leaves: Sequence[jax.Array], pivot: jax.Array) -> jax.Array:
  """Per-leaf ``#{key >= pivot}`` for ``pivot > _KEY_NAN``, shape ``(L,)``."""
  return jnp.stack([_reduce(x, lambda c: _at_least(c, pivot)) for x in leaves])


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

  def weight(chunk):
    key = _keys(chunk)
    w = jnp.zeros(key.shape, jnp.uint8)
    for j in range(_SLOTS):
      w = w + jnp.where(key >= splits[j], incs[j], jnp.uint8(0))
    return jnp.where((key >= lo) & (key < hi), w, jnp.uint8(0))

  return jnp.stack([_reduce(x, weight) for x in leaves])


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
  """Search state: the k-th largest key ``T`` satisfies ``lo <= T < hi``."""

  lo: jax.Array  # int32 key, #{key >= lo} >= k
  hi: jax.Array  # int32 key, #{key >= hi} < k
  c_lo: jax.Array  # per-leaf #{key >= lo}, (L,)
  c_hi: jax.Array  # per-leaf #{key >= hi}, (L,)
  stall: jax.Array  # bool, last step failed to shrink the bracket enough
  top_w: jax.Array  # uint32; if > 0 the largest bracket key is >= hi - top_w
  bot_w: jax.Array  # uint32; if > 0 the smallest bracket key is < lo + bot_w
  open_lo: jax.Array  # bool, no non-NaN score lies below lo


def _start(leaves, done) -> _Bracket:
  """The whole key range (or, if ``done``, an empty search with made-up counts)."""
  num = len(leaves)
  return _Bracket(
      lo=jnp.int32(_KEY_NAN),
      hi=jnp.where(done, _KEY_NAN + 1, _KEY_TOP).astype(jnp.int32),
      c_lo=jnp.array([x.shape[0] for x in leaves], jnp.int32),
      c_hi=jnp.zeros((num,), jnp.int32),
      stall=jnp.bool_(False),
      top_w=jnp.uint32(0),
      bot_w=jnp.uint32(0),
      open_lo=jnp.bool_(False))


def _digit_slots(count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Split count and digit base when no leaf holds more than ``count`` bracket scores."""
  base = count + 1
  powers = jnp.cumprod(jnp.full((_SLOTS,), base, jnp.float32)) / base
  slots = jnp.sum(powers <= 255.0).astype(jnp.int32)
  return jnp.maximum(slots, 1), base


class _Model(NamedTuple):
  """What the sample says about where keys lie."""

  sample: jax.Array  # sorted sample keys
  atoms: jax.Array  # atoms[i]: sample positions below i that start 3 equal keys
  weight: float  # scores per sample point


def _make_model(sample: jax.Array, total: int) -> _Model:
  starts = jnp.zeros(sample.shape, bool)
  if sample.shape[0] > 2:
    starts = starts.at[:-2].set(sample[2:] == sample[:-2])
  atoms = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(starts, dtype=jnp.int32)])
  return _Model(sample, atoms, total / sample.shape[0])


def _sample_range(model: _Model, br: _Bracket) -> tuple[jax.Array, jax.Array]:
  """Sample positions ``[i_lo, i_hi)`` of the keys inside the bracket."""
  both = jnp.searchsorted(model.sample, jnp.stack([br.lo, br.hi]), side="left",
                          method="compare_all")
  return both[0], both[1]


def _sample_inverse(model: _Model, br: _Bracket, c_lo, c_hi, targets):
  """Keys where the sample CDF, rescaled to the exact bracket counts, hits ``targets``."""
  s = model.sample
  size = s.shape[0]
  i_lo, i_hi = _sample_range(model, br)
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
  window: jax.Array  # uint32 width of the window an extent pass buckets
  shift: jax.Array  # extent passes bucket the window by 2**shift keys


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
  # A target among the scores above (below) every sample point, with no
  # sampled tie there: pin the largest (smallest) score first, by extent
  # passes over shrinking windows, then the sample brackets the target.
  top_tail, bottom_tail = _tails(model, br, kf, c_lo, c_hi)
  # Digit passes spread their splits by value, so they need finite ends; an
  # open end is first closed by the sample if it has points in the bracket,
  # else by an extent pass.
  open_top = ~jnp.isfinite(_key_value(br.hi))
  open_bottom = ~jnp.isfinite(_key_value(br.lo))
  sampled = _sample_points(model, br) > 0
  top = (top_tail | (digits & open_top & ~sampled)) & (br.top_w != 1)
  bottom = (bottom_tail | (digits & br.open_lo & open_bottom & ~sampled)) & (br.bot_w != 1)
  nan_end = (br.lo == _KEY_NAN) & ((c_lo - kf < 2.0 * model.weight) | digits)
  digits = digits & ~open_top & ~open_bottom
  kind = jnp.where(
      lone | top, _TOP,
      jnp.where(bottom, _BOTTOM, jnp.where(digits, _DIGITS, _COUNT)))
  top_window = jnp.where((br.top_w > 0) & (br.top_w < span), br.top_w, span)
  bot_window = jnp.where((br.bot_w > 0) & (br.bot_w < span), br.bot_w, span)
  window = jnp.where(kind == _BOTTOM, bot_window, top_window)

  one = _one_pivot(model, br, kf, c_lo, c_hi, top_tail | bottom_tail)
  one = jnp.where(nan_end, _live_pivot(jnp.int32(-_KEY_INF), br), one)
  # A pinned extreme that is the target itself: split just off it.
  one = jnp.where(top_tail & (br.top_w == 1) & (kf - c_hi == 1.0), br.hi - 1, one)
  one = jnp.where(bottom_tail & (br.bot_w == 1) & (c_lo == kf), br.lo + 1, one)
  many = _many_pivots(br, kf, c_lo, c_hi, slots, span)
  used = j < slots
  splits = jnp.where(digits, jnp.where(used, many, _KEY_TOP),
                     jnp.where(j == 0, one, _KEY_TOP))
  power = _powers(base, slots)
  inc = power - jnp.concatenate([jnp.zeros((1,), jnp.int32), power[:-1]])
  incs = jnp.where(digits, jnp.where(used, inc, 0), jnp.where(j == 0, 1, 0))
  # Smallest shift with (window - 1) >> shift <= 253: buckets 2..255.
  shift = jnp.sum(((window - 1)[None] >> jnp.arange(32, dtype=jnp.uint32)) > 253)
  return _Plan(kind.astype(jnp.int32), splits.astype(jnp.int32),
               incs.astype(jnp.uint8), slots, base, window,
               shift.astype(jnp.uint32))


def _powers(base, slots):
  """``base**j`` for the used slots, 1 beyond (no int32 overflow)."""
  j = jnp.arange(_SLOTS, dtype=jnp.int32)
  factors = jnp.where((j > 0) & (j < slots), base, 1)
  return jnp.cumprod(factors)


def _sample_points(model: _Model, br: _Bracket) -> jax.Array:
  """Number of sample keys inside the bracket."""
  i_lo, i_hi = _sample_range(model, br)
  return i_hi - i_lo


def _tails(model: _Model, br: _Bracket, kf, c_lo, c_hi):
  """Whether the target lies in the open top (bottom) tail beyond the sample.

  Open top: nothing at or above ``hi``; open bottom: no non-NaN score below
  ``lo``. The target is in the tail if it is among the ``2 * weight``
  extreme scores there and no sampled tie (3 equal sample keys) sits at the
  sample's edge in the bracket.
  """
  s = model.sample
  size = s.shape[0]
  beyond = 2.0 * model.weight
  i_lo, i_hi = _sample_range(model, br)
  tied_top = (i_hi - i_lo >= 3) & (s[jnp.clip(i_hi - 3, 0, size - 1)]
                                   == s[jnp.clip(i_hi - 1, 0, size - 1)])
  tied_bottom = (i_hi - i_lo >= 3) & (s[jnp.clip(i_lo, 0, size - 1)]
                                      == s[jnp.clip(i_lo + 2, 0, size - 1)])
  top = (c_hi == 0.0) & (kf - c_hi < beyond) & ~tied_top
  bottom = br.open_lo & (c_lo - kf + 1.0 < beyond) & ~tied_bottom
  return top, bottom


def _one_pivot(model: _Model, br: _Bracket, kf, c_lo, c_hi, tail) -> jax.Array:
  """A pivot overshooting the target so that the farther bracket end moves close.

  In a tail beyond the sample (``tail``) the rescaled sample is used, which
  puts the pivot on the last sample key before the tail.
  """
  count = c_lo - c_hi
  d_lo = c_lo - kf + 1.0  # scores at or above lo that the target lies below
  d_hi = kf - c_hi
  near = jnp.minimum(d_lo, d_hi)
  infinite = (br.lo == _KEY_NAN) | (br.hi == _KEY_TOP)
  sample_err = jnp.sqrt(near * model.weight) + model.weight
  linear_err = jnp.sqrt(near * (count - near) / jnp.maximum(count, 1.0)) + 1.0
  linear_err = linear_err + _CURVATURE * near
  i_lo, i_hi = _sample_range(model, br)
  atom = model.atoms[i_hi] > model.atoms[i_lo]
  use_sample = infinite | atom | tail | (sample_err < linear_err)
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


def _beta_quantile(a, b, z):
  """Approximate quantile of Beta(a, b) at the normal deviate ``z``.

  Uses ``Ga / (Ga + Gb)`` with Wilson-Hilferty gamma quantiles (``Gb`` at
  ``-z``), which keeps the skew of ranks near the ends of a bracket.
  """

  def gamma(shape, z):
    return shape * jnp.maximum(1.0 - 1.0 / (9.0 * shape) + z / (3.0 * jnp.sqrt(shape)),
                               0.0) ** 3

  ga, gb = gamma(a, z), gamma(b, -z)
  return ga / jnp.maximum(ga + gb, 1e-30)


def _many_pivots(br: _Bracket, kf, c_lo, c_hi, slots, span) -> jax.Array:
  """``slots`` ascending pivots spread over where the target likely lies."""
  j = jnp.arange(_SLOTS, dtype=jnp.int32)
  count = jnp.maximum(c_lo - c_hi, 1.0)
  # If the bracket scores were uniform in value, the target (the r-th
  # largest of `count`) would sit at a Beta(r, count - r + 1) fraction of the
  # bracket from the top; the splits cover its central +-_SPREAD sigma range.
  r = kf - c_hi
  top = _beta_quantile(r, count - r + 1.0, -_SPREAD)
  bottom = _beta_quantile(r, count - r + 1.0, _SPREAD)
  step = (bottom - top) / jnp.maximum(slots - 1, 1).astype(jnp.float32)
  frac = bottom - step * j  # j = 0 is the lowest key
  pivots = _linear_inverse(br, c_lo, c_hi, c_hi + frac * count)
  spanf = span.astype(jnp.float32)
  offsets = ((j + 1) * spanf / (slots + 1)).astype(jnp.uint32)  # span may pass 2**31
  even = br.lo + lax.bitcast_convert_type(offsets, jnp.int32)
  finite = jnp.isfinite(_key_value(br.lo)) & jnp.isfinite(_key_value(br.hi))
  pivots = jnp.where(br.stall | ~finite, even, pivots)
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
  """Per-leaf counts ``#{key >= split_j}`` from digit sums, ``(L, _SLOTS)``."""
  j = jnp.arange(_SLOTS)
  used = j < plan.slots
  power = _powers(plan.base, plan.slots)
  digit = (sums[:, None] // power[None, :]) % plan.base
  digit = jnp.where(used[None, :], digit, 0)
  above = lax.cumsum(digit, axis=1, reverse=True)
  return jnp.where(used[None, :], c_hi[:, None] + above, 0)


def _extent_pass(leaves, lo, hi, window, shift, from_top) -> jax.Array:
  """Where the largest (or smallest) bracket score lies, per leaf, ``(L,)``.

  The pass buckets the ``window`` keys at the top (``from_top``, a traced
  bool) or bottom of the bracket ``[lo, hi)`` by ``2**shift`` and returns the
  max over the leaf of a uint8 weight: 0 outside the bracket, 1 in the
  bracket outside the window, and ``2 + bucket`` inside it, the bucket
  counted from the window's far edge.
  """
  edge = jnp.where(from_top, hi - window, lo + window)

  def weight(chunk):
    key = _keys(chunk)
    distance = jnp.where(from_top, key - edge, edge - 1 - key)
    bucket = lax.bitcast_convert_type(distance, jnp.uint32) >> shift
    inside = jnp.where(from_top, key >= edge, key < edge)
    w = jnp.where(inside, bucket + 2, 1)
    return jnp.where((key >= lo) & (key < hi), w, 0)

  return jnp.stack([_reduce(x, weight, jnp.max) for x in leaves])


def _bucket_range(weight, shift, window):
  """Offsets ``[start, end)`` in the window of the bucket of extent ``weight >= 2``."""
  start = lax.bitcast_convert_type(weight - 2, jnp.uint32) << shift
  end = start + jnp.minimum(jnp.uint32(1) << shift, window - start)  # no wrap-around
  return start, end


def _measure(leaves, br: _Bracket, plan: _Plan):
  """Runs the planned pass.

  Returns ``(splits, counts, width)``: split keys (unused ones ``_KEY_TOP``),
  the per-leaf ``#{key >= split}`` of each, ``(L, _SLOTS)``, and for extent
  passes the new bound on where the extreme bracket score lies (else 0).
  """
  num = len(leaves)
  unused_splits = jnp.full((_SLOTS,), _KEY_TOP, jnp.int32)
  unused_counts = jnp.zeros((num, _SLOTS), jnp.int32)
  none = jnp.uint32(0)

  def by_count(_):
    counts = _count_pass(leaves, plan.splits[0])
    return plan.splits, unused_counts.at[:, 0].set(counts), none

  def by_digits(_):
    sums = _digit_pass(leaves, plan.splits, plan.incs, br.lo, br.hi)
    return plan.splits, _decode(sums, plan, br.c_hi), none

  def by_extent(_):
    # Nothing lies above (below) the bucket of the largest (smallest) bracket
    # score, so hi comes down (lo goes up) to the bucket's end; a lone
    # bracket score also pins lo.
    from_top = plan.kind == _TOP
    best = _extent_pass(leaves, br.lo, br.hi, plan.window, plan.shift, from_top)
    weight = jnp.max(best)
    inside = weight >= 2
    start, end = _bucket_range(weight, plan.shift, plan.window)
    width = jnp.where(inside, end - start, none)
    win = lax.bitcast_convert_type(plan.window, jnp.int32)
    start = lax.bitcast_convert_type(start, jnp.int32)
    end = lax.bitcast_convert_type(end, jnp.int32)
    # From the top: the bucket is [hi - win + start, hi - win + end).
    top_edge = br.hi - win
    hi = jnp.where(inside, top_edge + end, top_edge)
    lone = inside & (jnp.sum(br.c_lo - br.c_hi) == 1)
    top_lo = jnp.where(lone, top_edge + start, _KEY_TOP)
    # From the bottom: the bucket is [lo + win - end, lo + win - start).
    bottom_edge = br.lo + win
    lo = jnp.where(inside, bottom_edge - end, bottom_edge)
    splits = jnp.where(from_top, unused_splits.at[0].set(top_lo).at[1].set(hi),
                       unused_splits.at[0].set(lo))
    top_counts = unused_counts.at[:, 0].set(br.c_hi + (best >= 2)).at[:, 1].set(br.c_hi)
    counts = jnp.where(from_top, top_counts, unused_counts.at[:, 0].set(br.c_lo))
    return splits, counts, width

  branch = jnp.minimum(plan.kind, _TOP)  # both extents share one kernel
  return lax.switch(branch, (by_count, by_digits, by_extent), None)


def _search(leaves, k, model: _Model, done: jax.Array) -> _Bracket:
  """Bracket with ``hi == lo + 1``: ``lo`` is the key of the k-th largest score.

  With ``done`` no pass runs and the bracket is ``[_KEY_NAN, _KEY_NAN + 1)``
  with made-up counts; callers use it when every or no score is kept.
  """

  def unfinished(br):
    return lax.bitcast_convert_type(br.hi - br.lo, jnp.uint32) > 1

  def step(br):
    plan = _plan(model, br, k)
    splits, per_leaf, width = _measure(leaves, br, plan)
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
    extent = (plan.kind == _TOP) | (plan.kind == _BOTTOM)  # these shrink a window
    stall = ~(fewer_keys | fewer_scores | extent) & ~br.stall
    # The bound on the largest bracket score survives a rise of lo but not a
    # fall of hi (and symmetrically for the smallest one).
    top_w = jnp.where(plan.kind == _TOP, width, jnp.where(hi == br.hi, br.top_w, 0))
    bot_w = jnp.where(plan.kind == _BOTTOM, width, jnp.where(lo == br.lo, br.bot_w, 0))
    open_lo = (lo == -_KEY_INF) | (br.open_lo & ((lo == br.lo) | (plan.kind == _BOTTOM)))
    return _Bracket(lo, hi, c_lo, c_hi, stall, top_w.astype(jnp.uint32),
                    bot_w.astype(jnp.uint32), open_lo)

  return lax.while_loop(unfinished, step, _start(leaves, done))


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def _tie_cut(x: jax.Array, key: jax.Array, keep: jax.Array, ties: jax.Array) -> jax.Array:
  """Flat index just after the ``keep``-th (1-based) of the ``ties`` scores with ``key``.

  A search over flat indices on exact prefix counts: interpolation (exact at
  once when every score is tied), with every other step a bisection.
  """
  n = x.shape[0]

  def before(j):  # ties at flat indices below j
    total = jnp.int32(0)
    for a, b in _chunks(n):
      hit = (_keys(x[a:b]) == key) & (a + lax.iota(jnp.int32, b - a) < j)
      total = total + jnp.sum(hit.astype(jnp.uint8).astype(jnp.float32)).astype(jnp.int32)
    return total

  def step(state):
    lo, hi, c_lo, c_hi, bisect = state  # c_lo < keep <= c_hi
    frac = (keep - c_lo - 0.5) / (c_hi - c_lo).astype(jnp.float32)
    guess = lo + (frac * (hi - lo).astype(jnp.float32)).astype(jnp.int32)
    mid = jnp.clip(jnp.where(bisect, lo + (hi - lo) // 2, guess), lo + 1, hi - 1)
    c_mid = before(mid)
    up = c_mid >= keep
    new_lo, new_hi = jnp.where(up, lo, mid), jnp.where(up, mid, hi)
    halved = 2 * (new_hi - new_lo) <= hi - lo
    return (new_lo, new_hi, jnp.where(up, c_lo, c_mid), jnp.where(up, c_mid, c_hi),
            ~halved & ~bisect)

  start = (jnp.int32(0), jnp.int32(n), jnp.int32(0), ties, jnp.bool_(False))
  return lax.while_loop(lambda s: s[1] - s[0] > 1, step, start)[1]


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
    cut = lax.cond(partial, lambda x=x, i=i: _tie_cut(x, thresh, keep[i], eq[i]),
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


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def _select(leaves: list[jax.Array], k: jax.Array, done: jax.Array) -> _Bracket:
  """Bracket of the k-th largest key of non-empty flat leaves, ``k >= 1`` or ``done``."""
  total = sum(x.shape[0] for x in leaves)
  model = _make_model(_sample_keys(leaves, total), total)
  return _search(leaves, jnp.maximum(k, 1), model, done)


def _row_by_row(fn):
  """A ``custom_vmap`` rule that runs ``fn`` on one row at a time (``lax.map``).

  Plain batching would turn the search's ``lax.cond``/``lax.switch`` into
  selects that run every kind of pass at every step, for every row.
  """

  def rule(axis_size, in_batched, *args):
    def batched(x, b):
      return x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))

    args = jax.tree.map(batched, args, tuple(in_batched))
    out = lax.map(lambda row: fn(*row), args)
    return out, jax.tree.map(lambda _: True, out)

  return rule


@jax.custom_batching.custom_vmap
def _searched_masks(leaves: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Flat masks of non-empty flat leaves by the counting search."""
  total = sum(x.shape[0] for x in leaves)
  # Keeping all scores needs no threshold: the bracket is then
  # [_KEY_NAN, _KEY_NAN + 1) with every score counted as a kept tie.
  br = _select(leaves, k, (k == 0) | (k >= total))
  return _masks_from_bracket(leaves, k, br)


_searched_masks.def_vmap(_row_by_row(_searched_masks))


@jax.custom_batching.custom_vmap
def _searched_value(leaves: list[jax.Array], k: jax.Array) -> jax.Array:
  """The k-th largest score of non-empty flat leaves by the counting search."""
  br = _select(leaves, k, k == 0)
  value = jnp.where(br.lo == _KEY_NAN, jnp.nan, _key_value(br.lo))
  return jnp.where(k > 0, value, jnp.inf).astype(jnp.float32)


_searched_value.def_vmap(_row_by_row(_searched_value))


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
  # Selection has no gradient; stop_gradient keeps JVP tracers (jax.grad of a loss that
  # builds masks from its own weights) out of the custom_vmap, which has no JVP rule.
  live = [lax.stop_gradient(x) for x in leaves if x.shape[0] > 0]
  flat = iter(_searched_masks(live, k))
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
  return _kth_largest_flat(leaves, k)


@jax.jit
def _kth_largest_flat(leaves: list[jax.Array], k: Any) -> jax.Array:
  total = sum(x.shape[0] for x in leaves)
  k = _clip_k(k, total)
  if total == 0:
    return jnp.float32(jnp.inf)
  if total <= _SMALL_TOTAL:
    keys = jnp.sort(jnp.concatenate([_keys(x) for x in leaves]))
    key = keys[jnp.clip(total - k, 0, total - 1)]
    value = jnp.where(key == _KEY_NAN, jnp.nan, _key_value(key))
    return jnp.where(k > 0, value, jnp.inf).astype(jnp.float32)
  return _searched_value([lax.stop_gradient(x) for x in leaves if x.shape[0] > 0], k)
