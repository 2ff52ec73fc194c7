"""Exact top-k selection for sparsity masks: keep counts, k-th values, masks.

Everything here is exact, deterministic and jit/vmap friendly, and a global
selection over a whole pytree never concatenates its leaves.

Ordering. Scores are ranked by their float32 value through an order-preserving
int32 key (`_keys`): ``-0.0`` and ``+0.0`` are one value (a tie), and NaN
ranks below ``-inf``, so NaN scores are pruned first. Ties at the threshold
are broken by position: the lower flat (row-major) index is kept, and across
the leaves of a tree the earlier leaf (``jax.tree_util.tree_leaves`` order)
first. Keys, never float comparisons, rank the scores, so the result is the
same with or without denormals-are-zero modes and on every backend.

Algorithm. Pools of at most 8,192 scores are ranked by one sort of their keys
(`_masks.by_sort`). Bigger pools search for the k-th largest key ``T``
(`_search`): a strided sample of one in 128 scores (1,024 to 65,536 of them,
`_sample.sample_size`) is sorted once (`_sample`), then each step
makes one streaming pass over all scores (`_passes`) that counts exactly how
many lie at or above one or more split keys, chosen by the planner (`_plan`)
from the sample and the exact counts so far:

* count: the scores at or above one split, placed past the target by a
  margin so that the far bracket end moves close;
* digits: once no leaf holds more than 254 scores in the bracket, 2 to 4
  splits at once, decoded from the base-W digits of one uint8 weight sum;
* extent: the uint8 max of a bucketed distance locates the largest
  (smallest) bracket score, 8 bits of the key per pass, for targets beyond
  the sample's extremes and for a bracket holding one score.

On 25.5M normal scores a search takes 6 to 10 passes at sparsities 0.8 to
0.98, up to about 15 at 0.5 (the k-th score then lies near 0, where values
span many binades), and 2 when the threshold is one big tie. One more pass
writes the masks; only a leaf whose ties at ``T`` straddle the cut searches
its flat indices for it (`_masks`). Under ``jax.vmap`` the rows are searched
one at a time (``lax.map`` through ``custom_vmap``), since batching would run
every branch of every ``lax.cond``/``lax.switch``.

Sharding. Leaves stay in their own shapes throughout (never flattened: a
leaf sharded along another axis than its first would be gathered), the
passes reduce each leaf in its shape, masks come out in it, and the sample
is a strided grid whose strides divide an 8-way (or smaller power-of-2)
shard, so under ``jit`` with sharded scores the devices all-reduce counts and
gather only the sample (benchmarks/mask_refresh.py reads the program).

Modules: `api` (the public functions, re-exported here), `_keep` (keep
count helpers), `_keys`, `_passes`, `_sample`, `_plan`, `_search`, `_masks`.
"""

from optg_jax.select.api import global_topk_masks
from optg_jax.select.api import keep_count
from optg_jax.select.api import kth_largest
from optg_jax.select.api import topk_mask

__all__ = ("global_topk_masks", "keep_count", "kth_largest", "topk_mask")
