"""Mask pytrees: which leaves are prunable, building, applying, validating and summarising masks.

A *mask* has exactly the treedef of the params it masks. Prunable leaves get a bool array of the
leaf's shape; every other leaf gets a free all-keep scalar ``True`` that broadcasts. Selection of
prunable leaves is by key path and array, so the same code serves Flax linen param dicts,
``flax.nnx.State`` and any registered pytree.

Trees of per-leaf data that only exist for prunable leaves (scores, logits, per-layer sparsities)
use ``None`` at the non-prunable positions; ``jax.tree_util`` keeps ``None`` as an empty node, so
such trees stay cheap and still line up with the params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import _paths
from optg_jax import select

PyTree = Any
FilterFn = Callable[[str, Any], bool]


def _is_none(x: Any) -> bool:
  return x is None


def default_filter(name: str, leaf: Any) -> bool:
  """Kernels of Dense/Conv layers: every leaf with ``ndim >= 2``. Biases and norm scales are not."""
  del name
  return np.ndim(leaf) >= 2


def prunable_tree(
    params: PyTree,
    *,
    exclude: Iterable[str] = (),
    filter_fn: FilterFn | None = None,
) -> PyTree:
  """A tree of Python bools, ``True`` at the prunable leaves of ``params``.

  Args:
    params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
    exclude: regular expressions; a leaf whose path string (``'params/Dense_0/kernel'``, see
      :func:`optg_jax._paths.path_str`; an ``nnx.State`` leaf is ``'fc2/kernel'``) contains a
      match is never pruned, e.g. ``('Conv_0', 'Dense_2')`` for the stem and the classifier.
      Every pattern must match at least one leaf.
    filter_fn: ``(path_str, leaf) -> bool`` replacing :func:`default_filter`.

  Raises:
    TypeError: a selected leaf is not a floating-point array (the message names its path).
    ValueError: nothing is prunable, or an ``exclude`` pattern matches no leaf.
  """
  exclude = tuple(exclude)
  filter_fn = default_filter if filter_fn is None else filter_fn

  def pick(path, leaf):
    name = _paths.path_str(path)
    if _paths.matches_any(name, exclude) or not filter_fn(name, leaf):
      return False
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"prunable leaf {name!r} has dtype {jnp.result_type(leaf)}; only floating-point leaves"
          " can be pruned (exclude it with `exclude=` or `filter_fn=`)")
    return True

  tree = jax.tree_util.tree_map_with_path(pick, params)
  names = [_paths.path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  _paths.check_patterns_match(exclude, names, "exclude")
  if not any(jax.tree_util.tree_leaves(tree)):
    raise ValueError(
        "no prunable leaves: the filter selected none of the params' leaves "
        f"(exclude={exclude!r}); pass a `filter_fn` that selects the kernels to prune")
  return tree


def layer_axis_tree(
    params: PyTree, prunable: PyTree, layer_axes: int | Mapping[str, int] | None
) -> PyTree:
  """Per prunable leaf, the leading layer axis of a stacked (scanned) kernel, else ``None``.

  Args:
    params: the params.
    prunable: the bool tree from :func:`prunable_tree`.
    layer_axes: ``None`` (no stacked kernels), one axis for every prunable leaf, or a mapping from
      path regex to axis. Stacked kernels are pruned per layer: each slice along the axis is a layer.

  Raises:
    ValueError: a prunable leaf lacks the axis it was given (the message names its path), or a
      pattern of a ``layer_axes`` mapping matches no prunable leaf.
  """
  if isinstance(layer_axes, Mapping):
    names = [_paths.path_str(path) for path, keep
             in jax.tree_util.tree_flatten_with_path(prunable)[0] if keep]
    _paths.check_patterns_match(layer_axes, names, "layer_axes")
  elif not (layer_axes is None or isinstance(layer_axes, int)):
    raise TypeError(f"layer_axes must be None, an int or a mapping from path regex to axis, "
                    f"got {type(layer_axes).__name__}")

  def axis_of(path, keep, leaf):
    if not keep or layer_axes is None:
      return None
    name = _paths.path_str(path)
    axis = layer_axes if isinstance(layer_axes, int) else _paths.lookup_override(name, layer_axes)
    if axis is None:
      return None
    ndim = np.ndim(leaf)
    if not -ndim <= axis < ndim:
      raise ValueError(f"layer_axes: leaf {name!r} of shape {np.shape(leaf)} has no axis {axis}")
    return axis % ndim

  return jax.tree_util.tree_map_with_path(axis_of, prunable, params)


def all_keep(params: PyTree, prunable: PyTree) -> PyTree:
  """The dense mask: ``True`` everywhere, full-shaped at prunable leaves, a scalar elsewhere."""
  return jax.tree.map(
      lambda keep, p: jnp.ones(np.shape(p), bool) if keep else jnp.array(True), prunable, params)


def validate_masks(params: PyTree, masks: PyTree) -> None:
  """Checks that ``masks`` fits ``params``: same treedef, bool leaves, shapes equal or scalar.

  Raises:
    ValueError: different structure, or a leaf whose shape neither equals the param's nor is
      scalar (the message names the path).
    TypeError: a mask leaf that is not bool (the message names the path).
  """
  p_def = jax.tree_util.tree_structure(params)
  m_def = jax.tree_util.tree_structure(masks)
  if p_def != m_def:
    raise ValueError(f"masks and params differ in structure:\n  params: {p_def}\n  masks:  {m_def}")

  def check(path, p, m):
    name = _paths.path_str(path)
    if jnp.result_type(m) != jnp.bool_:
      raise TypeError(f"mask leaf {name!r} has dtype {jnp.result_type(m)}, expected bool")
    if np.shape(m) not in ((), np.shape(p)):
      raise ValueError(
          f"mask leaf {name!r} has shape {np.shape(m)}, expected {np.shape(p)} or () (all-keep)")

  jax.tree_util.tree_map_with_path(check, params, masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``params ⊙ masks``: zeros every pruned entry; dtypes and shapes of ``params`` are kept."""
  validate_masks(params, masks)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.result_type(p))), params,
                      masks)


@dataclasses.dataclass(frozen=True)
class ScaledSparsity:
  """The sparsity ``final · fraction`` of a schedule on its way to a Python-float target.

  At ``fraction >= 1`` the keep count comes from the Python float ``final`` itself (0.98 of
  25,502,912 is exact), not from its float32 rounding; before that from the float32 product.
  Not a pytree node: it sits as one leaf in per-leaf sparsity trees.
  """
  final: float
  fraction: Any


def keep_count(n: int, sparsity: Any) -> int | jax.Array:
  """:func:`optg_jax.select.keep_count`, also for a :class:`ScaledSparsity`."""
  if not isinstance(sparsity, ScaledSparsity):
    return select.keep_count(n, sparsity)
  at_target = select.keep_count(n, sparsity.final)
  fraction = sparsity.fraction
  if not isinstance(fraction, jax.Array):
    return at_target if fraction >= 1 else select.keep_count(n, sparsity.final * fraction)
  on_the_way = select.keep_count(n, (sparsity.final * fraction).astype(jnp.float32))
  return jnp.where(fraction >= 1, at_target, on_the_way)


def _flat_topk(scores: jax.Array, sparsity: Any, axis: int | None) -> jax.Array:
  """Keeps ``n - floor(sparsity·n)`` of a leaf, or of each slice along a stacked layer ``axis``
  (``sparsity`` may then be a tuple with one per layer)."""
  if axis is None:
    return select.topk_mask(scores, keep_count(scores.size, sparsity))
  layers, n = _layer_grid(np.shape(scores), axis)
  if isinstance(sparsity, tuple):
    if len(sparsity) != layers:
      raise ValueError(f"{len(sparsity)} sparsities for a stack of {layers} layers")
    return _topk_per_layer(
        scores, jnp.stack([jnp.asarray(keep_count(n, s), jnp.int32) for s in sparsity]), axis)
  return _topk_per_layer(scores, keep_count(n, sparsity), axis)


def _layer_grid(shape: tuple[int, ...], axis: int | None) -> tuple[int, int]:
  """``(layers, weights per layer)`` of a leaf: one layer, or one per slice along ``axis``."""
  if axis is None:
    return 1, math.prod(shape)
  return shape[axis], math.prod(shape[:axis] + shape[axis + 1:])


def _topk_per_layer(scores: jax.Array, k: Any, axis: int | None) -> jax.Array:
  """Top-``k`` mask of a leaf, or of each slice along ``axis`` (``k`` a scalar for every slice,
  or a ``(layers,)`` int array of one per slice); ties keep the lower flat index."""
  if axis is None:
    return select.topk_mask(scores, k)
  moved = jnp.moveaxis(scores, axis, 0)
  rows = moved.reshape(moved.shape[0], -1)
  mask = jax.vmap(select.topk_mask, in_axes=(0, 0 if np.ndim(k) else None))(rows, k)
  return jnp.moveaxis(mask.reshape(moved.shape), 0, axis)


def layerwise_masks(
    scores: PyTree,
    prunable: PyTree,
    sparsities: Any,
    layer_axes: PyTree | None = None,
) -> PyTree:
  """Per-leaf top-k masks: each prunable leaf (or stacked layer) keeps its own exact count.

  Args:
    scores: a tree aligned with ``prunable``; its prunable leaves are float arrays (higher = keep),
      other positions may hold anything, ``None`` included.
    prunable: the bool tree from :func:`prunable_tree`.
    sparsities: one sparsity for every leaf, or a tree aligned with ``prunable`` holding one per
      prunable leaf (Python floats or traced scalars, e.g. a schedule's value; a tuple of one
      per layer for a stacked leaf).
    layer_axes: the tree from :func:`layer_axis_tree`, or ``None``.

  Returns:
    A mask with ``prunable``'s structure: full bool arrays at prunable leaves, scalar ``True``
    elsewhere.
  """
  if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(sparsities)):
    sparsities = jax.tree.map(lambda keep: sparsities if keep else None, prunable)
  if layer_axes is None:
    layer_axes = jax.tree.map(lambda _: None, prunable)

  def one(keep, s, p, axis):
    return _flat_topk(jnp.asarray(s), p, axis) if keep else jnp.array(True)

  return jax.tree.map(one, prunable, scores, sparsities, layer_axes, is_leaf=_is_none)


def global_masks(
    scores: PyTree,
    prunable: PyTree,
    sparsity: Any,
    *,
    min_density: float = 0.0,
    layer_axes: PyTree | None = None,
) -> PyTree:
  """One global pool: keeps exactly ``N - floor(sparsity·N)`` of all prunable scores together.

  ``N`` is the total number of prunable entries; ties at the threshold keep the earlier leaf (in
  ``jax.tree_util`` order) and then the lower flat index. Stacked kernels need no special case.

  With ``min_density = d > 0`` every layer ``l`` of ``n_l`` weights (a prunable leaf, or a slice
  of a stacked leaf along its ``layer_axes`` axis) first keeps its own top ``m_l = ceil(d·n_l)``
  scores (ties: lower flat index), and the other ``k − Σ m_l`` are the global top-k of the scores
  not forced in (ties as above), so ``k`` are still kept in all. See :func:`floored_global_masks`.

  Args:
    scores: a tree aligned with ``prunable``; float arrays at its prunable leaves.
    prunable: the bool tree from :func:`prunable_tree`.
    sparsity: a Python float, a traced scalar or a :class:`ScaledSparsity`.
    min_density: ``d`` in [0, 1]; 0 (the default) is the plain global top-k, bit for bit.
    layer_axes: the tree from :func:`layer_axis_tree` (only read with ``min_density``), or
      ``None``.

  Returns:
    A mask with ``prunable``'s structure: full bool arrays at prunable leaves, scalar ``True``
    elsewhere.

  Raises:
    ValueError: the layers' floors ``Σ m_l`` exceed the ``k`` kept at the (final) sparsity.
  """
  pooled = jax.tree.map(lambda keep, s: s if keep else None, prunable, scores, is_leaf=_is_none)
  n = sum(int(np.size(s)) for s in jax.tree_util.tree_leaves(pooled))
  if min_density:
    picked = floored_global_masks(pooled, sparsity, min_density, layer_axes)
  else:
    picked = select.global_topk_masks(pooled, keep_count(n, sparsity))
  return jax.tree.map(lambda keep, m: m if keep else jnp.array(True), prunable, picked,
                      is_leaf=_is_none)


def min_keep_count(shape: tuple[int, ...], axis: int | None, min_density: float) -> int:
  """``m = ceil(min_density·n)``: the weights each layer of ``n`` keeps at least (a leaf of
  ``shape``, or each of its slices along ``axis``); ``min_density`` read as a decimal, like
  sparsities (0.07 of 100 is 7, where ``0.07 * 100`` is 7.000000000000001)."""
  _, n = _layer_grid(tuple(shape), axis)
  if min_density >= 1:
    return n
  return n - select.keep_count(n, min_density, rounding="ceil")  # n − (n − ceil(d·n))


def floored_global_masks(
    scores: PyTree, sparsity: Any, min_density: float, layer_axes: PyTree | None = None
) -> PyTree:
  """Global top-k with a floor per layer: each layer keeps at least ``ceil(min_density·n_l)``.

  1. Forced: each layer's top ``m_l = ceil(d·n_l)`` (:func:`optg_jax.select.topk_mask`, per
     slice of a stacked leaf), ``M = Σ m_l`` in all.
  2. Free: the exact global top-``k'`` of the other scores, ``k' = max(k − M, 0)``, by
     :func:`optg_jax.select.global_topk_masks` on the scores with the forced entries set to NaN
     (the lowest key, so never picked while ``k'`` is at most the number of non-NaN free
     scores). Free scores that are NaN themselves tie with the forced NaNs; when ``k'`` reaches
     them (``lax.cond``), every free number is kept and the rest are the first free NaNs by
     position (a running count) instead.
  3. The mask is forced | free: exactly ``max(k, M)`` kept.

  ``M`` is static (shapes and ``d``). It is checked against the ``k`` of the final sparsity (a
  Python float, or the ``final`` of a :class:`ScaledSparsity`): ``M > k`` is a ``ValueError``.
  On a schedule (a traced ``fraction``) ``k(t) >= k`` as the sparsity rises to its target, so
  ``k(t) >= M`` too; should ``k(t)`` fall below ``M`` (a float32 product a hair above the target,
  or a traced plain sparsity that cannot be checked) the forced weights alone are kept.

  Args:
    scores: a pytree of float arrays (``None`` leaves are empty nodes), the pool.
    sparsity: a Python float, a traced scalar or a :class:`ScaledSparsity`.
    min_density: ``d`` in (0, 1].
    layer_axes: a tree aligned with ``scores`` of ``None`` or the leaf's layer axis (see
      :func:`layer_axis_tree`), or ``None``: each leaf is one layer.

  Returns:
    Bool masks with the structure and shapes of ``scores``.
  """
  if layer_axes is None:
    layer_axes = jax.tree.map(lambda _: None, scores)
  leaves, treedef = jax.tree_util.tree_flatten(scores)
  axes = treedef.flatten_up_to(layer_axes)
  leaves = [jnp.asarray(s) for s in leaves]
  n = sum(s.size for s in leaves)
  counts = [min_keep_count(s.shape, axis, min_density) for s, axis in zip(leaves, axes)]
  forced_total = sum(m * _layer_grid(s.shape, axis)[0]
                     for s, m, axis in zip(leaves, counts, axes))
  _check_floor(n, sparsity, min_density, forced_total)
  masks = _floored_topk(leaves, keep_count(n, sparsity), jnp.asarray(counts, jnp.int32),
                        forced_total, tuple(axes))
  return jax.tree_util.tree_unflatten(treedef, masks)


@functools.partial(jax.jit, static_argnames="axes")
def _floored_topk(leaves: list[jax.Array], k: Any, counts: jax.Array, forced_total: Any,
                  axes: tuple[int | None, ...]) -> list[jax.Array]:
  """:func:`floored_global_masks` of flat leaves, ``counts`` the ``(leaves,)`` floors per layer
  (jitted: eager calls compile once per shape)."""
  free_k = jnp.maximum(jnp.asarray(k, jnp.int32) - forced_total, 0)
  forced = [_topk_per_layer(s, m, axis) for s, m, axis in zip(leaves, counts, axes)]
  free_nan = [~f & jnp.isnan(s) for s, f in zip(leaves, forced)]
  free_numbers = sum((jnp.sum(~f & ~nan, dtype=jnp.int32) for f, nan in zip(forced, free_nan)),
                     jnp.zeros((), jnp.int32))

  def by_score():
    return select.global_topk_masks([jnp.where(f, jnp.nan, s) for s, f in zip(leaves, forced)],
                                    free_k)

  def numbers_then_nans_by_position():
    nans_kept, before = [], jnp.zeros((), jnp.int32)
    for f, nan in zip(forced, free_nan):
      rank = before + jnp.cumsum(nan.reshape(-1), dtype=jnp.int32)  # 1-based, across leaves
      nans_kept.append((~f & ~nan) | (nan & (rank <= free_k - free_numbers).reshape(nan.shape)))
      before = before + jnp.sum(nan, dtype=jnp.int32)
    return nans_kept

  free = jax.lax.cond(free_k <= free_numbers, by_score, numbers_then_nans_by_position)
  return [f | m for f, m in zip(forced, free)]


def _check_floor(n: int, sparsity: Any, min_density: float, forced_total: int) -> None:
  """``ValueError`` when the floors ``forced_total`` exceed the final keep count (if static)."""
  final = sparsity.final if isinstance(sparsity, ScaledSparsity) else sparsity
  if isinstance(final, jax.Array):
    return
  k = select.keep_count(n, final)
  if forced_total > k:
    raise ValueError(
        f"min_density={min_density}: every layer keeps at least ceil(min_density·n_l) weights, "
        f"{forced_total} of the {n} prunable weights in all, more than the k = {k} kept at "
        f"sparsity {final}; lower min_density or the sparsity")


class LeafSummary(NamedTuple):
  """Counts for one prunable leaf: ``kept`` (int32 array), ``total`` (int), ``sparsity`` (float32)."""
  kept: jax.Array
  total: int
  sparsity: jax.Array


class SparsitySummary(NamedTuple):
  """Totals over the prunable leaves and a ``leaves`` dict from path string to :class:`LeafSummary`."""
  kept: jax.Array
  total: int
  sparsity: jax.Array
  leaves: dict[str, LeafSummary]


def sparsity_summary(masks: PyTree) -> SparsitySummary:
  """Per-leaf and total sparsity of a mask, counted over its prunable (full-shaped) leaves.

  Scalar all-keep leaves are not prunable and are left out. Works inside ``jax.jit`` (the counts
  are arrays; ``total`` is a static Python int), so it can feed logging from a train step.
  """
  leaves = {}
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    if np.ndim(m) == 0:
      continue
    kept = jnp.sum(m, dtype=jnp.int32)
    total = int(np.size(m))
    leaves[_paths.path_str(path)] = LeafSummary(kept, total, _pruned_fraction(kept, total))
  total = sum(leaf.total for leaf in leaves.values())
  kept = sum((leaf.kept for leaf in leaves.values()), jnp.zeros((), jnp.int32))
  return SparsitySummary(kept, total, _pruned_fraction(kept, total), leaves)


def _pruned_fraction(kept: jax.Array, total: int) -> jax.Array:
  return (total - kept).astype(jnp.float32) / max(total, 1)
