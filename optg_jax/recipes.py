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
import warnings

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
  """A registered method.

  Attributes:
    builder: see :class:`RecipeBuilder`.
    frozen_weights: the method is the whole chain (it trains masks over frozen weights: no
      weight decay or SGD follows it).
    init_params: ``(params, key, **options) -> params``, the weights the method needs (e.g. the
      signed supermask's ELUS constants), or ``None`` to keep the model's init.
    builds_chain: the method owns the weights' optimizer (methods with rounds or phases): its
      builder also gets ``weight_decay=`` and ``momentum=`` and returns the whole chain.
    total_epochs: ``(sparsity, epochs, **options) -> epochs of the whole run`` for methods that
      train in rounds or phases (``epochs`` is then the length of one round); ``None``:
      ``epochs``.
  """
  builder: RecipeBuilder
  frozen_weights: bool = False
  init_params: Callable[..., Any] | None = None
  builds_chain: bool = False
  total_epochs: Callable[..., int] | None = None


_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, builder: RecipeBuilder, *, frozen_weights: bool = False,
                    init_params: Callable[..., Any] | None = None, builds_chain: bool = False,
                    total_epochs: Callable[..., int] | None = None) -> RecipeBuilder:
  """Registers ``builder`` as the recipe of method ``name`` (replacing one of that name).

  Args:
    name: the method's name in the main job (``--method``).
    builder: see :class:`RecipeBuilder`.
    frozen_weights: the method's transformation is the whole chain (see :class:`Recipe`).
    init_params: ``(params, key, **options) -> params`` re-initialising the weights.
    builds_chain, total_epochs: see :class:`Recipe`.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"name must be a non-empty string, got {name!r}")
  if not callable(builder):
    raise TypeError(f"builder of {name!r} must be callable, got {builder!r}")
  _RECIPES[name] = Recipe(builder, frozen_weights, init_params, builds_chain, total_epochs)
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


def total_epochs(method: str, sparsity: float, epochs: int, **options: Any) -> int:
  """Epochs of a whole run of ``method`` with rounds of ``epochs`` (``epochs`` for methods
  without rounds)."""
  recipe = get_recipe(method)
  if recipe.total_epochs is None:
    return epochs
  return recipe.total_epochs(sparsity, epochs, **options)


def init_params(method: str, params: Any, seed: int, **options: Any) -> Any:
  """``params`` as ``method`` needs them: re-initialised by its recipe (from
  ``jax.random.key(seed + 1)``), or unchanged."""
  recipe = get_recipe(method)
  if recipe.init_params is None:
    return params
  return recipe.init_params(params, jax.random.key(seed + 1), **options)


def scaled_warmup(epochs: int, warmup_epochs: int = 5) -> int:
  """The warm-up epochs of a run of ``epochs``: ``min(warmup_epochs, epochs // 2)``."""
  return min(warmup_epochs, epochs // 2)


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
  warmup = scaled_warmup(epochs, warmup_epochs) if scale_warmup else warmup_epochs

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
  chain = {"weight_decay": weight_decay, "momentum": momentum} if recipe.builds_chain else {}
  head = recipe.builder(sparsity, learning_rate=lr, steps_per_epoch=steps_per_epoch,
                        epochs=epochs, seed=seed, **chain, **method_kwargs)
  if recipe.frozen_weights or recipe.builds_chain:
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


def _weights_sgd(learning_rate, weight_decay, momentum, nesterov=False):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum, nesterov=nesterov))


def lottery_levels(sparsity: float, rate: float = 0.2, levels: int | None = None) -> int:
  """IMP's levels: ``levels`` where given, else the fewest whose sparsity ``1 − (1 − rate)^L``
  reaches ``sparsity``."""
  if levels is not None:
    return levels
  levels = 0
  while 1.0 - (1.0 - rate) ** levels < sparsity - 1e-12:
    levels += 1
  return levels


def _lottery(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, weight_decay, momentum,
             rewind_epoch=0, rate=0.2, levels=None, **options):
  """IMP with rewinding: ``levels`` (default: the fewest reaching ``sparsity``) prunings of
  ``rate`` of the survivors, each level a training of ``epochs`` (from ``rewind_epoch`` after a
  rewind) on the job's schedule resumed at the rewind step."""
  del seed
  return og.lottery_ticket(lottery_levels(sparsity, rate, levels), epochs * steps_per_epoch,
                           _weights_sgd(learning_rate, weight_decay, momentum),
                           rewind_step=rewind_epoch * steps_per_epoch, rate=rate, **options)


def _lottery_epochs(sparsity, epochs, *, rewind_epoch=0, rate=0.2, levels=None, **unused):
  del unused
  return og.methods.lottery.total_steps(lottery_levels(sparsity, rate, levels), epochs,
                                        rewind_epoch)


def _continuous_sparsification(sparsity, *, learning_rate, steps_per_epoch, epochs, seed,
                               weight_decay, momentum, layers="reference", rewind_epoch=2,
                               **options):
  """Savarese et al.'s config: weights and logits on SGD with Nesterov momentum on the job's
  schedule, restarted each round; ``layers='reference'`` masks spatial convs, ``'all'`` every
  kernel (models without convs); ``rewind_epoch`` is clipped to ``E − 1`` for rounds shorter
  than 3 epochs. No sparsity target (``sparsity`` is not used)."""
  del sparsity, seed
  if layers not in ("reference", "all"):
    raise ValueError(f"layers must be 'reference' or 'all', got {layers!r}")
  filter_fn = og.methods.continuous_sparsification.spatial_convs if layers == "reference" else None
  return og.continuous_sparsification(
      _weights_sgd(learning_rate, weight_decay, momentum, nesterov=True), steps_per_epoch, epochs,
      logit_optimizer=optax.sgd(learning_rate, momentum, nesterov=True), filter_fn=filter_fn,
      rewind_epoch=min(rewind_epoch, epochs - 1), **options)


def _cs_epochs(sparsity, epochs, *, num_rounds=3, ticket=True, ticket_epochs=None,
               **unused):
  del sparsity, unused
  return og.methods.continuous_sparsification.total_epochs(epochs, num_rounds, ticket,
                                                           ticket_epochs)


def _rst_extrusion_epochs(epochs: int, extrusion_epochs: int | None) -> int:
  return max(1, -(-epochs // 2)) if extrusion_epochs is None else extrusion_epochs


def rst_extrusion(steps: int, *, cycles: int = 1, extrusion_lr: float = 1e-3,
                  extrusion_dose: float | str | None = "reference",
                  upper_limit: float = 1.0, max_rate: float = 1.0) -> dict[str, Any]:
  """``og.rst``'s extrusion fitted into ``steps``: per cycle, ``λ`` rises every step over the
  first half and is held for the second (``granularity``, ``interval``, ``upper_limit``,
  ``stabilize``).

  ``extrusion_dose``: ``'reference'`` scales ``λ`` so that ``Σ_t lr·λ_t`` per cycle equals the
  reference's 65.0 (``λ += 1e-4`` every 5 steps to 1, held 40,000 steps, at lr 1e-3;
  :func:`optg_jax.methods.rst.extrusion_dose`): the weights to remove shrink by about
  ``e^−65`` in any budget, where a limit of 1 over a few hundred steps leaves them at ~80 % of
  their size. A number sets the dose; ``None`` keeps ``λ`` rising to ``upper_limit``.

  ``max_rate`` caps the shrink rate of one step, ``extrusion_lr·λ`` (a deviation from the
  reference, which never comes near it): gradient descent on ``λ‖w‖²/2`` diverges once
  ``lr·λ > 2`` (``2(1+μ)`` with momentum μ), which a dose fitted into a few dozen steps would
  pass. A capped dose is smaller than asked, with a warning.
  """
  per_cycle = steps // cycles
  ramp = max(per_cycle // 2, 1)
  if extrusion_dose is not None:
    dose = (og.methods.rst.extrusion_dose(1e-3) if extrusion_dose == "reference"
            else float(extrusion_dose))
    per_unit = og.methods.rst.extrusion_dose(  # Σ_t λ_t at η = 1, the same ramp and hold
        1.0, granularity=1.0, interval=1, upper_limit=ramp - 0.5, stabilize=per_cycle - ramp)
    upper_limit = dose / (extrusion_lr * per_unit) * (ramp - 0.5)
    if extrusion_lr * upper_limit > max_rate:
      warnings.warn(f"rst_extrusion: the dose {dose:g} in {per_cycle} steps needs lr·λ = "
                    f"{extrusion_lr * upper_limit:.3g} per step, capped at max_rate = "
                    f"{max_rate:g} (a step beyond 2 diverges); give more extrusion steps for "
                    "the full dose", stacklevel=2)
      upper_limit = max_rate / extrusion_lr
  return {"granularity": upper_limit / (ramp - 0.5), "interval": 1, "upper_limit": upper_limit,
          "stabilize": per_cycle - ramp}


def _rst(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, weight_decay, momentum,
         extrusion_epochs=None, extrusion_lr=1e-3, extrusion_dose="reference", upper_limit=1.0,
         cycles=1, **options):
  """Bai et al.'s RST fitted to the budget: ``extrusion_epochs`` (default ``ceil(E/2)``) of
  extrusion at ``extrusion_lr`` (:func:`rst_extrusion`), then the mask and ``E`` epochs of
  finetuning on the job's schedule."""
  steps = _rst_extrusion_epochs(epochs, extrusion_epochs) * steps_per_epoch
  timing = rst_extrusion(steps, cycles=cycles, extrusion_lr=extrusion_lr,
                         extrusion_dose=extrusion_dose, upper_limit=upper_limit)
  head = og.rst(sparsity, cycles=cycles, seed=seed, **timing, **options)
  extruded = og.methods.rst.phases(cycles=cycles, **timing).extrusion_steps
  lr = optax.join_schedules([optax.constant_schedule(extrusion_lr), learning_rate], [extruded])
  return optax.chain(head, _weights_sgd(lr, weight_decay, momentum))


def _rst_epochs(sparsity, epochs, *, extrusion_epochs=None, **unused):
  del sparsity, unused
  return epochs + _rst_extrusion_epochs(epochs, extrusion_epochs)


register_recipe("lottery_ticket", _lottery, builds_chain=True, total_epochs=_lottery_epochs)
register_recipe("continuous_sparsification", _continuous_sparsification, builds_chain=True,
                total_epochs=_cs_epochs)
register_recipe("rst", _rst, builds_chain=True, total_epochs=_rst_epochs)
