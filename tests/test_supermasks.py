"""The supermask family: signed supermask and edge-popup, their initialisers and SGDW.

Each defining identity is checked numerically against an independent computation: frozen weights
(bitwise), ternary masks and fixed thresholds, decoupled decay, the straight-through gradients,
exact per-layer counts; and both train on the embedded MNIST digits.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og

import helpers
from optg_jax import models
from optg_jax.data import mnist_5k
from optg_jax.methods import signed_supermask as signed_lib


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4))},
          "fc": {"kernel": jax.random.normal(k[1], (16, 5)), "bias": jnp.zeros(5)},
          "out": {"kernel": jax.random.normal(k[2], (5, 3)), "bias": -jnp.zeros(3)}}


def _loss(p, t):
  x = jax.random.normal(jax.random.key(100 + t), (8, 4, 4, 2))
  h = jax.nn.elu(jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
  h = jnp.mean(h, axis=(1, 2)) @ jnp.ones((4, 16)) / 4
  h = jax.nn.elu(h @ p["fc"]["kernel"] + p["fc"]["bias"])
  return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - 0.3) ** 2)


def _bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def _train(tx, params, steps, loss=_loss):
  state = tx.init(params)
  step = helpers.jitted_step(tx, loss)
  history = []
  for t in range(steps):
    before = state
    params, state, grads = step(params, state, t)
    history.append((before, grads))
  return params, state, history


# ----------------------------------------------------------------------------------------------
# Initialisers


def test_elus_and_signed_constant_are_plus_minus_the_constant_of_the_fan_in():
  params = _params()
  elus = og.initializers.elus(params, jax.random.key(1))
  np.testing.assert_allclose(np.abs(elus["conv"]["kernel"]), math.sqrt(3 / 18), rtol=1e-6)
  np.testing.assert_allclose(np.abs(elus["fc"]["kernel"]), math.sqrt(3 / 16), rtol=1e-6)
  assert 0.3 < float(jnp.mean(elus["fc"]["kernel"] > 0)) < 0.7
  resnet56 = og.initializers.elus(params, jax.random.key(1), factor=1.3)
  np.testing.assert_allclose(np.abs(resnet56["out"]["kernel"]), math.sqrt(2.6 / 5), rtol=1e-6)
  signed = og.initializers.signed_constant(params, jax.random.key(1))
  np.testing.assert_allclose(np.abs(signed["conv"]["kernel"]), math.sqrt(2 / 18), rtol=1e-6)
  assert signed["fc"]["bias"] is params["fc"]["bias"]  # non-kernels untouched
  scaled = og.initializers.signed_constant(params, jax.random.key(1), fan_scale=0.5)
  np.testing.assert_allclose(np.abs(scaled["fc"]["kernel"]), math.sqrt(2 / 8), rtol=1e-6)
  np.testing.assert_array_equal(np.sign(scaled["fc"]["kernel"]), np.sign(signed["fc"]["kernel"]))
  baseline = og.initializers.elu_uniform(params, jax.random.key(1))["fc"]["kernel"]
  assert math.sqrt(4.5 / 16) * 0.9 < float(jnp.max(jnp.abs(baseline))) <= math.sqrt(4.5 / 16)


def test_kaiming_normal_and_xavier_uniform_have_the_papers_spread():
  big = {"w": jnp.zeros((3, 3, 64, 128))}
  w = og.initializers.kaiming_normal(big, jax.random.key(0))["w"]
  assert abs(float(jnp.std(w)) / math.sqrt(2 / 576) - 1) < 0.02
  x = og.initializers.xavier_uniform_init(jax.random.key(0), (3, 3, 64, 128), jnp.float32)
  bound = math.sqrt(6 / (576 + 1152))
  assert float(jnp.max(jnp.abs(x))) <= bound and float(jnp.max(jnp.abs(x))) > 0.99 * bound
  assert og.initializers.fans((3, 3, 64, 128)) == (576, 1152)


# ----------------------------------------------------------------------------------------------
# SGDW


def test_sgdw_is_keras_momentum_with_decay_outside_the_learning_rate():
  lr = lambda t: 0.1 * 0.5 ** t
  wd = lambda t: 0.01 * 0.5 ** t
  for nesterov in (True, False):
    tx = og.optimizers.sgdw(lr, wd, 0.9, nesterov)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    v, expected = np.zeros(2), np.array([1.0, -2.0])
    for t in range(4):
      g = jnp.array([0.3, -0.1]) * (t + 1)
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
      v = 0.9 * v - lr(t) * np.asarray(g)
      step = 0.9 * v - lr(t) * np.asarray(g) if nesterov else v
      expected = expected + step - wd(t) * expected
    np.testing.assert_allclose(p, expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Signed supermask


def test_signed_supermask_masks_are_ternary_with_fixed_thresholds_and_frozen_weights():
  params = og.initializers.elus(_params(), jax.random.key(2))
  tx = og.signed_supermask(0.5, 5e-4, steps_per_epoch=3, threshold=0.4)
  new_params, state, history = _train(tx, params, 12)
  assert all(np.array_equal(a, b) for a, b in zip(_bits(params), _bits(new_params)))
  first = history[0][0]
  for name in ("conv", "fc", "out"):
    m0 = np.asarray(first.scores[name]["kernel"])
    assert float(state.aux[name]["kernel"]) == pytest.approx(0.4 * np.abs(m0).max(), rel=1e-7)
    assert float(state.aux[name]["kernel"]) == float(first.aux[name]["kernel"])
    mask = np.asarray(state.masks[name]["kernel"])
    assert set(np.unique(mask)) <= {-1, 0, 1} and mask.dtype == np.int8
    m = np.asarray(state.scores[name]["kernel"])
    np.testing.assert_array_equal(mask, np.sign(m) * (np.abs(m) > state.aux[name]["kernel"]))
  assert 0 < float(signed_lib.inverted_fraction(state)) < 0.6


def test_signed_supermask_masks_start_xavier_uniform_with_tf_fans():
  state = og.signed_supermask().init(_params())
  bound = math.sqrt(6 / (18 + 36))
  m = np.asarray(state.scores["conv"]["kernel"])
  assert np.abs(m).max() <= bound and np.abs(m).max() > 0.8 * bound


def test_signed_supermask_zero_gradient_shrinks_the_mask_by_exactly_one_minus_wd():
  params = og.initializers.elus(_params(), jax.random.key(2))
  spe, wd0 = 2, 0.01
  tx = og.signed_supermask(0.5, wd0, steps_per_epoch=spe)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for t in range(5):
    before = np.asarray(state.scores["fc"]["kernel"])
    _, state = tx.update(zeros, state, params)
    wd_t = np.float32(wd0 * 0.9 ** (t / (10 * spe)))
    np.testing.assert_allclose(state.scores["fc"]["kernel"], before * (1 - wd_t), rtol=2e-7,
                               atol=0)


def test_signed_supermask_gradient_is_g_times_w_straight_through():
  params = og.initializers.elus(_params(), jax.random.key(2))
  lr = 0.5
  tx = og.signed_supermask(lr, 0.0, momentum=0.0)
  state = tx.init(params)
  m0 = {k: np.asarray(state.scores[k]["kernel"]) for k in ("conv", "fc", "out")}
  w_eff = {k: {**params[k], "kernel": params[k]["kernel"]
               * np.sign(m0[k]) * (np.abs(m0[k]) > 0.4 * np.abs(m0[k]).max())} for k in params}
  g = jax.grad(_loss)(w_eff, 0)
  _, state = tx.update(g, state, params)
  for k in m0:
    expected = m0[k] - lr * np.asarray(g[k]["kernel"]) * np.asarray(params[k]["kernel"])
    np.testing.assert_allclose(state.scores[k]["kernel"], expected, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# edge-popup


def test_edge_popup_keeps_exactly_k_per_layer_at_every_step_with_frozen_weights():
  params = og.initializers.signed_constant(_params(), jax.random.key(3))
  tx = og.edge_popup(0.7, 0.5)
  new_params, state, history = _train(tx, params, 10)
  assert all(np.array_equal(a, b) for a, b in zip(_bits(params), _bits(new_params)))
  for before, _ in history + [(state, None)]:
    for name, n in (("conv", 72), ("fc", 80), ("out", 15)):
      s = np.abs(np.asarray(before.scores[name]["kernel"])).ravel()
      kept = np.asarray(before.masks[name]["kernel"]).ravel()
      assert kept.sum() == n - math.floor(0.7 * n)
      assert s[kept].min() >= s[~kept].max()
  final = og.final_masks(new_params, state)
  np.testing.assert_array_equal(final["fc"]["kernel"], state.masks["fc"]["kernel"])
  assert history[0][0].scores["fc"]["kernel"] is not None
  changed = [not np.array_equal(a.masks["fc"]["kernel"], b.masks["fc"]["kernel"])
             for (a, _), (b, _) in zip(history, history[1:])]
  assert any(changed)  # the scores move the subnetwork


def test_edge_popup_score_gradient_is_sign_s_times_w_times_g():
  params = og.initializers.kaiming_normal(_params(), jax.random.key(3))
  tx = og.edge_popup(0.5, 1.0, weight_decay=0.0, momentum=0.0)
  state = tx.init(params)
  s0 = {k: np.asarray(state.scores[k]["kernel"]) for k in ("conv", "fc", "out")}
  g = jax.grad(_loss)(og.effective_params(params, state), 0)
  _, state = tx.update(g, state, params)
  for k in s0:
    expected = s0[k] - np.sign(s0[k]) * np.asarray(params[k]["kernel"]) * np.asarray(g[k]["kernel"])
    np.testing.assert_allclose(state.scores[k]["kernel"], expected, rtol=1e-6, atol=1e-8)
  bound = 1 / math.sqrt(16)
  assert 0.8 * bound < np.abs(s0["fc"]).max() <= bound


def test_edge_popup_scores_decay():
  params = _params()
  tx = og.edge_popup(0.5, 1.0, weight_decay=0.1, momentum=0.0)
  state = tx.init(params)
  s0 = np.asarray(state.scores["fc"]["kernel"])
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_allclose(state.scores["fc"]["kernel"], s0 * 0.9, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# End to end on the embedded digits


def _mnist_run(make_tx, reinit, activation, epochs=10, batch=128):
  train, test = mnist_5k.load_mnist_5k(0)
  model = models.LeNet300100(activation=activation, use_bias=False)
  params = reinit(model.init(jax.random.key(0), train.images[:1])["params"], jax.random.key(1))
  spe = len(train.labels) // batch
  tx = make_tx(spe, epochs)

  def loss(w, x, y):
    logits = model.apply({"params": w}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(og.effective_params(params, state), x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, start = tx.init(params), params
  rng = np.random.default_rng(0)
  for _ in range(epochs):
    order = rng.permutation(len(train.labels))
    for b in range(spe):
      i = order[b * batch:(b + 1) * batch]
      params, state = step(params, state, train.images[i], train.labels[i])
  assert all(np.array_equal(a, b) for a, b in zip(_bits(start), _bits(params)))
  logits = model.apply({"params": og.effective_params(params, state)}, test.images)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test.labels))
  return accuracy, 1 - float(og.sparsity_summary(og.get_masks(state)).sparsity)


@pytest.mark.slow
def test_signed_supermask_trains_the_fcn_on_the_embedded_digits():
  accuracy, remaining = _mnist_run(lambda spe, e: og.signed_supermask(0.05, 5e-4, spe),
                                   og.initializers.elus, "elu")
  assert accuracy > 0.85 and remaining < 0.6


@pytest.mark.slow
def test_edge_popup_trains_lenet_on_the_embedded_digits():
  accuracy, remaining = _mnist_run(
      lambda spe, e: og.edge_popup(0.5, optax.cosine_decay_schedule(0.1, spe * e)),
      og.initializers.signed_constant, "relu")
  assert accuracy > 0.85 and remaining == pytest.approx(0.5, abs=1e-5)
