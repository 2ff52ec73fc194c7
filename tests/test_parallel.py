"""Data parallelism: 8 simulated CPU devices give the masks and parameters of one device."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import optg_jax
from optg_jax import models
from optg_jax import parallel
from optg_jax import recipes
from optg_jax import training

STEPS = 20
PMAP_METHODS = ("optg", "lottery_ticket")

# Runs in a fresh process: XLA_FLAGS must be set before jax is imported. Every method, 20 steps
# of LeNet-300-100 on 8x8 inputs (50,200 weights, cheap to compile; the sharded search of big
# pools is checked by tests/test_mask_refresh.py), 2 epochs of 5 steps: OptG refreshes, GMP
# prunes, IMP prunes and rewinds twice, CS ends a round, RST extrudes then finetunes; on 1
# device, then on 8 replicated and 8 fully sharded, and pmap for OptG and IMP.
EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    import optg_jax as og
    from optg_jax import models, parallel, recipes, training

    assert jax.device_count() == 8, jax.devices()
    OPTIONS = {"optg": {"ramp": "budget"},
               "continuous_sparsification": {"layers": "all", "num_rounds": 1},
               "rst": {"exclude": ("^classifier/",), "extrusion_epochs": 1}}
    model = models.get_model("lenet300100")
    rng = np.random.default_rng(0)
    images = rng.random((STEPS, 32, 8, 8, 1), dtype=np.float32)
    labels = rng.integers(0, 10, (STEPS, 32)).astype(np.int32)
    mesh = parallel.local_mesh(32)

    def leaves(tree):
      return [np.asarray(x) for x in jax.tree.leaves(tree)]

    def run(step, state):
      for x, y in zip(images, labels):
        state, _ = jax.block_until_ready(step(state, x, y))  # one multi-device program at a time
      return state

    def compare(one, other):
      masks1, masks = (leaves(og.get_masks(s.opt_state)) if training.has_method(s.opt_state)
                       else [] for s in (one, other))
      return {"masks_equal": len(masks) == len(masks1) and all(
                  np.array_equal(a, b) for a, b in zip(masks1, masks)),
              "params_max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(
                  leaves(one.params), leaves(other.params)))}

    results, states = {}, {}
    for method in recipes.names():
      tx = recipes.make_optimizer(method, 0.5, steps_per_epoch=5, epochs=2, learning_rate=0.05,
                                  **OPTIONS.get(method, {}))
      initial = training.init(model, tx, images[0, :1], seed=0,
                              init_params=lambda p: recipes.init_params(method, p, 0))
      step = training.make_train_step(model, tx)
      one = run(jax.jit(step), initial)
      replicated = run(parallel.data_parallel(step, mesh, donate_state=True),
                       parallel.replicate(initial, mesh))
      sharded = run(parallel.fully_sharded(step, mesh, initial, donate_state=True),
                    parallel.shard_state(initial, mesh))
      report = {"replicated": compare(one, replicated), "sharded": compare(one, sharded),
                "kept": int(og.sparsity_summary(og.get_masks(one.opt_state)).kept)
                        if training.has_method(one.opt_state) else None,
                "fc1_shard": [list(x.addressable_shards[0].data.shape) for x in (
                    sharded.params["fc1"]["kernel"],
                    og.get_masks(sharded.opt_state)["fc1"]["kernel"]
                    if training.has_method(sharded.opt_state) else sharded.params["fc1"]["kernel"])]}
      if method in PMAP_METHODS:
        pmapped = parallel.pmapped(
            training.make_train_step(model, tx, axis_name=parallel.DATA_AXIS), donate_state=True)
        report["pmap"] = compare(one, parallel.unreplicate(
            run(pmapped, parallel.replicate_for_pmap(initial))))
      results[method] = report
      states[method] = (one, replicated)

    one, eight = states["optg"]
    evaluate = parallel.data_parallel(training.make_eval_step(model), mesh)
    batches = [{"image": images[0, :16], "label": labels[0, :16]},
               {"image": images[0, 16:21], "label": labels[0, 16:21]}]  # short: padded
    accuracy = [training.evaluate(evaluate, s, batches, 16) for s in (one, eight)]

    def shards_agree(x):
      return all(np.array_equal(s.data, x.addressable_shards[0].data) for s in x.addressable_shards)

    try:
      parallel.shard({"image": images[0, :7]}, parallel.local_mesh())
      shard_error = None
    except ValueError as e:
      shard_error = str(e)
    w_eff = og.effective_params(one.params, one.opt_state)
    predicted = np.argmax(np.asarray(model.apply({"params": w_eff}, images[0, :21])), -1)
    print(json.dumps({
        "methods": results,
        "correct_direct": int(np.sum(predicted == labels[0, :21])),
        "mesh_sizes": [parallel.local_mesh(b).devices.size for b in (32, 100, 7, 9, None)],
        "replicated": all(x.sharding.is_fully_replicated and len(x.addressable_shards) == 8
                          for x in jax.tree.leaves(eight)),
        "shards_agree": all(shards_agree(x) for x in jax.tree.leaves(eight)),
        "accuracy": accuracy,
        "shard_error": shard_error,
    }))
""").replace("STEPS", str(STEPS)).replace("PMAP_METHODS", repr(PMAP_METHODS))


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  # A generous collective timeout (40 s by default): on a loaded 2-core machine one of the 8
  # device threads can lag far behind the others at an all-reduce.
  flags = os.environ.get("XLA_FLAGS", "") + (
      " --xla_force_host_platform_device_count=8"
      " --xla_cpu_collective_call_terminate_timeout_seconds=600")
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  package_root = pathlib.Path(optg_jax.__file__).parent.parent  # not resolved: keeps overlays
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root),
                                                    env.get("PYTHONPATH")]))
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                          text=True, timeout=900, cwd=tmp_path_factory.mktemp("parallel"))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["replicated", "sharded", "pmap"])
@pytest.mark.parametrize("method", recipes.names())
def test_eight_devices_give_the_masks_and_params_of_one(eight_devices, method, mode):
  """After 20 steps: the masks of one device exactly, the params within 1e-5 (the gradient's
  summation order differs); ``pmap`` for OptG and IMP."""
  report = eight_devices["methods"][method]
  if mode == "pmap" and mode not in report:
    assert method not in PMAP_METHODS
    return
  assert report[mode]["masks_equal"]
  assert report[mode]["params_max_diff"] <= 1e-5


def test_every_method_prunes_within_the_twenty_steps(eight_devices):
  """The equalities above compare pruned masks: every method but dense keeps fewer than all."""
  for method, report in eight_devices["methods"].items():
    assert report["kept"] is None if method == "dense" else 0 < report["kept"] < 50_200, method


def test_sharded_mode_splits_params_and_masks_along_the_largest_axis(eight_devices):
  for report in eight_devices["methods"].values():  # 64 / 8 rows of fc1's (64, 300)
    assert report["fc1_shard"] == [[8, 300], [8, 300]]


def test_fsdp_shardings_pick_the_largest_divisible_axis():
  mesh = parallel.local_mesh(devices=jax.devices()[:1])
  tree = {"conv": np.zeros((3, 3, 16, 64)), "odd": np.zeros((7, 5)), "scalar": np.float32(1)}
  specs = jax.tree.map(lambda s: tuple(s.spec), parallel.fsdp_shardings(tree, mesh))
  assert specs == {"conv": (None, None, None, "data"), "odd": ("data", None), "scalar": ()}
  assert parallel._largest_divisible_axis((3, 3, 16, 64), 8) == 3
  assert parallel._largest_divisible_axis((64, 64), 8) == 0
  assert parallel._largest_divisible_axis((7, 5), 8) is None


def test_pmapped_rejects_a_batch_it_cannot_split():
  step = parallel.pmapped(lambda state, x: (state, x.sum()))
  with pytest.raises(ValueError, match=r"batch leaf '\[0\]' of shape \(\) cannot be split"):
    step(parallel.replicate_for_pmap(np.zeros(())), np.zeros(()))


def test_state_is_replicated_and_identical_on_every_device(eight_devices):
  assert eight_devices["replicated"]
  assert eight_devices["shards_agree"]


def test_evaluation_pads_short_batches_and_agrees(eight_devices):
  """21 examples in batches of 16 and 5 (padded to 16 with label -1): the accuracy is the count
  of right answers of the masked model, computed directly, over 21, on 1 and on 8 devices."""
  acc1, acc8 = eight_devices["accuracy"]
  assert acc1 == acc8 == eight_devices["correct_direct"] / 21
  assert eight_devices["correct_direct"] > 0  # else a wrong denominator would go unseen


def test_mesh_takes_the_most_devices_that_divide_the_batch(eight_devices):
  assert eight_devices["mesh_sizes"] == [8, 5, 7, 3, 8]
  assert "cannot be split over 8 devices" in eight_devices["shard_error"]


def test_one_device_mesh_matches_plain_jit_bitwise():
  model = models.get_model("lenet300100")
  tx = optax.chain(optg_jax.mask_optimizer(0.5, 0.1, steps_per_epoch=1, total_epochs=2),
                   optax.sgd(0.1, momentum=0.9))
  rng = np.random.default_rng(1)
  images = rng.random((3, 8, 8, 8, 1), dtype=np.float32)  # 50,200 weights: quick to compile
  labels = rng.integers(0, 10, (3, 8)).astype(np.int32)
  initial = training.init(model, tx, images[0, :1], seed=0)
  mesh = parallel.local_mesh(devices=jax.devices()[:1])
  sharded = parallel.data_parallel(training.make_train_step(model, tx), mesh, donate_state=True)
  plain = jax.jit(training.make_train_step(model, tx))
  a, b = parallel.replicate(initial, mesh), initial
  for x, y in zip(images, labels):
    a, _ = sharded(a, x, y)
    b, _ = plain(b, x, y)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_evaluate_counts_only_real_examples():
  model = models.get_model("lenet300100")
  params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
  state = training.TrainState(params, {}, optax.identity().init(params))
  rng = np.random.default_rng(2)
  images = rng.random((13, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 10, 13).astype(np.int32)
  predicted = np.argmax(model.apply({"params": params}, images), -1)
  labels[:6] = predicted[:6]  # at least 6 of 13 right
  evaluate = jax.jit(training.make_eval_step(model))
  batches = [{"image": images[i:i + 5], "label": labels[i:i + 5]} for i in range(0, 13, 5)]
  assert training.evaluate(evaluate, state, batches, 5) == pytest.approx(
      np.mean(predicted == labels))
  with pytest.raises(ValueError, match="at least one example"):
    training.evaluate(evaluate, state, [], 5)


def test_local_mesh_rejects_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    parallel.local_mesh(0)
  with pytest.raises(ValueError, match="devices"):
    parallel.local_mesh(devices=[])
