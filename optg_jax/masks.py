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
  moved = jnp.moveaxis(scores, axis, 0)
  per_layer = moved.reshape(moved.shape[0], -1)
  n = per_layer.shape[1]
  if isinstance(sparsity, tuple):
    if len(sparsity) != per_layer.shape[0]:
      raise ValueError(f"{len(sparsity)} sparsities for a stack of {per_layer.shape[0]} layers")
    k = jnp.stack([jnp.asarray(keep_count(n, s), jnp.int32) for s in sparsity])
    mask = jax.vmap(select.topk_mask)(per_layer, k)
  else:
    mask = jax.vmap(select.topk_mask, in_axes=(0, None))(per_layer, keep_count(n, sparsity))
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


def global_masks(scores: PyTree, prunable: PyTree, sparsity: Any) -> PyTree:
  """One global pool: keeps exactly ``N - floor(sparsity·N)`` of all prunable scores together.

  ``N`` is the total number of prunable entries; ties at the threshold keep the earlier leaf (in
  ``jax.tree_util`` order) and then the lower flat index. Stacked kernels need no special case.
  """
  pooled = jax.tree.map(lambda keep, s: s if keep else None, prunable, scores, is_leaf=_is_none)
  n = sum(int(np.size(s)) for s in jax.tree_util.tree_leaves(pooled))
  picked = select.global_topk_masks(pooled, keep_count(n, sparsity))
  return jax.tree.map(lambda keep, m: m if keep else jnp.array(True), prunable, picked,
                      is_leaf=_is_none)


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
