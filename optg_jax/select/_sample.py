"""The sorted strided sample that guides the search, and what it says about ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optg_jax.select import _keys

if TYPE_CHECKING:
  from optg_jax.select._search import Bracket

SAMPLE = 1 << 16  # target sample size


class Model(NamedTuple):
  """What the sample says about where keys lie."""

  sample: jax.Array  # sorted sample keys, (S,) int32
  atoms: jax.Array  # (S + 1,): atoms[i] = sample positions below i that start 3 equal keys
  weight: float  # scores per sample point, total / S


def sample_keys(leaves: Sequence[jax.Array], total: int) -> jax.Array:
  """Sorted keys of a strided sample of about ``SAMPLE`` of the ``total`` scores, ``(S,)``.

  Every leaf contributes in proportion to its size; pools up to ``SAMPLE``
  are taken whole.
  """
  parts = []
  for x in leaves:
    n = x.shape[0]
    want = n if total <= SAMPLE else round(n * SAMPLE / total)
    if want < 1:
      continue
    stride = max(1, n // want)
    if stride > 1:
      stride |= 1  # an odd stride does not lock onto even channel counts
    parts.append(_keys.keys(x[::stride]))
  return jnp.sort(jnp.concatenate(parts))


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
