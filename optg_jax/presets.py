"""Reference optimizer chains: each method wrapped as its authors train it, for any model.

``make_optimizer('optg', 0.98, steps_per_epoch=40, epochs=20)`` returns the chain of the design's
one train step: the method's transformation first, then weight decay on every entry of the
dense weights, then SGD with momentum, all on the per-epoch warm-up + cosine learning rate of
the OptG code.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from optg_jax.methods import magnitude
from optg_jax.methods import optg

METHODS = ("dense", "optg", "gmp", "magnitude", "snip", "random")


def warmup_cosine_per_epoch(
    learning_rate: float, steps_per_epoch: int, epochs: int, warmup_epochs: int = 5
) -> optax.Schedule:
  """OptG's weight learning rate, set once per epoch ``e``: ``lr·(e+1)/warmup_epochs`` during
  warm-up, then ``0.5·lr·(1 + cos(π·e/epochs))`` (the cosine is not shifted by the warm-up)."""

  def schedule(step):
    e = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    warm = learning_rate * (e + 1) / max(warmup_epochs, 1)
    cosine = 0.5 * learning_rate * (1 + jnp.cos(jnp.pi * e / epochs))
    return jnp.where(e < warmup_epochs, warm, cosine)

  return schedule


def make_optimizer(
    method: str,
    sparsity: float,
    *,
    steps_per_epoch: int,
    epochs: int,
    learning_rate: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    warmup_epochs: int = 5,
    seed: int = 0,
    **method_kwargs: Any,
) -> optax.GradientTransformation:
  """The reference chain ``method → add_decayed_weights → sgd(momentum)`` for ``method``.

  Args:
    method: one of :data:`METHODS`.
    sparsity: target sparsity in [0, 1) (ignored by ``'dense'``).
    steps_per_epoch, epochs: the run's length.
    learning_rate: peak weight learning rate of :func:`warmup_cosine_per_epoch`.
    weight_decay: L2 decay of all weights (pruned entries, biases and norms included, as OptG).
    momentum: SGD momentum of the weights.
    warmup_epochs: linear warm-up epochs.
    seed: seed of ``'random'``.
    **method_kwargs: passed on to the method's transformation (``distribution=``, ...).

  Raises:
    ValueError: unknown method (the message lists them), or a bad argument of the method.
  """
  lr = warmup_cosine_per_epoch(learning_rate, steps_per_epoch, epochs, warmup_epochs)
  if method == "dense":
    head = optax.identity()
  elif method == "optg":
    head = optg.mask_optimizer(sparsity, lr, steps_per_epoch, epochs, **method_kwargs)
  elif method == "gmp":
    begin, end = epochs // 5 * steps_per_epoch, epochs * 7 // 10 * steps_per_epoch
    head = magnitude.gmp(sparsity, begin, max(end, begin + 1), steps_per_epoch, **method_kwargs)
  elif method == "magnitude":
    head = magnitude.magnitude(sparsity, **method_kwargs)
  elif method == "snip":
    head = magnitude.snip(sparsity, **method_kwargs)
  elif method == "random":
    head = magnitude.random_pruning(sparsity, seed, **method_kwargs)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return optax.chain(head, optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum))
