"""Reference chains and the OptG weight learning rate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import recipes
from optg_jax import training


def test_warmup_cosine_per_epoch_matches_the_reference_formula():
  lr, spe, epochs = 0.1, 7, 20
  schedule = jax.jit(recipes.warmup_cosine_per_epoch(lr, spe, epochs))
  for step in range(spe * epochs):
    e = step // spe
    expected = lr * (e + 1) / 5 if e < 5 else 0.5 * lr * (1 + math.cos(math.pi * e / epochs))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)  # float32 cos


@pytest.mark.parametrize("epochs,warmup", [(3, 1), (6, 3), (9, 4), (10, 5), (100, 5), (1, 0)])
def test_warmup_is_capped_at_half_the_run(epochs, warmup):
  lr, spe = 0.1, 2
  schedule = jax.jit(recipes.warmup_cosine_per_epoch(lr, spe, epochs))
  reference = jax.jit(recipes.warmup_cosine_per_epoch(lr, spe, epochs, scale_warmup=False))
  got = [float(schedule(spe * e)) for e in range(epochs)]
  expected = [lr * (e + 1) / warmup if e < warmup
              else 0.5 * lr * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)  # float32 cos
  # The warm-up ends by mid-run: from then on the cosine, which is at half the peak or more.
  assert warmup <= epochs // 2 and all(g >= 0.5 * lr * (1 - 1e-6) for g in got[warmup:epochs // 2])
  # Unscaled, a run of E <= 5 epochs never leaves the warm-up; E >= 10 is the same either way.
  unscaled = [float(reference(spe * e)) for e in range(epochs)]
  if epochs <= 5:
    np.testing.assert_allclose(unscaled, [lr * (e + 1) / 5 for e in range(epochs)], rtol=1e-6)
  if epochs >= 10:
    assert unscaled == got


def test_make_optimizer_scales_the_warmup():
  params = {"w": jnp.ones((3, 2))}
  grads = {"w": jnp.ones((3, 2))}
  moves = []
  for scale in (True, False):
    tx = recipes.make_optimizer("dense", 0.0, steps_per_epoch=1, epochs=3, weight_decay=0.0,
                                momentum=0.0, scale_warmup=scale)
    updates, _ = tx.update(grads, tx.init(params), params)
    moves.append(float(-updates["w"][0, 0]))
  np.testing.assert_allclose(moves, [0.1, 0.1 / 5], rtol=1e-6)  # epoch 0 of a 3-epoch run


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {"fc1": {"kernel": jax.random.normal(keys[0], (8, 6)),
                  "bias": jax.random.normal(keys[1], (6,))},
          "fc2": {"kernel": jax.random.normal(keys[2], (6, 4)),
                  "bias": jax.random.normal(keys[3], (4,))}}


# Kept kernel weights (of 72) of the mask applied to each of 4 steps' gradient, at P = 0.5 with
# one step per epoch: OptG's staircase P·σ(t − 2) from a dense start; gmp's cubic window [0, 2],
# uniform per layer (48·0.4375 → 21 and 24·0.4375 → 10 removed at step 1); the one-shot methods
# at k = 72 − floor(0.5·72) = 36 from step 0 (SNIP's mask comes from the first batch's G).
KEPT = {"optg": [72, 63, 54, 46], "gmp": [72, 41, 36, 36], "magnitude": [36] * 4,
        "snip": [36] * 4, "random": [36] * 4}


@pytest.mark.parametrize("method", ["dense", *KEPT])
def test_reference_chain_is_method_then_weight_decay_then_sgd(method):
  """Each update is exactly ``−η_t·(G ⊙ M_t + λ·W_t)``: the method hands ``G ⊙ M`` of the mask
  the forward pass used, and weight decay comes after it, so it reaches every weight, pruned
  ones included (a chain decaying before the method would mask the decay too)."""
  wd, steps = 5e-4, 4
  tx = recipes.make_optimizer(method, 0.5, steps_per_epoch=1, epochs=steps, weight_decay=wd,
                              momentum=0.0)
  lr = recipes.warmup_cosine_per_epoch(0.1, 1, steps)
  params, state, kept = _params(), None, []
  state = tx.init(params)
  for t in range(steps):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(10 + t), x.shape), params)
    used = og.get_masks(state) if method != "dense" else jax.tree.map(lambda _: True, params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    if method == "snip" and t == 0:  # SNIP's saliency needs this G: it masks G with the new M
      used = og.get_masks(new_state)
    expected = jax.tree.map(lambda g, m, w: -lr(t) * (jnp.where(m, g, 0.0) + wd * w),
                            grads, used, params)
    for (path, u), e in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                            jax.tree.leaves(expected)):
      np.testing.assert_allclose(u, e, rtol=1e-6, atol=0, err_msg=f"step {t} {path}")
    if method != "dense":
      kept.append(int(og.sparsity_summary(used).kept))
      pruned = ~np.asarray(used["fc1"]["kernel"])
      if pruned.any():  # pruned weights: no loss gradient, but weight decay
        np.testing.assert_allclose(np.asarray(updates["fc1"]["kernel"])[pruned],
                                   -float(lr(t)) * wd * np.asarray(params["fc1"]["kernel"])[pruned],
                                   rtol=1e-6, atol=0)
    params, state = optax.apply_updates(params, updates), new_state
  assert kept == KEPT.get(method, [])


@pytest.mark.parametrize("method,state_type", [
    ("optg", og.methods.scores.ScoresState), ("gmp", og.methods.pruner.PrunerState),
    ("magnitude", og.methods.pruner.PrunerState), ("snip", og.methods.pruner.PrunerState),
    ("random", og.methods.pruner.PrunerState)])
def test_each_method_chain_holds_its_state(method, state_type):
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  tx = recipes.make_optimizer(method, 0.5, steps_per_epoch=3, epochs=10)
  state = tx.init(params)
  assert isinstance(og.methods.base.find_state(state), state_type)


def test_dense_chain_has_no_method_state_and_unknown_method_fails():
  params = {"w": jnp.ones((8, 4))}
  state = recipes.make_optimizer("dense", 0.0, steps_per_epoch=3, epochs=10).init(params)
  assert not training.has_method(state)
  with pytest.raises(ValueError, match="unknown method 'lottery'; valid: dense, optg"):
    recipes.make_optimizer("lottery", 0.5, steps_per_epoch=3, epochs=10)


def test_a_registered_recipe_builds_its_chain():
  calls = []

  def keep_half(sparsity, *, learning_rate, steps_per_epoch, epochs, seed, **options):
    calls.append((sparsity, steps_per_epoch, epochs, seed, options))
    return og.magnitude(sparsity, **options)

  recipes.register_recipe("test_keep_half", keep_half)
  try:
    assert "test_keep_half" in recipes.names()
    tx = recipes.make_optimizer("test_keep_half", 0.5, steps_per_epoch=3, epochs=10, seed=4,
                                distribution="uniform")
    state = tx.init({"w": jnp.ones((8, 4))})
    assert int(og.sparsity_summary(og.get_masks(state)).kept) == 16
    assert calls == [(0.5, 3, 10, 4, {"distribution": "uniform"})]
  finally:
    recipes._RECIPES.pop("test_keep_half")  # pylint: disable=protected-access
  with pytest.raises(TypeError, match="callable"):
    recipes.register_recipe("bad", None)
