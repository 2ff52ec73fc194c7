"""Every method honours its selection options and hands ``G ⊙ M`` down the chain.

Each test runs all five methods (OptG and the four baselines) through the same checks, so that a
method whose selection ignored ``exclude=``, ``layer_axes=`` or ``overrides=``, or that handed
``G`` instead of ``G ⊙ M`` down, fails here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og

METHODS = ("optg", "gmp", "magnitude", "snip", "random")
PRUNED_BY = 2  # every method below has its target mask from the forward pass of this step on


def _method(name, sparsity, **kwargs):
  """Each method configured to reach ``sparsity`` for the forward pass of step ``PRUNED_BY``."""
  if name == "optg":
    return og.mask_optimizer(sparsity, 0.1, sparsity_schedule=og.schedules.constant(sparsity),
                             refresh=og.schedules.every_n_steps(1, begin_step=PRUNED_BY),
                             **kwargs)
  if name == "gmp":
    return og.gmp(sparsity, 0, PRUNED_BY, 1, **kwargs)
  if name == "magnitude":
    return og.magnitude(sparsity, step=PRUNED_BY, **kwargs)
  if name == "snip":
    return og.snip(sparsity, num_batches=PRUNED_BY, **kwargs)
  return og.random_pruning(sparsity, seed=1, **kwargs)


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  scale = jnp.array([1.0, 10.0, 100.0])[:, None, None]  # layer 2 outweighs the others
  return {"dense1": {"kernel": jax.random.normal(k[0], (6, 8)), "bias": jnp.zeros(8)},
          "dense2": {"kernel": jax.random.normal(k[1], (8, 8)), "bias": jnp.zeros(8)},
          "stack": jax.random.normal(k[2], (3, 8, 8)) * scale}


def _loss(p, t):
  x = jax.random.normal(jax.random.key(10 + t), (16, 6))
  h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  h = jnp.tanh(h @ p["dense2"]["kernel"] + p["dense2"]["bias"])
  s = h
  for layer in range(3):
    s = jnp.tanh(s @ p["stack"][layer] / 10.0 ** layer)
  return jnp.mean((h + s - 0.5) ** 2)  # the skip keeps gradients flowing past a pruned stack


def _run(method, steps=PRUNED_BY + 1):
  """Steps of the method alone: ``(masks used by the forward pass, grads, updates)`` each."""
  params = _params()
  state = method.init(params)
  update = jax.jit(method.update)
  history = []
  for t in range(steps):
    masks = og.get_masks(state)
    grads = jax.grad(_loss)(og.effective_params(params, state), t)
    updates, new_state = update(grads, state, params)
    history.append((masks, grads, updates, og.get_masks(new_state)))
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)
    state = new_state
  return history, state


def _kept(mask):
  return int(np.sum(mask))


@pytest.mark.parametrize("name", METHODS)
def test_hands_g_times_m_down_the_chain(name):
  history, _ = _run(_method(name, 0.7, distribution="uniform"))
  for t, (masks, grads, updates, new_masks) in enumerate(history):
    used = new_masks if (name == "snip" and t == PRUNED_BY - 1) else masks  # SNIP's first is sparse
    for m, g, u in zip(jax.tree.leaves(used), jax.tree.leaves(grads), jax.tree.leaves(updates)):
      np.testing.assert_array_equal(u, np.where(m, g, 0.0))
  masks, grads, updates, _ = history[-1]
  kernel = np.asarray(masks["dense2"]["kernel"])
  assert 0 < kernel.sum() < kernel.size  # the check above saw pruned and kept entries
  assert np.all(np.asarray(updates["dense2"]["kernel"])[kernel] != 0)


@pytest.mark.parametrize("name", METHODS)
def test_exclude_keeps_the_named_leaf_dense(name):
  history, _ = _run(_method(name, 0.8, exclude=("dense2/kernel",)))
  masks = history[-1][0]
  assert bool(np.all(masks["dense2"]["kernel"]))
  assert _kept(masks["dense1"]["kernel"]) < 48


@pytest.mark.parametrize("name", METHODS)
def test_layer_axes_prune_each_stacked_layer_to_its_own_count(name):
  def per_layer(**kwargs):
    history, _ = _run(_method(name, 0.75, distribution="uniform", **kwargs))
    return [_kept(layer) for layer in np.asarray(history[-1][0]["stack"])]

  assert per_layer(layer_axes={"stack": 0}) == [16, 16, 16]
  assert per_layer() != [16, 16, 16]  # without it the stack is one pool: the test has power


@pytest.mark.parametrize("name", METHODS)
def test_overrides_set_the_named_leaf_sparsity(name):
  history, _ = _run(_method(name, 0.5, distribution="uniform", overrides={"dense2": 0.875}))
  masks = history[-1][0]
  assert _kept(masks["dense2"]["kernel"]) == 8
  assert _kept(masks["dense1"]["kernel"]) == 24


@pytest.mark.parametrize("name", METHODS)
def test_overrides_with_a_global_pool_are_refused(name):
  with pytest.raises(ValueError, match="overrides"):
    _method(name, 0.5, distribution="global", overrides={"dense2": 0.9})


@pytest.mark.parametrize("name", METHODS)
def test_exclude_pattern_matching_nothing_is_refused(name):
  with pytest.raises(ValueError, match="exclude: pattern 'fc2/kernel\\$' matches no leaf"):
    _method(name, 0.5, exclude=("fc2/kernel$",)).init(_params())


@pytest.mark.parametrize("name", METHODS)
def test_bad_layer_axes_are_refused_also_with_a_global_pool(name):
  with pytest.raises(ValueError, match="layer_axes"):
    _method(name, 0.5, distribution="global", layer_axes=5).init(_params())
  with pytest.raises(ValueError, match="layer_axes: pattern 'stak'"):
    _method(name, 0.5, distribution="uniform", layer_axes={"stak": 0}).init(_params())


@pytest.mark.parametrize("name", METHODS)
def test_erk_with_stacked_layers_meets_the_target(name):
  history, _ = _run(_method(name, 0.8, distribution="erk", layer_axes={"stack": 0}))
  masks = history[-1][0]
  total = sum(m.size for m in jax.tree.leaves(masks) if m.ndim)
  kept = sum(_kept(m) for m in jax.tree.leaves(masks) if m.ndim)
  assert abs(kept - 0.2 * total) <= 5  # within one weight per layer (5 layers)
  assert len({_kept(layer) for layer in np.asarray(masks["stack"])}) == 1


@pytest.mark.parametrize("name", METHODS)
def test_final_masks_need_no_selection_arguments(name):
  kwargs = dict(distribution="uniform", exclude=("dense1",), layer_axes={"stack": 0})
  history, state = _run(_method(name, 0.75, **kwargs))
  final = og.final_masks(_params(), state)
  assert bool(np.all(final["dense1"]["kernel"]))
  assert [_kept(layer) for layer in np.asarray(final["stack"])] == [16, 16, 16]
  assert _kept(final["dense2"]["kernel"]) == 16


@pytest.mark.parametrize("name", METHODS)
def test_a_pluggable_distribution_callable(name):
  def halves(shapes, sparsity):
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: x is None)
    values = [None if s is None else (0.5 if s.shape == (6, 8) else sparsity) for s in leaves]
    return jax.tree.unflatten(jax.tree.structure(shapes, is_leaf=lambda x: x is None), values)

  history, _ = _run(_method(name, 0.75, distribution=halves, layer_axes={"stack": 0}))
  masks = history[-1][0]
  assert _kept(masks["dense1"]["kernel"]) == 24
  assert _kept(masks["dense2"]["kernel"]) == 16
  assert [_kept(layer) for layer in np.asarray(masks["stack"])] == [16, 16, 16]


def test_a_distribution_callable_with_a_bad_result_is_refused():
  bad = {"wrong structure": lambda shapes, p: {"a": 0.5},
         "out of range": lambda shapes, p: jax.tree.map(lambda s: 1.5, shapes)}
  for what, fn in bad.items():
    with pytest.raises(ValueError, match="distribution"):
      og.magnitude(0.5, distribution=fn).init(_params())


def test_unknown_distribution_and_topk_kind_are_refused():
  with pytest.raises(ValueError, match="distribution"):
    og.Selection("gaussian")
  with pytest.raises(ValueError, match="topk"):
    og.Selection("uniform", topk="2:4")


def test_stacked_layers_may_take_different_sparsities():
  history, _ = _run(og.magnitude(0.5, distribution="uniform", layer_axes={"stack": 0},
                                 overrides={"stack/0": 0.25, "stack/2": 0.875}), steps=1)
  assert [_kept(layer) for layer in np.asarray(history[0][0]["stack"])] == [48, 32, 8]


def test_selection_is_a_hashable_value():
  a = og.Selection("erk", exclude="x", layer_axes={"s": 0}, overrides={"k": 0.5})
  b = og.Selection("erk", exclude=("x",), layer_axes={"s": 0}, overrides={"k": 0.5})
  assert a == b and hash(a) == hash(b)
  assert math.isclose(dict(a.overrides)["k"], 0.5)
