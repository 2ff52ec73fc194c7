"""``min_density``: a floor per layer in the global pool.

Each layer of ``n_l`` weights keeps its own top ``m_l = ceil(d·n_l)`` (ties: lower flat index),
and the other ``k − Σ m_l`` of the ``k = N − floor(p·N)`` kept are the exact global top-k of the
scores not forced in (ties: earlier leaf, then lower flat index; NaN lowest). Checked against a
brute-force numpy sort on small random trees with ties and NaNs, with and without jit, on a
stacked kernel, against today's masks at ``d = 0``, and in two methods where a layer would
otherwise be pruned away.
"""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import masks as masks_lib
from optg_jax import select
from optg_jax.methods.selection import Selection

import helpers

SHAPES = {"a": (4, 5), "b": (3, 2), "c": (6, 4)}  # 20, 6 and 24 prunable weights: N = 50


def _params(shapes=SHAPES):
  return {name: {"kernel": jnp.ones(shape), "bias": jnp.zeros(shape[-1])}
          for name, shape in shapes.items()}


def _scores(values, shapes=SHAPES):
  return {name: {"kernel": jnp.asarray(values[name], jnp.float32), "bias": None}
          for name in shapes}


def _tied(seed, shapes=SHAPES, nan=0.1):
  """Small integers (many ties), ±0.0, ±inf and NaNs."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    x = rng.integers(-3, 4, size=shape).astype(np.float32)
    x[rng.random(shape) < 0.1] = -0.0
    x[rng.random(shape) < 0.05] = np.inf
    x[rng.random(shape) < 0.05] = -np.inf
    x[rng.random(shape) < nan] = np.nan
    out[name] = x
  return out


def _order(values, positions):
  """``positions`` (tuples ending in the flat index) sorted best first: larger value, NaN last,
  ``-0.0 == +0.0``, then by position."""
  def key(pos):
    v = values[pos]
    return (1, 0.0, pos) if np.isnan(v) else (0, -float(v), pos)
  return sorted(positions, key=key)


def _brute(values, shapes, sparsity, d, axes=None):
  """The floored global selection by sorting: ``{name: bool array}``."""
  axes = axes or {}
  names = list(shapes)
  flat = {(i, j): float(values[name].ravel()[j])
          for i, name in enumerate(names) for j in range(values[name].size)}
  n = len(flat)
  k = n - math.floor(fractions.Fraction(repr(sparsity)) * n)
  kept = set()
  for i, name in enumerate(names):
    index = np.arange(math.prod(shapes[name])).reshape(shapes[name])
    layers = (index.reshape(1, -1) if name not in axes
              else np.moveaxis(index, axes[name], 0).reshape(shapes[name][axes[name]], -1))
    for layer in layers:
      floor = math.ceil(fractions.Fraction(repr(d)) * layer.size)
      kept |= set(_order(flat, [(i, int(j)) for j in layer])[:floor])
  free = _order(flat, [pos for pos in flat if pos not in kept])
  kept |= set(free[:max(k - len(kept), 0)])
  return {name: np.array([(i, j) in kept for j in range(math.prod(shapes[name]))]
                         ).reshape(shapes[name]) for i, name in enumerate(names)}


def _kernels(masks):
  return {name: np.asarray(m["kernel"]) for name, m in masks.items()}


@pytest.mark.parametrize("seed,sparsity,d", [(0, 0.8, 0.1), (1, 0.7, 0.25), (2, 0.5, 0.3),
                                             (3, 0.9, 0.05), (4, 0.6, 0.35)])
def test_matches_brute_force_with_ties_and_nans(seed, sparsity, d):
  values = _tied(seed)
  selection = Selection(min_density=d)
  got = _kernels(selection.masks(_scores(values), _params(), 1.0, sparsity))
  want = _brute(values, SHAPES, sparsity, d)
  k = 50 - math.floor(round(sparsity * 50, 9))
  assert sum(int(m.sum()) for m in got.values()) == k
  for name, shape in SHAPES.items():
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got[name].sum() >= math.ceil(d * math.prod(shape))


def test_floor_counts_are_ceil_of_the_decimal_density():
  assert masks_lib.min_keep_count((10, 10), None, 0.07) == 7  # not ceil(0.07 * 100.0) = 8
  assert masks_lib.min_keep_count((3, 2), None, 0.1) == 1
  assert masks_lib.min_keep_count((4, 5), None, 1.0) == 20
  assert masks_lib.min_keep_count((3, 4, 5), 0, 0.15) == 3  # per slice of 20
  assert masks_lib.min_keep_count((3, 4, 5), 1, 0.15) == 3  # per slice of 15: ceil(2.25)
  assert masks_lib.min_keep_count((4, 5), None, 1e-9) == 1


def test_forced_weights_are_each_layers_top_scores():
  rng = np.random.default_rng(5)
  values = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
  values["b"] -= 100.0  # b is below every other score: the global pool alone keeps none of it
  got = _kernels(Selection(min_density=0.34).masks(_scores(values), _params(), 1.0, 0.5))
  plain = _kernels(Selection().masks(_scores(values), _params(), 1.0, 0.5))
  assert plain["b"].sum() == 0
  assert got["b"].sum() == math.ceil(0.34 * 6) == 3
  np.testing.assert_array_equal(got["b"], np.asarray(select.topk_mask(jnp.asarray(values["b"]), 3)))
  assert sum(int(m.sum()) for m in got.values()) == 25  # k = 50 − 25; floors 7 + 3 + 9


def test_free_nans_after_the_numbers_by_position():
  """The free pass reaches the NaN tier: free NaNs are taken by position, never a forced one."""
  values = {"a": np.full((4, 5), np.nan, np.float32),
            "b": np.arange(1, 7, dtype=np.float32).reshape(3, 2),
            "c": np.arange(7, 31, dtype=np.float32).reshape(6, 4)}
  # d = 0.5: a forces its indices 0-9 (NaN ties by index), b 3, c 12: M = 25. At 10%, k = 45:
  # the 20 free picks are the 15 free numbers, then a's free NaNs 10-14 by position.
  got = _kernels(Selection(min_density=0.5).masks(_scores(values), _params(), 1.0, 0.1))
  np.testing.assert_array_equal(got["a"].ravel(), [1] * 15 + [0] * 5)
  assert got["b"].all() and got["c"].all()
  np.testing.assert_array_equal(got["a"], _brute(values, SHAPES, 0.1, 0.5)["a"])


def test_stacked_layers_each_keep_their_floor():
  shapes = {"s": (3, 4, 5), "t": (6, 4), "u": (4, 3, 2)}
  axes = {"s": 0, "u": 1}
  rng = np.random.default_rng(6)
  values = {name: rng.integers(-3, 3, size=shape).astype(np.float32)
            for name, shape in shapes.items()}
  values["t"] += 10.0
  values["s"][1] -= 100.0  # the middle layer of each stack is below everything
  values["u"][:, 1] -= 100.0
  selection = Selection(min_density=0.15, layer_axes=axes)
  got = _kernels(selection.masks(_scores(values, shapes), _params(shapes), 1.0, 0.75))
  want = _brute(values, shapes, 0.75, 0.15, axes)
  for name in shapes:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name, axis in axes.items():
    per_layer = np.moveaxis(got[name], axis, 0).reshape(shapes[name][axis], -1)
    assert (per_layer.sum(1) >= math.ceil(0.15 * per_layer.shape[1])).all(), name
    assert per_layer[1].sum() == math.ceil(0.15 * per_layer.shape[1]), name
  assert sum(int(m.sum()) for m in got.values()) == 108 - 81


def test_jit_and_traced_fraction_agree_with_eager():
  values, params = _scores(_tied(7)), _params()
  selection = Selection(min_density=0.2)
  eager = selection.masks(values, params, 1.0, 0.7)
  jitted = jax.jit(lambda s, f: selection.masks(s, params, f, 0.7))
  tree_equal = lambda x, y: jax.tree.map(np.testing.assert_array_equal, x, y)
  tree_equal(jitted(values, jnp.float32(1.0)), eager)
  # Mid-schedule (fraction 0.5: p = 0.35): the floors are static, the count k(t) is traced.
  half = jitted(values, jnp.float32(0.5))
  tree_equal(half, selection.masks(values, params, 0.5, 0.7))
  got = _kernels(half)
  assert sum(int(m.sum()) for m in got.values()) == 50 - math.floor(0.35 * 50)
  want = _brute(_tied(7), SHAPES, 0.35, 0.2)
  for name in SHAPES:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_zero_is_todays_global_top_k_bit_for_bit():
  values, params = _scores(_tied(8)), _params()
  pooled = {name: {"kernel": v["kernel"], "bias": None} for name, v in values.items()}
  today = select.global_topk_masks(pooled, select.keep_count(50, 0.8))
  for selection in (Selection(), Selection(min_density=0.0), Selection(min_density=0)):
    got = selection.masks(values, params, 1.0, 0.8)
    for name in SHAPES:
      np.testing.assert_array_equal(got[name]["kernel"], today[name]["kernel"])
      assert got[name]["bias"].shape == ()
  assert Selection(min_density=0) == Selection()


def test_floors_above_k_are_refused():
  values, params = _scores(_tied(9)), _params()
  # ceil(0.3·20) + ceil(0.3·6) + ceil(0.3·24) = 6 + 2 + 8 = 16 > k = 50 − 40 = 10.
  with pytest.raises(ValueError, match=r"min_density=0\.3.*16 of the 50.*k = 10.*sparsity 0\.8"):
    Selection(min_density=0.3).masks(values, params, 1.0, 0.8)
  with pytest.raises(ValueError, match="min_density"):  # inside jit too, at trace time
    jax.jit(lambda f: Selection(min_density=0.3).masks(values, params, f, 0.8))(0.5)
  Selection(min_density=0.15).masks(values, params, 1.0, 0.8)  # 3 + 1 + 4 = 8 <= 10
  with pytest.raises(ValueError, match="min_density=0.3"):  # a pruner: at init
    og.magnitude(0.8, min_density=0.3).init(params)
  tx = og.mask_optimizer(0.8, 0.1, sparsity_schedule=lambda t: 0.8, min_density=0.3,
                         refresh=lambda t: True)
  state = tx.init(params)  # OptG's first mask is dense: no selection yet
  with pytest.raises(ValueError, match="min_density=0.3"):  # its first update selects
    tx.update(params, state, params)


@pytest.mark.parametrize("kwargs,error", [
    (dict(min_density=1.5), ValueError), (dict(min_density=-0.1), ValueError),
    (dict(min_density=float("nan")), ValueError), (dict(min_density="0.1"), TypeError),
    (dict(min_density=True), TypeError),
    (dict(min_density=0.1, distribution="uniform"), ValueError),
    (dict(min_density=0.1, distribution="erk"), ValueError),
    (dict(min_density=0.1, distribution=lambda shapes, p: shapes), ValueError),
    (dict(min_density=0.1, rule="reference"), ValueError)])
def test_bad_min_density_is_refused(kwargs, error):
  with pytest.raises(error, match="min_density"):
    Selection(**kwargs)


def test_methods_refuse_or_forward_it():
  with pytest.raises(ValueError, match="applies to distribution='global'"):
    og.gmp(0.8, 0, 10, 2, min_density=0.1)  # uniform by default
  with pytest.raises(ValueError, match="min_density"):
    og.lottery_ticket(1, 10, optax.sgd(0.1), min_density=0.1)
  with pytest.raises(ValueError, match="min_density"):
    og.mask_optimizer(0.8, 0.1, 1, 10, min_density=0.1, selection_rule="reference")


def _layer_b_wiped_out_params():
  """|W| of b far below a and c: a global magnitude pool at 50% keeps none of b."""
  params = _params()
  rng = np.random.default_rng(10)
  for name, shape in SHAPES.items():
    scale = 1e-3 if name == "b" else 1.0
    params[name]["kernel"] = jnp.asarray(1.0 + rng.random(shape), jnp.float32) * scale
  return params


def test_magnitude_keeps_every_layer_alive():
  """At 50% (k = 25) the floors at d = 0.34 are 7 + 3 + 9 = 19; without them b is wiped out."""
  params = _layer_b_wiped_out_params()
  plain = Selection().masks(jax.tree.map(jnp.abs, params), params, 1.0, 0.5)  # og.magnitude's
  assert int(plain["b"]["kernel"].sum()) == 0
  floored = og.get_masks(og.magnitude(0.5, min_density=0.34).init(params))
  kept = {name: int(m["kernel"].sum()) for name, m in floored.items()}
  assert kept["b"] == 3 and sum(kept.values()) == 25


def test_mask_optimizer_keeps_every_layer_alive():
  """OptG's scores S = −Σ η G ⊙ W: a loss that raises b's weights drives all of b's scores
  below a's and c's, so the plain global top-k keeps none of b; with min_density every refresh
  and the final mask keep b's floor."""
  params = _params()
  signs = {"a": -1.0, "b": 1.0, "c": -1.0}
  loss = lambda w, t: sum(signs[name] * jnp.sum(w[name]["kernel"]) for name in SHAPES)
  tx = optax.chain(og.mask_optimizer(0.5, 0.1, sparsity_schedule=lambda t: 0.5,
                                     refresh=lambda t: True, min_density=0.34), optax.sgd(0.01))
  state = tx.init(params)
  step = helpers.jitted_step(tx, loss)
  for _ in range(3):
    params, state, _ = step(params, state, 0)
  scores = state[0].scores
  assert int(Selection().masks(scores, params, 1.0, 0.5)["b"]["kernel"].sum()) == 0
  final = {name: int(m["kernel"].sum()) for name, m in og.final_masks(params, state).items()}
  current = {name: int(m["kernel"].sum()) for name, m in og.get_masks(state).items()}
  assert final == current
  assert sum(final.values()) == 25
  assert final["b"] == 3
