"""Multi-host: two processes on localhost (CPU devices, Gloo collectives) train OptG and end with
the masks and parameters of one process fed the same global batches."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import optg_jax
from optg_jax import multihost
from optg_jax import parallel

GLOBAL_BATCH = 16
STEPS = 6

# One program for every process: `python -c SCRIPT PROCESS_ID NUM_PROCESSES PORT OUT`. With two
# processes each runs 2 CPU devices and feeds its half of each global batch; with one process it
# runs on one device and feeds all of it.
SCRIPT = textwrap.dedent(f"""
    import json, sys
    import jax
    import numpy as np
    from optg_jax import multihost

    process_id, num_processes, port, out = sys.argv[1:]
    process_id, num_processes = int(process_id), int(num_processes)
    if num_processes > 1:
      multihost.initialize(f"localhost:{{port}}", num_processes, process_id, local_device_count=2,
                           initialization_timeout=60)
    import optax
    import optg_jax as og
    from optg_jax import models, parallel, schedules, training

    B, STEPS = {GLOBAL_BATCH}, {STEPS}
    model = models.get_model("lenet300100")
    tx = optax.chain(
        og.mask_optimizer(0.9, 0.05, sparsity_schedule=schedules.polynomial(0.9, 0, 4, 2),
                          refresh=schedules.every_n_steps(2)),
        optax.add_decayed_weights(5e-4),
        optax.sgd(0.05, momentum=0.9))
    data = np.random.default_rng(0)
    images = data.random((STEPS, B, 8, 8, 1), dtype=np.float32)  # LeNet-300-100 on 8x8 inputs
    labels = data.integers(0, 10, (STEPS, B)).astype(np.int32)
    # The same initial state in every process. NumPy draws it: model.init would compile a dozen
    # small programs, seconds on 2 shared CPU cores.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images[0, :1]))["params"]
    init = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (init.standard_normal(s.shape) * np.sqrt(2 / s.shape[0])
                                     if len(s.shape) == 2 else np.zeros(s.shape)
                                     ).astype(s.dtype), shapes)
    initial = training.TrainState(params, {{}}, tx.init(params), {{}})

    devices = None if num_processes > 1 else jax.devices()[:1]
    mesh = multihost.global_mesh(B, devices=devices)
    rows = multihost.local_rows(B, mesh)
    step = parallel.data_parallel(training.make_train_step(model, tx), mesh, donate_state=True)
    state = parallel.replicate(initial, mesh)
    losses, kept_per_step = [], []
    for i in range(STEPS):
      state, loss = step(state, *multihost.global_batch((images[i, rows], labels[i, rows]), mesh))
      losses.append(float(loss))
      kernel_masks = [m for m in jax.tree.leaves(og.get_masks(state.opt_state)) if np.ndim(m) == 2]
      kept_per_step.append(sum(int(np.sum(m)) for m in kernel_masks))  # biases: scalar True
    try:
      multihost.global_batch({{"image": images[0, :3]}}, mesh)
      batch_error = None
    except ValueError as e:
      batch_error = str(e)
    masks = jax.tree.map(np.asarray, og.get_masks(state.opt_state))
    flat = {{}}
    for name, tree in (("mask", masks), ("param", state.params)):
      for path, x in jax.tree_util.tree_leaves_with_path(tree):
        flat[name + jax.tree_util.keystr(path)] = np.asarray(x)
    np.savez(out + ".npz", **flat)
    json.dump({{
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": len(mesh.local_devices),
        "rows": [rows.start, rows.stop],
        "losses": losses,
        "kept_per_step": kept_per_step,
        "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)),
        "batch_error": batch_error,
    }}, open(out + ".json", "w"))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Starts the two processes of the distributed run and the one-process run together; returns
  ``[(report, arrays)]`` for process 0, process 1 and the one-process run."""
  tmp = tmp_path_factory.mktemp("multihost")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  package_root = pathlib.Path(optg_jax.__file__).parent.parent  # not resolved: keeps overlays
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
  port = str(_free_port())
  jobs = [(str(i), n, str(tmp / f"run{i}_{n}")) for i, n in ((0, "2"), (1, "2"), (0, "1"))]
  children = []
  try:
    for i, n, out in jobs:
      with open(out + ".log", "w") as log:
        children.append(subprocess.Popen([sys.executable, "-c", SCRIPT, i, n, port, out],
                                         env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 120  # a hang (a process waiting for its peer) fails the test
    for child in children:
      try:
        child.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pass
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
        child.wait()
  for child, (i, n, out) in zip(children, jobs):
    log = pathlib.Path(out + ".log").read_text()[-3000:]
    assert child.returncode == 0, f"process {i} of {n} ended with {child.returncode}:\n{log}"
  results = []
  for _, _, out in jobs:
    with open(out + ".json") as f, np.load(out + ".npz") as arrays:
      results.append((json.load(f), dict(arrays)))
  return results


@pytest.mark.slow  # starts three JAX processes
def test_two_processes_share_one_mesh_and_feed_half_each(runs):
  (p0, _), (p1, _), (one, _) = runs
  assert [p0["process_index"], p1["process_index"]] == [0, 1]
  assert p0["process_count"] == p1["process_count"] == 2
  assert p0["device_count"] == p1["device_count"] == 4
  assert p0["local_device_count"] == p1["local_device_count"] == 2
  assert p0["rows"] == [0, GLOBAL_BATCH // 2] and p1["rows"] == [GLOBAL_BATCH // 2, GLOBAL_BATCH]
  assert one["process_count"] == 1 and one["rows"] == [0, GLOBAL_BATCH]
  assert p0["replicated"] and p1["replicated"]


@pytest.mark.slow  # starts three JAX processes
def test_both_processes_end_with_identical_masks_and_params(runs):
  (p0, a0), (p1, a1) = runs[:2]
  assert a0.keys() == a1.keys()
  for name in a0:
    np.testing.assert_array_equal(a0[name], a1[name], err_msg=name)
  assert p0["losses"] == p1["losses"]


@pytest.mark.slow  # starts three JAX processes
def test_two_processes_give_the_masks_and_params_of_one(runs):
  (p0, two), (one_report, one) = runs[0], runs[2]
  assert two.keys() == one.keys()
  masks = [name for name in one if name.startswith("mask")]
  assert masks
  for name in one:
    if name.startswith("mask"):
      np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    else:
      np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(p0["losses"], one_report["losses"], rtol=1e-5)
  # The masks were refreshed on the way (every 2 steps, sparsity ramping up to 0.9 by step 4).
  kept = one_report["kept_per_step"]
  assert p0["kept_per_step"] == kept
  n = 64 * 300 + 300 * 100 + 100 * 10  # LeNet-300-100's kernels on 8x8 inputs
  assert kept[0] > kept[2] > kept[4] == kept[-1] == n - int(0.9 * n)


@pytest.mark.slow  # starts three JAX processes
def test_batch_that_does_not_split_over_the_local_devices_names_the_leaf(runs):
  error = runs[0][0]["batch_error"]
  assert "['image']" in error and "(3, 8, 8, 1)" in error and "2 devices" in error
  assert runs[2][0]["batch_error"] is None  # one device takes any number of rows


def test_one_process_global_batch_is_shard():
  mesh = multihost.global_mesh(devices=jax.devices()[:1])
  batch = {"image": np.arange(12.0).reshape(4, 3), "label": np.arange(4)}
  got, want = multihost.global_batch(batch, mesh), parallel.shard(batch, mesh)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert x.sharding == y.sharding
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert multihost.local_rows(4, mesh) == slice(0, 4)


def test_bad_arguments_fail_clearly():
  mesh = multihost.global_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"batch leaf \"\['label'\]\" of shape \(\) cannot be split"):
    multihost.global_batch({"image": np.zeros((2, 3)), "label": np.int32(1)}, mesh)
  with pytest.raises(ValueError, match="batch_size must be a positive multiple"):
    multihost.global_mesh(0)
  with pytest.raises(ValueError, match="batch_size must be a positive multiple"):
    multihost.local_rows(0, mesh)
  # Checked before anything starts: these never reach jax.distributed.
  with pytest.raises(ValueError, match="coordinator_address"):
    multihost.initialize("localhost", 2, 0)
  with pytest.raises(ValueError, match="num_processes"):
    multihost.initialize("localhost:1234", 0, 0)
  with pytest.raises(ValueError, match="process_id"):
    multihost.initialize("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="local_device_count"):
    multihost.initialize("localhost:1234", 2, 1, local_device_count=0)
