"""The state protocol: how any method's optimizer state gives its effective params and masks.

Every sparsity method keeps what it learns in its optax state, a ``NamedTuple`` registered here
with :func:`register_state`. The registration says how that state gives

* ``effective_params(state, params)``: the weights the forward pass uses (``W ⊙ M`` by default);
* ``masks(state)``: the current bool masks, the params' treedef (``state.masks`` by default);
* ``final_masks(state, params, sparsity)``: the masks of the final model (by default the current
  masks, refusing a ``sparsity`` they were not selected at);
* ``with_masks(state, masks)``: the state with other masks (by default ``_replace(masks=...)``).

:func:`effective_params`, :func:`get_masks`, :func:`final_masks` and :func:`with_masks` find the
one registered state anywhere inside an optax chain (``MultiSteps``, ``apply_if_finite``,
``inject_hyperparams``, any nesting of pytrees); subclasses of a registered type are found too.
Registering a method of one's own takes one call::

  class MyState(NamedTuple):
    count: jax.Array
    masks: Any

  og.register_state(MyState)   # W ⊙ state.masks, state.masks, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import _checks
from optg_jax import _paths
from optg_jax import masks as masks_lib

PyTree = Any


def masked(tree: PyTree, masks: PyTree) -> PyTree:
  """``tree ⊙ masks`` without checks: bool masks zero the pruned entries exactly (``W ⊙ M``,
  ``G ⊙ M``); real or signed multipliers (soft and ternary masks) multiply."""
  return jax.tree.map(
      lambda p, m: (jnp.where(m, p, jnp.zeros((), jnp.result_type(p)))
                    if jnp.result_type(m) == jnp.bool_ else p * m.astype(jnp.result_type(p))),
      tree, masks)


def _default_final_masks(state: Any, params: PyTree, sparsity: float | None) -> PyTree:
  """The current masks; a ``sparsity`` other than the one the state records is refused."""
  del params
  target = getattr(state, "target", None)
  if sparsity is not None and sparsity != target:
    raise ValueError(
        f"final_masks: this method's final masks are its current masks, selected at sparsity "
        f"{target}; it cannot select them again at sparsity={sparsity} (omit the argument)")
  return state.masks


@dataclasses.dataclass(frozen=True)
class StateProtocol:
  """How a registered state type gives its effective params and masks (see module doc)."""
  effective_params: Callable[[Any, PyTree], PyTree]
  masks: Callable[[Any], PyTree]
  final_masks: Callable[[Any, PyTree, float | None], PyTree]
  with_masks: Callable[[Any, PyTree], Any]


_PROTOCOLS: dict[type, StateProtocol] = {}


def register_state(
    state_type: type,
    *,
    effective_params: Callable[[Any, PyTree], PyTree] | None = None,
    masks: Callable[[Any], PyTree] | None = None,
    final_masks: Callable[[Any, PyTree, float | None], PyTree] | None = None,
    with_masks: Callable[[Any, PyTree], Any] | None = None,
) -> type:
  """Declares ``state_type`` (a ``NamedTuple``) the state of a sparsity method.

  Args:
    state_type: the class; its subclasses are found too.
    effective_params: ``(state, params) -> weights of the forward pass``; default
      ``params ⊙ state.masks`` (bool masks zero, signed or real ones multiply).
    masks: ``state -> bool masks`` (the params' treedef); default ``state.masks``.
    final_masks: ``(state, params, sparsity or None) -> bool masks of the final model``; default
      the current masks, with a ``sparsity`` other than ``state.target`` (if any) refused.
    with_masks: ``(state, masks) -> state``; default ``state._replace(masks=masks)``.

  Returns:
    ``state_type``, so that it can decorate the class.
  """
  get = masks or (lambda state: state.masks)
  _PROTOCOLS[state_type] = StateProtocol(
      effective_params=effective_params or (lambda state, params: masked(params, state.masks)),
      masks=get,
      final_masks=final_masks or _default_final_masks,
      with_masks=with_masks or (lambda state, new: state._replace(masks=new)))
  return state_type


def protocol(x: Any) -> StateProtocol | None:
  """The protocol of ``x``'s type or of its nearest registered base class, else ``None``."""
  for cls in type(x).__mro__:
    if cls in _PROTOCOLS:
      return _PROTOCOLS[cls]
  return None


def is_method_state(x: Any) -> bool:
  """Whether ``x`` is the state of a registered sparsity method."""
  return protocol(x) is not None


def _states(opt_state: Any) -> list[Any]:
  leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=is_method_state)
  return [x for x in leaves if is_method_state(x)]


def has_state(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a sparsity-method state anywhere (``False``: dense training)."""
  return bool(_states(opt_state))


def find_state(opt_state: Any) -> Any:
  """The one sparsity-method state inside ``opt_state``.

  Raises:
    ValueError: ``opt_state`` holds no sparsity-method state, or more than one.
  """
  found = _states(opt_state)
  if len(found) != 1:
    names = ", ".join(t.__name__ for t in _PROTOCOLS)
    raise ValueError(
        f"opt_state must hold exactly one sparsity-method state ({names}); found {len(found)}. "
        "Put one optg_jax transformation in the chain and pass the chain's state.")
  return found[0]


def effective_params(params: PyTree, opt_state: Any) -> PyTree:
  """The weights the forward pass uses: ``W ⊙ M`` for mask methods (see each method's docs);
  ``params`` themselves for a chain without a sparsity method (dense training)."""
  if not has_state(opt_state):
    return params
  state = find_state(opt_state)
  return protocol(state).effective_params(state, params)


def get_masks(opt_state: Any, params: PyTree = None) -> PyTree:
  """The current bool masks (the params' treedef; scalar ``True`` at non-prunable leaves).

  For a chain without a sparsity method (dense training) the all-keep masks of ``params``'
  default prunable leaves, which then must be given (the state alone does not know the params'
  structure).

  Raises:
    ValueError: more than one sparsity-method state; no method state and no ``params``.
  """
  if not has_state(opt_state):
    if params is None:
      raise ValueError("get_masks: opt_state holds no sparsity method (dense training); pass "
                       "params=... to get its all-keep masks")
    return masks_lib.all_keep(params, masks_lib.prunable_tree(params))
  state = find_state(opt_state)
  return protocol(state).masks(state)


def final_masks(params: PyTree, opt_state: Any, sparsity: float | None = None) -> PyTree:
  """The bool masks of the final model (the params' treedef).

  The method's state knows how it selects: OptG keeps the mask its last step trained with once
  that mask is at the target (``final='trained'``), else takes the top-k of its final scores at
  the full target with the ``distribution``, ``exclude``, ``layer_axes`` and ``selection_rule``
  it was built with (exactly ``k`` by default; ties kept with ``selection_rule='reference'``); the
  pruning baselines and the methods with rounds hold their final mask already (Continuous
  Sparsification: its ticket ``[s > 0]``). Works inside ``jax.jit`` (``sparsity`` static).

  Args:
    params: the trained params.
    opt_state: the optimizer state (a chain holding one sparsity method), or the state of a
      chain without any (dense training: all-keep masks of the default prunable leaves).
    sparsity: ``None`` for the method's own target. OptG selects again at this sparsity; a
      method that cannot (a pruning baseline, dense training) refuses any value other than its
      own target (0 for dense training).

  Raises:
    ValueError: ``sparsity`` outside [0, 1), or one the method cannot select at.
  """
  if sparsity is not None:
    sparsity = _checks.sparsity(sparsity)
  if not has_state(opt_state):
    if sparsity:
      raise ValueError(f"final_masks: opt_state holds no sparsity method (dense training); "
                       f"it has no masks at sparsity={sparsity}")
    return get_masks(opt_state, params)
  state = find_state(opt_state)
  return protocol(state).final_masks(state, params, sparsity)


def final_params(params: PyTree, opt_state: Any, masks: PyTree | None = None) -> PyTree:
  """The weights a run ships: the final model's effective weights ``⊙ M``.

  ``M`` is ``masks`` or :func:`final_masks`; the effective weights are those the forward pass
  would use with ``M`` installed (:func:`with_masks`, then :func:`effective_params`), so every
  method's own folding is in: ``W ⊙ M`` for mask methods, ``W ⊙ S`` for the signed supermask
  (its signs), ``W ⊙ [s > 0]/σ(s0)`` for Continuous Sparsification's ticket (its scale). Pruned
  entries are exactly ``+0.0``. Evaluate the model on these params alone (no ``opt_state``);
  ``og.export.compact_params`` stores them. For a chain without a sparsity method: ``params``.
  Works inside ``jax.jit``.

  Args:
    params: the trained params.
    opt_state: the optimizer state of the chain.
    masks: bool masks of the params' treedef (e.g. ``og.final_masks(params, opt_state, 0.9)``);
      default :func:`final_masks`.
  """
  if masks is None:
    masks = final_masks(params, opt_state)
  if has_state(opt_state):
    params = effective_params(params, with_masks(opt_state, masks))
  return masks_lib.apply_masks(params, masks)


def with_masks(opt_state: Any, masks: PyTree) -> Any:
  """``opt_state`` with its sparsity method's masks replaced by ``masks`` (everything else kept),
  so that :func:`effective_params` and an eval step use them.

  Args:
    opt_state: a state holding one sparsity method.
    masks: bool masks with the treedef, shapes and dtypes of the current ones (e.g. from
      :func:`final_masks` or an earlier :func:`get_masks`).

  Raises:
    ValueError: ``opt_state`` holds no sparsity-method state, or more than one; ``masks`` of
      another structure or shape (the message names the path).
    TypeError: a mask leaf that is not bool (the message names the path).
  """
  state = find_state(opt_state)
  spec = protocol(state)
  _check_like(masks, spec.masks(state))
  return jax.tree.map(lambda x: spec.with_masks(x, masks) if is_method_state(x) else x, opt_state,
                      is_leaf=is_method_state)


def _check_like(masks: PyTree, current: PyTree) -> None:
  want = jax.tree_util.tree_structure(current)
  got = jax.tree_util.tree_structure(masks)
  if want != got:
    raise ValueError(f"with_masks: masks differ in structure from the current masks:\n"
                     f"  current: {want}\n  given:   {got}")

  def check(path, new, old):
    name = _paths.path_str(path)
    if jnp.result_type(new) != jnp.bool_:
      raise TypeError(f"with_masks: mask leaf {name!r} has dtype {jnp.result_type(new)}, "
                      "expected bool")
    if np.shape(new) != np.shape(old):
      raise ValueError(f"with_masks: mask leaf {name!r} has shape {np.shape(new)}, expected "
                       f"{np.shape(old)}")

  jax.tree_util.tree_map_with_path(check, masks, current)
