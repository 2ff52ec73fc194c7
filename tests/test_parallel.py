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
from optg_jax.methods import lottery as og_lottery
from optg_jax import models
from optg_jax import parallel
from optg_jax import training

# Runs in a fresh process: XLA_FLAGS must be set before jax is imported.
EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    import optax
    import optg_jax as og
    from optg_jax import models, parallel, schedules, training

    assert jax.device_count() == 8, jax.devices()
    model = models.get_model("lenet300100")
    tx = optax.chain(
        og.mask_optimizer(0.9, 0.05, sparsity_schedule=schedules.polynomial(0.9, 0, 6, 2),
                          refresh=schedules.every_n_steps(2)),
        optax.add_decayed_weights(5e-4),
        optax.sgd(0.05, momentum=0.9))
    rng = np.random.default_rng(0)
    images = rng.random((8, 32, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, (8, 32)).astype(np.int32)
    initial = training.init(model, tx, images[0, :1], seed=0)

    def run(mesh):
      step = parallel.data_parallel(training.make_train_step(model, tx), mesh, donate_state=True)
      state = parallel.replicate(initial, mesh)
      for i in range(len(images)):
        state, loss = step(state, images[i], labels[i])
      evaluate = parallel.data_parallel(training.make_eval_step(model), mesh)
      batches = [{"image": images[0, :16], "label": labels[0, :16]},
                 {"image": images[0, 16:21], "label": labels[0, 16:21]}]  # short: padded
      return state, training.evaluate(evaluate, state, batches, 16)

    one, acc1 = run(parallel.local_mesh(devices=jax.devices()[:1]))
    eight, acc8 = run(parallel.local_mesh(32))
    masks1, masks8 = og.get_masks(one.opt_state), og.get_masks(eight.opt_state)
    # A method with rounds: IMP, 2 levels of 3 steps rewound to step 1 (7 steps of the 8).
    tx = og.lottery_ticket(2, 3, optax.sgd(0.05, momentum=0.9), rewind_step=1)
    initial = training.init(model, tx, images[0, :1], seed=0)
    imp1, _ = run(parallel.local_mesh(devices=jax.devices()[:1]))
    imp8, _ = run(parallel.local_mesh(32))
    imp_masks1, imp_masks8 = og.get_masks(imp1.opt_state), og.get_masks(imp8.opt_state)

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
        "correct_direct": int(np.sum(predicted == labels[0, :21])),
        "mesh_sizes": [parallel.local_mesh(b).devices.size for b in (32, 100, 7, 9, None)],
        "masks_equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks1),
                                                                jax.tree.leaves(masks8))),
        "sparsity": float(og.sparsity_summary(masks8).sparsity),
        "imp_masks_equal": all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(imp_masks1), jax.tree.leaves(imp_masks8))),
        "imp_kept": int(og.sparsity_summary(imp_masks8).kept),
        "imp_params_allclose": all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(
            jax.tree.leaves(imp1.params), jax.tree.leaves(imp8.params))),
        "params_max_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                               for a, b in zip(jax.tree.leaves(one.params),
                                               jax.tree.leaves(eight.params))),
        "params_allclose": all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                               for a, b in zip(jax.tree.leaves(one.params),
                                               jax.tree.leaves(eight.params))),
        "replicated": all(x.sharding.is_fully_replicated and len(x.addressable_shards) == 8
                          for x in jax.tree.leaves(eight)),
        "shards_agree": all(shards_agree(x) for x in jax.tree.leaves(eight)),
        "accuracy": [acc1, acc8],
        "shard_error": shard_error,
    }))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  package_root = pathlib.Path(optg_jax.__file__).parent.parent  # not resolved: keeps overlays
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root),
                                                    env.get("PYTHONPATH")]))
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path_factory.mktemp("parallel"))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_masks_and_params_of_one(eight_devices):
  assert eight_devices["masks_equal"]
  assert eight_devices["sparsity"] == pytest.approx(0.9, abs=1e-6)
  assert eight_devices["params_allclose"], eight_devices["params_max_diff"]


def test_eight_devices_give_the_masks_of_one_for_a_method_with_rounds(eight_devices):
  """Lottery tickets (two prunings and rewinds in the 8 steps) on 1 and on 8 devices."""
  assert eight_devices["imp_masks_equal"]
  assert eight_devices["imp_kept"] == og_lottery.level_keep_counts(266_200, 2)[-1]
  assert eight_devices["imp_params_allclose"]


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
  images = rng.random((3, 8, 28, 28, 1), dtype=np.float32)
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
