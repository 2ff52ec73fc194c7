"""Signed Supermask (Koster, Grothe, Rettinger, ICLR 2022): keep, hide or invert frozen weights.

The weights stay frozen at their signed-constant ELUS init (``og.initializers.elus``). Each
masked kernel has a real mask ``M`` (Xavier-uniform init with TensorFlow fans); the forward pass
uses ``W ⊙ sign(M)·[|M| > τ_l]``, ``τ_l = q·max|M_l(0)|`` fixed at init, and the identity
straight-through gradient ``dL/dM = G ⊙ W`` trains ``M`` by SGDW (Nesterov momentum 0.9, decoupled
weight decay). There is no sparsity target: the decay shrinks ``|M|`` below ``τ`` and the
fraction of weights remaining is reported (``og.sparsity_summary(og.get_masks(opt_state))``).
Reference: github.com/kosnil/signed_supermasks at 53c6320; SPEC §5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optg_jax import _checks
from optg_jax import initializers
from optg_jax import optimizers
from optg_jax.methods import base
from optg_jax.methods import scores as scores_lib
from optg_jax.methods.selection import Selection

PyTree = Any


def signed_supermask(
    learning_rate: optax.ScalarOrSchedule = 0.05,
    weight_decay: optax.ScalarOrSchedule = 5e-4,
    steps_per_epoch: int | None = None,
    *,
    threshold: float = 0.4,
    momentum: float = 0.9,
    nesterov: bool = True,
    seed: int = 0,
    exclude: Iterable[str] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
) -> optax.GradientTransformation:
  """The signed supermask as an optax transformation; use it alone (the weights are frozen).

  ::

    params = og.initializers.elus(params, jax.random.key(0))        # ±√(3/fan_in)
    tx = og.signed_supermask(0.05, 5e-4, steps_per_epoch=spe)       # FCN / Conv2-8 reference

  Args:
    learning_rate: the masks' learning rate; a float is decayed as ``0.9^(t/(10·spe))`` when
      ``steps_per_epoch`` is given (the reference), else constant; or any optax schedule.
    weight_decay: the decoupled decay ``M ← M − λ_t·M``, decayed like ``learning_rate``.
    steps_per_epoch: ``spe`` of the exponential decay.
    threshold: ``q`` of ``τ_l = q·max|M_l(0)|``: 0.4 (FCN, Conv2-8), 0.75 (ResNet-20), 0.8
      (ResNet-56).
    momentum, nesterov: of the SGDW (:func:`optg_jax.optimizers.sgdw`).
    seed: seed of the masks' Xavier-uniform init.
    exclude, filter_fn: which kernels are masked (default: all, first and last included).

  Returns:
    A :func:`~optg_jax.methods.scores.trainable_scores` transformation that hands ``-0.0`` down
    the chain: nothing that turns a zero update into a non-zero one (weight decay, Adam's bias)
    may follow it. Its masks are int8 in {-1, 0, +1}; ``og.get_masks`` gives their support.
  """
  for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
    if not callable(value):
      _checks.number(value, name)
  if steps_per_epoch is not None:
    _checks.number(steps_per_epoch, "steps_per_epoch", integer=True, traced=False)
  _checks.number(threshold, "threshold")
  _checks.number(momentum, "momentum")
  _checks.number(seed, "seed", integer=True)
  selection = Selection("uniform", tuple(exclude), filter_fn)
  lr = _decayed(learning_rate, steps_per_epoch)
  wd = _decayed(weight_decay, steps_per_epoch)

  return scores_lib.trainable_scores(
      scores_lib.random_scores(seed, initializers.xavier_uniform_init, selection),
      optimizers.sgdw(lr, wd, momentum, nesterov), scores_lib.ternary_masks,
      selection=selection, train_weights=False,
      init_aux=scores_lib.max_fraction_thresholds(threshold))


def inverted_fraction(opt_state: Any) -> jax.Array:
  """The fraction of masked weights the signed supermask inverts (mask −1), float32."""
  masks = [m for m in jax.tree.leaves(base.find_state(opt_state).masks) if jnp.ndim(m)]
  inverted = sum(jnp.sum(m < 0, dtype=jnp.int32) for m in masks)
  return inverted.astype(jnp.float32) / sum(m.size for m in masks)


def _decayed(value: optax.ScalarOrSchedule, steps_per_epoch: int | None):
  if callable(value) or steps_per_epoch is None:
    return value
  return optax.exponential_decay(value, 10 * steps_per_epoch, 0.9)
