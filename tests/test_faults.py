"""Bad numbers stop the main job clearly, or are skipped on request, and metrics.jsonl stays
strict JSON; a layer pruned to 100 % is flagged (issue 14, items 2 and 3)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import training
from test_train import ROOT, SPE, _final_checkpoint, _main, _same_outcome, _tiny
from test_train import data_dir, uninterrupted  # noqa: F401  (the fixtures)

POISONED_EPOCH, POISONED_INDEX = 2, 1  # the second batch of epoch 2: step SPE + 2


def _poison(monkeypatch):
  """Epoch 2's second batch gets NaN images (a corrupt record, as a user would meet one)."""
  run_epoch, calls = training.run_epoch, []

  def run(step, state, batches, num_steps, on_step=None):
    calls.append(num_steps)

    def feed():
      for i, batch in enumerate(batches):
        if len(calls) == POISONED_EPOCH and i == POISONED_INDEX:
          batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        yield batch

    return run_epoch(step, state, feed(), num_steps, on_step)

  monkeypatch.setattr(training, "run_epoch", run)


def _strict_records(workdir):
  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line, parse_constant=refuse) for line in lines]


def test_a_nan_batch_stops_the_run_naming_the_step(tmp_path, data_dir, monkeypatch, capsys):
  _poison(monkeypatch)
  status = _main(_tiny(data_dir, "--method", "optg", "--workdir", tmp_path,
                       "--no-dense-baseline", epochs=3))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 1 and len(err) == 1
  step = (POISONED_EPOCH - 1) * SPE + POISONED_INDEX + 1
  assert f"non-finite loss at step {step} (epoch {POISONED_EPOCH})" in err[0]
  assert "first non-finite leaf: " in err[0] and "--skip-nonfinite" in err[0]
  records = _strict_records(tmp_path)
  assert [r["epoch"] for r in records] == [1, 2] and records[1]["loss"] is None
  assert math.isfinite(records[0]["loss"]) and records[1]["nonfinite_steps"] >= 1
  assert _final_checkpoint(tmp_path)[0] == SPE  # the last good epoch's checkpoint is kept
  assert not (tmp_path / "summary.json").exists()


def test_skip_nonfinite_survives_a_nan_batch_and_counts_it(tmp_path, data_dir, monkeypatch):
  _poison(monkeypatch)
  assert _main(_tiny(data_dir, "--method", "optg", "--workdir", tmp_path,
                     "--no-dense-baseline", "--skip-nonfinite", epochs=3)) == 0
  records = _strict_records(tmp_path)
  assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 0]
  assert all(math.isfinite(r["loss"]) for r in records)
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["skipped_steps"] == 1 and result["test_accuracy"] > 0.1
  assert "1 step(s) with a non-finite loss skipped" in (tmp_path / "summary.txt").read_text()


class _WithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(10)(nn.relu(x))


@pytest.mark.parametrize("jit", [True, False])
def test_a_skipped_step_leaves_the_whole_state_untouched(jit):
  model = _WithBatchNorm()
  tx = optax.apply_if_finite(optax.chain(og.magnitude(0.5), optax.sgd(0.1, momentum=0.9)), 5)
  rng = np.random.default_rng(0)
  images, labels = rng.random((3, 8, 4, 4, 1), np.float32), rng.integers(0, 10, (3, 8))
  images[1, 3] = np.nan
  step = training.make_train_step(model, tx, skip_nonfinite=True)
  step = jax.jit(step) if jit else step
  state = training.init(model, tx, images[0, :1], seed=0)
  state, _ = step(state, images[0], labels[0])
  before = state
  state, loss = step(state, images[1], labels[1])
  assert not np.isfinite(float(loss))
  for name in ("params", "batch_stats", "rewind_stats"):
    for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(state, name))):
      np.testing.assert_array_equal(a, b)
  inner_before, inner_after = before.opt_state.inner_state, state.opt_state.inner_state
  for a, b in zip(jax.tree.leaves(inner_before), jax.tree.leaves(inner_after)):
    np.testing.assert_array_equal(a, b)
  assert int(state.opt_state.total_notfinite) == 1
  state, loss = step(state, images[2], labels[2])  # and training goes on
  assert np.isfinite(float(loss)) and bool(training.all_finite(state.params))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.batch_stats),
                                                      jax.tree.leaves(state.batch_stats)))


def test_run_epoch_counts_nonfinite_steps_on_the_device():
  losses = iter([1.0, np.nan, 3.0, np.inf])
  step = lambda state, images, labels: (state, jnp.float32(next(losses)))
  batches = ({"image": None, "label": None} for _ in range(4))
  epoch = training.run_epoch(step, training.TrainState({}, {}, optax.identity().init({})),
                             batches, 4)
  assert int(epoch.nonfinite) == 2 and int(epoch.first_nonfinite) == 1
  assert float(epoch.loss) == 2.0  # the mean of the finite losses


def test_first_nonfinite_leaf_and_collapsed_layers():
  tree = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"bias": jnp.array([0.0, jnp.inf]),
                                                  "kernel": jnp.array([[jnp.nan]])}}
  assert training.first_nonfinite_leaf(tree) == "b/bias"
  assert training.first_nonfinite_leaf({"a": jnp.ones(3)}) is None
  masks = {"fc1": {"kernel": jnp.ones((3, 2), bool), "bias": jnp.array(True)},
           "fc2": {"kernel": jnp.zeros((2, 2), bool), "bias": jnp.array(True)}}
  assert training.collapsed_layers(masks) == ["fc2/kernel"]
  assert training.collapsed_layers(None) == []


def test_metrics_lines_are_strict_json():
  from test_train import train
  line = train.json_line({"loss": float("nan"), "acc": 0.5, "x": float("inf"), "n": 3})
  assert json.loads(line) == {"loss": None, "acc": 0.5, "x": None, "n": 3}


def _corrupt(step_dir, how):
  files = sorted((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
  data = files[-1]  # the largest array data file
  size = data.stat().st_size
  if how == "truncate":
    with open(data, "r+b") as f:
      f.truncate(size // 2)
  else:
    with open(data, "r+b") as f:
      f.seek(size // 2)
      f.write(b"\x00corrupt\xff" * 4)


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(how, tmp_path, data_dir,
                                                                 uninterrupted, capsys):
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  newest = 3 * SPE
  _corrupt(tmp_path / "checkpoints" / str(newest), how)
  assert _main(["--resume", "--workdir", tmp_path, "--data-dir", data_dir]) == 0
  out = capsys.readouterr().out
  assert f"checkpoint {newest} cannot be restored" in out and "trying the one before" in out
  assert (tmp_path / "checkpoints" / f"corrupt-{newest}").is_dir()
  _same_outcome(tmp_path, uninterrupted)  # epoch 3 trained again from epoch 2, bitwise


def test_checksum_sees_a_changed_bit():
  from optg_jax import checkpoint
  tree = {"w": jnp.arange(12.0).reshape(3, 4), "m": jnp.ones(5, bool), "k": jnp.arange(3)}
  flipped = {**tree, "w": tree["w"].at[2, 1].set(np.nextafter(np.float32(9.0), 10))}
  swapped = {**tree, "w": tree["w"][::-1]}
  sums = {checkpoint.checksum(t) for t in (tree, flipped, swapped)}
  assert len(sums) == 3 and checkpoint.checksum(tree) == checkpoint.checksum(dict(tree))


# A child job that SIGKILLs itself in the middle of its second checkpoint save (epoch 2's, step
# 2 * SPE), in orbax's own save path: "arrays" after the train state's arrays are written into
# the step's temporary directory, before they are merged and anything is committed; "commit"
# once every item is written and the commit-success file too, before the rename that commits.
KILLED_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {examples!r})
    import main
    from orbax.checkpoint._src.path import async_path
    from orbax.checkpoint._src.serialization import ocdbt_utils
    where, merges, renames = {where!r}, [], []
    merge, rename = ocdbt_utils.merge_ocdbt_per_process_files, async_path.rename

    async def merge_or_die(directory, *args, **kwargs):
      merges.append(directory)
      if where == "arrays" and len(merges) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
      return await merge(directory, *args, **kwargs)

    async def rename_or_die(src, dst):
      if dst.parent.name == "checkpoints":  # a step directory's commit, not an item's
        renames.append(dst)
        if where == "commit" and len(renames) == 2:
          os.kill(os.getpid(), signal.SIGKILL)
      return await rename(src, dst)

    ocdbt_utils.merge_ocdbt_per_process_files = merge_or_die
    async_path.rename = rename_or_die
    sys.exit(main.main({argv!r}, prog="train.py"))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["arrays", "commit"])
def test_sigkill_during_a_save_then_resume_is_bitwise(where, tmp_path, data_dir, uninterrupted,
                                                      capsys):
  argv = [str(a) for a in _tiny(data_dir, "--method", "optg", "--workdir", tmp_path,
                                "--no-dense-baseline", epochs=3)]
  code = KILLED_IN_SAVE.format(examples=str(ROOT / "examples"), where=where, argv=argv)
  child = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=dict(os.environ), timeout=300)
  assert child.returncode == -signal.SIGKILL
  ckpts = tmp_path / "checkpoints"
  partial = ckpts / f"{2 * SPE}.orbax-checkpoint-tmp"
  assert {p.name for p in ckpts.iterdir()} == {str(SPE), partial.name}
  assert any(partial.rglob("d/*"))  # array data written ...
  assert (partial / "state").is_dir() == (where == "commit")  # ... and never committed
  assert _final_checkpoint(tmp_path)[0] == SPE

  assert _main(["--resume", "--workdir", tmp_path, "--data-dir", data_dir]) == 0
  out = capsys.readouterr().out
  assert f"checkpoint {2 * SPE} was cut off mid-save and never committed; removed {partial}" in out
  assert {p.name for p in ckpts.iterdir()} == {str(n * SPE) for n in (1, 2, 3)}  # all 3 kept
  _same_outcome(tmp_path, uninterrupted)  # epochs 2 and 3 trained again from epoch 1, bitwise


@pytest.mark.parametrize("method", ["signed_supermask", "edge_popup"])
def test_a_nan_batch_stops_a_frozen_weight_method_before_its_scores_are_saved(
    method, tmp_path, data_dir, monkeypatch, capsys):
  """A frozen-weight method's weights never change, so a NaN batch turns only its scores (in
  the optimizer state) NaN: the run must stop on the loss alone, not on non-finite params. It
  stops with status 1 naming the step and no non-finite params leaf, keeps epoch 1's finite
  checkpoint, and ships no final model (issue 20: a job that tolerated the NaN loss trained on
  and saved NaN scores)."""
  _poison(monkeypatch)
  status = _main(_tiny(data_dir, "--method", method, "--workdir", tmp_path,
                       "--no-dense-baseline", epochs=POISONED_EPOCH))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 1 and len(err) == 1, err
  step = (POISONED_EPOCH - 1) * SPE + POISONED_INDEX + 1
  assert f"non-finite loss at step {step} (epoch {POISONED_EPOCH})" in err[0]
  assert "first non-finite leaf: none in the params" in err[0]  # the weights stayed finite
  records = _strict_records(tmp_path)
  assert [r["epoch"] for r in records] == [1, 2] and records[1]["loss"] is None
  step, ckpt = _final_checkpoint(tmp_path)
  assert step == SPE  # epoch 2's NaN scores were never checkpointed
  floats = [np.asarray(x) for x in jax.tree.leaves(ckpt["state"]["opt_state"])
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert floats and all(np.all(np.isfinite(x)) for x in floats)
  for shipped in ("summary.json", "result.json", "model.ospk"):
    assert not (tmp_path / shipped).exists(), shipped
