"""The public building blocks: the state protocol, trainable scores and their mask functions,
the scored pruner, and the errors at the boundary (with_masks, final_masks, traced sparsity)."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optg_jax as og
from optg_jax.methods import scores as scores_lib

SPE, EPOCHS = 2, 4


def _params():
  k = jax.random.split(jax.random.key(5), 2)
  return {"a": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jnp.zeros(5)},
          "b": {"kernel": jax.random.normal(k[1], (5, 4)), "bias": jnp.zeros(4)}}


def _loss(p, t=0):
  x = jax.random.normal(jax.random.key(t), (12, 6))
  h = jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"])
  return jnp.mean((h @ p["b"]["kernel"] + p["b"]["bias"] - 1.0) ** 2)


def _train(tx, params, steps):
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, t):
    loss, grads = jax.value_and_grad(_loss)(og.effective_params(params, opt_state), t)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for t in range(steps):
    params, opt_state, _ = step(params, opt_state, t)
  return params, opt_state


# A method of one's own: prune the entries whose weight is negative, once, at init.
class SignState(NamedTuple):
  masks: Any


og.register_state(SignState)


def prune_negative() -> optax.GradientTransformation:
  def init(params):
    return SignState(jax.tree.map(lambda p: p >= 0 if p.ndim == 2 else jnp.array(True), params))

  def update(grads, state, params=None):
    return jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, state.masks), state

  return optax.GradientTransformation(init, update)


def test_a_user_defined_method_trains_in_the_one_step():
  params = _params()
  tx = optax.chain(prune_negative(), optax.sgd(0.1))
  new_params, opt_state = _train(tx, params, 3)
  negative = params["a"]["kernel"] < 0
  np.testing.assert_array_equal(og.get_masks(opt_state)["a"]["kernel"], ~negative)
  w_eff = og.effective_params(new_params, opt_state)["a"]["kernel"]
  np.testing.assert_array_equal(w_eff[negative], 0.0)
  np.testing.assert_array_equal(new_params["a"]["kernel"][negative], params["a"]["kernel"][negative])
  assert og.final_masks(new_params, opt_state) is og.get_masks(opt_state)
  with pytest.raises(ValueError, match="sparsity=0.5"):
    og.final_masks(new_params, opt_state, 0.5)


def test_subclasses_of_a_registered_state_are_found():
  class Derived(SignState):
    pass

  state = (optax.EmptyState(), Derived(masks={"w": jnp.array([True, False])}))
  np.testing.assert_array_equal(og.effective_params({"w": jnp.ones(2)}, state)["w"], [1.0, 0.0])


class OptGScoresTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_soft_mask_gradient_is_the_exact_chain_rule_with_the_penalty(self):
    beta, lam, lr = 3.0, 0.01, 0.5
    params = _params()
    mask_fn = scores_lib.soft_masks(lambda t: beta)
    tx = og.trainable_scores(scores_lib.zero_scores, optax.sgd(lr), mask_fn,
                             straight_through=False, mask_penalty=lam)
    state = tx.init(params)
    np.testing.assert_array_equal(og.effective_params(params, state)["a"]["kernel"],
                                  params["a"]["kernel"])  # starts at exactly 1

    def total(s):
      w_eff = jax.tree.map(lambda w, x: w * 2 * jax.nn.sigmoid(beta * x) if x is not None else w,
                           params, s, is_leaf=lambda x: x is None)
      penalty = sum(jnp.sum(2 * jax.nn.sigmoid(beta * x)) for x in jax.tree.leaves(s))
      return _loss(w_eff) + lam * penalty

    expected = jax.grad(total)(state.scores)
    grads = jax.grad(_loss)(og.effective_params(params, state))
    _, new_state = self.variant(tx.update)(grads, state, params)
    for name in ("a", "b"):
      np.testing.assert_allclose(new_state.scores[name]["kernel"],
                                 -lr * expected[name]["kernel"], rtol=1e-5, atol=1e-8)

  def test_ternary_masks_keep_hide_or_invert_and_train_straight_through(self):
    params = _params()
    init = lambda params, prunable: jax.tree.map(
        lambda keep, p: jnp.linspace(-1, 1, p.size).reshape(p.shape) if keep else None,
        prunable, params)
    tx = og.trainable_scores(init, optax.sgd(1.0), scores_lib.ternary_masks,
                             init_aux=scores_lib.max_fraction_thresholds(0.5),
                             train_weights=False)
    state = tx.init(params)
    s = state.scores["a"]["kernel"]
    expected = np.sign(s) * (np.abs(s) > 0.5)
    np.testing.assert_array_equal(state.masks["a"]["kernel"], expected)
    np.testing.assert_array_equal(og.effective_params(params, state)["a"]["kernel"],
                                  params["a"]["kernel"] * expected)
    np.testing.assert_array_equal(og.get_masks(state)["a"]["kernel"], expected != 0)
    grads = jax.grad(_loss)(og.effective_params(params, state))
    updates, new_state = tx.update(grads, state, params)
    assert all(not np.any(u) for u in jax.tree.leaves(updates))  # frozen weights
    np.testing.assert_allclose(new_state.scores["a"]["kernel"],
                               s - grads["a"]["kernel"] * params["a"]["kernel"], rtol=1e-6)

  def test_topk_of_magnitude_masks_and_their_final_rule(self):
    params = _params()
    selection = og.Selection("uniform")
    init = lambda params, prunable: jax.tree.map(
        lambda keep, p: -p if keep else None, prunable, params)
    tx = og.trainable_scores(init, optax.sgd(0.0),
                             scores_lib.topk_masks(selection, 0.6, of_magnitude=True),
                             final_masks=scores_lib.TopKAtTarget(selection, 0.6, True))
    state = tx.init(params)
    for name in ("a", "b"):
      w = np.abs(np.asarray(params[name]["kernel"])).ravel()
      kept = np.asarray(og.get_masks(state)[name]["kernel"]).ravel()
      k = w.size - int(0.6 * w.size)
      assert kept.sum() == k and w[kept].min() >= w[~kept].max()
    final = og.final_masks(params, state, 0.8)
    assert int(final["a"]["kernel"].sum()) == 30 - 24


def test_exact_score_gradient_needs_masks_of_the_current_scores():
  with pytest.raises(ValueError, match="refresh=None"):
    og.trainable_scores(scores_lib.zero_scores, optax.sgd(0.1), scores_lib.ternary_masks,
                        straight_through=False, refresh=og.schedules.every_n_steps(2))


def test_scored_pruner_with_a_score_of_ones_own():
  smallest = lambda params, grads, aux: jax.tree.map(lambda p: -jnp.abs(p), params)
  tx = og.scored_pruner(0.5, og.schedules.in_window(0, 1), score_fn=smallest,
                        selection=og.Selection("uniform"))
  params = _params()
  masks = og.get_masks(tx.init(params))
  w = np.abs(np.asarray(params["a"]["kernel"]))
  kept = np.asarray(masks["a"]["kernel"])
  assert kept.sum() == 15 and w[kept].max() <= w[~kept].min()


def test_optg_final_masks_honour_sparsity_and_the_method_selection():
  tx = optax.chain(og.optg(0.5, 0.1, SPE, EPOCHS, distribution="uniform", exclude=("b/",)),
                   optax.sgd(0.1))
  params, opt_state = _train(tx, _params(), SPE * EPOCHS)
  final = og.final_masks(params, opt_state)
  assert int(final["a"]["kernel"].sum()) == 15 and bool(final["b"]["kernel"].all())
  assert int(og.final_masks(params, opt_state, 0.9)["a"]["kernel"].sum()) == 3
  with pytest.raises(ValueError, match="sparsity"):
    og.final_masks(params, opt_state, 1.0)
  jitted = jax.jit(og.final_masks, static_argnums=2)(params, opt_state, 0.9)
  np.testing.assert_array_equal(jitted["a"]["kernel"],
                                og.final_masks(params, opt_state, 0.9)["a"]["kernel"])


def test_final_masks_of_baselines_and_dense_training():
  params = _params()
  state = og.gmp(0.5, 0, 2, 1).init(params)
  assert og.final_masks(params, state, 0.5) is state.masks
  with pytest.raises(ValueError, match="sparsity=0.7"):
    og.final_masks(params, state, 0.7)
  dense = optax.sgd(0.1).init(params)
  assert bool(og.final_masks(params, dense)["a"]["kernel"].all())
  with pytest.raises(ValueError, match="dense"):
    og.final_masks(params, dense, 0.5)


def test_with_masks_validates_the_masks_naming_the_path():
  params = _params()
  state = (og.magnitude(0.5).init(params), optax.EmptyState())
  masks = og.get_masks(state)
  swapped = og.with_masks(state, jax.tree.map(jnp.logical_not, masks))
  np.testing.assert_array_equal(og.get_masks(swapped)["a"]["kernel"], ~masks["a"]["kernel"])
  wrong_shape = {**masks, "a": {**masks["a"], "kernel": jnp.ones((5, 6), bool)}}
  with pytest.raises(ValueError, match="'a/kernel' has shape"):
    og.with_masks(state, wrong_shape)
  wrong_dtype = {**masks, "b": {**masks["b"], "kernel": jnp.ones((5, 4))}}
  with pytest.raises(TypeError, match="'b/kernel' has dtype float32"):
    og.with_masks(state, wrong_dtype)
  with pytest.raises(ValueError, match="structure"):
    og.with_masks(state, {"a": masks["a"]})


def test_traced_sparsity_gets_a_clear_error_and_static_args_work():
  params = _params()
  make = optax.inject_hyperparams(og.mask_optimizer)
  tx = make(sparsity=0.5, learning_rate=0.1, steps_per_epoch=SPE, total_epochs=EPOCHS)
  with pytest.raises(TypeError, match="sparsity must be a Python number.*static_args"):
    jax.jit(tx.init)(params)
  static = optax.inject_hyperparams(
      og.mask_optimizer, static_args=("sparsity", "steps_per_epoch", "total_epochs", "beta"))
  tx = optax.chain(static(sparsity=0.5, learning_rate=0.1, steps_per_epoch=SPE,
                          total_epochs=EPOCHS), optax.sgd(0.1))
  _, opt_state = _train(tx, params, SPE * EPOCHS)
  final = og.final_masks(params, opt_state)
  assert int(final["a"]["kernel"].sum()) + int(final["b"]["kernel"].sum()) == 25


def test_nnx_state_paths_read_as_a_user_writes_them():

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(6, 5, rngs=rngs)
      self.fc2 = nnx.Linear(5, 4, rngs=rngs)

  _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  masks = og.get_masks(og.magnitude(0.8, exclude=("fc2/kernel$",)).init(state))
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(masks["fc2"]))
  summary = og.sparsity_summary(masks)
  assert sorted(summary.leaves) == ["fc1/kernel"]
  assert int(summary.leaves["fc1/kernel"].kept) == 6


def _gradient_score(params, grads, aux):
  """``|W ⊙ G|``, a score that needs the gradient."""
  del aux
  return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


@pytest.mark.parametrize("begin", [0, 2])
def test_scored_pruner_score_fn_without_grads_at_init_is_named(begin):
  """``score_fn`` gets ``grads=None`` at init, also when ``refresh(0)`` is false (the init's
  selection is traced either way): a score that needs gradients fails there with the contract
  in the message, its own error chained."""
  tx = og.methods.pruner.scored_pruner(0.5, og.schedules.in_window(begin, begin + 1),
                                       score_fn=_gradient_score)
  with pytest.raises(TypeError, match=r"score_fn raised ValueError at init, where it is called "
                                      r"with grads=None.*handle grads=None") as info:
    tx.init(_params())
  assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("jit", [False, True])
def test_scored_pruner_score_fn_that_handles_none_uses_the_step_gradient(jit):
  """The contract kept (``|W|`` while ``grads`` is ``None``): the refresh of step 1 keeps the
  top half of ``|W ⊙ G|`` of step 0's gradient, the score's only call with a gradient."""
  calls = []

  def score(params, grads, aux):
    calls.append(grads is None)
    return jax.tree.map(jnp.abs, params) if grads is None else _gradient_score(params, grads, aux)

  tx = og.methods.pruner.scored_pruner(0.5, og.schedules.in_window(1, 2), score_fn=score,
                                       selection=og.Selection("uniform"))
  params = _params()
  state = tx.init(params)
  assert calls == [True]
  grads = jax.grad(_loss)(params)
  update = jax.jit(tx.update) if jit else tx.update
  _, state = update(grads, state, params)
  assert calls == [True, False]
  for leaf in ("a", "b"):
    saliency = np.abs(np.asarray(params[leaf]["kernel"] * grads[leaf]["kernel"])).ravel()
    kept = np.asarray(og.get_masks(state)[leaf]["kernel"]).ravel()
    assert kept.sum() == saliency.size - saliency.size // 2
    assert saliency[kept].min() >= saliency[~kept].max()
