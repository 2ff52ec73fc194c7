"""RST (Dual Lottery Ticket): the exact λ ramp, the seeded random subnetwork with the reference's
removal counts, the extrusion of the removed weights, the mask after it, and RST-Iter."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og

import helpers
from optg_jax import recipes
from optg_jax.methods import rst as rst_lib


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"a": {"kernel": jax.random.normal(k[0], (10, 7)), "bias": jnp.zeros(7)},
          "b": {"kernel": jax.random.normal(k[1], (7, 3)), "bias": jnp.zeros(3)}}


def _loss(p, t):
  x = jax.random.normal(jax.random.key(t), (16, 10))
  h = jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"])
  return jnp.mean((h @ p["b"]["kernel"] + p["b"]["bias"]) ** 2)


FAST = dict(granularity=0.25, interval=2, stabilize=3)  # λ: .25 .25 .5 .5 ... 1.25, 9+3+1 steps


def test_phases_of_the_reference_and_of_a_short_run():
  assert rst_lib.phases() == (10_001, 90_001, 90_001)
  assert rst_lib.phases(cycles=5, interval=1, stabilize=10_000) == (10_001, 20_001, 100_005)
  assert rst_lib.phases(**FAST) == (5, 12, 12)


def test_removal_counts_follow_the_reference_and_the_exact_rule():
  assert rst_lib.removal_counts(70, 0.7, 1, "reference") == [49]
  assert rst_lib.removal_counts(10, 0.95, 1, "reference") == [9]  # min(ceil(9.5), N - 1)
  assert rst_lib.removal_counts(10, 0.95, 1, "exact") == [9]
  assert rst_lib.removal_counts(10, 0.91, 1, "exact") == [9]
  assert rst_lib.removal_counts(21, 0.3, 1, "reference") == [7]  # ceil(6.3)
  cumulative = [1 - 0.3 ** (c / 5) for c in range(1, 6)]
  assert rst_lib.removal_counts(100, 0.7, 5, "reference") == [
      min(math.ceil(p * 100), 99) for p in cumulative[:4]] + [70]


def test_lambda_ramp_is_exact_and_pushes_only_the_removed_weights():
  params = _params()
  tx = og.rst(0.7, **FAST)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  removed = {k: np.asarray(state.rank[k]["kernel"]) < int(state.removed[k]["kernel"][0])
             for k in ("a", "b")}
  assert [int(r.sum()) for r in removed.values()] == [49, 15]
  update = jax.jit(tx.update)
  for t in range(12):
    updates, state = update(zeros, state, params)
    lam = np.float32(0.25) * min(t // 2 + 1, 5)
    for k in removed:
      u, w = np.asarray(updates[k]["kernel"]), np.asarray(params[k]["kernel"])
      np.testing.assert_array_equal(u[removed[k]], lam * w[removed[k]])
      np.testing.assert_array_equal(u[~removed[k]], 0.0)
    masks = og.get_masks(state)
    dense = bool(masks["a"]["kernel"].all())
    assert dense == (t < 11), t  # the mask from the forward pass of step 12 on
  np.testing.assert_array_equal(masks["a"]["kernel"], ~removed["a"])
  updates, _ = update(jax.tree.map(jnp.ones_like, params), state, params)
  np.testing.assert_array_equal(updates["a"]["kernel"], (~removed["a"]).astype(np.float32))


def test_random_subnetwork_is_seeded_uniform_and_min_picks_the_smallest():
  params = _params()
  mask = lambda **kw: np.asarray(og.final_masks(params, og.rst(0.5, **kw).init(params))["a"]["kernel"])
  assert mask(seed=3).sum() == 35 and np.array_equal(mask(seed=3), mask(seed=3))
  assert not np.array_equal(mask(seed=3), mask(seed=4))
  many = np.mean([mask(seed=s) for s in range(200)], axis=0)
  assert 0.33 < many.min() and many.max() < 0.67  # every weight about equally likely (±4.8σ)
  smallest = mask(pick="min")
  w = np.abs(np.asarray(params["a"]["kernel"]))
  assert w[smallest].min() >= w[~smallest].max()


def test_removed_weights_are_extruded_to_about_zero_before_the_mask():
  params = _params()
  extrusion = dict(granularity=2.0, upper_limit=20.0, interval=1, stabilize=60)
  tx = optax.chain(og.rst(0.7, **extrusion), optax.sgd(0.05, momentum=0.9))
  state = tx.init(params)
  step = helpers.jitted_step(tx, _loss)
  steps = rst_lib.phases(**extrusion).extrusion_steps
  start = params
  for t in range(steps):
    params, state, _ = step(params, state, t)
  removed = ~np.asarray(og.get_masks(state)["a"]["kernel"])
  assert removed.sum() == 49
  before = np.abs(np.asarray(start["a"]["kernel"]))[removed]
  after = np.abs(np.asarray(params["a"]["kernel"]))[removed]
  assert after.max() < 5e-3 * before.max()  # held where the loss gradient balances λ·W
  kept = np.asarray(params["a"]["kernel"])[~removed]
  assert np.abs(kept).min() > 1e-3  # the subnetwork keeps training


def test_rst_iter_grows_the_removal_set_and_resets_lambda_each_cycle():
  params = _params()
  tx = og.rst(0.7, cycles=3, **FAST)
  state = tx.init(params)
  counts = [int(c) for c in state.removed["a"]["kernel"]]
  assert counts == rst_lib.removal_counts(70, 0.7, 3, "reference") and counts[-1] == 49
  assert counts[0] < counts[1] < counts[2]
  zeros = jax.tree.map(jnp.zeros_like, params)
  rank = np.asarray(state.rank["a"]["kernel"])
  w = np.asarray(params["a"]["kernel"])
  update = jax.jit(tx.update)
  for t in range(36):
    updates, state = update(zeros, state, params)
    cycle, local = t // 12, t % 12
    pushed = np.asarray(updates["a"]["kernel"]) != 0
    np.testing.assert_array_equal(pushed, rank < counts[cycle])  # nested, growing sets
    if local == 0:  # λ starts again from η
      np.testing.assert_array_equal(np.asarray(updates["a"]["kernel"])[pushed],
                                    np.float32(0.25) * w[pushed])
  assert int((~np.asarray(og.get_masks(state)["a"]["kernel"])).sum()) == 49


def test_final_masks_and_bad_input():
  params = _params()
  state = og.rst(0.7, count="exact").init(params)
  final = og.final_masks(params, state)
  assert int((~final["b"]["kernel"]).sum()) == math.floor(0.7 * 21)
  assert final["a"]["bias"].shape == ()
  with pytest.raises(ValueError, match="sparsity=0.5"):
    og.final_masks(params, state, 0.5)
  excluded = og.final_masks(params, og.rst(0.7, exclude=("b/",)).init(params))
  assert bool(excluded["b"]["kernel"].all())
  for bad in (dict(distribution="global"), dict(pick="max"), dict(count="round"),
              dict(cycles=0)):
    with pytest.raises(ValueError):
      og.rst(0.7, **bad)


def test_extrusion_dose_is_the_sum_of_lr_times_lambda():
  for kwargs in ({}, dict(granularity=0.01, interval=1, upper_limit=1.0, stabilize=10),
                 dict(granularity=0.03, interval=3, upper_limit=0.5, stabilize=7)):
    timing = rst_lib.phases(**kwargs)
    lam = [kwargs.get("granularity", 1e-4) * min(t // kwargs.get("interval", 5) + 1,
                                                  timing.ramp_updates)
           for t in range(timing.cycle_steps)]
    assert rst_lib.extrusion_dose(2e-3, **kwargs) == pytest.approx(2e-3 * sum(lam), rel=1e-9)
  assert rst_lib.extrusion_dose(1e-3) == pytest.approx(1e-7 * 650_075_001, rel=1e-12)


@pytest.mark.parametrize("steps, cycles", [(400, 1), (97, 1), (500, 5)])
def test_recipe_fits_the_reference_dose_into_the_budget(steps, cycles):
  timing = recipes.rst_extrusion(steps, cycles=cycles, extrusion_lr=1e-3)
  phases = rst_lib.phases(cycles=cycles, **timing)
  assert phases.extrusion_steps == cycles * (steps // cycles) <= steps
  assert phases.ramp_updates == (steps // cycles) // 2  # rising over the first half
  assert rst_lib.extrusion_dose(1e-3, **timing) == pytest.approx(65.0075, rel=1e-6)
  fixed = recipes.rst_extrusion(steps, cycles=cycles, extrusion_dose=None)
  assert fixed["upper_limit"] == 1.0 and rst_lib.extrusion_dose(1e-3, **fixed) < 1.0


def test_recipe_caps_the_shrink_rate_of_a_dose_fitted_into_a_few_steps():
  """65 in 10 steps would need lr·λ ≈ 13 per step, where descent on λ‖w‖²/2 diverges (> 2)."""
  with pytest.warns(UserWarning, match="capped at max_rate = 1"):
    timing = recipes.rst_extrusion(10, extrusion_lr=1e-3)
  assert 1e-3 * timing["upper_limit"] == pytest.approx(1.0)
  assert rst_lib.extrusion_dose(1e-3, **timing) < 65.0
  w = 1.0
  for lam in (timing["granularity"] * min(t + 1, 4.5) for t in range(10)):  # ramp, then hold
    w -= 1e-3 * min(lam, timing["upper_limit"]) * w
  assert 0 <= w < 1.0  # shrinks, does not oscillate out


def test_finetuning_hands_down_only_the_subnetworks_gradients():
  """After the extrusion (12 steps of ``FAST``) the forward pass uses ``W ⊙ M`` and RST hands
  ``G ⊙ M`` down the chain: under plain SGD the removed weights stay exactly where the
  extrusion left them, though the loss's gradient at them is not zero, and the kept ones take
  ``-lr·G``."""
  params, lr = _params(), 0.05
  tx = optax.chain(og.rst(0.7, **FAST), optax.sgd(lr))
  state = tx.init(params)
  step = helpers.jitted_step(tx, _loss)
  extrusion = rst_lib.phases(**FAST).extrusion_steps
  for t in range(extrusion):
    params, state, _ = step(params, state, t)
  assert rst_lib.phase(state[0])["phase"] == "finetune"
  masks = og.get_masks(state)
  removed = {k: ~np.asarray(masks[k]["kernel"]) for k in ("a", "b")}
  assert [int(r.sum()) for r in removed.values()] == [49, 15]
  for t in range(extrusion, extrusion + 4):
    before = params
    params, state, grads = step(params, state, t)
    for k, r in removed.items():
      w0, w1 = np.asarray(before[k]["kernel"]), np.asarray(params[k]["kernel"])
      g = np.asarray(grads[k]["kernel"])
      assert np.abs(g[r]).max() > 1e-6  # a dense gradient would move them
      np.testing.assert_array_equal(w1[r], w0[r])
      np.testing.assert_allclose(w1[~r] - w0[~r], -lr * g[~r], rtol=1e-4, atol=1e-7)
