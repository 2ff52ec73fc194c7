"""``og.final_params``: what a run ships, for every registered method, equals the exported and
reloaded model bit for bit, with each method's own folding (signs, scales) in."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import recipes

import helpers

SPE, EPOCHS, SPARSITY = 2, 3, 0.5
OPTIONS = {"continuous_sparsification": {"layers": "all"}}  # an MLP has no spatial convs


def _params():
  k = jax.random.split(jax.random.key(3), 2)
  return {"fc1": {"kernel": jax.random.normal(k[0], (8, 16)) / 3, "bias": jnp.full(16, 0.1)},
          "fc2": {"kernel": jax.random.normal(k[1], (16, 4)) / 4, "bias": jnp.zeros(4)}}


def _logits(p, x):
  return jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _inputs(t):
  k = jax.random.split(jax.random.key(500 + t))
  return jax.random.normal(k[0], (24, 8)), jax.random.randint(k[1], (24,), 0, 4)


def _loss(p, t):
  x, y = _inputs(t)
  return optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()


def _trained(method):
  """The params and optimizer state at the end of ``method``'s whole run (rounds included)."""
  options = OPTIONS.get(method, {})
  tx = recipes.make_optimizer(method, SPARSITY, steps_per_epoch=SPE, epochs=EPOCHS, seed=0,
                              **options)
  params = recipes.init_params(method, _params(), 0, **options)
  opt_state = tx.init(params)
  step = helpers.jitted_step(tx, _loss)
  for t in range(recipes.total_epochs(method, SPARSITY, EPOCHS, **options) * SPE):
    params, opt_state, _ = step(params, opt_state, t)
    params, _, _ = og.sync_rewind(params, opt_state)
  return params, opt_state


@pytest.fixture(scope="module")
def trained():
  return {method: _trained(method) for method in recipes.names()}


@pytest.mark.parametrize("method", recipes.names())
def test_final_params_evaluate_as_the_exported_and_reloaded_model(method, trained, tmp_path):
  params, opt_state = trained[method]
  shipped = og.final_params(params, opt_state)
  values, masks = og.export.compact_params(params, opt_state)
  og.export.save(tmp_path / "model.ospk", values, masks)
  reloaded = og.export.load(tmp_path / "model.ospk", like=params)
  for a, b in zip(jax.tree.leaves(shipped), jax.tree.leaves(reloaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x, _ = _inputs(0)
  np.testing.assert_array_equal(np.asarray(jax.jit(_logits)(shipped, x)),
                                np.asarray(jax.jit(_logits)(reloaded, x)))
  # Pruned entries are exact zeros; inside jit the same values.
  final_masks = og.final_masks(params, opt_state)
  for w, m in zip(jax.tree.leaves(shipped), jax.tree.leaves(final_masks)):
    assert not np.any(np.asarray(w)[~np.broadcast_to(np.asarray(m), np.shape(w))])
  for a, b in zip(jax.tree.leaves(shipped), jax.tree.leaves(jax.jit(og.final_params)(
      params, opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_signed_supermask_ships_its_signs(trained):
  params, opt_state = trained["signed_supermask"]
  signs = og.methods.base.find_state(opt_state).masks
  shipped = og.final_params(params, opt_state)
  for name in ("fc1", "fc2"):
    s = np.asarray(signs[name]["kernel"])
    assert (s < 0).any() and (s > 0).any() and (s == 0).any()
    np.testing.assert_array_equal(shipped[name]["kernel"], np.asarray(params[name]["kernel"]) * s)
  # The bool masks alone lose the signs: W ⊙ M differs where a weight is inverted.
  plain = og.apply_masks(params, og.final_masks(params, opt_state))
  assert not np.array_equal(plain["fc1"]["kernel"], shipped["fc1"]["kernel"])


def test_continuous_sparsification_ships_its_ticket_scale(trained):
  params, opt_state = trained["continuous_sparsification"]
  logits = og.methods.base.find_state(opt_state).aux.logits
  shipped = og.final_params(params, opt_state)
  scale = np.float32(1.0) / np.float32(jax.nn.sigmoid(0.0))  # 1/σ(s0), s0 = 0: 2
  for name in ("fc1", "fc2"):
    ticket = np.asarray(logits[name]["kernel"]) > 0
    assert ticket.any() and not ticket.all()
    expected = np.where(ticket, np.asarray(params[name]["kernel"]) * scale, 0.0)
    np.testing.assert_array_equal(shipped[name]["kernel"], expected)


def test_a_chain_without_a_method_is_dense_training():
  params = _params()
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9))
  opt_state = tx.init(params)
  assert og.effective_params(params, opt_state) is params
  masks = og.get_masks(opt_state, params)
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(masks))
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(og.final_params(params, opt_state)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="pass params"):
    og.get_masks(opt_state)


def test_continuous_sparsification_mid_search_ships_the_ticket_it_would_cut():
  """In the middle of a search round the forward pass uses soft masks; ``og.final_params`` is
  still the ticket ``W ⊙ [s > 0]/σ(s0)``, not the soft-masked weights."""
  options = OPTIONS["continuous_sparsification"]
  tx = recipes.make_optimizer("continuous_sparsification", SPARSITY, steps_per_epoch=SPE,
                              epochs=EPOCHS, seed=0, **options)
  params = _params()
  opt_state = tx.init(params)
  step = helpers.jitted_step(tx, _loss)
  for t in range(EPOCHS * SPE + 3):  # into round 2
    params, opt_state, _ = step(params, opt_state, t)
  state = og.methods.base.find_state(opt_state)
  assert int(state.round) == 1 and int(state.round_step) == 3
  soft = state.masks["fc1"]["kernel"]
  assert not np.all(np.isin(np.asarray(soft), [0.0, 2.0]))  # soft, not a ticket
  shipped = og.final_params(params, opt_state)
  for name in ("fc1", "fc2"):
    ticket = np.asarray(state.aux.logits[name]["kernel"]) > 0
    assert ticket.any() and not ticket.all()
    expected = np.where(ticket, np.asarray(params[name]["kernel"]) * np.float32(2.0), 0.0)
    np.testing.assert_array_equal(shipped[name]["kernel"], expected)
