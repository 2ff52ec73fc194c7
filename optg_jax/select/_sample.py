"""The sorted strided sample that guides the search, and what it says about ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optg_jax.select import _keys

if TYPE_CHECKING:
  from optg_jax.select._search import Bracket

SAMPLE = 1 << 16  # the largest sample
MIN_SAMPLE = 1 << 10  # the smallest sample
SCORES_PER_POINT = 128  # the sample aims at one point per this many scores


def sample_size(total: int) -> int:
  """The sample size for a pool of ``total`` scores: ``total / 128`` rounded down to a power of
  2, within ``[1024, 65536]``.

  Sorting the sample then costs about a quarter of one count pass over the pool (an int32 sort
  costs some 50 ns a key on a CPU, a pass some 0.3 ns a score), while a bigger sample saves
  at most a pass or two (measured in benchmarks/mask_refresh.py).
  """
  want = max(MIN_SAMPLE, total // SCORES_PER_POINT)
  return min(SAMPLE, 1 << (want.bit_length() - 1))


class Model(NamedTuple):
  """What the sample says about where keys lie."""

  sample: jax.Array  # sorted sample keys, (S,) int32
  atoms: jax.Array  # (S + 1,): atoms[i] = sample positions below i that start 3 equal keys
  weight: float  # scores per sample point, total / S


def sample_keys(leaves: Sequence[jax.Array], total: int) -> jax.Array:
  """Sorted keys of a strided sample of about ``sample_size(total)`` of the ``total`` scores.

  Every leaf contributes in proportion to its size (the planner reads every
  sample point as ``total / S`` scores): a strided grid in the leaf's own
  shape (`strides`) holding at least that share, thinned to it at evenly
  spread flat positions. Pools up to that size are taken whole.
  """
  size = sample_size(total)
  parts = []
  for x in leaves:
    want = x.size if total <= size else round(x.size * size / total)
    if want < 1:
      continue
    grid = x[tuple(slice(None, None, s) for s in strides(x.shape, x.size / want))]
    picks = np.arange(want, dtype=np.int64) * grid.size // want  # `want` of them, evenly spread
    parts.append(_keys.keys(grid).reshape(-1)[picks])
  return jnp.sort(jnp.concatenate(parts))


SHARDS = 8  # grid strides keep to whole shards of axes split this many ways (or fewer, powers of 2)


def strides(shape: tuple[int, ...], ratio: float) -> list[int]:
  """Per-axis strides of a grid holding at least one in ``ratio`` entries of ``shape``.

  A leaf sharded along one axis is sampled without moving scores between
  devices (only the grid, sample-sized, is gathered) when the stride divides
  that axis's shard: on an axis divisible by ``SHARDS`` the stride is a power
  of 2 dividing ``size / SHARDS``; other axes take any stride. Axes are taken
  largest first. Should that leave the grid more than twice too big, the
  largest axis takes the rest (the grid stays small, but a sharded leaf may
  then move some scores).
  """
  out = [1] * len(shape)
  left = float(ratio)
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if left < 2.0:
      break
    size = shape[axis]
    if size % SHARDS == 0:
      shard = size // SHARDS
      step = min(shard & -shard, 1 << int(math.log2(left)))  # & -: largest power of 2 dividing
    else:
      step = min(size, int(left))
    out[axis] = max(1, step)
    left /= out[axis]
  if left >= 2.0 and shape:
    out[max(range(len(shape)), key=lambda i: shape[i])] *= int(left)
  return out


def make_model(sample: jax.Array, total: int) -> Model:
  """The `Model` of a sorted sample of a pool of ``total`` scores."""
  starts = jnp.zeros(sample.shape, bool)
  if sample.shape[0] > 2:
    starts = starts.at[:-2].set(sample[2:] == sample[:-2])
  atoms = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(starts, dtype=jnp.int32)])
  return Model(sample, atoms, total / sample.shape[0])


def sample_range(model: Model, br: Bracket) -> tuple[jax.Array, jax.Array]:
  """Sample positions ``[i_lo, i_hi)`` of the sample keys inside the bracket."""
  both = jnp.searchsorted(model.sample, jnp.stack([br.lo, br.hi]), side="left",
                          method="compare_all")
  return both[0], both[1]


def sample_inverse(model: Model, br: Bracket, c_lo, c_hi, targets):
  """Keys where the sample CDF, rescaled to the exact bracket counts, reaches ``targets``.

  ``c_lo``, ``c_hi`` are the total (float32) counts at the bracket ends and
  ``targets`` float32 ranks between them. Returns ``(keys, sample points in
  the bracket)``.
  """
  s = model.sample
  size = s.shape[0]
  i_lo, i_hi = sample_range(model, br)
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
