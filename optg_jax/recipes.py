"""Reference optimizer chains: each method wrapped as its authors train it, for any model.

``make_optimizer('optg', 0.98, steps_per_epoch=40, epochs=20)`` returns the chain of the design's
one train step: the method's transformation first, then weight decay on every entry of the
dense weights, then SGD with momentum, all on the per-epoch warm-up + cosine learning rate of
the OptG code.

The method part comes from a registry of *recipes*, name -> builder, so a new method is one
:func:`register_recipe` call, not a new branch::

  def my_method(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, **options):
    return og.magnitude(sparsity, **options)

  recipes.register_recipe("my_method", my_method)
  tx = recipes.make_optimizer("my_method", 0.9, steps_per_epoch=100, epochs=10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

import optg_jax as og


class RecipeBuilder(Protocol):
  """Builds a method's transformation (the head of the chain).

  Called as ``builder(sparsity, learning_rate=schedule, steps_per_epoch=..., epochs=...,
  seed=..., **options)``: ``learning_rate`` is the weights' schedule (OptG ties its score rate
  to it), ``options`` the method's own keyword arguments (``distribution=``, ...).
  """

  def __call__(self, sparsity: float, *, learning_rate: optax.Schedule, steps_per_epoch: int,
               epochs: int, seed: int, **options: Any) -> optax.GradientTransformation:
    ...


class Recipe(NamedTuple):
  """A registered method: its ``builder``; ``frozen_weights``: the method is the whole chain (it
  trains masks over frozen weights: no weight decay or SGD follows it); ``init_params``:
  ``(params, key, **options) -> params``, the weights the method needs (e.g. the signed
  supermask's ELUS constants), or ``None`` to keep the model's init."""
  builder: RecipeBuilder
  frozen_weights: bool = False
  init_params: Callable[..., Any] | None = None


_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, builder: RecipeBuilder, *, frozen_weights: bool = False,
                    init_params: Callable[..., Any] | None = None) -> RecipeBuilder:
  """Registers ``builder`` as the recipe of method ``name`` (replacing one of that name).

  Args:
    name: the method's name in the main job (``--method``).
    builder: see :class:`RecipeBuilder`.
    frozen_weights: the method's transformation is the whole chain (see :class:`Recipe`).
    init_params: ``(params, key, **options) -> params`` re-initialising the weights.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"name must be a non-empty string, got {name!r}")
  if not callable(builder):
    raise TypeError(f"builder of {name!r} must be callable, got {builder!r}")
  _RECIPES[name] = Recipe(builder, frozen_weights, init_params)
  return builder


def names() -> tuple[str, ...]:
  """The registered methods, in registration order (``'dense'`` first)."""
  return tuple(_RECIPES)


def get_recipe(name: str) -> Recipe:
  """The recipe of ``name``.

  Raises:
    ValueError: ``name`` is not registered (the message lists the known ones).
  """
  if name not in _RECIPES:
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(_RECIPES)}")
  return _RECIPES[name]


def init_params(method: str, params: Any, seed: int, **options: Any) -> Any:
  """``params`` as ``method`` needs them: re-initialised by its recipe (from
  ``jax.random.key(seed + 1)``), or unchanged."""
  recipe = get_recipe(method)
  if recipe.init_params is None:
    return params
  return recipe.init_params(params, jax.random.key(seed + 1), **options)


def warmup_cosine_per_epoch(
    learning_rate: float, steps_per_epoch: int, epochs: int, warmup_epochs: int = 5, *,
    scale_warmup: bool = True,
) -> optax.Schedule:
  """OptG's weight learning rate, set once per epoch ``e``: ``lr·(e+1)/W`` during the ``W``
  warm-up epochs, then ``0.5·lr·(1 + cos(π·e/epochs))`` (the cosine is not shifted by the
  warm-up).

  Warm-up scaled to the run (``scale_warmup``): ``W = min(warmup_epochs, epochs // 2)``. The
  warm-up then ends by mid-run, where the unshifted cosine it hands over to still runs at half
  the peak or more (``cos(π·W/epochs) >= 0``), and at least half the run follows the cosine.
  Runs with ``epochs >= 2·warmup_epochs`` are unchanged: the reference (5 of 100 epochs) and
  every run of 10 epochs or more with the default 5. Without it, a run of ``epochs <=
  warmup_epochs`` never leaves the warm-up (a 3-epoch run trains at 0.2, 0.4, 0.6 of the peak);
  scaled, it trains at ``lr`` (``W = 1``: ``lr·1/1``), then on the cosine.

  Args:
    learning_rate: the peak rate ``lr``.
    steps_per_epoch: optimizer steps per epoch (the rate is constant within an epoch).
    epochs: the run's length ``E``.
    warmup_epochs: the warm-up of a long run (5 in the reference).
    scale_warmup: cap the warm-up at ``epochs // 2``; ``False`` keeps ``warmup_epochs`` as is.

  Returns:
    An optax schedule ``step -> lr`` (float32).
  """
  warmup = min(warmup_epochs, epochs // 2) if scale_warmup else warmup_epochs

  def schedule(step):
    e = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    warm = learning_rate * (e + 1) / max(warmup, 1)
    cosine = 0.5 * learning_rate * (1 + jnp.cos(jnp.pi * e / epochs))
    return jnp.where(e < warmup, warm, cosine)

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
    scale_warmup: bool = True,
    seed: int = 0,
    **method_kwargs: Any,
) -> optax.GradientTransformation:
  """The reference chain ``method → add_decayed_weights → sgd(momentum)`` for ``method`` (the
  method alone where its recipe has ``frozen_weights``).

  Weight decay comes after the method, so it acts on every entry of the dense weights (pruned
  ones included, as in OptG's code) while the method's masked gradient ``G ⊙ M`` reaches SGD.

  Args:
    method: a registered recipe (:func:`names`).
    sparsity: target sparsity in [0, 1) (ignored by ``'dense'``).
    steps_per_epoch, epochs: the run's length.
    learning_rate: peak weight learning rate of :func:`warmup_cosine_per_epoch`.
    weight_decay: L2 decay of all weights (pruned entries, biases and norms included, as OptG).
    momentum: SGD momentum of the weights.
    warmup_epochs: linear warm-up epochs of a long run.
    scale_warmup: cap the warm-up at ``epochs // 2`` (:func:`warmup_cosine_per_epoch`).
    seed: seed of ``'random'``.
    **method_kwargs: passed on to the method's transformation (``distribution=``, ...).

  Raises:
    ValueError: unknown method (the message lists them), or a bad argument of the method.
  """
  recipe = get_recipe(method)
  lr = warmup_cosine_per_epoch(learning_rate, steps_per_epoch, epochs, warmup_epochs,
                               scale_warmup=scale_warmup)
  head = recipe.builder(sparsity, learning_rate=lr, steps_per_epoch=steps_per_epoch,
                        epochs=epochs, seed=seed, **method_kwargs)
  if recipe.frozen_weights:
    return head
  return optax.chain(head, optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum))


def _dense(sparsity, **unused) -> optax.GradientTransformation:
  del sparsity, unused
  return optax.identity()


def _optg(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, **options):
  del seed
  return og.mask_optimizer(sparsity, learning_rate, steps_per_epoch, epochs, **options)


def _gmp(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, **options):
  """Zhu & Gupta's window: pruning from 20 % to 70 % of the run, a refresh per epoch."""
  del learning_rate, seed
  begin, end = epochs // 5 * steps_per_epoch, epochs * 7 // 10 * steps_per_epoch
  return og.gmp(sparsity, begin, max(end, begin + 1), steps_per_epoch, **options)


def _one_shot(transform: Callable[..., optax.GradientTransformation]) -> RecipeBuilder:
  def builder(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, **options):
    del learning_rate, steps_per_epoch, epochs, seed
    return transform(sparsity, **options)
  return builder


def _random(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, **options):
  del learning_rate, steps_per_epoch, epochs
  return og.random_pruning(sparsity, seed, **options)


register_recipe("dense", _dense)
register_recipe("optg", _optg)
register_recipe("gmp", _gmp)
register_recipe("magnitude", _one_shot(og.magnitude))
register_recipe("snip", _one_shot(og.snip))
register_recipe("random", _random)


def _signed_supermask(sparsity, *, learning_rate, steps_per_epoch, epochs, seed,
                      score_lr=0.05, score_decay=5e-4, exponential_decay=True, weight_factor=1.5,
                      **options):
  """Koster et al.'s FCN / Conv2-8 config: SGDW lr 0.05, decoupled decay 5e-4, both
  ``×0.9^(t/(10·spe))`` (``exponential_decay=False``: constant), q = 0.4; no sparsity target
  (``sparsity`` is not used)."""
  del sparsity, learning_rate, epochs, weight_factor
  return og.signed_supermask(score_lr, score_decay,
                             steps_per_epoch if exponential_decay else None, seed=seed, **options)


def _edge_popup(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, score_lr=0.1,
                score_decay=1e-4, weights="signed_constant", fan_scale=1.0, **options):
  """Ramanujan et al.'s Conv2-8 config: scores on SGD momentum 0.9, weight decay 1e-4 on the
  scores, per-epoch cosine learning rate from 0.1; ``1 − sparsity`` kept per layer."""
  del learning_rate, weights, fan_scale
  lr = warmup_cosine_per_epoch(score_lr, steps_per_epoch, epochs, warmup_epochs=0)
  return og.edge_popup(sparsity, lr, weight_decay=score_decay, seed=seed, **options)


def _elus(params, key, *, weight_factor=1.5, **unused):
  del unused
  return og.initializers.elus(params, key, factor=weight_factor)


def _edge_popup_weights(params, key, *, weights="signed_constant", fan_scale=1.0, **unused):
  del unused
  inits = {"signed_constant": og.initializers.signed_constant,
           "kaiming_normal": og.initializers.kaiming_normal}
  if weights not in inits:
    raise ValueError(f"weights must be one of {sorted(inits)}, got {weights!r}")
  return inits[weights](params, key, fan_scale)


register_recipe("signed_supermask", _signed_supermask, frozen_weights=True, init_params=_elus)
register_recipe("edge_popup", _edge_popup, frozen_weights=True, init_params=_edge_popup_weights)
