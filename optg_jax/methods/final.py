"""The masks of the final model, and an optimizer state that carries other masks.

OptG's reference evaluates the trained network with the mask taken from the final scores at the
full target sparsity ``P``; its last scheduled refresh happened at the start of the last epoch,
at ``p_{E-1} ≤ P``. The score-based baselines already hold their final mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from optg_jax import _checks
from optg_jax import masks as masks_lib
from optg_jax.methods import base
from optg_jax.methods import optg

PyTree = Any


def final_masks(
    params: PyTree,
    opt_state: Any,
    sparsity: float,
    *,
    distribution: str = "global",
    exclude: tuple[str, ...] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    overrides: Mapping[str, float] | None = None,
) -> PyTree:
  """The bool masks of the final model (the params' treedef).

  * OptG (:class:`~optg_jax.methods.optg.MaskOptimizerState` in ``opt_state``): exact top-k of
    the current scores at ``sparsity``, selected as ``mask_optimizer`` selects (pass it the same
    ``distribution``, ``exclude``, ``filter_fn``, ``layer_axes`` and ``overrides``).
  * Any other sparsity method: its current masks (``og.get_masks``); ``sparsity`` is unused.
  * No sparsity method in the chain (dense training): all-keep masks of the default prunable
    leaves.

  Works inside ``jax.jit`` (``sparsity`` and the selection options are static).
  """
  if not base.has_state(opt_state):
    return masks_lib.all_keep(params, masks_lib.prunable_tree(params, exclude=exclude,
                                                              filter_fn=filter_fn))
  state = base.find_state(opt_state)
  if not isinstance(state, optg.MaskOptimizerState):
    return state.masks
  final = _checks.sparsity(sparsity)
  selection = base.Selection(distribution, exclude, filter_fn, layer_axes, overrides)
  return selection.masks(state.scores, params, 1.0, final)  # all the way to the target


def with_masks(opt_state: Any, masks: PyTree) -> Any:
  """``opt_state`` with its sparsity method's masks replaced by ``masks`` (everything else kept),
  so that ``og.effective_params`` and the eval step use them.

  Raises:
    ValueError: ``opt_state`` holds no sparsity-method state, or more than one.
  """
  base.find_state(opt_state)
  is_state = base.is_method_state
  return jax.tree.map(lambda x: x._replace(masks=masks) if is_state(x) else x, opt_state,
                      is_leaf=is_state)
