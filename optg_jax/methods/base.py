"""What every sparsity method shares: which leaves it prunes, how it turns scores into masks, and
how ``effective_params`` / ``get_masks`` find its state anywhere inside an optax chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import distributions
from optg_jax import masks as masks_lib

PyTree = Any
EffectiveFn = Callable[[PyTree, Any], PyTree]

_STATE_TYPES: dict[type, EffectiveFn] = {}


def register_state(state_type: type, effective_fn: EffectiveFn | None = None) -> type:
  """Declares ``state_type`` as a method state; ``effective_fn(params, state)`` gives the weights
  the forward pass uses (default ``params ⊙ state.masks``)."""
  _STATE_TYPES[state_type] = effective_fn or (
      lambda params, state: masks_lib.apply_masks(params, state.masks))
  return state_type


def is_method_state(x: Any) -> bool:
  """Whether ``x`` is the state of a registered sparsity method."""
  return type(x) in _STATE_TYPES


def has_state(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a sparsity-method state anywhere."""
  return any(is_method_state(x)
             for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_method_state))


def find_state(opt_state: Any) -> Any:
  """The one sparsity-method state inside ``opt_state`` (chains, MultiSteps, apply_if_finite,
  inject_hyperparams and any other nesting of pytrees).

  Raises:
    ValueError: ``opt_state`` holds no sparsity-method state, or more than one.
  """
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_method_state)
           if is_method_state(x)]
  if len(found) != 1:
    names = ", ".join(t.__name__ for t in _STATE_TYPES)
    raise ValueError(
        f"opt_state must hold exactly one sparsity-method state ({names}); found {len(found)}. "
        "Put one optg_jax transformation in the chain and pass the chain's state.")
  return found[0]


def effective_params(params: PyTree, opt_state: Any) -> PyTree:
  """The weights the forward pass uses: ``W ⊙ M`` for mask methods (see each method's docs)."""
  state = find_state(opt_state)
  return _STATE_TYPES[type(state)](params, state)


def get_masks(opt_state: Any) -> PyTree:
  """The current bool masks (the params' treedef; scalar ``True`` at non-prunable leaves)."""
  return find_state(opt_state).masks


def is_prunable_tree(per_leaf: PyTree) -> PyTree:
  """Bools from a tree that holds arrays at prunable leaves and ``None`` elsewhere."""
  return jax.tree.map(lambda x: x is not None, per_leaf, is_leaf=lambda x: x is None)


def map_prunable(fn: Callable[..., Any], per_leaf: PyTree, *rest: PyTree) -> PyTree:
  """``fn`` over the prunable leaves of ``per_leaf`` (``None`` elsewhere stays ``None``); ``rest``
  are trees with the params' structure, or other per-leaf trees."""
  return jax.tree.map(lambda x, *r: None if x is None else fn(x, *r), per_leaf, *rest,
                      is_leaf=lambda x: x is None)


def only_prunable(prunable: PyTree, tree: PyTree) -> PyTree:
  """``tree`` with ``None`` at the non-prunable leaves."""
  return jax.tree.map(lambda keep, x: x if keep else None, prunable, tree)


def mask_gradients(grads: PyTree, masks: PyTree) -> PyTree:
  """``G ⊙ M``: pruned entries get exactly zero loss gradient; other leaves pass unchanged."""
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, masks)


def require_params(params: Any, method: str) -> None:
  if params is None:
    raise ValueError(f"{method} needs the params: call tx.update(grads, opt_state, params)")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Where and how a method keeps its top scores.

  Attributes:
    distribution: ``'global'`` (one pool over all prunable leaves), ``'uniform'`` or ``'erk'``
      (per-leaf pools with the sparsity of :mod:`optg_jax.distributions`).
    exclude: path regexes never pruned (see :func:`optg_jax.masks.prunable_tree`).
    filter_fn: ``(path_str, leaf) -> bool`` replacing the default kernel filter.
    layer_axes: leading layer axis of stacked kernels (an int or path regex → int), pruned per
      layer in per-leaf distributions.
    overrides: path regex → sparsity for per-leaf distributions.
  """
  distribution: str = "global"
  exclude: tuple[str, ...] = ()
  filter_fn: Callable[[str, Any], bool] | None = None
  layer_axes: int | Mapping[str, int] | None = None
  overrides: Mapping[str, float] | None = None

  def __post_init__(self):
    if self.distribution not in distributions.DISTRIBUTIONS:
      raise ValueError(f"distribution must be one of {distributions.DISTRIBUTIONS}, "
                       f"got {self.distribution!r}")
    object.__setattr__(self, "exclude", tuple(_as_tuple(self.exclude)))

  def prunable(self, params: PyTree) -> PyTree:
    return masks_lib.prunable_tree(params, exclude=self.exclude, filter_fn=self.filter_fn)

  def masks(self, scores: PyTree, params: PyTree, fraction: Any, final_sparsity: float) -> PyTree:
    """Top-k masks of ``scores`` at ``fraction`` (maybe traced) of the way to ``final_sparsity``.

    Per-leaf targets are solved once at the final sparsity and each is scaled by ``fraction``,
    as gradual schedules do per layer; at ``fraction >= 1`` the counts are exact for the Python
    float targets (see :class:`optg_jax.masks.ScaledSparsity`).
    """
    prunable = self.prunable(params)
    if self.distribution == "global":
      return masks_lib.global_masks(scores, prunable,
                                    masks_lib.ScaledSparsity(final_sparsity, fraction))
    axes = masks_lib.layer_axis_tree(params, prunable, self.layer_axes)
    shapes = jax.tree.map(
        lambda keep, p, axis: _layer_shape(p, axis) if keep else None, prunable, params, axes,
        is_leaf=lambda x: x is None)
    finals = distributions.layer_sparsities(self.distribution, shapes, final_sparsity,
                                            overrides=self.overrides)
    per_leaf = jax.tree.map(lambda s: masks_lib.ScaledSparsity(s, fraction), finals)
    return masks_lib.layerwise_masks(scores, prunable, per_leaf, axes)


def _layer_shape(leaf: Any, axis: int | None) -> jax.ShapeDtypeStruct:
  shape = np.shape(leaf)
  if axis is not None:
    shape = shape[:axis] + shape[axis + 1:]
  return jax.ShapeDtypeStruct(shape, jnp.result_type(leaf))


def _as_tuple(x: str | Iterable[str]) -> tuple[str, ...]:
  return (x,) if isinstance(x, str) else tuple(x)
