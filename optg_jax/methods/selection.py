"""Where and how a method keeps its top scores: the pool, the per-layer budget, the top-k kind,
the selection rule.

A :class:`Selection` is a frozen, hashable value (registered as a static pytree node), so a method
state can carry it and select its final masks again without being told how.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import _checks
from optg_jax import distributions
from optg_jax import masks as masks_lib
from optg_jax import select

PyTree = Any
DistributionFn = Callable[[PyTree, float], PyTree]

TOPK_KINDS = ("unstructured",)
"""Kinds of top-k selection; N:M and block sparsity will be added here."""

RULES = ("exact", "reference")
"""Selection rules: ``'exact'`` keeps exactly ``N − floor(p·N)`` scores of a pool, ties at the
threshold going to the earlier leaf and lower flat index; ``'reference'`` is the OptG authors'
``S >= thr`` with ``thr`` the ``int(N·(1−p)) = N − ceil(p·N)``-th largest score, keeping every
tie at ``thr`` (so it keeps ``N − ceil(p·N)`` without ties at the threshold, more with them)."""


def _frozen_mapping(value: Any, name: str) -> tuple[tuple[str, Any], ...] | None:
  if value is None or isinstance(value, tuple):
    return value or None
  if not isinstance(value, Mapping):
    raise TypeError(f"{name} must be a mapping from path regex to value, got "
                    f"{type(value).__name__}")
  return tuple(value.items()) or None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Selection:
  """Where and how a method keeps its top scores.

  Attributes:
    distribution: ``'global'`` (one pool over all prunable leaves), ``'uniform'`` or ``'erk'``
      (per-layer pools with the sparsities of :mod:`optg_jax.distributions`), or a callable
      ``(shapes, sparsity) -> per-layer sparsities`` (see :meth:`layer_sparsities`).
    exclude: path regexes never pruned; each must match a leaf (see
      :func:`optg_jax.masks.prunable_tree`).
    filter_fn: ``(path_str, leaf) -> bool`` replacing the default kernel filter.
    layer_axes: leading layer axis of stacked (scanned) kernels: an int for every prunable leaf,
      or a mapping path regex → axis. In per-layer distributions each slice along the axis is a
      layer of its own (ERK counts it as one); a global pool needs no special case, except that
      its :attr:`min_density` floors each slice.
    overrides: path regex → sparsity for the named distributions ``'uniform'`` and ``'erk'``;
      refused with ``'global'`` (one pool has no per-layer budget) and with a callable.
    topk: the kind of top-k: ``'unstructured'`` (the only kind for now).
    rule: ``'exact'`` (exact counts, ties by position) or ``'reference'`` (the OptG code's
      threshold, every tie kept); see :data:`RULES`.
    min_density: ``d`` in [0, 1] (``None``: 0), with ``'global'`` and the ``'exact'`` rule:
      every layer (a prunable leaf, or a slice of a stacked one along its ``layer_axes`` axis) of
      ``n_l`` weights keeps at least its own top ``ceil(d·n_l)`` scores, and the rest of the ``k``
      kept are the global top-k of the others, so that no layer is pruned away (see
      :func:`optg_jax.masks.floored_global_masks`). The floors are static; their sum above
      the ``k`` kept at the final sparsity is a ``ValueError`` at the first selection (at
      ``init`` for the pruners, at the first update for OptG, whose first mask is dense). 0 (the
      default) is the plain global pool; refused with the per-layer distributions, whose
      budgets already set each layer's density.
  """
  distribution: str | DistributionFn = "global"
  exclude: tuple[str, ...] = ()
  filter_fn: Callable[[str, Any], bool] | None = None
  layer_axes: int | Mapping[str, int] | None = None
  overrides: Mapping[str, float] | None = None
  topk: str = "unstructured"
  rule: str = "exact"
  min_density: float | None = None

  def __post_init__(self):
    if not (callable(self.distribution) or self.distribution in distributions.DISTRIBUTIONS):
      raise ValueError(f"distribution must be one of {distributions.DISTRIBUTIONS} or a callable "
                       f"(shapes, sparsity) -> per-layer sparsities, got {self.distribution!r}")
    exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
    object.__setattr__(self, "exclude", exclude)
    if not (self.layer_axes is None or isinstance(self.layer_axes, int)):
      object.__setattr__(self, "layer_axes", _frozen_mapping(self.layer_axes, "layer_axes"))
    overrides = _frozen_mapping(self.overrides, "overrides")
    object.__setattr__(self, "overrides", overrides)
    if overrides and (callable(self.distribution) or self.distribution == "global"):
      raise ValueError(
          f"overrides={dict(overrides)} need distribution='uniform' or 'erk'; with "
          f"distribution={self.distribution!r} they cannot be honoured (use exclude= to keep "
          "leaves dense, or apply them inside your distribution callable)")
    for pattern, value in overrides or ():
      _checks.sparsity(value, f"overrides[{pattern!r}]")
    if self.topk not in TOPK_KINDS:
      raise ValueError(f"topk must be one of {TOPK_KINDS}, got {self.topk!r}")
    if self.rule not in RULES:
      raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
    object.__setattr__(self, "min_density", _min_density(self.min_density))
    if self.min_density and self.distribution != "global":
      raise ValueError(
          f"min_density={self.min_density} applies to distribution='global' (the per-layer "
          f"budgets of distribution={self.distribution!r} already set each layer's density; "
          "use overrides= or your callable to raise one)")
    if self.min_density and self.rule != "exact":
      raise ValueError(f"min_density={self.min_density} needs rule='exact', got {self.rule!r}")

  def prunable(self, params: PyTree) -> PyTree:
    """Python bools, ``True`` at the prunable leaves (``layer_axes`` are checked too)."""
    prunable = masks_lib.prunable_tree(params, exclude=self.exclude, filter_fn=self.filter_fn)
    self._axes(params, prunable)
    return prunable

  def _axes(self, params: PyTree, prunable: PyTree) -> PyTree:
    axes = self.layer_axes if not isinstance(self.layer_axes, tuple) else dict(self.layer_axes)
    return masks_lib.layer_axis_tree(params, prunable, axes)

  def layer_sparsities(self, params: PyTree, prunable: PyTree, sparsity: float) -> PyTree:
    """Per prunable leaf, its sparsity (a float), or a tuple of one per layer of a stacked leaf.

    The distribution sees ``shapes``: ``None`` at non-prunable leaves, a
    ``jax.ShapeDtypeStruct`` per prunable leaf, and a tuple of one per layer for a stacked leaf
    (so ``'erk'`` solves over every layer, and a layer's path is ``'<leaf path>/<index>'``).
    """
    axes = self._axes(params, prunable)
    shapes = jax.tree.map(lambda keep, p, axis: _layer_shapes(p, axis) if keep else None,
                          prunable, params, axes, is_leaf=lambda x: x is None)
    if callable(self.distribution):
      per_layer = self.distribution(shapes, sparsity)
      _check_distribution_output(shapes, per_layer)
    else:
      per_layer = distributions.layer_sparsities(
          self.distribution, shapes, sparsity,
          overrides=dict(self.overrides) if self.overrides else None)
    return jax.tree.map(lambda keep, s: _collapse(s) if keep else None, prunable, per_layer,
                        is_leaf=lambda x: x is None)

  def masks(self, scores: PyTree, params: PyTree, fraction: Any, final_sparsity: float) -> PyTree:
    """Top-k masks of ``scores`` at ``fraction`` (maybe traced) of the way to ``final_sparsity``.

    Per-layer targets are solved once at the final sparsity and each is scaled by ``fraction``,
    as gradual schedules do per layer; at ``fraction >= 1`` the counts are exact for the Python
    float targets (see :class:`optg_jax.masks.ScaledSparsity`). Each pool (the global one, or
    each layer) keeps its count by the :attr:`rule`; with :attr:`min_density` the global pool
    first keeps each layer's floor.

    Args:
      scores: a tree aligned with ``params``, float scores at the prunable leaves (higher kept).
      params: the params (their shapes and paths choose the prunable leaves).
      fraction: the fraction of ``final_sparsity`` reached, a Python float or a traced scalar.
      final_sparsity: the target, a Python float in [0, 1).

    Returns:
      Bool masks, the params' treedef: full-shaped at the prunable leaves, scalar ``True``
      elsewhere.

    Raises:
      ValueError: the :attr:`min_density` floors exceed the ``k`` kept at ``final_sparsity``.
    """
    prunable = self.prunable(params)
    reference = self.rule == "reference"
    if self.distribution == "global":
      scaled = masks_lib.ScaledSparsity(final_sparsity, fraction)
      if not reference:  # min_density needs the exact rule
        axes = self._axes(params, prunable) if self.min_density else None
        return masks_lib.global_masks(scores, prunable, scaled, min_density=self.min_density,
                                      layer_axes=axes)
      pooled = _trees_only(prunable, scores)
      n = sum(int(np.size(s)) for s in jax.tree_util.tree_leaves(pooled))
      picked = select.global_topk_masks(pooled, _reference_keep(n, scaled), keep_ties=True)
      return jax.tree.map(lambda keep, m: m if keep else jnp.array(True), prunable, picked,
                          is_leaf=lambda x: x is None)
    finals = self.layer_sparsities(params, prunable, final_sparsity)
    per_leaf = jax.tree.map(lambda s: _scaled(s, fraction), finals,
                            is_leaf=lambda x: isinstance(x, tuple))
    axes = self._axes(params, prunable)
    if not reference:
      return masks_lib.layerwise_masks(scores, prunable, per_leaf, axes)
    return jax.tree.map(lambda keep, s, p, axis: _reference_leaf(s, p, axis) if keep
                        else jnp.array(True), prunable, scores, per_leaf, axes,
                        is_leaf=lambda x: x is None)


def _min_density(value: Any) -> float:
  """``value`` as a float in [0, 1], else ``ValueError``/``TypeError`` naming ``min_density``."""
  if value is None:
    return 0.0
  _checks.concrete(value, "min_density")
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    value = np.asarray(value)[()]  # a concrete scalar array (optax.inject_hyperparams makes one)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                   np.floating)):
    raise TypeError(f"min_density must be a real number in [0, 1], got {value!r}")
  if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
    raise ValueError(f"min_density must be in [0, 1], got {value!r}")
  return float(value)


def _trees_only(prunable: PyTree, scores: PyTree) -> PyTree:
  """``scores`` at the prunable leaves, ``None`` elsewhere."""
  return jax.tree.map(lambda keep, s: s if keep else None, prunable, scores,
                      is_leaf=lambda x: x is None)


def _reference_keep(n: int, sparsity: masks_lib.ScaledSparsity) -> int | jax.Array:
  """``n − ceil(p·n)`` kept of ``n`` at a scheduled sparsity ``p`` (the OptG code's
  ``int(n·(1−p))``), ``p`` read as :func:`optg_jax.masks.keep_count` reads it: the Python float
  target at ``fraction >= 1``, else the float32 product."""
  at_target = select.keep_count(n, sparsity.final, rounding="ceil")
  fraction = sparsity.fraction
  if not isinstance(fraction, jax.Array):
    return (at_target if fraction >= 1
            else select.keep_count(n, sparsity.final * fraction, rounding="ceil"))
  on_the_way = select.keep_count(n, (sparsity.final * fraction).astype(jnp.float32),
                                 rounding="ceil")
  return jnp.where(fraction >= 1, at_target, on_the_way)


def _reference_leaf(scores: Any, sparsity: Any, axis: int | None) -> jax.Array:
  """``S >= thr`` of a leaf, or of each slice along a stacked layer ``axis`` (``sparsity`` a
  :class:`~optg_jax.masks.ScaledSparsity`, or a tuple of one per layer), ``thr`` the
  ``n − ceil(p·n)``-th largest score of its pool of ``n``."""
  scores = jnp.asarray(scores)
  if axis is None:
    return select.topk_mask(scores, _reference_keep(scores.size, sparsity), keep_ties=True)
  moved = jnp.moveaxis(scores, axis, 0)
  rows = moved.reshape(moved.shape[0], -1)
  per_layer = sparsity if isinstance(sparsity, tuple) else (sparsity,) * rows.shape[0]
  if len(per_layer) != rows.shape[0]:
    raise ValueError(f"{len(per_layer)} sparsities for a stack of {rows.shape[0]} layers")
  k = jnp.stack([jnp.asarray(_reference_keep(rows.shape[1], p), jnp.int32) for p in per_layer])
  mask = jax.vmap(lambda row, k: select.topk_mask(row, k, keep_ties=True))(rows, k)
  return jnp.moveaxis(mask.reshape(moved.shape), 0, axis)


def _layer_shapes(leaf: Any, axis: int | None) -> Any:
  shape, dtype = np.shape(leaf), jnp.result_type(leaf)
  if axis is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  layer = jax.ShapeDtypeStruct(shape[:axis] + shape[axis + 1:], dtype)
  return (layer,) * shape[axis]


def _collapse(per_layer: Any) -> Any:
  """One float for a stacked leaf whose layers agree (the common case), else the tuple."""
  if isinstance(per_layer, (tuple, list)):
    values = tuple(float(v) for v in per_layer)
    return values[0] if len(set(values)) == 1 else values
  return per_layer


def _scaled(sparsity: Any, fraction: Any) -> Any:
  if isinstance(sparsity, tuple):
    return tuple(masks_lib.ScaledSparsity(s, fraction) for s in sparsity)
  return masks_lib.ScaledSparsity(sparsity, fraction)


def _check_distribution_output(shapes: PyTree, per_layer: PyTree) -> None:
  want = jax.tree_util.tree_structure(shapes, is_leaf=lambda x: x is None)
  got = jax.tree_util.tree_structure(per_layer, is_leaf=lambda x: x is None)
  if want != got:
    raise ValueError(f"distribution: the callable returned a tree of another structure than "
                     f"its shapes:\n  shapes: {want}\n  result: {got}")
  flat = jax.tree_util.tree_flatten_with_path(per_layer, is_leaf=lambda x: x is None)[0]
  for (path, value), shape in zip(flat, jax.tree.leaves(shapes, is_leaf=lambda x: x is None)):
    name = jax.tree_util.keystr(path)
    if (shape is None) != (value is None):
      raise ValueError(f"distribution: the callable's result at {name} must be "
                       f"{'None' if shape is None else 'a sparsity'}, got {value!r}")
    if value is not None:
      _checks.sparsity(value, f"distribution result at {name}")

