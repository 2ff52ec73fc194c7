"""Masks from a finished search, and the one-sort masks of small pools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optg_jax.select import _keys
from optg_jax.select import _passes
from optg_jax.select._keys import KEY_TOP

if TYPE_CHECKING:
  from optg_jax.select._search import Bracket


def from_bracket(leaves: Sequence[jax.Array], k: jax.Array, br: Bracket) -> list[jax.Array]:
  """Bool masks, ``key > T`` plus the first ties at ``T = br.lo``, exactly ``k`` in all.

  Ties go to earlier leaves first, then to lower flat indices; ``k == 0``
  keeps nothing. Only a leaf whose ties straddle the cut runs `_tie_cut`.
  """
  sizes = jnp.array([x.size for x in leaves], jnp.int32)
  eq = br.c_lo - br.c_hi  # per-leaf ties at T
  ties = k - jnp.sum(br.c_hi)  # how many of them are kept
  before = jnp.cumsum(eq) - eq
  keep = jnp.clip(ties - before, 0, eq)
  thresh = jnp.where(k > 0, br.lo, KEY_TOP)
  masks = []
  for i, x in enumerate(leaves):
    partial = (keep[i] > 0) & (keep[i] < eq[i])
    cut = lax.cond(partial, lambda x=x, i=i: _tie_cut(x, thresh, keep[i], eq[i]),
                   lambda i=i: jnp.where(keep[i] > 0, sizes[i], 0))
    key = _keys.keys(x)
    index = _passes.flat_index(x.shape)
    masks.append((key > thresh) | ((key == thresh) & (index < cut)))
  return masks


def _tie_cut(x: jax.Array, key: jax.Array, keep: jax.Array, ties: jax.Array) -> jax.Array:
  """Flat index just after the ``keep``-th (1-based) of the ``ties`` scores of ``x`` with ``key``.

  A search over flat indices on exact prefix counts: interpolation (exact at
  once when every score is tied), with every other step a bisection.
  """
  n = x.size

  def before(j):  # ties at flat indices below j
    return _passes.reduce(
        x, lambda c, a: (_keys.keys(c) == key) & (a + _passes.flat_index(c.shape) < j))

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


def pooled_keys(leaves: Sequence[jax.Array]) -> jax.Array:
  """Keys of all leaves, flattened and concatenated (small pools only)."""
  return jnp.concatenate([_keys.keys(x).reshape(-1) for x in leaves])


def by_sort(leaves: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Masks of a small pool from one sort of its int32 keys, exactly ``k`` kept.

  Every key above the k-th largest one ``T`` is kept, then the ties at ``T`` in pool order
  (earlier leaves, then lower flat indices) up to ``k`` in all: the ranks of a stable
  descending sort. A single-operand int32 sort is the fast one on XLA's CPU backend (about 8x
  an argsort with its index payload, or a float sort with its total-order comparator).
  """
  keys = pooled_keys(leaves)
  n = keys.size
  kth = jnp.sort(keys)[jnp.clip(n - k, 0, n - 1)]
  above = keys > kth
  tied = keys == kth
  ties_kept = k - jnp.sum(above, dtype=jnp.int32)  # 0 when k == 0: kth is then the largest key
  keep = above | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= ties_kept))
  bounds = np.cumsum([0] + [x.size for x in leaves])
  return [keep[a:b].reshape(x.shape) for a, b, x in zip(bounds[:-1], bounds[1:], leaves)]
