"""Where and how a method keeps its top scores: the pool, the per-layer budget, the top-k kind.

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

PyTree = Any
DistributionFn = Callable[[PyTree, float], PyTree]

TOPK_KINDS = ("unstructured",)
"""Kinds of top-k selection; N:M and block sparsity will be added here."""


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
      layer of its own (ERK counts it as one); a global pool needs no special case.
    overrides: path regex → sparsity for the named distributions ``'uniform'`` and ``'erk'``;
      refused with ``'global'`` (one pool has no per-layer budget) and with a callable.
    topk: the kind of top-k: ``'unstructured'`` (the only kind for now).
  """
  distribution: str | DistributionFn = "global"
  exclude: tuple[str, ...] = ()
  filter_fn: Callable[[str, Any], bool] | None = None
  layer_axes: int | Mapping[str, int] | None = None
  overrides: Mapping[str, float] | None = None
  topk: str = "unstructured"

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
    float targets (see :class:`optg_jax.masks.ScaledSparsity`).
    """
    prunable = self.prunable(params)
    if self.distribution == "global":
      return masks_lib.global_masks(scores, prunable,
                                    masks_lib.ScaledSparsity(final_sparsity, fraction))
    finals = self.layer_sparsities(params, prunable, final_sparsity)
    per_leaf = jax.tree.map(lambda s: _scaled(s, fraction), finals,
                            is_leaf=lambda x: isinstance(x, tuple))
    return masks_lib.layerwise_masks(scores, prunable, per_leaf, self._axes(params, prunable))


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

