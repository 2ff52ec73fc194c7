"""Tests for optg_jax.distributions: uniform, ERK (budget, ratios, capping, overrides), dispatch."""

import math

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optg_jax import distributions


def _sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _resnet_like():
  """A small CIFAR-ResNet-shaped tree: stem conv, 3x3 convs, a 1x1 shortcut, a classifier."""
  return {
      "params": {
          "conv0": {"kernel": _sds(3, 3, 3, 16), "bias": None},
          "block1": [
              {"conv": {"kernel": _sds(3, 3, 16, 64)}, "bn": {"scale": None, "bias": None}},
              {"conv": {"kernel": _sds(3, 3, 64, 64)}, "bn": {"scale": None, "bias": None}},
              {"conv": {"kernel": _sds(3, 3, 64, 64)}, "bn": {"scale": None, "bias": None}},
          ],
          "shortcut": (_sds(1, 1, 64, 128), None),
          "block2": [{"conv": {"kernel": _sds(3, 3, 128, 128)}}] * 2,
          "head": {"kernel": jnp.zeros((128, 10)), "bias": None},
      }
  }


def _flat(tree):
  """``{path string: leaf}`` for the non-None leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {
      "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
      for path, leaf in leaves
      if leaf is not None
  }


def _kept(shapes, sparsities):
  shapes, sparsities = _flat(shapes), _flat(sparsities)
  assert shapes.keys() == sparsities.keys()
  return math.fsum((1 - sparsities[k]) * math.prod(shapes[k].shape) for k in shapes)


def _total(shapes):
  return sum(math.prod(leaf.shape) for leaf in _flat(shapes).values())


def _er_ratio(shape):
  return sum(shape) / math.prod(shape)


def _assert_same_structure(shapes, out):
  is_none = lambda x: x is None
  assert jax.tree.structure(shapes, is_leaf=is_none) == jax.tree.structure(out, is_leaf=is_none)
  none_in = jax.tree.leaves(jax.tree.map(is_none, shapes, is_leaf=is_none))
  none_out = jax.tree.leaves(jax.tree.map(is_none, out, is_leaf=is_none))
  assert none_in == none_out
  for value in _flat(out).values():
    assert type(value) is float


# ----------------------------------------------------------------------------------------------
# uniform


def test_uniform_every_prunable_leaf():
  shapes = _resnet_like()
  out = distributions.uniform(shapes, 0.8)
  _assert_same_structure(shapes, out)
  assert set(_flat(out).values()) == {0.8}
  assert out["params"]["conv0"]["bias"] is None
  assert out["params"]["shortcut"][1] is None


def test_uniform_overrides_first_match_wins():
  shapes = _resnet_like()
  out = distributions.uniform(
      shapes, 0.8, overrides={r"conv0/": 0.0, r"head": 0.5, r"kernel$": 0.3}
  )
  _assert_same_structure(shapes, out)
  assert out["params"]["conv0"]["kernel"] == 0.0
  assert out["params"]["head"]["kernel"] == 0.5
  assert out["params"]["block1"][2]["conv"]["kernel"] == 0.3
  assert out["params"]["shortcut"][0] == 0.8  # path 'params/shortcut/0': no pattern matches


# ----------------------------------------------------------------------------------------------
# ERK


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_total_kept_matches(sparsity):
  shapes = _resnet_like()
  out = distributions.erk(shapes, sparsity)
  _assert_same_structure(shapes, out)
  total = _total(shapes)
  assert _kept(shapes, out) == pytest.approx((1 - sparsity) * total, rel=1e-12)
  assert all(0.0 <= s < 1.0 for s in _flat(out).values())


def test_erk_ratios_follow_sum_over_prod_for_uncapped_leaves():
  shapes = _resnet_like()
  out = distributions.erk(shapes, 0.9)
  shapes_flat, out_flat = _flat(shapes), _flat(out)
  uncapped = {k: 1 - s for k, s in out_flat.items() if s > 0}
  assert len(uncapped) >= 4
  ref = next(iter(uncapped))
  for k, density in uncapped.items():
    want = _er_ratio(shapes_flat[k].shape) / _er_ratio(shapes_flat[ref].shape)
    assert density / uncapped[ref] == pytest.approx(want, rel=1e-12), k


def test_erk_power_scale():
  shapes = _resnet_like()
  flat = _flat(shapes)
  out = _flat(distributions.erk(shapes, 0.9, power_scale=0.5))
  a, b = "params/block1/1/conv/kernel", "params/block2/0/conv/kernel"
  want = (_er_ratio(flat[a].shape) / _er_ratio(flat[b].shape)) ** 0.5
  assert (1 - out[a]) / (1 - out[b]) == pytest.approx(want, rel=1e-12)
  uniform = _flat(distributions.erk(shapes, 0.9, power_scale=0.0))
  assert all(s == pytest.approx(0.9, rel=1e-12) for s in uniform.values())


def test_erk_caps_small_first_conv_and_resolves():
  shapes = _resnet_like()
  out = distributions.erk(shapes, 0.9)
  flat_shapes, flat = _flat(shapes), _flat(out)
  stem = "params/conv0/kernel"
  assert flat[stem] == 0.0  # density would exceed 1: made dense

  # Independently: without capping the stem would get eps * ratio > 1, with eps from all leaves.
  total = _total(shapes)
  eps_all = 0.1 * total / sum(
      _er_ratio(s.shape) * math.prod(s.shape) for s in flat_shapes.values()
  )
  assert eps_all * _er_ratio(flat_shapes[stem].shape) > 1

  # The rest is re-solved: each other leaf gets eps * ratio, and the budget is still met.
  dense = {k for k, s in flat.items() if s == 0.0}
  rest = {k: s for k, s in flat_shapes.items() if k not in dense}
  eps = (0.1 * total - sum(math.prod(flat_shapes[k].shape) for k in dense)) / sum(
      _er_ratio(s.shape) * math.prod(s.shape) for s in rest.values()
  )
  assert eps > eps_all
  for k, s in rest.items():
    assert 1 - flat[k] == pytest.approx(eps * _er_ratio(s.shape), rel=1e-12), k
    assert eps * _er_ratio(s.shape) <= 1
  assert _kept(shapes, out) == pytest.approx(0.1 * total, rel=1e-12)


def _rigl_reference(shape_list, sparsity):
  """RigL's loop, written independently: make only the max-ratio leaves dense per pass."""
  sizes = [math.prod(s) for s in shape_list]
  raw = [_er_ratio(s) for s in shape_list]
  dense = set()
  while True:
    free = [i for i in range(len(sizes)) if i not in dense]
    if not free:
      return [0.0] * len(sizes)
    rhs = (1 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
    eps = rhs / sum(raw[i] * sizes[i] for i in free)
    top = max(raw[i] for i in free)
    if eps * top <= 1:
      return [0.0 if i in dense else 1 - eps * raw[i] for i in range(len(sizes))]
    dense |= {i for i in free if raw[i] == top}


def test_erk_cascading_caps():
  # Capping "a" frees budget, which pushes "b" over density 1 in the second pass.
  shapes = {"a": _sds(8, 16), "b": _sds(8, 64), "c": _sds(64, 32)}
  total = _total(shapes)
  eps_all = 0.5 * total / sum(_er_ratio(s.shape) * math.prod(s.shape) for s in shapes.values())
  assert eps_all * _er_ratio((8, 16)) > 1 and eps_all * _er_ratio((8, 64)) < 1
  out = distributions.erk(shapes, 0.5)
  assert out["a"] == 0.0 and out["b"] == 0.0 and out["c"] > 0.0
  assert _kept(shapes, out) == pytest.approx(0.5 * total, rel=1e-12)
  want = _rigl_reference([(8, 16), (8, 64), (64, 32)], 0.5)
  assert [out[k] for k in "abc"] == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_erk_dense_is_erdos_renyi():
  shapes = {"fc1": _sds(784, 300), "fc2": _sds(300, 100), "fc3": _sds(100, 10)}
  out = distributions.erk(shapes, 0.98)
  d1, d2 = 1 - out["fc1"], 1 - out["fc2"]
  assert d1 / d2 == pytest.approx(((784 + 300) / (784 * 300)) / ((300 + 100) / (300 * 100)))
  assert _kept(shapes, out) == pytest.approx(0.02 * _total(shapes), rel=1e-12)


def test_erk_overrides_keep_total():
  shapes = _resnet_like()
  overrides = {r"head/kernel": 0.0, r"block2/1": 0.995}
  out = distributions.erk(shapes, 0.9, overrides=overrides)
  _assert_same_structure(shapes, out)
  flat_shapes, flat = _flat(shapes), _flat(out)
  assert flat["params/head/kernel"] == 0.0
  assert flat["params/block2/1/conv/kernel"] == 0.995
  assert _kept(shapes, out) == pytest.approx(0.1 * _total(shapes), rel=1e-12)
  # the free leaves still follow the ERK ratios among themselves
  free = [k for k in flat if k not in ("params/head/kernel", "params/block2/1/conv/kernel")]
  uncapped = [k for k in free if flat[k] > 0]
  a, b = uncapped[0], uncapped[-1]
  assert (1 - flat[a]) / (1 - flat[b]) == pytest.approx(
      _er_ratio(flat_shapes[a].shape) / _er_ratio(flat_shapes[b].shape), rel=1e-12
  )


def test_erk_all_leaves_overridden_consistently():
  shapes = {"a": _sds(10, 10), "b": _sds(10, 30)}
  out = distributions.erk(shapes, 0.5, overrides={"a": 0.5, "b": 0.5})
  assert out == {"a": 0.5, "b": 0.5}


@given(
    st.lists(
        st.lists(st.integers(1, 40), min_size=1, max_size=4).map(tuple), min_size=1, max_size=6
    ),
    st.floats(0.0, 0.999),
)
@settings(max_examples=60, deadline=None)
def test_erk_budget_and_rigl_property(dims, sparsity):
  shapes = [_sds(*d) for d in dims]
  out = distributions.erk(shapes, sparsity)
  assert _kept(shapes, out) == pytest.approx((1 - sparsity) * _total(shapes), rel=1e-9)
  assert all(0.0 <= s < 1.0 for s in out)
  assert out == pytest.approx(_rigl_reference(dims, sparsity), rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# dispatch and nested trees


def test_layer_sparsities_dispatch():
  shapes = _resnet_like()
  assert distributions.layer_sparsities("uniform", shapes, 0.7) == distributions.uniform(
      shapes, 0.7
  )
  overrides = {"conv0": 0.0}
  assert distributions.layer_sparsities(
      "erk", shapes, 0.7, overrides=overrides
  ) == distributions.erk(shapes, 0.7, overrides=overrides)
  assert distributions.layer_sparsities("global", shapes, 0.7) is None


def test_nested_tuples_lists_and_arrays():
  shapes = {"a": [jnp.zeros((4, 5)), (None, _sds(6, 7, 2))], "b": (None, [None, _sds(3, 8)])}
  for out in (distributions.uniform(shapes, 0.6), distributions.erk(shapes, 0.6)):
    _assert_same_structure(shapes, out)
    assert isinstance(out["a"], list) and isinstance(out["a"][1], tuple)
    assert out["a"][1][0] is None and out["b"][0] is None and out["b"][1][0] is None
  out = distributions.erk(shapes, 0.6, overrides={r"^b/1/1$": 0.2})
  assert out["b"][1][1] == 0.2
  assert _kept(shapes, out) == pytest.approx(0.4 * _total(shapes), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# bad input

_FNS = [distributions.uniform, distributions.erk]


@pytest.mark.parametrize("fn", _FNS)
@pytest.mark.parametrize("sparsity", [1.0, -0.01, float("nan")])
def test_bad_sparsity(fn, sparsity):
  with pytest.raises(ValueError, match=r"^sparsity"):
    fn(_resnet_like(), sparsity)


@pytest.mark.parametrize("fn", _FNS)
@pytest.mark.parametrize("shapes", [{}, {"a": None, "b": [None]}])
def test_no_prunable_leaves(fn, shapes):
  with pytest.raises(ValueError, match="no prunable leaves"):
    fn(shapes, 0.5)


@pytest.mark.parametrize("fn", _FNS)
def test_bad_override_value(fn):
  with pytest.raises(ValueError, match=r"overrides\['head'\]"):
    fn(_resnet_like(), 0.5, overrides={"head": 1.0})


@pytest.mark.parametrize("fn", _FNS)
def test_override_matching_nothing(fn):
  with pytest.raises(ValueError, match="nonexistent_layer"):
    fn(_resnet_like(), 0.5, overrides={"head": 0.1, "nonexistent_layer": 0.1})
  with pytest.raises(ValueError, match="bias"):  # only None (non-prunable) leaves match
    fn(_resnet_like(), 0.5, overrides={"conv0/bias": 0.1})


@pytest.mark.parametrize("fn", _FNS)
def test_leaf_that_is_not_an_array(fn):
  with pytest.raises(TypeError, match="params/x"):
    fn({"params": {"x": 3.0, "y": _sds(2, 2)}}, 0.5)


def test_erk_scalar_leaf():
  with pytest.raises(ValueError, match="'s'"):
    distributions.erk({"s": _sds(), "k": _sds(4, 4)}, 0.5)


def test_erk_bad_power_scale():
  for value in (float("inf"), -1.0):
    with pytest.raises(ValueError, match="power_scale"):
      distributions.erk(_resnet_like(), 0.5, power_scale=value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"big": 0.0},  # the big leaf alone keeps more than the whole budget
        {"big": 0.999},  # the small leaf cannot make up the rest even when dense
    ],
)
def test_erk_impossible_overrides(overrides):
  shapes = {"big": _sds(100, 100), "small": _sds(10, 10)}
  with pytest.raises(ValueError, match="overrides"):
    distributions.erk(shapes, 0.5, overrides=overrides)


def test_erk_all_overridden_inconsistent():
  with pytest.raises(ValueError, match="overrides"):
    distributions.erk({"a": _sds(10, 10)}, 0.5, overrides={"a": 0.4})


def test_layer_sparsities_bad_name():
  with pytest.raises(ValueError, match="'uniform', 'erk', 'global'.*'magnitude'"):
    distributions.layer_sparsities("magnitude", _resnet_like(), 0.5)


def test_layer_sparsities_global_checks():
  with pytest.raises(ValueError, match="^sparsity"):
    distributions.layer_sparsities("global", _resnet_like(), 1.0)
  with pytest.raises(ValueError, match="no prunable leaves"):
    distributions.layer_sparsities("global", {"a": None}, 0.5)
  with pytest.raises(ValueError, match="overrides"):
    distributions.layer_sparsities("global", _resnet_like(), 0.5, overrides={"head": 0.0})
