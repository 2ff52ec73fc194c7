"""The one train step of the design, and a small in-memory training loop built on it.

``train_step`` takes the gradient at the method's effective weights and lets the optax chain
route it (``og.effective_params``); models with BatchNorm carry ``batch_stats`` alongside.
``fit`` trains on in-memory NumPy arrays such as the embedded ``mnist_5k`` split; the data-set
pipelines of :mod:`optg_jax.data` serve the bigger runs.

An epoch is evaluated with the masks its last forward pass used (:func:`run_epoch`): the last
update of an epoch may already install the next epoch's mask (OptG refreshes at every epoch
boundary), which the weights were never trained with; an epoch that ends a round by rewinding
the weights (a lottery level) is evaluated on the level's weights before the rewind. The final
model is :func:`final_model`: ``og.final_params``, what ``og.export`` ships.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from optg_jax import _extras
from optg_jax import _paths

_extras.require("optg_jax.training", "flax", "flax")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optg_jax as og

PyTree = Any


def has_method(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds the state of a sparsity method (``False`` for dense chains)."""
  return og.has_state(opt_state)


def masks_in_use(opt_state: Any) -> PyTree | None:
  """A copy of the masks the next forward pass uses (``None`` for a dense chain).

  A copy, so that it outlives a step that donates ``opt_state``.
  """
  if not has_method(opt_state):
    return None
  return _copy(og.get_masks(opt_state))


def _copy(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)


def with_masks_in_use(state: TrainState, masks: PyTree | None) -> TrainState:
  """``state`` whose forward pass uses ``masks`` (from :func:`masks_in_use`; ``None``: as is)."""
  if masks is None:
    return state
  return state._replace(opt_state=og.with_masks(state.opt_state, masks))


def final_model(state: TrainState, sparsity: float | None = None
                ) -> tuple[TrainState, PyTree]:
  """The model a run ships and its masks: ``(TrainState, og.final_masks)``.

  The state's params are ``og.final_params`` (the effective weights ⊙ the final masks, every
  method's signs and scales folded in), its optimizer state empty, so that
  :func:`make_eval_step` evaluates exactly what ``og.export`` stores. ``sparsity`` selects the
  masks at another sparsity where the method can (OptG). A dense state keeps its params, with
  all-keep masks. Works inside ``jax.jit`` (``sparsity`` static).
  """
  masks = og.final_masks(state.params, state.opt_state, sparsity)
  params = og.final_params(state.params, state.opt_state, masks)
  return TrainState(params, state.batch_stats, optax.EmptyState(), state.rewind_stats), masks


def phase_of(opt_state: Any) -> dict[str, Any]:
  """Where a method with rounds or phases is (host values, for logs): ``{'round': r}`` for
  ``og.rounds`` methods (0-based), ``{'phase': ..., 'cycle': c}`` for RST, ``{}`` otherwise."""
  if not has_method(opt_state):
    return {}
  state = og.methods.base.find_state(opt_state)
  if isinstance(state, og.methods.rounds.RoundsState):
    return {"round": int(state.round)}
  if isinstance(state, og.methods.rst.RSTState):
    return og.methods.rst.phase(state)
  return {}


def sparsity_of(masks: PyTree | None) -> float:
  """The sparsity of the prunable leaves of ``masks`` (0 for ``None``, a dense chain)."""
  return 0.0 if masks is None else float(og.sparsity_summary(masks).sparsity)


class TrainState(NamedTuple):
  """What a step carries: ``params``, ``batch_stats`` (``{}`` without BatchNorm), ``opt_state``,
  and ``rewind_stats``: the ``batch_stats`` that methods with rewinding (``og.rounds``) restore
  with the weights (see :func:`optg_jax.sync_rewind`; a copy of ``batch_stats`` at init)."""
  params: PyTree
  batch_stats: PyTree
  opt_state: Any
  rewind_stats: PyTree = None


def init(model: nn.Module, tx: optax.GradientTransformation, sample: np.ndarray,
         seed: int, init_params: Callable[[PyTree], PyTree] | None = None) -> TrainState:
  """Initialises the model on ``sample`` (a batch, NHWC) and the optimizer on its params.

  ``init_params`` re-initialises the model's params first (e.g. ``functools.partial(
  recipes.init_params, 'signed_supermask', seed=0)``: the weights a supermask method needs).
  """
  variables = model.init(jax.random.key(seed), sample, train=False)
  params = variables["params"] if init_params is None else init_params(variables["params"])
  batch_stats = variables.get("batch_stats", {})
  return TrainState(params, batch_stats, tx.init(params), batch_stats)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    label_smoothing: float = 0.0, *, skip_nonfinite: bool = False,
                    axis_name: str | None = None
                    ) -> Callable[..., tuple[TrainState, jax.Array]]:
  """``step(state, images, labels) -> (state, loss)``: cross-entropy at the effective weights.

  ``axis_name``: inside ``jax.pmap`` (:func:`optg_jax.parallel.pmapped`), the mapped axis over
  which the gradients, the loss and the BatchNorm statistics are averaged (``lax.pmean``), so
  that every device applies the update of the whole batch. BatchNorm then normalises each
  device's part of the batch with its own moments, as in the Flax ImageNet example.

  ``skip_nonfinite``: a step whose loss or gradients are not finite keeps the ``batch_stats`` it
  started from; wrap ``tx`` in ``optax.apply_if_finite`` so that it keeps the params and the
  optimizer state too (its ``total_notfinite`` counts the skipped steps).
  """

  def loss_fn(w_eff, batch_stats, images, labels):
    variables = {"params": w_eff, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, updates.get("batch_stats", {})

  def step(state, images, labels):
    w_eff = og.effective_params(state.params, state.opt_state)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        w_eff, state.batch_stats, images, labels)
    if axis_name is not None:
      loss, grads, batch_stats = jax.lax.pmean((loss, grads, batch_stats), axis_name)
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & all_finite(grads)
      batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old), batch_stats,
                                 state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params, batch_stats, saved = og.sync_rewind(optax.apply_updates(state.params, updates),
                                                opt_state, batch_stats, state.rewind_stats)
    return TrainState(params, batch_stats, opt_state, saved), loss

  return step


def all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every float leaf of ``tree`` is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def first_nonfinite_leaf(tree: PyTree) -> str | None:
  """The path of the first leaf of ``tree`` (in flattening order) holding a NaN or an infinity,
  or ``None``; reads the tree on the host."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      return _paths.path_str(path)
  return None


def collapsed_layers(masks: PyTree | None) -> list[str]:
  """The paths of the mask leaves that keep no weight (the layer is pruned to 100 %: the
  network is disconnected there); ``[]`` for ``None``."""
  if masks is None:
    return []
  return [name for name, leaf in og.sparsity_summary(masks).leaves.items() if int(leaf.kept) == 0]


def make_eval_step(model: nn.Module) -> Callable[..., jax.Array]:
  """``eval(state, images, labels) -> number correct`` (int32) with the effective weights."""

  def evaluate(state, images, labels):
    w_eff = og.effective_params(state.params, state.opt_state)
    variables = {"params": w_eff, **({"batch_stats": state.batch_stats}
                                     if state.batch_stats else {})}
    logits = model.apply(variables, images, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32)

  return evaluate


class FitResult(NamedTuple):
  """``state`` after training; per epoch: ``test_accuracy`` (in [0, 1]) and ``sparsity`` of the
  masks the epoch was trained with, and its mean ``loss``."""
  state: TrainState
  test_accuracy: list[float]
  loss: list[float]
  sparsity: list[float]


def fit(model: nn.Module, tx: optax.GradientTransformation, train: Any, test: Any, *,
        epochs: int, batch_size: int, seed: int = 0,
        on_epoch: Callable[[int, TrainState, float, float], None] | None = None) -> FitResult:
  """Trains on in-memory ``train`` / ``test`` splits (``.images`` NHWC, ``.labels`` int).

  Drops the last partial batch (``steps_per_epoch = len(train) // batch_size``), shuffles with
  ``seed`` every epoch, and evaluates on the whole test split after each epoch, with the masks
  of the epoch's last forward pass (:func:`run_epoch`). ``on_epoch(epoch, state, loss,
  accuracy)`` sees the state after the epoch's last update. The final model is
  ``final_model(result.state, sparsity)``.
  """
  steps_per_epoch = len(train.labels) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size {batch_size} is larger than the {len(train.labels)} examples")
  state = init(model, tx, train.images[:1], seed)
  step = jax.jit(make_train_step(model, tx))
  evaluate = jax.jit(make_eval_step(model))
  rng = np.random.default_rng(seed)
  accuracies, losses, sparsities = [], [], []
  for epoch in range(epochs):
    order = rng.permutation(len(train.labels))[:steps_per_epoch * batch_size]
    batches = ({"image": train.images[idx], "label": train.labels[idx]}
               for idx in order.reshape(steps_per_epoch, batch_size))
    epoch_out = run_epoch(step, state, batches, steps_per_epoch)
    state, loss, masks = epoch_out.state, epoch_out.loss, epoch_out.masks
    accuracies.append(int(evaluate(epoch_out.trained, test.images, test.labels))
                      / len(test.labels))
    losses.append(float(loss))
    sparsities.append(sparsity_of(masks))
    if on_epoch is not None:
      on_epoch(epoch, state, losses[-1], accuracies[-1])
  return FitResult(state, accuracies, losses, sparsities)


Batch = dict[str, np.ndarray]


class Epoch(NamedTuple):
  """What :func:`run_epoch` returns: the ``state`` after the last update, the mean ``loss`` of
  its steps with a finite loss (a device scalar; NaN if none), a copy of the ``masks`` the last
  forward pass used (``None`` if dense), the number of steps whose loss was not finite
  (``nonfinite``, device int32) and the index of the first of them (``first_nonfinite``, -1 if
  none): counted on the device, read once per epoch; and ``trained``, the state to evaluate the
  epoch with: ``state`` with ``masks`` in use, or, when the epoch's last update ended a round
  by rewinding the weights (a lottery level), a copy of the state before that update: the
  level's trained weights, one step short of its end, with its masks."""
  state: TrainState
  loss: jax.Array
  masks: PyTree | None
  nonfinite: jax.Array
  first_nonfinite: jax.Array
  trained: TrainState


def run_epoch(step: Callable[..., tuple[TrainState, jax.Array]], state: TrainState,
              batches: Iterator[Batch], num_steps: int,
              on_step: Callable[[int, jax.Array], None] | None = None) -> Epoch:
  """Runs ``num_steps`` steps of ``step(state, images, labels)`` on ``next(batches)``.

  ``batches`` yields ``{'image': (B, H, W, C), 'label': (B,)}`` (an ``optg_jax.data.load``
  iterator). ``on_step(i, loss)`` sees each step's loss as a device scalar; reading it on the
  host waits for the step. Evaluate the epoch with ``epoch.trained``: the trained weights with
  the masks they were trained with.
  """
  total, masks, before_rewind = jnp.zeros((), jnp.float32), None, None
  bad, first = jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)
  batches = iter(batches)
  for i in range(num_steps):
    batch = next(batches)
    if i == num_steps - 1:
      masks = masks_in_use(state.opt_state)
      if og.methods.rounds.rewinds_next(state.opt_state):
        before_rewind = _copy(state)  # the step may donate ``state``
    state, loss = step(state, batch["image"], batch["label"])
    total, bad, first = _tally(total, bad, first, loss, i)
    if on_step is not None:
      on_step(i, loss)
  finite_steps = num_steps - bad
  trained = before_rewind if before_rewind is not None else with_masks_in_use(state, masks)
  return Epoch(state, total / jnp.maximum(finite_steps, 1) + jnp.where(finite_steps > 0, 0.0,
                                                                      jnp.nan),
               masks, bad, first, trained)


@jax.jit
def _tally(total, bad, first, loss, i):
  """One step's loss into the epoch's sum of finite losses and its count of non-finite ones."""
  finite = jnp.isfinite(loss)
  return (total + jnp.where(finite, loss, 0.0), bad + (~finite).astype(jnp.int32),
          jnp.where((first < 0) & ~finite, i, first))


def run_steps(step: Callable[..., tuple[TrainState, jax.Array]], state: TrainState,
              batches: Iterator[Batch], num_steps: int,
              on_step: Callable[[int, jax.Array], None] | None = None
              ) -> tuple[TrainState, jax.Array]:
  """:func:`run_epoch` without the masks: the state and the mean loss, a device scalar."""
  return run_epoch(step, state, batches, num_steps, on_step)[:2]


def evaluate(eval_step: Callable[..., jax.Array], state: TrainState, batches: Iterable[Batch],
             batch_size: int) -> float:
  """Accuracy in [0, 1] of ``eval_step`` (:func:`make_eval_step`, jitted or data parallel).

  A batch shorter than ``batch_size`` is padded with zero images labelled ``-1``, which match no
  class, so one compiled shape serves every batch and a mesh can split it evenly.

  Raises:
    ValueError: ``batches`` is empty, or a batch is larger than ``batch_size``.
  """
  correct, total = jnp.zeros((), jnp.int32), 0
  for batch in batches:
    n = len(batch["label"])
    if n > batch_size:
      raise ValueError(f"a batch of {n} examples exceeds batch_size={batch_size}")
    pad = [(0, batch_size - n)]
    images = np.pad(batch["image"], pad + [(0, 0)] * (np.ndim(batch["image"]) - 1))
    labels = np.pad(np.asarray(batch["label"], np.int32), pad, constant_values=-1)
    correct += eval_step(state, images, labels)
    total += n
  if total == 0:
    raise ValueError("evaluate needs at least one example")
  return int(correct) / total
