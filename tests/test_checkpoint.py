"""Checkpoints: a full OptG TrainState and the data iterator round-trip exactly; steps, pruning."""

from typing import Any, NamedTuple

import jax
import numpy as np
import pytest

from optg_jax import checkpoint
from optg_jax import data
from optg_jax import models
from optg_jax import recipes
from optg_jax import training

BATCH = 50


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  data.data_source("mnist5k", "train", data_dir=path)
  return path


def _iterator(data_dir, start_step=0):
  return data.load("mnist5k", "train[:400]", batch_size=BATCH, seed=3, data_dir=data_dir,
                   cache=True, start_step=start_step)


class Run(NamedTuple):
  fresh: training.TrainState
  step: Any


@pytest.fixture(scope="module")
def run(data_dir):
  """An OptG run of LeNet-300-100: its initial state and jitted step."""
  model = models.get_model("lenet300100")
  tx = recipes.make_optimizer("optg", 0.9, steps_per_epoch=2, epochs=4)
  fresh = training.init(model, tx, next(_iterator(data_dir))["image"][:1], seed=0)
  return Run(fresh, jax.jit(training.make_train_step(model, tx)))


def _trained(run, data_dir, steps):
  """The state after ``steps`` steps (scores, momentum, refreshed masks) and its iterator."""
  it, state = _iterator(data_dir), run.fresh
  for _ in range(steps):
    batch = next(it)
    state, _ = run.step(state, batch["image"], batch["label"])
  return state, it


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_round_trip_of_optg_state_and_iterator(tmp_path, data_dir, run):
  state, it = _trained(run, data_dir, steps=5)
  assert 0 < int(jax.tree.leaves(state.opt_state)[0]) == 5
  ckpt = checkpoint.Checkpoint(state, np.int32(2), np.int32(5),
                               jax.random.key_data(jax.random.key(7)))
  mngr = checkpoint.manager(tmp_path / "ckpt")
  checkpoint.save(mngr, ckpt, iterator=it, metadata={"config": {"method": "optg"},
                                                     "seconds": 1.5})
  expected_next = [next(it) for _ in range(3)]  # the iterator moves on after the save
  mngr.wait_until_finished()

  other = _iterator(data_dir)
  restored, metadata = checkpoint.restore(checkpoint.manager(tmp_path / "ckpt"),
                                          checkpoint.new(run.fresh, seed=0), iterator=other)
  _assert_trees_equal(restored, ckpt)
  assert metadata == {"config": {"method": "optg"}, "seconds": 1.5,
                      "checksum": checkpoint.checksum(restored)}
  assert other.get_state() == {"step": 5}
  for want in expected_next:
    got = next(other)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_restore_into_shape_structs(tmp_path, data_dir, run):
  state, _ = _trained(run, data_dir, steps=2)
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, checkpoint.new(state, seed=1))
  mngr.wait_until_finished()
  target = jax.eval_shape(lambda: checkpoint.new(run.fresh, seed=0))
  restored, _ = checkpoint.restore(mngr, target)
  _assert_trees_equal(restored, checkpoint.new(state, seed=1))


def test_latest_step_keeps_the_last_few_and_ignores_unfinished(tmp_path, run):
  fresh = run.fresh
  assert checkpoint.latest_step(tmp_path / "missing") is None
  mngr = checkpoint.manager(tmp_path / "ckpt", max_to_keep=2)
  assert checkpoint.latest_step(tmp_path / "ckpt") is None
  for step in (10, 20, 30, 40):
    checkpoint.save(mngr, checkpoint.new(fresh, 0)._replace(step=np.int32(step)))
  mngr.wait_until_finished()
  assert mngr.all_steps() == [30, 40]
  (tmp_path / "ckpt" / "50.orbax-checkpoint-tmp-1234").mkdir()  # a save cut off mid-write
  assert checkpoint.latest_step(tmp_path / "ckpt") == 40
  restored, _ = checkpoint.restore(mngr, checkpoint.new(fresh, 0), step=30)
  assert int(restored.step) == 30


def test_restore_without_checkpoint_raises(tmp_path, run):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(checkpoint.manager(tmp_path), checkpoint.new(run.fresh, 0))
