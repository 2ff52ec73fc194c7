"""The README's NNX recipe (examples/nnx_recipe.py: split, train with og, merge) and checkpoints
of a state that is not the linen TrainState (an nnx.State and its optimizer state)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optg_jax as og
from optg_jax import checkpoint
from optg_jax import data

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _recipe():
  spec = importlib.util.spec_from_file_location("nnx_recipe", ROOT / "examples" / "nnx_recipe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def trained():
  recipe = _recipe()
  train_split, test_split = data.load_mnist_5k(seed=0)
  small = data.Split(train_split.images[:1000], train_split.labels[:1000])
  return recipe, test_split, recipe.train(small, epochs=4, batch_size=100, sparsity=0.9)


def test_nnx_recipe_trains_prunes_and_merges_back(trained):
  recipe, test_split, (model, params, opt_state, masks) = trained
  assert isinstance(model, recipe.MLP) and isinstance(params, nnx.State)
  summary = og.sparsity_summary(masks)
  n = 784 * 300 + 300 * 100 + 100 * 10
  assert (summary.total, int(summary.kept)) == (n, n - int(0.9 * n))  # exactly at the target
  kernel = np.asarray(model.fc1.kernel[...])
  mask = np.asarray(masks["fc1"]["kernel"])
  assert np.all(kernel[~mask] == 0)
  np.testing.assert_array_equal(kernel[mask], np.asarray(params["fc1"]["kernel"][...])[mask])
  # The merged model computes what the functional effective weights compute.
  graphdef, _, rest = nnx.split(recipe.MLP(nnx.Rngs(1)), nnx.Param, ...)
  functional = nnx.merge(graphdef, og.apply_masks(params, masks), rest)
  x = test_split.images[:64]
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(functional(x)), rtol=1e-6)
  accuracy = np.mean(np.argmax(np.asarray(model(test_split.images)), -1) == test_split.labels)
  # Chance is 0.1; 4 short epochs end at p_3 = 0.66 and the final mask jumps to 0.9 untrained.
  assert accuracy > 0.3, accuracy


def test_checkpoint_round_trip_of_an_nnx_state(tmp_path, trained):
  recipe, _, (_, params, opt_state, _) = trained
  state = {"params": params, "opt_state": opt_state}  # any pytree, not a linen TrainState
  mngr = checkpoint.manager(tmp_path / "ckpt")
  checkpoint.save(mngr, checkpoint.new(state, seed=3)._replace(step=jnp.int32(40)),
                  metadata={"note": "nnx"})
  mngr.wait_until_finished()
  # Restore into a freshly built state of the same structure.
  _, fresh_params, _ = nnx.split(recipe.MLP(nnx.Rngs(5)), nnx.Param, ...)
  tx_state = jax.tree.map(jnp.zeros_like, opt_state)
  target = checkpoint.new({"params": fresh_params, "opt_state": tx_state}, seed=0)
  restored, metadata = checkpoint.restore(checkpoint.manager(tmp_path / "ckpt"), target)
  assert metadata == {"note": "nnx", "checksum": checkpoint.checksum(restored)}
  assert int(restored.step) == 40
  assert isinstance(restored.state["params"], nnx.State)
  assert jax.tree.structure(restored.state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(3)))
  # The restored masks are the trained ones: training goes on where it stopped.
  assert og.sparsity_summary(og.get_masks(restored.state["opt_state"])).kept == (
      og.sparsity_summary(og.get_masks(opt_state)).kept)
