"""Exact top-k selection: counts, ties, special values, trees, traced k and sparsity, bad input.

Both paths are exercised: pools up to 8,192 scores (one sort) and bigger pools (the counting
search), against a NumPy reference that ranks by value and breaks ties by lower flat index.
Big-pool tests reuse one shape (``BIG``) so that the search compiles only a few times.
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

BIG = 70_000  # above the one-sort limit of 8,192 (and above the largest sample, 65,536)


def _reference(flat: np.ndarray, k: int) -> np.ndarray:
  """Kept flags: the k largest of float32 values, NaN lowest, -0 == +0, lower index on ties."""
  values = np.where(np.isnan(flat), -np.inf, flat.astype(np.float32)) + np.float32(0.0)
  rank_key = np.where(np.isnan(flat), 0, 1)  # NaN below -inf
  order = np.lexsort((np.arange(flat.size), -values, -rank_key))
  keep = np.zeros(flat.size, bool)
  keep[order[:k]] = True
  return keep


def _reference_kth(flat: np.ndarray, k: int) -> float:
  """The k-th largest value (NaN lowest), +inf for k == 0."""
  if k == 0:
    return np.inf
  return flat[_reference(flat, k) & ~_reference(flat, k - 1)][0]


_topk = jax.jit(select.topk_mask)
_global = jax.jit(select.global_topk_masks)
_kth = jax.jit(select.kth_largest)


def _big_scores(kind: str, seed: int = 0, n: int = BIG) -> np.ndarray:
  """Score distributions that stress the search: smooth, tied, tailed, tiny, special."""
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return rng.standard_normal(n).astype(np.float32)
  if kind == "optg":  # most scores exactly zero, the rest small
    x = (1e-4 * rng.standard_normal(n)).astype(np.float32)
    return np.where(rng.random(n) < 0.6, np.float32(0.0), x)
  if kind == "tied":
    return np.full(n, 0.25, np.float32)
  if kind == "few_values":  # big ties everywhere, also straddling any threshold
    return rng.integers(-3, 4, n).astype(np.float32)
  if kind == "cauchy":  # far tails: the extreme k are beyond the sample
    return rng.standard_cauchy(n).astype(np.float32)
  if kind == "log_uniform":  # many binades, both signs
    return (np.exp(rng.uniform(-80, 80, n)) * rng.choice([-1, 1], n)).astype(np.float32)
  if kind == "denormal":  # only denormals and zeros: keys, not float compares, rank them
    return (rng.integers(-50, 50, n) * np.float32(1e-45)).astype(np.float32)
  if kind == "special":
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < 0.1] = np.nan
    x[rng.random(n) < 0.01] = np.inf
    x[rng.random(n) < 0.01] = -np.inf
    x[rng.random(n) < 0.05] = -0.0
    return x
  if kind == "sorted":
    return np.arange(n, dtype=np.float32)
  raise ValueError(kind)


BIG_KINDS = ("normal", "optg", "tied", "few_values", "cauchy", "log_uniform", "denormal",
             "special", "sorted")


# ----------------------------------------------------------------------------
# Single arrays.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 37, 1000, 8192, 8193, BIG])
def test_topk_mask_matches_reference_for_many_k(n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal(n).astype(np.float32)
  for k in sorted({0, 1, n - 1, n, n // 2, int(rng.integers(0, n + 1))}):
    got = np.asarray(_topk(jnp.asarray(x), k))
    np.testing.assert_array_equal(got, _reference(x, k), err_msg=f"k={k}")


@pytest.mark.parametrize("kind", BIG_KINDS)
def test_search_is_exact_on_hard_distributions(kind):
  x = _big_scores(kind)
  ks = {0, 1, 2, 3, 100, BIG // 10, BIG // 2, BIG - 100, BIG - 3, BIG - 2, BIG - 1, BIG}
  for k in sorted(ks):
    got = np.asarray(_topk(jnp.asarray(x), k))
    assert got.sum() == k, (kind, k)
    np.testing.assert_array_equal(got, _reference(x, k), err_msg=f"{kind} k={k}")


@pytest.mark.parametrize("kind", ["normal", "few_values", "special", "cauchy"])
def test_kth_largest_matches_reference(kind):
  x = _big_scores(kind, seed=1)
  for k in (0, 1, 7, BIG // 3, BIG - 1, BIG):
    want = _reference_kth(x, k)
    got = float(_kth(jnp.asarray(x), k))
    assert (np.isnan(want) and np.isnan(got)) or got == want, (kind, k, got, want)


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


def test_signed_zeros_tie_and_nan_ranks_below_minus_inf():
  x = jnp.asarray([-0.0, np.nan, 0.0, -np.inf, np.nan, -0.0])
  assert np.asarray(select.topk_mask(x, 1)).tolist() == [True] + [False] * 5
  assert np.asarray(select.topk_mask(x, 3)).tolist() == [True, False, True, False, False, True]
  assert np.asarray(select.topk_mask(x, 5)).tolist() == [True, True, True, True, False, True]
  assert np.isnan(float(select.kth_largest(x, 6)))
  zero = float(select.kth_largest(x, 2))
  assert zero == 0.0 and math.copysign(1.0, zero) == 1.0


@pytest.mark.parametrize("top", [np.inf, 3e38])
def test_a_far_outlier_on_top_keeps_exact_counts(top):
  x = np.random.default_rng(7).standard_normal(BIG).astype(np.float32)
  x[1] = top
  for k in (1, 2, 5):
    np.testing.assert_array_equal(np.asarray(_topk(jnp.asarray(x), k)), _reference(x, k))
  assert float(select.kth_largest(jnp.asarray(x), 1)) == np.float32(top)


def _xla_converts_float16() -> bool:
  """Whether this XLA:CPU build can convert float16 at all: under
  ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`` (no F16C) jaxlib 0.10 fails to link the software
  conversion (``Symbols not found: [ __extendhfsf2 ]``), so no float16 program runs there."""
  try:
    jax.jit(lambda v: v.astype(jnp.float32))(jnp.ones(2, jnp.float16)).block_until_ready()
  except jax.errors.JaxRuntimeError:
    return False
  return True


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", [300, BIG])
def test_bfloat16_and_float16_scores(n, dtype):
  if dtype == "float16" and not _xla_converts_float16():
    pytest.skip("this XLA:CPU cannot convert float16 at all (no F16C under the ISA limit)")
  x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
  for dtype in (getattr(jnp, dtype),):
    xs = jnp.asarray(x, dtype)  # rounding makes many ties
    for k in (1, n // 3, n - 1):
      ref = _reference(np.asarray(xs.astype(jnp.float32)), k)
      np.testing.assert_array_equal(np.asarray(_topk(xs, k)), ref)


def test_leaves_longer_than_a_chunk(monkeypatch):
  # f32 sums are exact below 2**24 terms, so longer leaves are reduced in chunks;
  # shrink the chunk to exercise that path (a new shape, so a new trace).
  passes = select._passes
  monkeypatch.setattr(passes, "CHUNK", 10_000)
  ranges, chunks = [], passes.chunks
  monkeypatch.setattr(passes, "chunks", lambda n: ranges.append(chunks(n)) or ranges[-1])
  x = _big_scores("few_values", seed=5, n=BIG + 3)
  for k in (1, 3_333, BIG // 2, BIG + 2):
    np.testing.assert_array_equal(np.asarray(select.topk_mask(jnp.asarray(x), k)),
                                  _reference(x, k), err_msg=f"k={k}")
  x = _big_scores("cauchy", seed=5, n=BIG + 3)
  for k in (1, 2, BIG):  # the extent passes, with chunk maxima
    np.testing.assert_array_equal(np.asarray(select.topk_mask(jnp.asarray(x), k)),
                                  _reference(x, k), err_msg=f"k={k}")
  assert max(len(r) for r in ranges) == 8  # 7 chunks of 10,000 and the ragged tail
  # Leaves of more axes keep their shape: split by rows along the first axis, flattened only
  # when one row is longer than a chunk; ties straddle the cut (flat indices per chunk).
  x = _big_scores("few_values", seed=6, n=80_002)
  tree = {"a": jnp.asarray(x[:70_000].reshape(700, 100)),
          "b": jnp.asarray(x[70_000:].reshape(1, 10_002) * 0 + 1.0)}
  flat = np.concatenate([x[:70_000], np.ones(10_002, np.float32)])
  for k in (3_333, int((flat >= 1.0).sum()) - 7, 60_000):
    masks = select.global_topk_masks(tree, k)
    got = np.concatenate([np.asarray(masks["a"]).ravel(), np.asarray(masks["b"]).ravel()])
    np.testing.assert_array_equal(got, _reference(flat, k), err_msg=f"k={k}")


def test_any_shape_is_ranked_row_major():
  x = np.random.default_rng(8).integers(0, 3, (6, 5, 4)).astype(np.float32)
  got = np.asarray(_topk(jnp.asarray(x), 50))
  assert got.shape == x.shape
  np.testing.assert_array_equal(got.ravel(), _reference(x.ravel(), 50))
  assert np.asarray(select.topk_mask(jnp.float32(2.0), 1)).shape == ()


# ----------------------------------------------------------------------------
# Trees.
# ----------------------------------------------------------------------------


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


def test_global_search_over_many_leaves_with_ties_across_leaves():
  rng = np.random.default_rng(9)
  sizes = [9_408, 4_096, 36_864, 0, 16_384, 1, 20_000]
  leaves = [(rng.integers(0, 50, s) * 0.5).astype(np.float32) for s in sizes]
  leaves[1][:] = 3.0  # one value everywhere in a leaf, tied with values elsewhere
  tree = {"conv": leaves[:3], "empty": leaves[3], "rest": tuple(leaves[4:])}
  flat = np.concatenate(leaves)
  jtree = jax.tree.map(jnp.asarray, tree)
  for k in (1, 12_345, int((flat >= 3.0).sum()) - 5, flat.size - 1):
    masks = _global(jtree, k)
    got = np.concatenate([np.ravel(m) for m in jax.tree.leaves(masks)])
    assert got.sum() == k
    np.testing.assert_array_equal(got, _reference(flat, k), err_msg=f"k={k}")
  assert jax.tree.leaves(_global(jtree, 10))[3].shape == (0,)


def test_empty_trees_and_zero_size_leaves():
  assert select.global_topk_masks({}, 0) == {}
  masks = select.global_topk_masks({"a": jnp.zeros((0, 3)), "b": jnp.ones((2,))}, 5)
  assert masks["a"].shape == (0, 3) and masks["a"].dtype == jnp.bool_
  assert np.asarray(masks["b"]).tolist() == [True, True]
  assert float(select.kth_largest({"a": jnp.zeros((0,))}, 1)) == np.inf


def test_big_global_pool_never_concatenates_its_leaves():
  tree = [jnp.zeros((500_000,)), jnp.zeros((400_000,))]  # only the sample (at most 65,536) is joined
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


def test_bisection_only_search_gives_the_default_masks_bit_for_bit():
  # The benchmark's baseline: no planner, no sample, plain bisection of the key range. The
  # tree's shapes and the traced k are those of test_global_masks_with_traced_k, so the
  # default search compiles once for both.
  sizes = (50_000, 20_000)
  for seed, kind in enumerate(["special", "few_values", "optg"]):
    flat = _big_scores(kind, seed=seed, n=sum(sizes))
    if kind == "few_values":  # signed zeros tie, NaN ranks lowest
      flat = np.where(flat == 0, np.float32(-0.0), flat)
      flat[::97] = np.nan
    tree = {"a": jnp.asarray(flat[:sizes[0]]), "b": jnp.asarray(flat[sizes[0]:])}
    for k in (0, 1, 999, 35_000, sum(sizes) - 1):
      want = select.global_topk_masks(tree, jnp.int32(k))
      got = select.api._bisection_topk_masks(tree, jnp.int32(k))
      for name in tree:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
      kept = np.concatenate([np.asarray(got["a"]), np.asarray(got["b"])])
      np.testing.assert_array_equal(kept, _reference(flat, k))


# ----------------------------------------------------------------------------
# Traced k, jit, vmap.
# ----------------------------------------------------------------------------


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

  @chex.variants(with_jit=True, without_jit=True)
  def test_global_masks_with_traced_k(self):
    x = _big_scores("few_values", seed=3)
    tree = {"a": jnp.asarray(x[:50_000]), "b": jnp.asarray(x[50_000:])}
    masks = self.variant(select.global_topk_masks)(tree, jnp.int32(31_000))
    got = np.concatenate([np.asarray(masks["a"]), np.asarray(masks["b"])])
    np.testing.assert_array_equal(got, _reference(x, 31_000))


def test_vmap_of_big_rows_with_per_row_k():
  rows = np.stack([_big_scores(kind, seed=i) for i, kind in
                   enumerate(["normal", "few_values", "optg", "special"])])
  ks = jnp.array([0, 1234, BIG - 1, 40_000])
  masks = np.asarray(jax.jit(jax.vmap(select.topk_mask))(jnp.asarray(rows), ks))
  for row, k, mask in zip(rows, np.asarray(ks), masks):
    np.testing.assert_array_equal(mask, _reference(row, int(k)))
  values = jax.jit(jax.vmap(select.kth_largest))(jnp.asarray(rows), ks)
  for row, k, value in zip(rows, np.asarray(ks), np.asarray(values)):
    want = _reference_kth(row, int(k))
    assert (np.isnan(want) and np.isnan(value)) or value == want
  # Shared scores, k batched only.
  shared = jax.vmap(select.topk_mask, in_axes=(None, 0))(jnp.asarray(rows[1]), ks)
  np.testing.assert_array_equal(np.asarray(shared).sum(axis=1), ks)


def test_gradients_flow_through_masks_and_stop_at_the_selection():
  # A loss that builds its mask from the weights it differentiates (straight-through style):
  # the selection itself has zero gradient, on both the sort and the search paths.
  for n in (300, BIG):
    w = jnp.asarray(_big_scores("normal", seed=4, n=n))
    mask = select.topk_mask(w, n // 10)
    grad = jax.grad(lambda w: jnp.sum(w * select.topk_mask(w, n // 10)))(w)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(mask, np.float32))
    assert float(jax.grad(lambda w: select.kth_largest(w, 5))(w).sum()) == 0.0


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, -0.0]), min_size=1, max_size=60),
                  st.data())
def test_property_exact_count_and_ties(values, data):
  x = np.asarray(values, np.float32)
  k = data.draw(st.integers(0, x.size))
  got = np.asarray(select.topk_mask(jnp.asarray(x), k))
  assert got.sum() == k
  np.testing.assert_array_equal(got, _reference(x, k))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(kind=st.sampled_from(BIG_KINDS), seed=st.integers(0, 2**16),
                  k=st.integers(0, BIG))
def test_property_search_exact_count_and_ties(kind, seed, k):
  x = _big_scores(kind, seed)
  got = np.asarray(_topk(jnp.asarray(x), k))
  assert got.sum() == k
  np.testing.assert_array_equal(got, _reference(x, k))


# ----------------------------------------------------------------------------
# Keep counts.
# ----------------------------------------------------------------------------


def test_keep_count_python_values_read_as_decimals():
  assert select.keep_count(200, 0.7) == 60  # 0.7·200 = 140 pruned, not 139
  assert select.keep_count(240, 0.9) == 24
  assert select.keep_count(100, np.float32(0.9)) == 10
  assert select.keep_count(25_502_912, 0.98) == 25_502_912 - 24_992_853
  assert select.keep_count(7, 0.0) == 7 and select.keep_count(0, 0.5) == 0
  assert isinstance(select.keep_count(10, 0.5), int)


def test_keep_count_traced_float32_is_exact_for_its_value():
  rng = np.random.default_rng(6)
  ns = [0, 1, 3, 1000, 2**24 + 1, 25_502_912, 2**31 - 1] + list(rng.integers(0, 2**31 - 1, 5))
  ps = np.concatenate([rng.random(40), 1.0 - rng.random(10) * 1e-6,
                       [0.0, 1e-45, 1e-38, 0.5, 0.98, np.nextafter(1.0, 0.0)]]).astype(np.float32)
  for n in ns:
    got = np.asarray(jax.jit(jax.vmap(lambda p, n=int(n): select.keep_count(n, p)))(ps))
    assert got.dtype == np.int32
    want = [int(n) - math.floor(fractions.Fraction(float(p)) * int(n)) for p in ps]
    np.testing.assert_array_equal(got, want, err_msg=f"n={n}")


def test_keep_count_traced_out_of_range_is_clipped():
  ps = jnp.asarray([-0.5, -0.0, 1.0, 7.0, np.inf, -np.inf, np.nan], jnp.float32)
  got = np.asarray(jax.vmap(lambda p: select.keep_count(1000, p))(ps))
  assert got.tolist() == [1000, 1000, 0, 0, 0, 1000, 1000]


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_bad_input():
  with pytest.raises(TypeError, match="scores"):
    select.topk_mask(jnp.arange(4), 2)
  with pytest.raises(TypeError, match="scores"):
    select.global_topk_masks({"a": jnp.ones(3, bool)}, 1)
  with pytest.raises(TypeError, match=r"scores\['b'\]"):
    select.global_topk_masks({"a": jnp.ones(3), "b": jnp.ones(3, jnp.int32)}, 1)
  with pytest.raises(TypeError, match="k"):
    select.topk_mask(jnp.ones(3), 1.5)
  with pytest.raises(ValueError, match="sparsity"):
    select.keep_count(10, 1.0)
  with pytest.raises(ValueError, match="sparsity"):
    select.keep_count(10, -0.1)
  with pytest.raises(ValueError, match="sparsity"):
    select.keep_count(10, float("nan"))
  with pytest.raises(ValueError, match="n"):
    select.keep_count(-1, 0.5)
  with pytest.raises(TypeError, match="n"):
    select.keep_count(10.0, 0.5)


def test_float64_scores_are_rejected_in_x64_mode():
  with jax.enable_x64(True):
    with pytest.raises(TypeError, match="float64"):
      select.topk_mask(jnp.ones(3, jnp.float64), 1)
