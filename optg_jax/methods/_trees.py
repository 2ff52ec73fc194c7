"""Trees that hold arrays at the prunable leaves and ``None`` elsewhere (scores, logits, aux)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _is_none(x: Any) -> bool:
  return x is None


def map_prunable(fn: Callable[..., Any], per_leaf: PyTree, *rest: PyTree) -> PyTree:
  """``fn`` over the prunable leaves of ``per_leaf`` (``None`` elsewhere stays ``None``); ``rest``
  are trees with the params' structure, or other per-leaf trees."""
  return jax.tree.map(lambda x, *r: None if x is None else fn(x, *r), per_leaf, *rest,
                      is_leaf=_is_none)


def only_prunable(prunable: PyTree, tree: PyTree) -> PyTree:
  """``tree`` with ``None`` at the non-prunable leaves."""
  return jax.tree.map(lambda keep, x: x if keep else None, prunable, tree)


def zeros(params: PyTree, prunable: PyTree) -> PyTree:
  """float32 zeros shaped like each prunable leaf, ``None`` elsewhere."""
  return jax.tree.map(lambda keep, p: jnp.zeros(jnp.shape(p), jnp.float32) if keep else None,
                      prunable, params)


def fill_true(per_leaf: PyTree, params: PyTree) -> PyTree:
  """A mask tree: ``per_leaf``'s arrays at the prunable leaves, a scalar ``True`` elsewhere."""
  return jax.tree.map(lambda m, p: jnp.array(True) if m is None else m, per_leaf, params,
                      is_leaf=_is_none)


def require_params(params: Any, method: str) -> None:
  if params is None:
    raise ValueError(f"{method} needs the params: call tx.update(grads, opt_state, params)")
