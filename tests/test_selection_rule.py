"""The selection rule of OptG: exact counts (default) or the authors' threshold (every tie kept).

'exact' keeps ``N − floor(p·N)`` of a pool, ties by position; 'reference' keeps ``S >= thr``,
``thr`` the ``N − ceil(p·N)``-th largest score (``int(N·(1−p))`` in the authors' code), so every
tie at ``thr`` is kept. Counts are checked on hand-made scores against numbers worked out by hand,
at the refreshes of ``og.mask_optimizer`` and in ``og.final_masks``, with and without jit.
"""

import fractions
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import select

N = 40  # prunable weights of _params: two 20-weight kernels


def _params():
  return {"d1": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)},
          "d2": {"kernel": jnp.ones((5, 4)), "bias": jnp.zeros(4)}}


def _scores(flat):
  """Hand-made scores: the first 20 values go to d1's kernel, the last 20 to d2's."""
  flat = np.asarray(flat, np.float32)
  assert flat.size == N
  return {"d1": {"kernel": jnp.asarray(flat[:20].reshape(4, 5)), "bias": None},
          "d2": {"kernel": jnp.asarray(flat[20:].reshape(5, 4)), "bias": None}}


def _flat_mask(masks):
  return np.concatenate([np.asarray(masks["d1"]["kernel"]).ravel(),
                         np.asarray(masks["d2"]["kernel"]).ravel()])


def _distinct():
  return np.random.default_rng(0).permutation(N).astype(np.float32) - 10.0


def _tied():
  """15 positive scores, 20 exact zeros (never-gradient weights), 5 negative ones, shuffled
  over both kernels; the 20th largest is 0."""
  rng = np.random.default_rng(1)
  values = np.concatenate([np.arange(1, 16), np.zeros(20), -np.arange(1, 6)])
  return rng.permutation(values).astype(np.float32)


def _tx(sparsity, rule, **kwargs):
  # A constant schedule at the target (fraction exactly 1), refreshed every step, and a zero
  # learning rate: the scores stay the hand-made ones and each update re-selects the mask.
  kwargs.setdefault("sparsity_schedule", lambda t: sparsity)
  return og.mask_optimizer(sparsity, 0.0, refresh=lambda t: True, selection_rule=rule, **kwargs)


def _refreshed(tx, scores, params, variant=lambda f: f):
  state = tx.init(params)
  state = state._replace(scores=scores)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = variant(tx.update)(grads, state, params)
  return state


# --------------------------------------------------------------------------------------------
# Keep counts and the threshold masks of optg_jax.select.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p,floor_keep,ceil_keep", [
    (40, 0.46, 22, 21),          # p·N = 18.4
    (40, 0.45, 22, 22),          # p·N = 18 (read as the decimal 0.45)
    (266_200, 0.95, 13_310, 13_310),
    (266_201, 0.95, 13_311, 13_310),
    (7, 0.0, 7, 7),
])
def test_keep_count_rounding(n, p, floor_keep, ceil_keep):
  assert select.keep_count(n, p) == floor_keep
  assert select.keep_count(n, p, rounding="ceil") == ceil_keep
  assert ceil_keep == int(n * (1 - p)) or n * p != int(n * p)  # the authors' int(N·(1−p))


def test_keep_count_ceil_traced_is_exact_for_the_float32_value():
  ps = np.concatenate([np.random.default_rng(2).random(500), [0.5, 0.25, 0.75, 1e-30]])
  ps = ps.astype(np.float32)
  for n in (1, 40, 266_200, 25_502_912, 2**31 - 1):
    got = np.asarray(jax.jit(jax.vmap(lambda p, n=n: select.keep_count(n, p, rounding="ceil")))(
        ps))
    want = [n - math.ceil(fractions.Fraction(float(p)) * n) for p in ps]
    np.testing.assert_array_equal(got, want)


def test_keep_count_refuses_unknown_rounding():
  with pytest.raises(ValueError, match="rounding"):
    select.keep_count(10, 0.5, rounding="round")


@pytest.mark.parametrize("n", [60, 100_003])  # the one-sort pool and the counting search
def test_topk_mask_keep_ties_is_at_least_the_kth(n):
  x = np.random.default_rng(3).integers(-5, 6, n).astype(np.float32)
  x[::7] = -0.0  # -0.0 ties with +0.0
  for k in (1, 9, n // 2, n - 1, n):
    got = np.asarray(select.topk_mask(jnp.asarray(x), k, keep_ties=True))
    kth = np.sort(x)[::-1][k - 1]
    np.testing.assert_array_equal(got, x >= kth)
    assert got.sum() > k or k == n or np.sum(x == kth) == 1
    assert np.asarray(select.topk_mask(jnp.asarray(x), k)).sum() == k
  assert not np.asarray(select.topk_mask(jnp.asarray(x), 0, keep_ties=True)).any()


def test_topk_mask_keep_ties_vmaps_with_a_k_per_row():
  rows = np.random.default_rng(4).integers(0, 4, (3, 50)).astype(np.float32)
  ks = np.array([1, 10, 50], np.int32)
  got = np.asarray(jax.jit(jax.vmap(lambda r, k: select.topk_mask(r, k, keep_ties=True)))(
      jnp.asarray(rows), jnp.asarray(ks)))
  for row, k, mask in zip(rows, ks, got):
    np.testing.assert_array_equal(mask, row >= np.sort(row)[::-1][k - 1])


# --------------------------------------------------------------------------------------------
# og.mask_optimizer: refreshes and final masks.
# --------------------------------------------------------------------------------------------


class RefreshTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_ties_reference_keeps_n_minus_ceil(self):
    scores = _scores(_distinct())
    for p, exact_keep, reference_keep in ((0.46, 22, 21), (0.45, 22, 22)):
      for rule, keep in (("exact", exact_keep), ("reference", reference_keep)):
        state = _refreshed(_tx(p, rule), scores, _params(), self.variant)
        got = _flat_mask(og.get_masks(state))
        np.testing.assert_array_equal(got, _distinct() >= np.sort(_distinct())[::-1][keep - 1])
        assert got.sum() == keep, (p, rule)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_at_the_threshold(self):
    flat = _tied()
    state = _refreshed(_tx(0.5, "reference"), _scores(flat), _params(), self.variant)
    reference = _flat_mask(og.get_masks(state))
    np.testing.assert_array_equal(reference, flat >= 0)  # all 20 zeros kept
    assert reference.sum() == 35                          # 12.5% sparsity instead of 50%
    state = _refreshed(_tx(0.5, "exact"), _scores(flat), _params(), self.variant)
    exact = _flat_mask(og.get_masks(state))
    assert exact.sum() == 20                              # N − floor(0.5·40)
    zeros = np.flatnonzero(flat == 0)
    np.testing.assert_array_equal(exact, (flat > 0) | np.isin(np.arange(N), zeros[:5]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_layer_ties(self):
    flat = _tied()
    for rule in ("exact", "reference"):
      state = _refreshed(_tx(0.5, rule, distribution="uniform"), _scores(flat), _params(),
                         self.variant)
      got = _flat_mask(og.get_masks(state))
      for leaf in (slice(0, 20), slice(20, 40)):
        s, m = flat[leaf], got[leaf]
        kth = np.sort(s)[::-1][9]  # 20 − ceil(0.5·20) = 10 = 20 − floor(0.5·20)
        if rule == "reference":
          np.testing.assert_array_equal(m, s >= kth)
        else:
          assert m.sum() == 10 and np.all(m[s > kth]) and not np.any(m[s < kth])

  def test_stacked_layers_per_layer_reference(self):
    params = {"stack": {"kernel": jnp.ones((2, 4, 5))}}
    layers = np.stack([np.concatenate([np.arange(1, 6), np.zeros(10), -np.arange(1, 6)]),
                       np.arange(20) - 3.0]).astype(np.float32)
    tx = _tx(0.46, "reference", distribution="uniform", layer_axes=0)
    state = tx.init(params)
    state = state._replace(scores={"stack": {"kernel": jnp.asarray(layers.reshape(2, 4, 5))}})
    _, state = jax.jit(tx.update)({"stack": {"kernel": jnp.ones((2, 4, 5))}}, state, params)
    got = np.asarray(og.get_masks(state)["stack"]["kernel"]).reshape(2, 20)
    # Each layer keeps S >= its 20 − ceil(0.46·20) = 10th largest: all 10 zeros in layer 0.
    np.testing.assert_array_equal(got[0], layers[0] >= 0)
    np.testing.assert_array_equal(got[1], layers[1] >= layers[1][10])
    assert got.sum(axis=1).tolist() == [15, 10]


class FinalMasksTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_final_masks_follow_the_rule(self):
    flat = _tied()
    params = _params()
    final = self.variant(og.final_masks, static_argnums=2)
    for rule, kept in (("exact", 20), ("reference", 35)):
      state = _tx(0.5, rule).init(params)
      state = state._replace(scores=_scores(flat))
      assert _flat_mask(final(params, state, None)).sum() == kept
    # At another sparsity: 0.3·40 = 12 pruned, the 28th largest is 0 again.
    for rule, kept in (("exact", 28), ("reference", 35)):
      state = _tx(0.5, rule).init(params)
      state = state._replace(scores=_scores(flat))
      assert _flat_mask(final(params, state, 0.3)).sum() == kept
    # Without ties at the threshold: N − floor(p·N) against N − ceil(p·N).
    for rule, kept in (("exact", 22), ("reference", 21)):
      state = _tx(0.46, rule).init(params)
      state = state._replace(scores=_scores(_distinct()))
      got = _flat_mask(final(params, state, None))
      np.testing.assert_array_equal(got, _distinct() >= np.sort(_distinct())[::-1][kept - 1])

  def test_the_rule_travels_in_the_state(self):
    params = _params()
    state = optax.chain(_tx(0.5, "reference"), optax.sgd(0.1)).init(params)
    state = (state[0]._replace(scores=_scores(_tied())),) + tuple(state[1:])
    leaves, treedef = jax.tree_util.tree_flatten(state)
    restored = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
    assert _flat_mask(og.final_masks(params, restored)).sum() == 35


def test_default_is_exact():
  state = og.mask_optimizer(0.5, 0.1, 1, 10, ramp="auto").init(_params())
  assert og.methods.base.find_state(state).final.value.reselect.selection.rule == "exact"
  default = og.mask_optimizer(0.5, 0.0, 1, 10, ramp="auto").init(_params())
  assert _tx(0.5, "exact").init(_params()).final.value == default.final.value


def test_bad_selection_rule_is_refused():
  with pytest.raises(ValueError, match="selection_rule"):
    og.mask_optimizer(0.5, 0.1, 1, 10, selection_rule="torch")
  with pytest.raises(ValueError, match="rule"):
    og.Selection(rule="pytorch")
