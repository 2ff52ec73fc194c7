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
  # BatchNorm trained: its running averages moved from their init (mean 0, var 1).
  assert float(np.abs(np.asarray(model.bn1.mean[...])).max()) > 1e-3
  # The merged model computes what og.final_params and the statistics compute.
  graphdef, _, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  functional = nnx.merge(graphdef, og.final_params(params, opt_state), stats, rest, copy=True)
  x = test_split.images[:64]
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(functional(x)))
  accuracy = np.mean(np.argmax(np.asarray(model(test_split.images)), -1) == test_split.labels)
  # Chance is 0.1; 4 epochs on 1,000 digits at 90% sparsity reach ~0.7-0.8.
  assert accuracy > 0.3, accuracy


def test_readme_nnx_example_is_the_recipe():
  """Every code line of the README's NNX example is a line of examples/nnx_recipe.py (which
  the test above runs), so the README cannot drift from code that works."""
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## Flax NNX"):]
  block = section[section.index("```python") + len("```python"):]
  block = block[:block.index("```")]
  recipe_lines = {line.split("#")[0].strip()
                  for line in (ROOT / "examples" / "nnx_recipe.py").read_text().splitlines()}
  code = [line.split("#")[0].strip() for line in block.splitlines()]
  code = [line for line in code if line and not line.startswith(("from ", "import "))]
  assert "nnx.BatchStat" in block and "copy=True" in block and "og.final_params" in block
  missing = [line for line in code if line not in recipe_lines]
  assert not missing, missing


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
