"""Lottery tickets (IMP with rewinding): exact counts per level, survivors only, the rewind."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optg_jax as og
from optg_jax.methods import lottery
from optg_jax.methods import rounds as rounds_lib
from test_rounds import GRAD, bitwise_equal, inner_sgd, params0, run_loop

T, K, LEVELS = 6, 2, 4


def kept(mask):
  return int(np.sum(np.asarray(mask)))


def level_ends(trace):
  """Indices of the records right after each pruning (the rewinds)."""
  return [i for i, rec in enumerate(trace)
          if i and int(rounds_lib.rounds_state(rec[1]).event) == rounds_lib.REWOUND]


def imp_trace(distribution="global", **kwargs):
  tx = og.lottery_ticket(LEVELS, T, inner_sgd(), rewind_step=K, distribution=distribution,
                         **kwargs)
  return run_loop(tx, lottery.total_steps(LEVELS, T, K))


def test_keep_counts_are_exact():
  for n in (1, 7, 250, 1000, 25_502_912):
    for level, k in enumerate(lottery.level_keep_counts(n, 18), start=1):
      assert k == n - math.floor((1 - Fraction(4, 5) ** level) * n)
  assert lottery.level_keep_counts(250, 3) == (200, 160, 128)
  assert lottery.total_steps(3, 10, 2) == 10 + 3 * 8


@pytest.fixture(scope="module")
def global_trace():
  return imp_trace()


def test_global_levels_hit_the_exact_counts(global_trace):
  ends = level_ends(global_trace)
  assert ends == [T + level * (T - K) for level in range(LEVELS)]
  want = lottery.level_keep_counts(200 + 40, LEVELS)
  for i, k in zip(ends, want):
    masks = og.get_masks(global_trace[i][1])
    assert kept(masks["a"]["kernel"]) + kept(masks["b"]["kernel"]) == k
    assert masks["a"]["bias"].shape == ()  # biases are never pruned


def test_masks_only_shrink(global_trace):
  for (_, s0, *_), (_, s1, *_) in zip(global_trace, global_trace[1:]):
    for m0, m1 in zip(jax.tree.leaves(og.get_masks(s0)), jax.tree.leaves(og.get_masks(s1))):
      assert not np.any(np.asarray(m1) & ~np.asarray(m0))


@pytest.mark.parametrize("level", [0, 2])
def test_next_masks_drop_the_smallest_survivors_globally(level):
  params = params0()
  prune = lottery.MagnitudeLevels(og.Selection(), "global", 0.2, 4)
  old = jax.tree.map(lambda p: jax.random.uniform(jax.random.key(p.size), p.shape) < 0.9
                     if p.ndim == 2 else jnp.array(True), params)
  new, aux = jax.jit(prune)(params, old, jnp.int32(level), None)
  assert aux is None
  assert kept(new["a"]["kernel"]) + kept(new["b"]["kernel"]) == \
      lottery.level_keep_counts(240, 4)[level]
  dropped, survivors = [], []
  for name in ("a", "b"):
    m0, m1 = np.asarray(old[name]["kernel"]), np.asarray(new[name]["kernel"])
    assert not np.any(m1 & ~m0)
    w = np.abs(np.asarray(params[name]["kernel"]))
    dropped.append(w[m0 & ~m1])
    survivors.append(w[m1])
  assert np.concatenate(dropped).max() <= np.concatenate(survivors).min()


def test_weights_rewind_to_step_k_with_zeros_where_pruned(global_trace):
  w_k = global_trace[K][0]
  for i in level_ends(global_trace):
    params, opt_state = global_trace[i][:2]
    assert bitwise_equal(params, w_k)
    masks = og.get_masks(opt_state)
    eff = og.effective_params(params, opt_state)
    assert np.all(np.asarray(eff["a"]["kernel"])[~np.asarray(masks["a"]["kernel"])] == 0)
    assert int(rounds_lib.rounds_state(opt_state).inner_state[1][1].count) == K


def test_final_masks_are_the_last_level(global_trace):
  params, opt_state = global_trace[-1][:2]
  final = og.final_masks(params, opt_state)
  assert kept(final["a"]["kernel"]) + kept(final["b"]["kernel"]) == \
      lottery.level_keep_counts(240, LEVELS)[-1]
  summary = og.sparsity_summary(final)
  assert abs(float(summary.sparsity) - (1 - 0.8**LEVELS)) < 1 / 240


def test_uniform_keeps_the_count_per_layer():
  trace = imp_trace("uniform")
  for level, i in enumerate(level_ends(trace)):
    masks = og.get_masks(trace[i][1])
    assert kept(masks["a"]["kernel"]) == lottery.level_keep_counts(200, LEVELS)[level]
    assert kept(masks["b"]["kernel"]) == lottery.level_keep_counts(40, LEVELS)[level]


def test_exclude_keeps_a_layer_dense_and_rewind_to_init():
  tx = og.lottery_ticket(2, 4, inner_sgd(), exclude=("b/kernel",))
  trace = run_loop(tx, lottery.total_steps(2, 4))
  masks = og.get_masks(trace[-1][1])
  assert masks["b"]["kernel"].shape == ()
  assert kept(masks["a"]["kernel"]) == 128
  for i in level_ends(trace):
    assert bitwise_equal(trace[i][0], params0())


def test_zero_levels_is_dense_training():
  trace = run_loop(og.lottery_ticket(0, 3, inner_sgd()), 4)
  assert kept(og.get_masks(trace[-1][1])["a"]["kernel"]) == 200
  assert rounds_lib.rounds_state(trace[-1][1]).snapshot is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=-1), "levels"),
    (dict(rate=1.0), "rate"),
    (dict(distribution="erk"), "distribution"),
    (dict(rewind_step=6), "rewind_step"),
    (dict(steps_per_level=0), "steps_per_level"),
    (dict(distribution="uniform", layer_axes=0), "layer_axes"),
])
def test_bad_arguments(kwargs, match):
  args = dict(levels=2, steps_per_level=6) | kwargs
  with pytest.raises(ValueError, match=match):
    og.lottery_ticket(args.pop("levels"), args.pop("steps_per_level"), inner_sgd(), **args)


def _masked(tree, masks):
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, masks)


def test_each_level_starts_a_fresh_inner_optimizer_on_the_rewound_weights(global_trace):
  """At every level boundary the inner optimizer's state is its init value on ``W_k`` (SGD's
  momentum buffer all zeros) with its step counters at ``K``, not the state the previous level
  ended with; and the level's steps equal those of a fresh ``inner_sgd()`` started there by
  hand: ``W ← W + M ⊙ update(M ⊙ ∇L(W ⊙ M))``, the decay reading the rewound ``W``."""
  inner = inner_sgd()
  w_k = global_trace[K][0]
  for i in level_ends(global_trace):
    params, opt_state = global_trace[i][:2]
    fresh = rounds_lib.set_counts(inner.init(w_k), K)
    got = rounds_lib.rounds_state(opt_state).inner_state
    assert bitwise_equal(got, fresh)
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(
        rounds_lib.rounds_state(global_trace[i - 1][1]).inner_state))  # there was momentum
    masks = og.get_masks(opt_state)
    p, s = w_k, fresh
    for j in range(i + 1, i + T - K):  # the level's steps before its own boundary
      grads = _masked(GRAD(_masked(p, masks), j - 1), masks)  # record j made step t = j - 1
      updates, s = inner.update(grads, s, p)
      p = jax.tree.map(lambda x, u: x + u, p, _masked(updates, masks))
      for a, b in zip(jax.tree.leaves(global_trace[j][0]), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
