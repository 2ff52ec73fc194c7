"""The baselines: GMP, one-shot magnitude, random and SNIP as optax transformations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og

import helpers


def _params():
  k = jax.random.split(jax.random.key(3), 3)
  return {"a": {"kernel": jax.random.normal(k[0], (20, 10)), "bias": jnp.zeros(10)},
          "b": {"kernel": jax.random.normal(k[1], (10, 4)), "bias": jnp.zeros(4)}}


def _loss(p, t):
  x = jax.random.normal(jax.random.key(t), (8, 20))
  return jnp.sum((jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]) ** 2)


def _train(tx, steps, params=None):
  params = _params() if params is None else params
  opt_state = tx.init(params)
  step = helpers.jitted_step(tx, _loss)
  trace = []
  for t in range(steps):
    trace.append((params, og.get_masks(opt_state)))
    params, opt_state, grads = step(params, opt_state, t)
  trace.append((params, og.get_masks(opt_state)))
  return trace


def _kept(mask):
  return int(mask.sum())


def test_gmp_follows_the_cubic_schedule_per_layer():
  begin, end, freq, final = 2, 10, 2, 0.8
  schedule = og.schedules.polynomial(final, begin, end, freq)
  trace = _train(optax.chain(og.gmp(final, begin, end, freq), optax.sgd(0.01)), 14)
  for t, (_, masks) in enumerate(trace):
    last_refresh = min(end, begin + (t - begin) // freq * freq) if t >= begin else None
    if last_refresh is None:
      p = 0.0
    else:
      p = float(schedule(last_refresh))  # float32: exact counts are relative to this value
      x = (last_refresh - begin) / (end - begin)
      np.testing.assert_allclose(p, final * (1 - (1 - x) ** 3), rtol=1e-6)
    assert _kept(masks["a"]["kernel"]) == 200 - math.floor(p * 200), t
    assert _kept(masks["b"]["kernel"]) == 40 - math.floor(p * 40), t


def test_gmp_keeps_largest_magnitudes_of_the_weights_it_saw():
  trace = _train(optax.chain(og.gmp(0.5, 0, 1, 1), optax.sgd(0.01)), 1)
  (params, dense), (_, masks) = trace
  assert all(bool(m.all()) for m in jax.tree.leaves(dense))
  w = np.abs(np.asarray(params["a"]["kernel"])).ravel()
  np.testing.assert_array_equal(np.asarray(masks["a"]["kernel"]).ravel(), w >= np.sort(w)[100])


def test_one_shot_magnitude_global_at_init():
  params = _params()
  state = og.magnitude(0.9).init(params)
  masks = og.get_masks(state)
  w = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel() for n in "ab"])
  kept = np.concatenate([np.asarray(masks[n]["kernel"]).ravel() for n in "ab"])
  assert kept.sum() == 240 - math.floor(0.9 * 240)
  np.testing.assert_array_equal(kept, w >= np.sort(w)[-kept.sum()])
  assert bool(masks["a"]["bias"]) and masks["a"]["bias"].shape == ()


def test_one_shot_magnitude_later_step_and_frozen_after():
  trace = _train(optax.chain(og.magnitude(0.5, step=3), optax.sgd(0.05)), 6)
  assert all(_kept(m["a"]["kernel"]) + _kept(m["b"]["kernel"]) == 240 for _, m in trace[:3])
  for _, m in trace[3:]:
    np.testing.assert_array_equal(m["a"]["kernel"], trace[3][1]["a"]["kernel"])
  assert _kept(trace[3][1]["a"]["kernel"]) + _kept(trace[3][1]["b"]["kernel"]) == 120


def _opaque_init_window(step):  # in_window(0, 1), but jit cannot tell it never holds again
  return og.schedules.in_window(0, 1)(step)


_INIT_ONLY = {
    "magnitude": (lambda: og.magnitude(0.9), lambda: og.methods.pruner.scored_pruner(
        0.9, _opaque_init_window, selection=og.Selection("global"))),
    "random": (lambda: og.random_pruning(0.75, seed=4), lambda: og.methods.pruner.scored_pruner(
        0.75, _opaque_init_window, score_fn=lambda params, grads, aux: aux,
        init_aux=og.methods.random_pruning.random_scores(4), selection=og.Selection("uniform"))),
}


@pytest.mark.parametrize("name", sorted(_INIT_ONLY))
def test_init_only_pruners_carry_no_refresh_branch_and_train_as_with_it(name):
  """A mask selected at init only: the updates hold no ``conditional`` (its top-k branch costs
  every step, taken or not), the state keeps no score, and 4 steps give the params and masks
  bit for bit of the same method with an opaque predicate, whose updates keep the branch."""
  assert og.schedules.true_only_before(og.schedules.in_window(0, 1), 1)
  assert not og.schedules.true_only_before(og.schedules.in_window(0, 2), 1)
  assert not og.schedules.true_only_before(_opaque_init_window, 1)
  fast, slow = (make() for make in _INIT_ONLY[name])
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)

  def hlo(tx):
    return jax.jit(tx.update).lower(grads, tx.init(params), params).compile().as_text()

  assert "conditional(" not in hlo(fast) and "conditional(" in hlo(slow)
  assert fast.init(params).aux is None  # random scores are not kept after the selection
  for (p1, m1), (p2, m2) in zip(_train(optax.chain(fast, optax.sgd(0.05, 0.9)), 4),
                                _train(optax.chain(slow, optax.sgd(0.05, 0.9)), 4)):
    jax.tree.map(np.testing.assert_array_equal, (p1, m1), (p2, m2))


def test_random_pruning_exact_per_layer_density_and_seeded():
  params = _params()
  m1 = og.get_masks(og.random_pruning(0.75, seed=1).init(params))
  m2 = og.get_masks(og.random_pruning(0.75, seed=1).init(params))
  m3 = og.get_masks(og.random_pruning(0.75, seed=2).init(params))
  assert _kept(m1["a"]["kernel"]) == 50 and _kept(m1["b"]["kernel"]) == 10
  np.testing.assert_array_equal(m1["a"]["kernel"], m2["a"]["kernel"])
  assert bool(jnp.any(m1["a"]["kernel"] != m3["a"]["kernel"]))


def test_snip_scores_first_batch_saliency():
  params = _params()
  trace = _train(optax.chain(og.snip(0.9), optax.sgd(0.01)), 3, params)
  grads = jax.grad(_loss)(params, 0)
  saliency = np.concatenate([np.abs(np.asarray(grads[n]["kernel"] * params[n]["kernel"])).ravel()
                             for n in "ab"])
  k = 240 - math.floor(0.9 * 240)
  for _, masks in trace[1:]:
    kept = np.concatenate([np.asarray(masks[n]["kernel"]).ravel() for n in "ab"])
    assert kept.sum() == k
    np.testing.assert_array_equal(kept, saliency >= np.sort(saliency)[-k])


def test_snip_first_update_is_already_sparse():
  params = _params()
  tx = optax.chain(og.snip(0.9), optax.sgd(0.01))
  state = tx.init(params)
  grads = jax.grad(_loss)(params, 0)
  updates, state = tx.update(grads, state, params)
  pruned = ~og.get_masks(state)["a"]["kernel"]
  np.testing.assert_array_equal(np.asarray(updates["a"]["kernel"])[pruned], 0.0)


def test_baselines_bad_input():
  with pytest.raises(ValueError, match="sparsity"):
    og.gmp(1.5, 0, 10, 1)
  with pytest.raises(ValueError, match="end_step"):
    og.gmp(0.5, 10, 5, 1)
  with pytest.raises(ValueError, match="num_batches"):
    og.snip(0.5, num_batches=0)
  with pytest.raises(ValueError, match="distribution"):
    og.random_pruning(0.5, distribution="triangular")
  with pytest.raises(ValueError, match="sparsity"):
    og.magnitude(-0.1)
