"""Streaming passes over all scores: each one elementwise kernel plus one reduction.

Every pass writes one uint8 weight per score and reduces the weights as
float32 per chunk, the form XLA:CPU runs at memory speed. Each chunk holds at
most ``CHUNK = 2**24`` scores and every partial sum stays at or below
``2**24``, so the float32 sums are exact; per-chunk results are combined in
int32. Leaves keep their own shapes (flattening a leaf sharded on another
axis than its first would gather it); results are per leaf, shape ``(L,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from optg_jax.select import _keys

CHUNK = 1 << 24  # scores per chunk: f32 sums of 0/1 weights are exact up to this
ALIGN = 256  # chunk lengths are multiples of this, but for a leaf's tail
SLOTS = 4  # most split keys one digit pass can count (fewer when the base is big)
MAX_DIGIT_BRACKET = 254  # most bracket scores per leaf for a digit pass (base <= 255)


def chunks(n: int) -> list[tuple[int, int]]:
  """``[start, end)`` ranges of at most ``CHUNK`` scores, all but a last short one aligned.

  Inside the search loop XLA:CPU reduces buffers whose length is not a
  multiple of 4 bytes ~2.5x slower, so a leaf's ragged tail is split off.
  """
  whole = n - n % ALIGN
  bounds = list(range(0, whole, CHUNK)) + [whole]
  ranges = [(a, min(a + CHUNK, whole)) for a in bounds[:-1]]
  return ranges + ([(whole, n)] if whole < n else [])


def reduce(x: jax.Array, weight_fn: Callable[[jax.Array, int], jax.Array],
           op=jnp.sum) -> jax.Array:
  """int32 ``op`` (``jnp.sum`` or ``jnp.max``) over a non-empty leaf of uint8 weights.

  ``weight_fn(chunk, start)`` gives the weights of a chunk of ``x`` whose first
  score has flat (row-major) index ``start`` (`flat_index` gives the others).
  A leaf of more than one axis is reduced in its own shape, split along its
  first axis only when it holds more than ``CHUNK`` scores (flattened if one
  slice does). Sums are exact while every chunk's weights sum to at most ``2**24``.
  """
  if x.ndim == 1:
    pieces = [(x[a:b], a) for a, b in chunks(x.shape[0])]
  elif x.size <= CHUNK:
    pieces = [(x, 0)]
  elif x.size // x.shape[0] > CHUNK:
    return reduce(x.reshape(-1), weight_fn, op)
  else:
    row = x.size // x.shape[0]
    step = CHUNK // row
    pieces = [(x[a:a + step], a * row) for a in range(0, x.shape[0], step)]
  parts = []
  for chunk, start in pieces:
    w = weight_fn(chunk, start).astype(jnp.uint8)
    parts.append(op(w.astype(jnp.float32)).astype(jnp.int32))
  return parts[0] if len(parts) == 1 else op(jnp.stack(parts))


def flat_index(shape: tuple[int, ...]) -> jax.Array:
  """int32 row-major flat index of every entry of an array of ``shape``, in that shape."""
  if len(shape) == 1:
    return lax.iota(jnp.int32, shape[0])
  index, stride = jnp.zeros(shape, jnp.int32), 1
  for axis in reversed(range(len(shape))):
    index = index + stride * lax.broadcasted_iota(jnp.int32, shape, axis)
    stride *= shape[axis]
  return index


def count_pass(leaves: Sequence[jax.Array], pivot: jax.Array) -> jax.Array:
  """Per-leaf ``#{key >= pivot}`` for a key ``pivot > KEY_NAN``, ``(L,)``."""
  return jnp.stack([reduce(x, lambda c, _: _keys.at_least(c, pivot)) for x in leaves])


# Digit passes. With a base W above every leaf's bracket count, a bracket
# score at or above j of the ascending splits weighs W**(j-1) in all
# (increments W**(j-1) - W**(j-2) per split); the per-leaf sum then holds the
# number of scores between consecutive splits as its base-W digits. Weights
# must fit in uint8, so W**(slots-1) <= 255: 4 splits for W <= 6, 3 for
# W <= 15, else 2 (W <= 255). Every sum is below W**slots <= 255 * W, far
# from 2**24.


def digit_slots(count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(slots, base)`` when no leaf holds more than ``count`` bracket scores."""
  base = count + 1
  powers = jnp.cumprod(jnp.full((SLOTS,), base, jnp.float32)) / base
  slots = jnp.sum(powers <= 255.0).astype(jnp.int32)
  return jnp.maximum(slots, 1), base


def powers(base: jax.Array, slots: jax.Array) -> jax.Array:
  """``base**j`` for the used slots ``j < slots``, 1 beyond (no int32 overflow), ``(SLOTS,)``."""
  j = jnp.arange(SLOTS, dtype=jnp.int32)
  return jnp.cumprod(jnp.where((j > 0) & (j < slots), base, 1))


def digit_pass(leaves: Sequence[jax.Array], splits: jax.Array, incs: jax.Array,
               lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Per-leaf sums of the digit weights of the bracket scores ``lo <= key < hi``, ``(L,)``.

  ``splits`` are ``SLOTS`` ascending keys inside the bracket and ``incs``
  their uint8 weight increments (0 for unused splits).
  """

  def weight(chunk, _):
    key = _keys.keys(chunk)
    w = jnp.zeros(key.shape, jnp.uint8)
    for j in range(SLOTS):
      w = w + jnp.where(key >= splits[j], incs[j], jnp.uint8(0))
    return jnp.where((key >= lo) & (key < hi), w, jnp.uint8(0))

  return jnp.stack([reduce(x, weight) for x in leaves])


def decode(sums: jax.Array, slots: jax.Array, base: jax.Array, c_hi: jax.Array) -> jax.Array:
  """Per-leaf ``#{key >= split_j}`` from digit sums and ``c_hi = #{key >= hi}``, ``(L, SLOTS)``.

  Unused slots (``j >= slots``) give 0.
  """
  used = jnp.arange(SLOTS) < slots
  digit = (sums[:, None] // powers(base, slots)[None, :]) % base
  above = lax.cumsum(jnp.where(used[None, :], digit, 0), axis=1, reverse=True)
  return jnp.where(used[None, :], c_hi[:, None] + above, 0)


# Extent passes: where the largest (or smallest) bracket score lies.


def extent_pass(leaves: Sequence[jax.Array], lo: jax.Array, hi: jax.Array, window: jax.Array,
                shift: jax.Array, from_top: jax.Array) -> jax.Array:
  """Per-leaf max of a uint8 weight locating the extreme bracket score, ``(L,)``.

  The pass buckets the ``window`` (uint32) keys at the top (``from_top``, a
  traced bool) or bottom of the bracket ``[lo, hi)`` by ``2**shift`` keys.
  A score weighs 0 outside the bracket, 1 in the bracket outside the window,
  and ``2 + bucket`` inside it, buckets counted from the window's far edge;
  ``(window - 1) >> shift <= 253`` keeps that within uint8.
  """
  edge = jnp.where(from_top, hi - window, lo + window)

  def weight(chunk, _):
    key = _keys.keys(chunk)
    distance = jnp.where(from_top, key - edge, edge - 1 - key)
    bucket = lax.bitcast_convert_type(distance, jnp.uint32) >> shift
    inside = jnp.where(from_top, key >= edge, key < edge)
    w = jnp.where(inside, bucket + 2, 1)
    return jnp.where((key >= lo) & (key < hi), w, 0)

  return jnp.stack([reduce(x, weight, jnp.max) for x in leaves])


def bucket_range(weight: jax.Array, shift: jax.Array,
                 window: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint32 offsets ``[start, end)`` in the window of the bucket of extent weight ``>= 2``.

  ``end`` is clipped to the window, computed without uint32 wrap-around.
  """
  start = lax.bitcast_convert_type(weight - 2, jnp.uint32) << shift
  end = start + jnp.minimum(jnp.uint32(1) << shift, window - start)
  return start, end
