"""Exact top-k selection: counts, ties, special values, trees, traced k and sparsity, bad input.

Both paths are exercised: pools up to 65,536 scores (one sort) and bigger pools (the counting
search), against a NumPy reference that ranks by value and breaks ties by lower flat index.
"""

import fractions
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from optg_jax import select

BIG = 70_000  # above the one-sort limit of 65,536


def _reference(flat: np.ndarray, k: int) -> np.ndarray:
  """Kept flags: the k largest of float32 values, NaN lowest, -0 == +0, lower index on ties."""
  values = np.where(np.isnan(flat), -np.inf, flat.astype(np.float32)) + np.float32(0.0)
  rank_key = np.where(np.isnan(flat), 0, 1)  # NaN below -inf
  order = np.lexsort((np.arange(flat.size), -values, -rank_key))
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  return keep


_topk = jax.jit(select.topk_mask)
_global = jax.jit(select.global_topk_masks)


@pytest.mark.parametrize("n", [1, 37, 1000, BIG])
def test_topk_mask_matches_reference_for_many_k(n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal(n).astype(np.float32)
  for k in sorted({0, 1, n - 1, n, n // 2, int(rng.integers(0, n + 1))}):
    got = np.asarray(_topk(jnp.asarray(x), k))
    np.testing.assert_array_equal(got, _reference(x, k), err_msg=f"k={k}")


@pytest.mark.parametrize("n", [500, BIG])
def test_ties_straddling_the_threshold_keep_lower_indices(n):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 5, n).astype(np.float32)  # heavy duplicates
  for k in (1, n // 3, n // 2 + 7, n - 1):
    np.testing.assert_array_equal(np.asarray(_topk(jnp.asarray(x), k)), _reference(x, k))
  same = np.zeros(n, np.float32)
  got = np.asarray(_topk(jnp.asarray(same), n // 4))
  assert got.sum() == n // 4 and got[:n // 4].all()


@pytest.mark.parametrize("n", [64, BIG])
def test_special_values(n):
  rng = np.random.default_rng(2)
  x = rng.standard_normal(n).astype(np.float32)
  x[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.0e38]
  x[-4:] = [np.nan, -0.0, 0.0, np.float32(1e-40)]
  for k in (0, 3, n // 2, n - 2, n - 1, n):
    np.testing.assert_array_equal(np.asarray(_topk(jnp.asarray(x), k)), _reference(x, k),
                                  err_msg=f"k={k}")
  assert float(select.kth_largest(jnp.asarray(x), 1)) == np.inf


@pytest.mark.parametrize("top", [np.inf, 3e38])
def test_a_far_outlier_on_top_keeps_exact_counts(top):
  x = np.random.default_rng(7).standard_normal(BIG).astype(np.float32)
  x[1] = top
  for k in (1, 2, 5):
    np.testing.assert_array_equal(np.asarray(_topk(jnp.asarray(x), k)), _reference(x, k))
  assert float(select.kth_largest(jnp.asarray(x), 1)) == np.float32(top)


def test_bfloat16_and_float16_scores():
  x = np.random.default_rng(3).standard_normal(300).astype(np.float32)
  for dtype in (jnp.bfloat16, jnp.float16):
    xs = jnp.asarray(x, dtype)
    ref = _reference(np.asarray(xs.astype(jnp.float32)), 100)
    np.testing.assert_array_equal(np.asarray(select.topk_mask(xs, 100)), ref)


@pytest.mark.parametrize("sizes", [(3, 40, 7), (40_000, 30_000, 12)])
def test_global_over_nested_tree_matches_reference_on_concatenation(sizes):
  rng = np.random.default_rng(4)
  a, b, c = (rng.integers(-20, 20, s).astype(np.float32) for s in sizes)
  tree = {"z": [jnp.asarray(a.reshape(-1, 1))], "y": (jnp.asarray(b), {"w": jnp.asarray(c)})}
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  for k in (0, 1, flat.size // 3, flat.size - 1, flat.size):
    masks = _global(tree, k)
    assert jax.tree.structure(masks) == jax.tree.structure(tree)
    got = np.concatenate([np.ravel(m) for m in jax.tree.leaves(masks)])
    np.testing.assert_array_equal(got, _reference(flat, k), err_msg=f"k={k}")


def test_big_global_pool_never_concatenates_its_leaves():
  tree = [jnp.zeros((500_000,)), jnp.zeros((400_000,))]  # only the ~65k-score sample is joined
  jaxpr = jax.make_jaxpr(select.global_topk_masks)(tree, 1000)
  sizes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "concatenate":
        sizes.append(eqn.outvars[0].aval.size)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert all(size <= 2 * 65_536 for size in sizes), sizes


class TracedKTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_traced_k_and_vmap_per_row(self):
    x = jax.random.normal(jax.random.key(5), (4, 300))
    ks = jnp.array([0, 17, 300, 150])
    masks = self.variant(jax.vmap(select.topk_mask))(x, ks)
    np.testing.assert_array_equal(masks.sum(axis=1), ks)
    np.testing.assert_array_equal(np.asarray(masks[1]), _reference(np.asarray(x[1]), 17))

  @chex.variants(with_jit=True, without_jit=True)
  def test_kth_largest(self):
    x = jnp.asarray([3.0, 1.0, 2.0, 2.0, -1.0])
    fn = self.variant(select.kth_largest)
    assert [float(fn(x, k)) for k in (1, 2, 3, 4, 5)] == [3.0, 2.0, 2.0, 1.0, -1.0]


def test_keep_count_python_values_read_as_decimals():
  assert select.keep_count(200, 0.7) == 60  # 0.7·200 = 140 pruned, not 139
  assert select.keep_count(240, 0.9) == 24
  assert select.keep_count(100, np.float32(0.9)) == 10
  assert select.keep_count(25_502_912, 0.98) == 25_502_912 - 24_992_853
  assert select.keep_count(7, 0.0) == 7 and select.keep_count(0, 0.5) == 0


def test_keep_count_traced_float32_is_exact_for_its_value():
  rng = np.random.default_rng(6)
  ps = rng.random(200).astype(np.float32)
  ns = rng.integers(0, 2**31 - 1, 200)
  fn = jax.jit(select.keep_count, static_argnums=0)
  for p, n in zip(ps, ns):
    expected = int(n) - math.floor(fractions.Fraction(float(p)) * int(n))
    assert int(fn(int(n), jnp.float32(p))) == expected, (p, n)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, -0.0]), min_size=1, max_size=60),
                  st.data())
def test_property_exact_count_and_ties(values, data):
  x = np.asarray(values, np.float32)
  k = data.draw(st.integers(0, x.size))
  got = np.asarray(select.topk_mask(jnp.asarray(x), k))
  assert got.sum() == k
  np.testing.assert_array_equal(got, _reference(x, k))


def test_bad_input():
  with pytest.raises(TypeError, match="scores"):
    select.topk_mask(jnp.arange(4), 2)
  with pytest.raises(TypeError, match="scores"):
    select.global_topk_masks({"a": jnp.ones(3, bool)}, 1)
  with pytest.raises(ValueError, match="sparsity"):
    select.keep_count(10, 1.0)
  with pytest.raises(ValueError, match="sparsity"):
    select.keep_count(10, -0.1)
  with pytest.raises(ValueError, match="sparsity"):
    select.keep_count(10, float("nan"))
  with pytest.raises(ValueError, match="n"):
    select.keep_count(-1, 0.5)
