"""Mask pytrees: prunable selection, validation, apply, summaries and top-k masks over trees."""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optg_jax as og
from optg_jax import masks as M


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Block:
  w: jax.Array
  b: jax.Array


def _linen_params():
  return _MLP().init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))


def _nested_tree():
  k = jax.random.split(jax.random.key(1), 4)
  return {
      "blocks": [_Block(jax.random.normal(k[0], (6, 5)), jnp.zeros(5)),
                 _Block(jax.random.normal(k[1], (5, 4)), jnp.zeros(4))],
      "head": (jax.random.normal(k[2], (4, 3)), jnp.zeros(3)),
      "step": jnp.array(3, jnp.int32),
  }


def test_default_filter_selects_kernels_of_linen_params():
  params = _linen_params()
  prunable = M.prunable_tree(params)
  named = {og._paths.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(prunable)[0]}
  assert named["params/Conv_0/kernel"] and named["params/Dense_0/kernel"]
  assert not named["params/Conv_0/bias"] and not named["params/BatchNorm_0/scale"]
  assert not named["batch_stats/BatchNorm_0/mean"]


def test_exclude_and_filter_fn():
  params = _linen_params()
  prunable = M.prunable_tree(params, exclude=("Dense",))
  assert not prunable["params"]["Dense_0"]["kernel"] and prunable["params"]["Conv_0"]["kernel"]
  only_bias = M.prunable_tree(params, filter_fn=lambda name, leaf: name.endswith("Dense_0/bias"))
  assert sum(jax.tree_util.tree_leaves(only_bias)) == 1


def test_nnx_state_is_supported():
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  prunable = M.prunable_tree(state)
  masks = M.global_masks(jax.tree.map(jnp.abs, state), prunable, 0.5)
  M.validate_masks(state, masks)
  assert int(og.sparsity_summary(masks).kept) == 24 - 12
  pruned = og.apply_masks(state, masks)
  assert jax.tree_util.tree_structure(pruned) == jax.tree_util.tree_structure(state)


def test_nested_tuple_list_dataclass_tree():
  tree = _nested_tree()
  prunable = M.prunable_tree(tree)
  assert [bool(x) for x in jax.tree_util.tree_leaves(prunable)] == [
      True, False, True, False, True, False, False]
  masks = M.layerwise_masks(jax.tree.map(jnp.abs, tree), prunable, 0.5)
  assert jax.tree_util.tree_structure(masks) == jax.tree_util.tree_structure(tree)
  kept = [int(m.sum()) for m in jax.tree_util.tree_leaves(masks) if m.ndim]
  assert kept == [30 - 15, 20 - 10, 12 - 6]


def test_non_float_prunable_leaf_is_a_type_error_naming_the_path():
  tree = {"layer": {"kernel": jnp.ones((3, 3), jnp.int32)}}
  with pytest.raises(TypeError, match="layer/kernel"):
    M.prunable_tree(tree)


def test_no_prunable_leaves_is_a_value_error():
  with pytest.raises(ValueError, match="no prunable leaves"):
    M.prunable_tree({"bias": jnp.zeros(3)})
  with pytest.raises(ValueError, match="no prunable leaves"):
    M.prunable_tree(_linen_params(), exclude=("kernel",))


def test_layer_axis_tree_and_missing_axis_error():
  params = {"stack": {"kernel": jnp.ones((4, 3, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
  prunable = M.prunable_tree(params)
  axes = M.layer_axis_tree(params, prunable, {"stack": 0})
  assert axes == {"stack": {"kernel": 0}, "head": {"kernel": None}}
  assert M.layer_axis_tree(params, prunable, -1) == {"stack": {"kernel": 2},
                                                       "head": {"kernel": 1}}
  with pytest.raises(ValueError, match="head/kernel.*axis 5"):
    M.layer_axis_tree(params, prunable, {"head": 5})


def test_all_keep_is_free_outside_prunable_leaves():
  params = _linen_params()
  masks = M.all_keep(params, M.prunable_tree(params))
  M.validate_masks(params, masks)
  assert masks["params"]["Conv_0"]["bias"].shape == ()
  assert masks["params"]["Conv_0"]["kernel"].shape == params["params"]["Conv_0"]["kernel"].shape
  assert all(bool(m.all()) for m in jax.tree_util.tree_leaves(masks))


def test_validate_masks_errors_name_the_problem():
  params = {"a": {"kernel": jnp.ones((2, 3))}, "b": jnp.ones(3)}
  with pytest.raises(ValueError, match="structure"):
    M.validate_masks(params, {"a": {"kernel": jnp.ones((2, 3), bool)}})
  with pytest.raises(ValueError, match="a/kernel.*shape"):
    M.validate_masks(params, {"a": {"kernel": jnp.ones((3, 2), bool)}, "b": jnp.array(True)})
  with pytest.raises(TypeError, match="a/kernel.*bool"):
    M.validate_masks(params, {"a": {"kernel": jnp.ones((2, 3))}, "b": jnp.array(True)})
  with pytest.raises(ValueError, match="structure"):
    og.apply_masks(params, {"a": {"kernel": jnp.ones((2, 3), bool)}, "c": jnp.array(True)})


class ApplyAndSummaryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_masks_zeros_exactly_the_pruned_entries(self):
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    mask = {"w": jnp.array([[True, False, True], [False, False, True]]), "b": jnp.array(True)}
    out = self.variant(og.apply_masks)(params, mask)
    np.testing.assert_array_equal(out["w"], [[1.0, 0.0, 3.0], [0.0, 0.0, 6.0]])
    assert out["b"].dtype == jnp.bfloat16 and out["w"].dtype == jnp.float32
    np.testing.assert_array_equal(out["b"], params["b"])

  @chex.variants(with_jit=True, without_jit=True)
  def test_sparsity_summary_counts(self):
    mask = {"w": jnp.arange(12).reshape(3, 4) < 3, "v": jnp.ones((5, 2), bool),
            "b": jnp.array(True)}
    s = self.variant(og.sparsity_summary)(mask)
    assert int(s.kept) == 13 and s.total == 22
    np.testing.assert_allclose(float(s.sparsity), 9 / 22, rtol=1e-6)
    assert set(s.leaves) == {"w", "v"}
    assert int(s.leaves["w"].kept) == 3 and s.leaves["w"].total == 12
    np.testing.assert_allclose(float(s.leaves["w"].sparsity), 0.75, rtol=1e-6)
    np.testing.assert_allclose(float(s.leaves["v"].sparsity), 0.0)


class TopkMaskTreesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_global_masks_keep_exact_count_of_largest(self):
    params = _nested_tree()
    prunable = M.prunable_tree(params)
    scores = jax.tree.map(jnp.abs, params)
    sparsity = 0.73
    masks = self.variant(lambda s: M.global_masks(s, prunable, sparsity))(scores)
    flat_scores = np.concatenate(
        [np.ravel(s) for s, p in zip(jax.tree_util.tree_leaves(scores),
                                     jax.tree_util.tree_leaves(prunable)) if p])
    n = flat_scores.size
    k = n - math.floor(sparsity * n)
    kept = np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(masks) if m.ndim])
    assert kept.sum() == k
    np.testing.assert_array_equal(np.sort(flat_scores[kept])[::-1], np.sort(flat_scores)[::-1][:k])
    assert all(bool(m) for m in jax.tree_util.tree_leaves(masks) if m.ndim == 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_layerwise_masks_with_traced_sparsity_tree(self):
    params = {"a": jax.random.normal(jax.random.key(0), (10, 10)),
              "b": jax.random.normal(jax.random.key(1), (7, 3)), "bias": jnp.zeros(3)}
    prunable = M.prunable_tree(params)
    sparsities = {"a": jnp.float32(0.875), "b": jnp.float32(0.5), "bias": None}
    masks = self.variant(lambda s, sp: M.layerwise_masks(s, prunable, sp))(params, sparsities)
    assert int(masks["a"].sum()) == 100 - 87 and int(masks["b"].sum()) == 21 - 10
    thr = np.sort(np.ravel(params["a"]))[-13]
    np.testing.assert_array_equal(masks["a"], params["a"] >= thr)

  def test_stacked_kernels_are_pruned_per_layer(self):
    stacked = jax.random.normal(jax.random.key(2), (6, 4, 3))
    params = {"layers": {"kernel": stacked}}
    prunable = M.prunable_tree(params)
    axes = M.layer_axis_tree(params, prunable, {"layers": 1})
    masks = jax.jit(lambda s: M.layerwise_masks(s, prunable, 0.5, axes))(params)
    per_layer = np.asarray(masks["layers"]["kernel"]).sum(axis=(0, 2))
    np.testing.assert_array_equal(per_layer, [9, 9, 9, 9])
    for layer in range(4):
      sl = np.asarray(stacked[:, layer, :])
      np.testing.assert_array_equal(masks["layers"]["kernel"][:, layer, :],
                                    sl >= np.sort(sl.ravel())[-9])



def test_scaled_sparsity_counts_exactly_at_the_target():
  n = 25_502_912
  exact = n - math.floor(0.98 * n)
  assert M.keep_count(n, M.ScaledSparsity(0.98, 1.0)) == exact
  assert int(jax.jit(lambda f: M.keep_count(n, M.ScaledSparsity(0.98, f)))(jnp.float32(1.0))) == exact
  on_the_way = jax.jit(lambda f: M.keep_count(n, M.ScaledSparsity(0.98, f)))(jnp.float32(0.5))
  assert int(on_the_way) == int(og.select.keep_count(n, jnp.float32(0.98) * jnp.float32(0.5)))
  assert M.keep_count(100, M.ScaledSparsity(0.5, 0.5)) == 75
