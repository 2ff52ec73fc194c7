"""Order-preserving int32 keys of float scores.

A score's key is its float32 sign-magnitude bit pattern read as a signed
int32: ``key(a) < key(b)`` iff ``a < b`` for non-NaN floats, ``-0.0`` and
``+0.0`` both have key 0 (one value, a tie), and every NaN has key
``KEY_NAN``, below ``key(-inf) == -KEY_INF``. Keys strictly between
``KEY_NAN`` and ``-KEY_INF``, or above ``KEY_INF``, belong to no score.
Ranking by keys needs no float comparison, so it is the same with or without
denormals-are-zero modes and on every backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

KEY_NAN = -(2**31)  # the key of every NaN: lowest of all
KEY_INF = 0x7F800000  # the key of +inf; -inf is -KEY_INF
KEY_TOP = KEY_INF + 1  # one above every key

SCORE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_scores(x: Any, where: str) -> jax.Array:
  """``x`` as an array of a score dtype; ``where`` names it in errors (``"['b']"``)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.float64:
    raise TypeError(
        f"scores{where} has dtype float64; selection works on float32 keys, "
        "cast the scores to float32 first.")
  if not any(x.dtype == d for d in SCORE_DTYPES):
    raise TypeError(
        f"scores{where} must be float32, bfloat16 or float16, got {x.dtype}.")
  return x


def keys(x: jax.Array) -> jax.Array:
  """int32 keys of scores of any shape (bfloat16/float16 upcast exactly)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  mag = bits & 0x7FFFFFFF
  key = jnp.where(bits < 0, -mag, mag)
  return jnp.where(mag > KEY_INF, KEY_NAN, key)


def key_value(key: jax.Array) -> jax.Array:
  """float32 value of a key: ``KEY_NAN`` gives -inf, ``KEY_TOP`` +inf, 0 gives +0.0."""
  bits = jnp.where(key >= 0, key, (-key) | KEY_NAN)
  value = lax.bitcast_convert_type(bits, jnp.float32)
  value = jnp.where(key <= KEY_NAN, -jnp.inf, value)
  return jnp.where(key >= KEY_TOP, jnp.inf, value)


def key_midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """``lo + (hi - lo) // 2`` for keys ``lo <= hi``, without int32 overflow."""
  span = lax.bitcast_convert_type(hi - lo, jnp.uint32)
  return lo + lax.bitcast_convert_type(span >> 1, jnp.int32)


def at_least(x: jax.Array, pivot: jax.Array) -> jax.Array:
  """``keys(x) >= pivot`` from the raw bits, for a key ``pivot > KEY_NAN``.

  Non-negative floats have their key as bits; a negative float with
  magnitude bits ``m`` has key ``-m`` and bits ``KEY_NAN + m``. Cheaper than
  forming the keys, in the most frequent pass.
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  positive = (bits >= jnp.maximum(pivot, 0)) & (bits <= KEY_INF)
  below = KEY_NAN + jnp.minimum(-jnp.minimum(pivot, 0), KEY_INF)
  negative = (bits <= below) & (pivot <= 0)
  return positive | negative
