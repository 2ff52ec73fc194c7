"""Helpers of `keep_count`: argument checks and the exact products."""

from __future__ import annotations

import fractions
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_n(n: Any) -> int:
  """``n`` as a non-negative Python int."""
  if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
    raise TypeError(f"n must be an int, got {type(n).__name__}: {n!r}.")
  n = int(n)
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}.")
  return n


def check_sparsity(sparsity: Any) -> None:
  """Raises unless ``sparsity`` is a concrete real scalar in ``[0, 1)``."""
  if isinstance(sparsity, np.ndarray) and sparsity.ndim == 0:
    sparsity = sparsity[()]
  if not isinstance(sparsity, (numbers.Real, np.floating, np.integer)):
    raise TypeError(
        "sparsity must be a real scalar or a JAX array, got "
        f"{type(sparsity).__name__}: {sparsity!r}.")
  if not 0.0 <= float(sparsity) < 1.0:  # also rejects NaN
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")


def shortest_decimal(sparsity: Any) -> fractions.Fraction:
  """The shortest decimal that rounds to ``sparsity`` in its own precision, as a fraction.

  So 0.7 of 200 prunes 140, where its float64 value, 0.69999…, would prune 139.
  """
  if isinstance(sparsity, np.ndarray):
    sparsity = sparsity[()]
  if isinstance(sparsity, np.floating):
    return fractions.Fraction(np.format_float_positional(sparsity, unique=True, trim="0"))
  return fractions.Fraction(repr(float(sparsity)))


def keep_count_array(n: int, sparsity: jax.Array, round_up: bool = False) -> jax.Array:
  """Exact int32 ``n - floor(p * n)`` for float32 ``p`` and ``n < 2**31``, clipped to ``[0, n]``;
  ``n - ceil(p * n)`` with ``round_up``.

  The product of the 24-bit mantissa and ``n`` is formed in 12-bit limbs,
  every partial product fitting in int32.
  """
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
  if round_up:  # one more is pruned when any bit below the binary point is set
    shifted_out = jnp.where(q >= 31, high, high & ((1 << jnp.clip(q, 0, 30)) - 1))
    dropped = dropped + ((shifted_out | (c1 & 0xFFF) | (c0 & 0xFFF)) != 0)
  keep = n - dropped
  keep = jnp.where(p >= 1.0, 0, keep)
  keep = jnp.where((p <= 0.0) | jnp.isnan(p), n, keep)
  return keep.astype(jnp.int32)
