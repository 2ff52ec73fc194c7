"""Reference chains and the OptG weight learning rate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optg_jax as og
from optg_jax import recipes
from optg_jax.methods import magnitude as magnitude_lib
from optg_jax.methods import optg as optg_lib


def test_warmup_cosine_per_epoch_matches_the_reference_formula():
  lr, spe, epochs = 0.1, 7, 20
  schedule = jax.jit(recipes.warmup_cosine_per_epoch(lr, spe, epochs))
  for step in range(spe * epochs):
    e = step // spe
    expected = lr * (e + 1) / 5 if e < 5 else 0.5 * lr * (1 + math.cos(math.pi * e / epochs))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)  # float32 cos


@pytest.mark.parametrize("method,state_type", [
    ("optg", optg_lib.MaskOptimizerState), ("gmp", magnitude_lib.PruningState),
    ("magnitude", magnitude_lib.PruningState), ("snip", magnitude_lib.PruningState),
    ("random", magnitude_lib.PruningState)])
def test_each_method_chain_holds_its_state(method, state_type):
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  tx = recipes.make_optimizer(method, 0.5, steps_per_epoch=3, epochs=10)
  state = tx.init(params)
  assert isinstance(og.methods.base.find_state(state), state_type)


def test_dense_chain_has_no_method_state_and_unknown_method_fails():
  params = {"w": jnp.ones((8, 4))}
  state = recipes.make_optimizer("dense", 0.0, steps_per_epoch=3, epochs=10).init(params)
  assert not og.methods.base.has_state(state)
  with pytest.raises(ValueError, match="method"):
    recipes.make_optimizer("lottery", 0.5, steps_per_epoch=3, epochs=10)
