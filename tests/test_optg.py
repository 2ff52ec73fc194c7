"""OptG's mask optimizer: the accumulation identity, refresh timing, STE gradients, revival,
weight decay on pruned weights, exact counts, jit and optax wrappers."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og


SPE, EPOCHS = 3, 6


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"dense1": {"kernel": jax.random.normal(k[0], (5, 8)), "bias": jnp.zeros(8)},
          "dense2": {"kernel": jax.random.normal(k[1], (8, 3)), "bias": jnp.zeros(3)}}


def _batch(t):
  k = jax.random.split(jax.random.key(100 + t))
  return jax.random.normal(k[0], (16, 5)), jax.random.randint(k[1], (16,), 0, 3)


def _loss(p, batch):
  x, y = batch
  h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  logits = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _step_fn(tx):

  def step(params, opt_state, batch):
    w_eff = og.effective_params(params, opt_state)
    grads = jax.grad(_loss)(w_eff, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  return step


def _lr(t):
  return 0.1 * (1.0 + jnp.cos(jnp.pi * t / (SPE * EPOCHS))) / 2


def _fraction(t):
  """σ(β(e − E/2)), β = 1, written out independently of optg_jax.schedules."""
  return 1.0 / (1.0 + math.exp(-(t // SPE - EPOCHS / 2)))


class AccumulationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scores_equal_minus_sum_of_lr_times_g_times_w(self):
    tx = optax.chain(og.mask_optimizer(0.8, _lr, SPE, EPOCHS, momentum=0.0), optax.sgd(_lr))
    params = _params()
    opt_state = tx.init(params)
    step = self.variant(_step_fn(tx))
    expected = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    for t in range(SPE * EPOCHS):
      before = params
      params, opt_state, grads = step(params, opt_state, _batch(t))
      eta_s = float(_lr(t)) * _fraction(t)
      expected = jax.tree.map(lambda e, g, w: e - eta_s * np.asarray(g, np.float64) * np.asarray(w),
                              expected, grads, before)
    scores = og.methods.base.find_state(opt_state).scores
    for name in ("dense1", "dense2"):
      np.testing.assert_allclose(scores[name]["kernel"], expected[name]["kernel"], rtol=2e-5,
                                 atol=1e-7)
      assert scores[name]["bias"] is None


@pytest.mark.parametrize("nesterov,decay", [(False, 0.0), (True, 0.0), (False, 0.05),
                                             (True, 0.05)])
def test_scores_follow_pytorch_momentum_sgd_at_the_default_momentum(nesterov, decay):
  """``g = G⊙W + λS``, ``v ← 0.9 v + g``, ``S ← S − η_s (g + 0.9 v if nesterov else v)``,
  written out in float64 NumPy; the default momentum (0.9) is not passed."""
  tx = optax.chain(og.mask_optimizer(0.8, _lr, SPE, EPOCHS, nesterov=nesterov,
                                     score_weight_decay=decay), optax.sgd(_lr))
  params = _params()
  opt_state = tx.init(params)
  step = jax.jit(_step_fn(tx))
  scores = {name: np.zeros(params[name]["kernel"].shape) for name in ("dense1", "dense2")}
  velocity = {name: np.zeros_like(s) for name, s in scores.items()}
  for t in range(SPE * EPOCHS):
    before = params
    params, opt_state, grads = step(params, opt_state, _batch(t))
    eta_s = float(_lr(t)) * _fraction(t)
    for name in scores:
      g = (np.asarray(grads[name]["kernel"], np.float64) * np.asarray(before[name]["kernel"])
           + decay * scores[name])
      velocity[name] = 0.9 * velocity[name] + g
      scores[name] = scores[name] - eta_s * (g + 0.9 * velocity[name] if nesterov
                                             else velocity[name])
  got = og.methods.base.find_state(opt_state).scores
  for name in scores:
    np.testing.assert_allclose(got[name]["kernel"], scores[name], rtol=1e-4, atol=1e-7)


def _run(tx, steps, params=None):
  params = _params() if params is None else params
  opt_state = tx.init(params)
  step = jax.jit(_step_fn(tx))
  history = []
  for t in range(steps):
    masks_before = og.get_masks(opt_state)
    new_params, opt_state, grads = step(params, opt_state, _batch(t))
    history.append((params, masks_before, grads, new_params))
    params = new_params
  return params, opt_state, history


def test_mask_changes_only_on_refresh_steps_and_final_count_is_exact():
  """Refreshes at the epoch starts only, none after the last epoch (the masks left in the state
  are the ones the last epoch trained with), each at its exact keep count."""
  sparsity = 0.7
  tx = optax.chain(og.mask_optimizer(sparsity, 0.5, SPE, EPOCHS), optax.sgd(0.1))
  _, opt_state, history = _run(tx, SPE * EPOCHS)
  masks = [h[1] for h in history] + [og.get_masks(opt_state)]
  changed = []
  for t in range(1, len(masks)):
    diff = any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(masks[t - 1]),
                                                      jax.tree.leaves(masks[t])))
    if diff:
      changed.append(t)
  assert changed and all(t % SPE == 0 for t in changed), changed
  n = 5 * 8 + 8 * 3
  for t, m in enumerate(masks):
    epoch_start = (min(t, SPE * EPOCHS - 1) // SPE) * SPE
    p_t = sparsity * _fraction(epoch_start) if t >= SPE else 0.0  # zero scores: starts dense
    kept = sum(int(x.sum()) for x in jax.tree.leaves(m) if x.ndim)
    assert kept == n - math.floor(p_t * n), (t, kept)


def _one_refresh(tx, params):
  """The state after one step whose update refreshes the mask from the trained scores."""
  opt_state = tx.init(params)
  assert all(bool(m.all()) for m in jax.tree.leaves(og.get_masks(opt_state)))  # starts dense
  grads = jax.grad(_loss)(og.effective_params(params, opt_state), _batch(0))
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def test_pruned_weights_get_zero_loss_gradient_but_keep_score_gradient():
  tx = optax.chain(og.mask_optimizer(0.5, 0.5, momentum=0.0,
                                     sparsity_schedule=og.schedules.constant(0.5),
                                     refresh=og.schedules.every_n_steps(1)),
                   optax.sgd(0.1))
  params, opt_state = _one_refresh(tx, _params())
  masks = og.get_masks(opt_state)
  assert sum(int((~m).sum()) for m in jax.tree.leaves(masks) if m.ndim) == 32
  scores_before = og.methods.base.find_state(opt_state).scores
  w_eff = og.effective_params(params, opt_state)
  grads = jax.grad(_loss)(w_eff, _batch(1))
  updates, new_state = tx.update(grads, opt_state, params)
  scores_after = og.methods.base.find_state(new_state).scores
  nonzero_score_steps = 0
  for name in ("dense1", "dense2"):
    pruned = ~np.asarray(masks[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(updates[name]["kernel"])[pruned], 0.0)
    np.testing.assert_array_equal(np.asarray(w_eff[name]["kernel"])[pruned], 0.0)
    expected = -0.5 * np.asarray(grads[name]["kernel"] * params[name]["kernel"])
    step = np.asarray(scores_after[name]["kernel"] - scores_before[name]["kernel"])
    np.testing.assert_allclose(step[pruned], expected[pruned], rtol=1e-5, atol=1e-7)
    nonzero_score_steps += np.count_nonzero(step[pruned])
  assert nonzero_score_steps > 16  # removed weights keep their criterion


def test_removed_weights_come_back_with_their_stored_value():
  """Linear loss -Σ W_eff·c: the criterion of weight i is c_i·W_i, so the mask follows c."""
  params = {"w": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}}
  tx = optax.chain(
      og.mask_optimizer(0.5, 1.0, momentum=0.0, sparsity_schedule=og.schedules.constant(0.5),
                        refresh=og.schedules.every_n_steps(1)),
      optax.add_decayed_weights(0.1), optax.sgd(0.01))
  opt_state = tx.init(params)
  favour_first = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  favour_second = jnp.array([[0.0, 0.0], [10.0, 10.0]])
  loss = lambda p, c: -jnp.sum(p["w"]["kernel"] * c)
  history = []
  for c in [favour_first] * 3 + [favour_second] * 3:
    grads = jax.grad(loss)(og.effective_params(params, opt_state), c)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append((og.get_masks(opt_state)["w"]["kernel"], params["w"]["kernel"]))
  np.testing.assert_array_equal(history[2][0], [[True, True], [False, False]])
  np.testing.assert_array_equal(history[-1][0], [[False, False], [True, True]])
  revived_at = next(i for i, (m, _) in enumerate(history) if bool(m[1, 0]))
  w_eff = og.effective_params(params, opt_state)["w"]["kernel"]
  assert float(w_eff[1, 0]) == float(params["w"]["kernel"][1, 0])
  assert 0.0 < float(history[revived_at][1][1, 0]) < 3.0  # decayed while pruned, not re-initialised


def test_weight_decay_acts_on_pruned_entries():
  wd, lr = 0.1, 0.5
  tx = optax.chain(og.mask_optimizer(0.5, lr, sparsity_schedule=og.schedules.constant(0.5),
                                     refresh=og.schedules.every_n_steps(1)),
                   optax.add_decayed_weights(wd), optax.sgd(lr))
  params, opt_state = _one_refresh(tx, _params())
  masks = og.get_masks(opt_state)
  grads = jax.grad(_loss)(og.effective_params(params, opt_state), _batch(1))
  updates, _ = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  for name in ("dense1", "dense2"):
    pruned = ~np.asarray(masks[name]["kernel"])
    before = np.asarray(params[name]["kernel"])[pruned]
    np.testing.assert_allclose(np.asarray(new_params[name]["kernel"])[pruned],
                               before * (1 - lr * wd), rtol=1e-6)
    bias = np.asarray(params[name]["bias"])
    np.testing.assert_allclose(new_params[name]["bias"],
                               bias - lr * (np.asarray(grads[name]["bias"]) + wd * bias),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wrap", ["multisteps", "apply_if_finite", "inject_hyperparams"])
def test_works_inside_optax_wrappers(wrap):

  def make(learning_rate):
    return optax.chain(og.mask_optimizer(0.6, learning_rate, SPE, EPOCHS),
                       optax.add_decayed_weights(1e-4), optax.sgd(learning_rate, momentum=0.9))

  if wrap == "multisteps":
    tx = optax.MultiSteps(make(0.1), every_k_schedule=2)
    steps = 2 * SPE * EPOCHS
  elif wrap == "apply_if_finite":
    tx = optax.apply_if_finite(make(0.1), max_consecutive_errors=3)
    steps = SPE * EPOCHS
  else:
    tx = optax.inject_hyperparams(make)(learning_rate=0.1)
    steps = SPE * EPOCHS
  params, opt_state, _ = _run(tx, steps)
  state = og.methods.base.find_state(opt_state)
  assert int(state.count) == SPE * EPOCHS
  kept = sum(int(m.sum()) for m in jax.tree.leaves(og.get_masks(opt_state)) if m.ndim)
  n = 64
  assert kept == n - math.floor(0.6 * _fraction((EPOCHS - 1) * SPE) * n)  # the last epoch's
  w_eff = og.effective_params(params, opt_state)
  assert int(sum(jnp.count_nonzero(w) for w in jax.tree.leaves(w_eff) if w.ndim == 2)) == kept


@pytest.mark.parametrize("opt", [optax.adam(1e-2), optax.adamw(1e-2), optax.lion(1e-3)])
def test_chains_with_other_optimizers(opt):
  tx = optax.chain(og.mask_optimizer(0.5, 1e-2, SPE, EPOCHS), opt)
  params, opt_state, _ = _run(tx, SPE * EPOCHS)
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  pruned = ~og.get_masks(opt_state)["dense1"]["kernel"]
  assert int(pruned.sum()) > 0


def test_state_is_named_tuples_of_arrays():
  tx = optax.chain(og.mask_optimizer(0.5, 0.1, SPE, EPOCHS), optax.sgd(0.1))
  state = tx.init(_params())
  assert isinstance(state[0], og.methods.scores.ScoresState)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_bad_input():
  with pytest.raises(ValueError, match="sparsity"):
    og.mask_optimizer(1.0, 0.1, SPE, EPOCHS)
  with pytest.raises(ValueError, match="total_epochs"):
    og.mask_optimizer(0.5, 0.1, SPE)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    og.mask_optimizer(0.5, 0.1, sparsity_schedule=og.schedules.constant(0.5))
  with pytest.raises(ValueError, match="distribution"):
    og.mask_optimizer(0.5, 0.1, SPE, EPOCHS, distribution="nope")
  tx = og.mask_optimizer(0.5, 0.1, SPE, EPOCHS)
  state = tx.init(_params())
  with pytest.raises(ValueError, match="params"):
    tx.update(_params(), state)
  params = _params()
  assert og.effective_params(params, optax.sgd(0.1).init(params)) is params  # dense training
  two = optax.chain(og.mask_optimizer(0.5, 0.1, SPE, EPOCHS), og.gmp(0.5, 0, 4, 2))
  with pytest.raises(ValueError, match="exactly one"):
    og.effective_params(_params(), two.init(_params()))


def test_budget_ramp_reaches_the_target_exactly_at_six_tenths_of_the_run():
  fraction = og.schedules.sigmoid_window_fraction(SPE, 1.0, 6.0)
  values = [float(fraction(e * SPE + SPE - 1)) for e in range(10)]
  expected = [min(1.0, (1 / (1 + math.exp(-2 * (e - 3.5)))) / (1 / (1 + math.exp(-5))))
              for e in range(6)] + [1.0] * 4
  np.testing.assert_allclose(values, expected, rtol=1e-6)
  assert values[6:] == [1.0] * 4 and all(a < b for a, b in zip(values[:6], values[1:7]))
  tx = optax.chain(og.mask_optimizer(0.7, 0.5, SPE, 10, ramp="budget"), optax.sgd(0.1))
  _, opt_state, history = _run(tx, SPE * 10)
  n = 5 * 8 + 8 * 3
  for t, (_, masks, _, _) in enumerate(history):
    kept = sum(int(m.sum()) for m in jax.tree.leaves(masks) if m.ndim)
    if t >= 6 * SPE:  # the last 40% of the run trains at the target
      assert kept == n - math.floor(0.7 * n), t


def test_reference_ramp_warns_when_a_short_run_cannot_reach_its_target():
  with pytest.warns(UserWarning, match="ramp='budget'"):
    og.mask_optimizer(0.9, 0.1, SPE, 10)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    og.mask_optimizer(0.9, 0.1, SPE, 40)
    og.mask_optimizer(0.9, 0.1, SPE, 10, ramp="budget")
    og.mask_optimizer(0.9, 0.1, SPE, 10, ramp="auto")
  auto = og.methods.optg.resolve_ramp
  assert (auto("auto", 99), auto("auto", 100), auto("reference", 10)) == (
      "budget", "reference", "reference")
  with pytest.raises(ValueError, match="ramp"):
    og.mask_optimizer(0.9, 0.1, SPE, 10, ramp="linear")


def _top_k_at(scores, sparsity):
  """The global top-k of the kernels' scores at ``sparsity``, ties to the earlier leaf and lower
  flat index, in NumPy (kept count ``N − floor(p·N)``)."""
  names = ("dense1", "dense2")
  flat = np.concatenate([np.asarray(scores[n]["kernel"]).ravel() for n in names])
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:flat.size - math.floor(sparsity * flat.size)]] = True
  sizes = np.cumsum([0] + [np.size(scores[n]["kernel"]) for n in names])
  return {n: keep[sizes[i]:sizes[i + 1]].reshape(np.shape(scores[n]["kernel"]))
          for i, n in enumerate(names)}


def _kernel_masks(masks):
  return {n: np.asarray(masks[n]["kernel"]) for n in ("dense1", "dense2")}


@pytest.mark.parametrize("jit", [False, True])
def test_final_model_keeps_the_mask_its_last_epoch_trained_with(jit):
  """Budget ramp, reached at epoch 3 of 6: ``final='trained'`` gives the masks the last step
  used; ``final='reselect'`` (the authors') the top-k of the final scores, a different mask."""
  final_masks = jax.jit(og.final_masks) if jit else og.final_masks
  got = {}
  for final in og.methods.optg.FINALS:
    tx = optax.chain(og.mask_optimizer(0.7, 0.5, SPE, EPOCHS, ramp="budget", final=final),
                     optax.sgd(0.1))
    params, opt_state, history = _run(tx, SPE * EPOCHS)
    last_used = _kernel_masks(history[-1][1])
    scores = og.methods.base.find_state(opt_state).scores
    got[final] = _kernel_masks(final_masks(params, opt_state))
    reselected = _top_k_at(scores, 0.7)
    assert sum(m.sum() for m in last_used.values()) == 64 - math.floor(0.7 * 64)
    if final == "trained":
      for n in last_used:
        np.testing.assert_array_equal(got[final][n], last_used[n])
    else:
      for n in last_used:
        np.testing.assert_array_equal(got[final][n], reselected[n])
    # The scores moved after the last refresh: the two rules give different masks here.
    assert any((last_used[n] != reselected[n]).any() for n in last_used)
    # An explicit sparsity always selects again, from the final scores.
    half = _kernel_masks(og.final_masks(params, opt_state, 0.5))
    for n, m in _top_k_at(scores, 0.5).items():
      np.testing.assert_array_equal(half[n], m)


def test_final_model_selects_again_when_the_ramp_never_reached_the_target():
  """The reference ramp at E = 6 trains its last epoch at 0.88·P: the final masks are the top-k
  of the final scores at P, with either ``final``."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tx = optax.chain(og.mask_optimizer(0.7, 0.5, SPE, EPOCHS), optax.sgd(0.1))
  params, opt_state, history = _run(tx, SPE * EPOCHS)
  assert sum(m.sum() for m in _kernel_masks(history[-1][1]).values()) > 64 - math.floor(0.7 * 64)
  scores = og.methods.base.find_state(opt_state).scores
  got = _kernel_masks(og.final_masks(params, opt_state))
  for n, m in _top_k_at(scores, 0.7).items():
    np.testing.assert_array_equal(got[n], m)


def test_final_must_be_a_known_rule():
  with pytest.raises(ValueError, match="final must be one of"):
    og.mask_optimizer(0.7, 0.5, SPE, EPOCHS, final="best")


def test_budget_ramp_fixes_the_mask_for_the_last_tenth_of_the_run():
  """E = 10: the ramp reaches P at epoch 6; the mask refreshes at epoch starts up to epoch 8,
  and the last epoch trains the mask of epoch 8, at P exactly."""
  epochs = 10
  tx = optax.chain(og.mask_optimizer(0.7, 0.5, SPE, epochs, ramp="budget"), optax.sgd(0.1))
  _, opt_state, history = _run(tx, SPE * epochs)
  masks = [h[1] for h in history] + [og.get_masks(opt_state)]
  changed = [t for t in range(1, len(masks))
             if any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(masks[t - 1]),
                                                           jax.tree.leaves(masks[t])))]
  assert changed and all(t % SPE == 0 and t <= 8 * SPE for t in changed), changed
  assert 6 * SPE in changed
  kept = sum(int(m.sum()) for m in jax.tree.leaves(masks[-1]) if m.ndim)
  assert kept == 64 - math.floor(0.7 * 64)
