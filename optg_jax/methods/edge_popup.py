"""edge-popup (Ramanujan, Wortsman, Kembhavi, Farhadi, Rastegari, CVPR 2020): find a subnetwork
of frozen random weights by training a score per weight.

Every masked kernel keeps the top ``k = 1 − sparsity`` fraction of ``|s|``, per layer, first and
last layers included; ``W_eff = W ⊙ M``; the straight-through estimator passes the mask's
gradient to ``|s|``, so ``dL/ds = sign(s) ⊙ W ⊙ G``; the scores (init ``U(±1/√fan_in)``) train by
SGD with momentum 0.9 and weight decay on the scores. The weights stay as initialised
(``og.initializers.kaiming_normal`` or ``og.initializers.signed_constant``).
Reference: github.com/allenai/hidden-networks; SPEC §6.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import optax

from optg_jax import _checks
from optg_jax import initializers
from optg_jax.methods import scores as scores_lib
from optg_jax.methods.selection import Selection


def edge_popup(
    sparsity: float,
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    nesterov: bool = False,
    seed: int = 0,
    distribution: str | Callable[..., Any] = "uniform",
    exclude: Iterable[str] = (),
    filter_fn: Callable[[str, Any], bool] | None = None,
    layer_axes: int | Mapping[str, int] | None = None,
    min_density: float | None = None,
) -> optax.GradientTransformation:
  """edge-popup as an optax transformation; use it alone (the weights are frozen).

  ::

    params = og.initializers.signed_constant(params, jax.random.key(0))   # ±√(2/fan_in)
    tx = og.edge_popup(0.5, optax.cosine_decay_schedule(0.1, total_steps))

  Args:
    sparsity: the fraction of each layer removed, ``1 − k`` for the paper's ``k`` (weights
      kept); exactly ``N − floor(sparsity·N)`` kept per layer, ties by index.
    learning_rate: the scores' learning rate (the reference: per-epoch cosine from 0.1).
    weight_decay: L2 decay of the scores (1e-4 for Conv2-8, 5e-4 for the CIFAR ResNet).
    momentum, nesterov: the scores' SGD momentum (0.9, no Nesterov in the reference).
    seed: seed of the scores' init.
    distribution: ``'uniform'`` (the reference: the same ``k`` in every layer), ``'erk'``,
      ``'global'`` or a callable.
    exclude, filter_fn, layer_axes: which kernels are masked, and stacked layers.
    min_density: with ``'global'``, each layer keeps at least ``ceil(min_density·n_l)`` (see
      :class:`~optg_jax.methods.selection.Selection`); ``None`` or 0: no floor.

  Returns:
    A :func:`~optg_jax.methods.scores.trainable_scores` transformation with bool masks that
    hands ``-0.0`` down the chain (see :func:`optg_jax.signed_supermask`); ``og.final_masks``
    is the top-k of the final ``|s|``.
  """
  sparsity = _checks.sparsity(sparsity)
  if not callable(learning_rate):
    _checks.number(learning_rate, "learning_rate")
  _checks.number(weight_decay, "weight_decay")
  _checks.number(momentum, "momentum")
  _checks.number(seed, "seed", integer=True)
  selection = Selection(distribution, tuple(exclude), filter_fn, layer_axes,
                        min_density=min_density)
  score_optimizer = optax.chain(optax.add_decayed_weights(weight_decay),
                                optax.trace(decay=momentum, nesterov=nesterov),
                                optax.scale_by_learning_rate(learning_rate))

  return scores_lib.trainable_scores(
      scores_lib.random_scores(seed, initializers.kaiming_uniform_init, selection),
      score_optimizer, scores_lib.topk_masks(selection, sparsity, of_magnitude=True), selection=selection,
      train_weights=False, surrogate=jnp.abs,
      final_masks=scores_lib.TopKAtTarget(selection, sparsity, of_magnitude=True))
