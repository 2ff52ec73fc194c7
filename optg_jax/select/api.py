"""The public functions: keep counts, top-k masks over arrays and pytrees, k-th values."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optg_jax.select import _keep
from optg_jax.select import _keys
from optg_jax.select import _masks
from optg_jax.select import _search
from optg_jax.select._keys import KEY_NAN, KEY_TOP

SMALL_TOTAL = 1 << 13  # pools up to this many scores are ranked by one sort (_masks.by_sort)
ROUNDINGS = ("floor", "ceil")
"""How `keep_count` rounds the pruned count ``sparsity * n``."""


def keep_count(n: int, sparsity: Any, *, rounding: str = "floor") -> int | jax.Array:
  """Number of weights kept out of ``n`` at ``sparsity``: ``n - floor(sparsity * n)``.

  With ``rounding='ceil'``, ``n - ceil(sparsity * n)``: the count ``int(n * (1 - sparsity))``
  of the OptG authors' code (there in float64), one fewer unless ``sparsity * n`` is whole.

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
    rounding: ``'floor'`` or ``'ceil'``, the rounding of the pruned count.

  Returns:
    The keep count ``k``.

  Raises:
    ValueError: ``n < 0``, a concrete ``sparsity`` outside ``[0, 1)`` or NaN, or an unknown
      ``rounding``.
    TypeError: ``n`` is not an integer or ``sparsity`` is not a real scalar.
  """
  n = _keep.check_n(n)
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")
  if isinstance(sparsity, jax.Array):
    if n > 2**31 - 1:
      raise ValueError(f"n must be < 2**31 for an array sparsity, got {n}.")
    return _keep.keep_count_array(n, sparsity, round_up=rounding == "ceil")
  _keep.check_sparsity(sparsity)
  pruned = _keep.shortest_decimal(sparsity) * n
  return n - (math.ceil(pruned) if rounding == "ceil" else math.floor(pruned))


def global_topk_masks(scores: Any, k: Any, *, keep_ties: bool = False) -> Any:
  """Masks keeping exactly the ``k`` largest scores over a whole pytree.

  Works leaf by leaf: above 8,192 scores in all the leaves are never
  concatenated (only a sample of at most 65,536 is). Jits, vmaps (``k`` may differ
  per row) and lets gradients through (the selection itself has none).

  Args:
    scores: a pytree of float32/bfloat16/float16 arrays, any shapes.
    k: number of scores kept in total, a Python int or an integer (traced)
      scalar; clipped to ``[0, total size]``.
    keep_ties: keep every score equal to the ``k``-th largest as well, so
      ``k`` or more are kept: the masks are ``score >= kth_largest(scores, k)``
      (the OptG authors' threshold rule). One `kth_largest` search and one
      comparison pass; ``k == 0`` keeps nothing.

  Returns:
    A pytree of bool arrays with the structure and shapes of ``scores`` and
    exactly ``k`` True entries in total (unless ``keep_ties``). Ties at the
    threshold keep the earlier leaf (``jax.tree_util.tree_leaves`` order),
    then the lower flat (row-major) index; NaN ranks below ``-inf`` and
    ``-0.0`` equals ``+0.0``.
  """
  return _tree_masks(scores, k, keep_ties=keep_ties)


def topk_mask(scores: jax.Array, k: Any, *, keep_ties: bool = False) -> jax.Array:
  """Bool mask of ``scores``' shape keeping exactly its ``k`` largest entries.

  Args:
    scores: float32/bfloat16/float16 array of any shape.
    k: Python int or integer (traced) scalar, clipped to ``[0, scores.size]``.
      Under ``jax.vmap`` it may differ per row.
    keep_ties: keep every entry tied with the ``k``-th largest too (see
      `global_topk_masks`).

  Returns:
    A bool array, True at the ``k`` largest scores; ties at the threshold keep
    the lower flat (row-major) index (all of them with ``keep_ties``), NaN
    ranks below ``-inf``.
  """
  return global_topk_masks(_keys.check_scores(scores, ""), k, keep_ties=keep_ties)


def _bisection_topk_masks(scores: Any, k: Any) -> Any:
  """`global_topk_masks` with the planner off: the same masks, bit for bit.

  Above 8,192 scores the search bisects the key range with plain count
  passes (no sample, about 32 passes); the baseline that
  benchmarks/mask_refresh.py measures the planner against. Not public.
  """
  return _tree_masks(scores, k, planner=False)


def kth_largest(scores: Any, k: Any) -> jax.Array:
  """The ``k``-th largest score over a pytree (1-based), as a float32 scalar.

  The masks of `global_topk_masks` keep every score above this value and
  some of the ties equal to it. ``k`` is clipped to ``[0, total size]``;
  ``k == 0`` gives ``+inf``, a NaN k-th score gives NaN, a zero gives
  ``+0.0``. Its gradient is zero.
  """
  leaves, _, _ = _flat_leaves(scores)
  return _kth_largest_flat(leaves, k)


# ----------------------------------------------------------------------------
# Leaves, jitted.
# ----------------------------------------------------------------------------


def _flat_leaves(scores: Any) -> tuple[list[jax.Array], Any, list[tuple[int, ...]]]:
  """Checked leaves of a pytree of scores (in their own shapes: flattening a leaf sharded
  along another axis than its first would gather it), its treedef and the leaf shapes."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(scores)
  leaves, shapes = [], []
  for path, leaf in paths_leaves:
    where = jax.tree_util.keystr(path) if path else ""
    x = _keys.check_scores(leaf, where)
    shapes.append(x.shape)
    leaves.append(x)
  total = sum(x.size for x in leaves)
  if total > 2**31 - 1:
    raise ValueError(f"scores has {total} entries; at most 2**31 - 1 are supported.")
  return leaves, treedef, shapes


def _tree_masks(scores: Any, k: Any, **options: bool) -> Any:
  """`_global_topk_flat` of the leaves of ``scores``, in the tree and shapes of ``scores``."""
  leaves, treedef, shapes = _flat_leaves(scores)
  masks = _global_topk_flat(leaves, k, **options)
  return jax.tree_util.tree_unflatten(
      treedef, [m.reshape(shape) for m, shape in zip(masks, shapes)])


def _clip_k(k: Any, total: int) -> jax.Array:
  """``k`` as an int32 scalar clipped to ``[0, total]``; rejects bools, floats and arrays."""
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


def _live(leaves: list[jax.Array]) -> list[jax.Array]:
  """The non-empty leaves, gradient stopped.

  Selection has no gradient; stopping it keeps JVP tracers (``jax.grad`` of
  a loss that builds masks from its own weights) out of the ``custom_vmap``
  functions, which have no JVP rule.
  """
  return [lax.stop_gradient(x) for x in leaves if x.size > 0]


def _kth_key(leaves: list[jax.Array], k: jax.Array) -> jax.Array:
  """int32 key of the k-th largest score of leaves, ``0 <= k <= total``, ``total > 0``
  (any key for ``k == 0``: callers mask that case)."""
  total = sum(x.size for x in leaves)
  if total <= SMALL_TOTAL:
    return jnp.sort(_masks.pooled_keys(leaves))[jnp.clip(total - k, 0, total - 1)]
  return _searched_key(_live(leaves), k)


def _kth_value(key: jax.Array, k: jax.Array) -> jax.Array:
  """float32 value of the k-th largest key: NaN for ``KEY_NAN``, +inf for ``k == 0``."""
  value = jnp.where(key == KEY_NAN, jnp.nan, _keys.key_value(key))
  return jnp.where(k > 0, value, jnp.inf).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("keep_ties", "planner"))
def _global_topk_flat(leaves: list[jax.Array], k: Any, keep_ties: bool = False,
                      planner: bool = True) -> list[jax.Array]:
  """Bool masks of leaves (jitted: calls outside ``jit`` compile once per shape);
  with ``keep_ties``, ``key >= key of the k-th largest`` (none for ``k == 0``); ``planner=False``
  searches by bisection (`_bisection_topk_masks`)."""
  total = sum(x.size for x in leaves)
  k = _clip_k(k, total)
  if total == 0:
    return [jnp.zeros(x.shape, bool) for x in leaves]
  if keep_ties:
    thresh = jnp.where(k > 0, _kth_key(leaves, k), KEY_TOP)
    return [_keys.keys(x) >= thresh for x in leaves]
  if total <= SMALL_TOTAL:
    return _masks.by_sort(leaves, k)
  search = _searched_masks if planner else _bisected_masks
  flat = iter(search(_live(leaves), k))
  return [next(flat) if x.size else jnp.zeros(x.shape, bool) for x in leaves]


@jax.jit
def _kth_largest_flat(leaves: list[jax.Array], k: Any) -> jax.Array:
  """`kth_largest` of leaves (jitted)."""
  total = sum(x.size for x in leaves)
  k = _clip_k(k, total)
  if total == 0:
    return jnp.float32(jnp.inf)
  return _kth_value(_kth_key(leaves, k), k)



# ----------------------------------------------------------------------------
# The counting search, one row at a time under vmap.
# ----------------------------------------------------------------------------


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


def _masks_searcher(planner: bool):
  """Masks of non-empty leaves by the counting search, ``0 <= k <= total``
  (``planner=False``: by bisection)."""

  @jax.custom_batching.custom_vmap
  def searched(leaves: list[jax.Array], k: jax.Array) -> list[jax.Array]:
    total = sum(x.size for x in leaves)
    # Keeping all or no scores needs no threshold: the bracket is then
    # [KEY_NAN, KEY_NAN + 1) with every score counted as a tie.
    br = _search.select(leaves, k, (k == 0) | (k >= total), planner=planner)
    return _masks.from_bracket(leaves, k, br)

  searched.def_vmap(_row_by_row(searched))
  return searched


_searched_masks = _masks_searcher(planner=True)
_bisected_masks = _masks_searcher(planner=False)


@jax.custom_batching.custom_vmap
def _searched_key(leaves: list[jax.Array], k: jax.Array) -> jax.Array:
  """The key of the k-th largest score of non-empty leaves by the counting search."""
  return _search.select(leaves, k, k == 0).lo


_searched_key.def_vmap(_row_by_row(_searched_key))
