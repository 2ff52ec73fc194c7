"""The main job, examples/main.py and examples/train.py: every method, metrics evaluated with the
masks each epoch trained with, summary and plots, exact resume, bad input, the configs; and what
it is built from (final masks, FLOPs, the summary table)."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optg_jax
from optg_jax import data
from optg_jax import masks as masks_lib
from optg_jax import models
from optg_jax import recipes
from optg_jax import report
from optg_jax import schedules
from optg_jax import training

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPARSITY = 0.9
SPE = 4  # 200 examples, batch 50
N = 266_200  # LeNet-300-100's kernel weights
KEPT = 26_620  # of them at 90 %, globally and per layer


def _load_job():
  spec = importlib.util.spec_from_file_location("optg_main_job", ROOT / "examples" / "main.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # puts examples/ on sys.path: train, configs
  return module


job = _load_job()
train = job.train
import configs  # pylint: disable=wrong-import-position,wrong-import-order  (examples/configs)


def _main(argv):
  return job.main([str(a) for a in argv], prog="train.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  data.data_source("mnist5k", "train", data_dir=path)
  return str(path)


def _tiny(data_dir, *flags, epochs=1):
  return ["--sparsity", str(SPARSITY), "--train-examples", "200", "--test-examples", "100",
          "--batch-size", "50", "--epochs", str(epochs), "--data-dir", data_dir, *flags]


def _run(argv):
  assert _main(argv) == 0


def _metrics(workdir):
  return report.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")


def _checkpoint(workdir, step=None):
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as mngr:
    step = mngr.latest_step() if step is None else step
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, state["state"]


_final_checkpoint = _checkpoint


def _test_accuracy(data_dir, params, masks):
  """Accuracy of LeNet-300-100 with ``params ⊙ masks`` on the 100 test digits, computed here."""
  batches = data.load("mnist5k", "test[:100]", batch_size=100, shuffle=False, augment=False,
                      num_epochs=1, drop_remainder=False, data_dir=data_dir)
  batch = next(iter(batches))
  logits = models.get_model("lenet300100").apply({"params": optg_jax.apply_masks(params, masks)},
                                                 batch["image"])
  return int(np.sum(np.argmax(np.asarray(logits), -1) == batch["label"])) / len(batch["label"])


def _removed(sparsity):
  """Weights of LeNet-300-100 a mask at ``sparsity`` (computed in float32, as the schedules do)
  removes: ``floor(p·N)``."""
  return math.floor(float(np.float32(sparsity)) * N)


def _params_and_masks(ckpt):
  """The params and the OptG masks (the chain's first state) of a restored checkpoint."""
  return ckpt["state"]["params"], ckpt["state"]["opt_state"][0]["masks"]


# gmp's reference window on a 1-epoch budget is [0, 1] (steps): refreshed at step 0 (sparsity 0)
# and at its end, step 1, off the every-epoch grid, where it reaches its target.
@pytest.mark.parametrize("method", [m for m in recipes.names()  # rounds: test_train_rounds.py
                                    if not recipes.get_recipe(m).builds_chain])
def test_each_method_trains_one_epoch(method, tmp_path, data_dir, capsys):
  _run(_tiny(data_dir, "--method", method, "--workdir", tmp_path, "--no-dense-baseline"))
  (record,) = _metrics(tmp_path)
  assert (record["epoch"], record["step"]) == (1, SPE)
  summary = json.loads((tmp_path / "summary.json").read_text())
  result = json.loads((tmp_path / "result.json").read_text())
  assert summary["sparse_accuracy"] == result["test_accuracy"]
  assert summary["report"]["sparsity"] == pytest.approx(result["sparsity"])
  kept = summary["report"]["kept"]
  if method == "dense":
    assert kept == N and summary["dense_accuracy"] == summary["sparse_accuracy"]
    assert summary["sparse_accuracy"] == record["test_accuracy"]  # no final mask to change
  elif method == "signed_supermask":  # no sparsity target: what the decay reached
    assert 0 < kept < N and 0 < result["inverted"] < result["weights_remaining"]
  else:
    assert kept == KEPT
  if method in ("random", "edge_popup"):  # uniform per layer: 10 % of each kernel
    assert [layer["kept"] for layer in summary["report"]["layers"]] == [23_520, 3_000, 100]
  assert [layer["name"] for layer in summary["report"]["layers"]] == [
      "fc1/kernel", "fc2/kernel", "classifier/kernel"]  # as the network runs
  assert _final_checkpoint(tmp_path)[0] == SPE
  if method in ("optg", "signed_supermask"):
    _check_the_compact_model(method, tmp_path, data_dir, capsys)


def _check_the_compact_model(method, tmp_path, data_dir, capsys):
  """The job ships a compact model that infer reproduces: result.json names model.ospk;
  examples/infer.py loads it and prints the summary's accuracy (dense load exactly; sparse
  inference within one test example of 100)."""
  result = json.loads((tmp_path / "result.json").read_text())
  compact = result["compact_model"]
  assert compact["bytes"] == (tmp_path / "model.ospk").stat().st_size
  if method == "optg":  # 90 % of the kernels pruned
    assert compact["bytes"] < 0.25 * compact["dense_bytes"]
  infer = importlib.import_module("infer")  # examples/ is on sys.path (the job put it there)
  capsys.readouterr()
  assert infer.main(["--workdir", str(tmp_path), "--data-dir", data_dir]) == 0
  out = capsys.readouterr().out
  assert f"test accuracy {100 * result['test_accuracy']:.2f}%" in out
  assert "compact file" in out and "dense checkpoint" in out
  sparse = infer.evaluate(tmp_path, sparse=True, data_dir=data_dir)
  assert abs(sparse["test_accuracy"] - result["test_accuracy"]) <= 0.01
  data = bytearray((tmp_path / "model.ospk").read_bytes())
  (tmp_path / "model.ospk").write_bytes(bytes(data[:-10]))
  assert infer.main(["--workdir", str(tmp_path), "--data-dir", data_dir]) == 2
  assert "checksum" in capsys.readouterr().err
@pytest.mark.parametrize("method,constant", [("signed_supermask", 3.0),
                                             ("edge_popup", 2.0)])
def test_supermask_methods_keep_their_constant_weights_frozen_in_the_job(method, constant,
                                                                        tmp_path, data_dir):
  _run(_tiny(data_dir, "--method", method, "--workdir", tmp_path, "--no-dense-baseline",
             epochs=2))
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_options"][method]["use_bias"] is False
  for step in (SPE, 2 * SPE):  # ±√(constant/fan_in) after every epoch, bit for bit
    params = _checkpoint(tmp_path, step)[1]["state"]["params"]
    assert set(params["fc1"]) == {"kernel"}  # the papers' bias-free variant
    for name, fan_in in (("fc1", 784), ("fc2", 300), ("classifier", 100)):
      np.testing.assert_array_equal(np.abs(params[name]["kernel"]),
                                    np.float32(math.sqrt(constant / fan_in)))


def test_metrics_jsonl_has_one_line_per_epoch(tmp_path, data_dir):
  _run(_tiny(data_dir, "--method", "optg", "--workdir", tmp_path, "--dense-baseline", epochs=2))
  records, dense = _metrics(tmp_path), _metrics(tmp_path / "dense")
  assert [set(r) for r in records] == [{"epoch", "step", "loss", "test_accuracy", "sparsity",
                                        "lr", "seconds"}] * 2
  assert [(r["epoch"], r["step"]) for r in records] == [(1, SPE), (2, 2 * SPE)]
  lr = recipes.warmup_cosine_per_epoch(0.1, SPE, 2)
  assert [r["lr"] for r in records] == pytest.approx([float(lr(0)), float(lr(SPE))])
  # Epoch 1 of OptG trains the dense network (its all-zero scores keep every weight) with the
  # dense run's init, data and chain: the same loss and accuracy, bit for bit.
  assert (records[0]["loss"], records[0]["test_accuracy"], records[0]["sparsity"]) == (
      dense[0]["loss"], dense[0]["test_accuracy"], 0.0)
  # Epoch 2 trains with the mask refreshed at its start, at the target: the budget ramp's window
  # at E = 2 is [0.2, 1], so that the last epoch trains at P (exact count).
  assert float(schedules.sigmoid_window_fraction(SPE, 0.2, 1.0)(SPE)) == 1.0
  assert round(records[1]["sparsity"] * N) == N - KEPT
  assert records[1]["loss"] != dense[1]["loss"]
  assert 0 < records[0]["seconds"] < records[1]["seconds"]


def test_dense_baseline_summary_and_plots(tmp_path, data_dir, capsys):
  _run(_tiny(data_dir, "--method", "snip", "--workdir", tmp_path, "--dense-baseline"))
  out = capsys.readouterr().out
  summary = json.loads((tmp_path / "summary.json").read_text())
  dense = json.loads((tmp_path / "dense" / "result.json").read_text())
  assert summary["dense_accuracy"] == dense["test_accuracy"] == _metrics(
      tmp_path / "dense")[-1]["test_accuracy"]
  assert f"{100 * summary['dense_accuracy']:.2f}%" in out
  assert f"{100 * summary['sparse_accuracy']:.2f}%" in out
  assert "fc1/kernel" in out and "FLOPs" in out
  assert (tmp_path / "summary.txt").read_text().strip() in out
  for name in ("accuracy_sparsity.png", "layer_density.png"):
    png = (tmp_path / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = matplotlib.image.imread(tmp_path / name).shape
    assert height > 100 and width > 100 and channels in (3, 4)


def _same_outcome(a, b):
  step_a, ckpt_a = _final_checkpoint(a)
  step_b, ckpt_b = _final_checkpoint(b)
  assert step_a == step_b
  assert jax.tree_util.tree_structure(ckpt_a) == jax.tree_util.tree_structure(ckpt_b)
  for x, y in zip(jax.tree.leaves(ckpt_a), jax.tree.leaves(ckpt_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert strip(_metrics(a)) == strip(_metrics(b))
  assert (pathlib.Path(a) / "result.json").read_text() == (
      pathlib.Path(b) / "result.json").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(_tiny(data_dir, "--method", "optg", "--workdir", workdir, "--no-dense-baseline",
             epochs=3))
  return workdir


def test_resume_after_a_stop_ends_as_an_uninterrupted_run(tmp_path, data_dir, uninterrupted):
  _run(_tiny(data_dir, "--method", "optg", "--workdir", tmp_path, "--no-dense-baseline",
             "--stop-after", 1, epochs=3))
  assert len(_metrics(tmp_path)) == 1 and not (tmp_path / "summary.json").exists()
  _run(["--resume", "--workdir", tmp_path, "--data-dir", data_dir])  # settings from the workdir
  _same_outcome(tmp_path, uninterrupted)


def test_epochs_are_evaluated_with_the_masks_they_trained_with(uninterrupted, data_dir):
  """OptG as the job runs it (ramp 'auto': the budget ramp at E = 3, the target from epoch 1.8
  on), P = 0.9: epoch e trains with the mask of p_{e-1} = 0, P·f(1), P (the refresh in its last
  update installs the next epoch's mask, which its record must not show)."""
  records = _metrics(uninterrupted)
  fraction = schedules.sigmoid_window_fraction(SPE, 0.3, 1.8)(SPE)
  assert 0.3 < float(fraction) < 0.6
  removed = [0, N - int(optg_jax.select.keep_count(N, SPARSITY * fraction)), N - KEPT]
  assert [round(r["sparsity"] * N) for r in records] == removed
  # The checkpoint of epoch e holds the mask that epoch e + 1 trains with.
  steps = [SPE, 2 * SPE, 3 * SPE]
  ckpts = [_params_and_masks(_checkpoint(uninterrupted, step)[1]) for step in steps]
  for (_, masks), record in zip(ckpts[:2], records[1:]):
    assert round(record["sparsity"] * N) == N - int(optg_jax.sparsity_summary(masks).kept)
  # Epoch 3's accuracy: its final weights with the mask it trained with (epoch 2's checkpoint).
  params = ckpts[2][0]
  assert records[2]["test_accuracy"] == _test_accuracy(data_dir, params, ckpts[1][1])
  # The final model: the mask epoch 3 trained with, at the target (final='trained'), not the
  # top scores at the target, which no epoch trained with; it scores what epoch 3 scored.
  result = json.loads((pathlib.Path(uninterrupted) / "result.json").read_text())
  state = _checkpoint(uninterrupted)[1]["state"]
  reselected = masks_lib.global_masks(state["opt_state"][0]["scores"],
                                      masks_lib.prunable_tree(params), SPARSITY)
  trained = ckpts[1][1]
  assert int(optg_jax.sparsity_summary(trained).kept) == KEPT
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(trained),
                                                    jax.tree.leaves(reselected)))
  assert result["sparsity"] == pytest.approx(SPARSITY)
  assert result["test_accuracy"] == records[2]["test_accuracy"]
  assert result["last_epoch"] == {"test_accuracy": records[2]["test_accuracy"],
                                  "sparsity": records[2]["sparsity"]}


def test_resume_after_a_crash_mid_epoch(tmp_path, data_dir, uninterrupted, monkeypatch):
  run_epoch, calls = training.run_epoch, []

  def crash_in_second_epoch(step, state, batches, num_steps, on_step=None):
    calls.append(num_steps)
    if len(calls) == 2:
      run_epoch(step, state, batches, 2)  # half an epoch, then the machine goes away
      raise RuntimeError("preempted")
    return run_epoch(step, state, batches, num_steps, on_step)

  monkeypatch.setattr(training, "run_epoch", crash_in_second_epoch)
  with pytest.raises(RuntimeError, match="preempted"):
    _main(_tiny(data_dir, "--method", "optg", "--workdir", str(tmp_path), "--no-dense-baseline",
                epochs=3))
  monkeypatch.setattr(training, "run_epoch", run_epoch)
  assert _final_checkpoint(tmp_path)[0] == SPE
  _run(_tiny(data_dir, "--method", "optg", "--workdir", tmp_path, "--resume",
             "--no-dense-baseline", epochs=3))
  _same_outcome(tmp_path, uninterrupted)


BAD_INPUTS = {
    "unknown method": ["--method", "prune-it"],
    "unknown model": ["--model", "lenet5"],
    "unknown dataset": ["--dataset", "svhn"],
    "sparsity 1": ["--sparsity", "1.0"],
    "negative sparsity": ["--sparsity", "-0.1"],
    "sparsity not a number": ["--sparsity", "most"],
    "zero epochs": ["--epochs", "0"],
    "negative epochs": ["--epochs", "-2"],
    "zero batch size": ["--batch-size", "0"],
    "batch larger than the data": ["--train-examples", "20", "--batch-size", "50"],
    "negative weight decay": ["--weight-decay", "-1e-4"],
    "no workdir": None,
    "workdir is a file": "file",
    "resume without checkpoint": ["--resume"],
    "missing data dir": ["--data-dir", "/nonexistent/tfds"],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(case, tmp_path, data_dir, capsys):
  flags = BAD_INPUTS[case]
  workdir = tmp_path / "run"
  if flags == "file":
    workdir.write_text("not a directory")
    flags = []
  argv = ["--data-dir", data_dir, "--no-dense-baseline"] + (
      flags if flags is not None else [])
  if case != "no workdir":
    argv += ["--workdir", str(workdir)]
  assert _main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("train.py: error: "), err
  assert not (workdir / "checkpoints").exists()


def test_existing_run_needs_resume_and_the_same_settings(tmp_path, data_dir, capsys):
  _run(_tiny(data_dir, "--method", "magnitude", "--workdir", tmp_path, "--no-dense-baseline"))
  capsys.readouterr()
  assert _main(_tiny(data_dir, "--method", "magnitude", "--workdir", str(tmp_path))) == 2
  assert "already holds a run" in capsys.readouterr().err
  assert _main(["--resume", "--workdir", str(tmp_path), "--method", "gmp"]) == 2
  assert "--method gmp differs" in capsys.readouterr().err


@pytest.mark.parametrize("script,flags", [("train.py", ["--sparsity", "1.5"]),
                                          ("main.py", ["--resume"])])
def test_bad_input_exit_status_of_the_script(script, flags, tmp_path):
  env = dict(os.environ)
  package_root = pathlib.Path(optg_jax.__file__).parent.parent  # not resolved: keeps overlays
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / script), "--workdir", str(tmp_path / "w"),
       *flags], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{script}: error: ")
  assert "Traceback" not in result.stderr + result.stdout


# ------------------------------------------------------------------------------------------------
# The configs.


def test_every_model_has_a_config_with_its_reference_budget():
  for model in models.MODELS:
    cfg = configs.for_model(model)
    assert cfg.model == model
    assert cfg.dataset in data.KNOWN_DATASETS
    assert set(cfg.methods) == set(recipes.names())  # a preset for every registered recipe
  budgets = {m: (c.dataset, c.epochs, c.batch_size, c.lr, c.weight_decay, c.label_smoothing)
             for m in models.MODELS for c in [configs.for_model(m)]}
  assert budgets["lenet300100"] == ("mnist5k", 40, 100, 0.1, 5e-4, 0.0)
  assert budgets["resnet32"] == budgets["vgg19"] == ("cifar10", 160, 256, 0.1, 5e-4, 0.0)
  assert budgets["resnet50"] == ("imagenet2012", 100, 256, 0.1, 1e-4, 0.1)
  assert budgets["mobilenetv1"] == ("imagenet2012", 180, 256, 0.05, 4e-5, 0.1)
  with pytest.raises(ValueError, match="no config for model"):
    configs.for_model("lenet5")


def test_flags_override_the_config_file_and_method_presets_reach_the_chain(tmp_path, data_dir):
  config = tmp_path / "my_config.py"
  config.write_text(
      "from configs import lenet300100_mnist5k\n\n"
      "def get_config():\n"
      "  cfg = lenet300100_mnist5k.get_config()\n"
      "  return cfg.replace(method='magnitude', epochs=7, methods={\n"
      "      **cfg.methods, 'magnitude': {'distribution': 'uniform'}})\n")
  workdir = tmp_path / "run"
  _run(_tiny(data_dir, "--config", config, "--workdir", workdir, "--no-dense-baseline"))
  stored = json.loads((workdir / "config.json").read_text())
  assert (stored["method"], stored["epochs"], stored["batch_size"]) == ("magnitude", 1, 50)
  assert stored["methods"]["magnitude"] == {"distribution": "uniform"}
  layers = json.loads((workdir / "summary.json").read_text())["report"]["layers"]
  assert [layer["kept"] for layer in layers] == [23_520, 3_000, 100]  # uniform, not global


# ------------------------------------------------------------------------------------------------
# Final masks, FLOPs and the summary table.


def _tiny_params():
  """Two dense layers, 1,600 kernel weights (160 kept at 90 %), and their biases."""
  keys = jax.random.split(jax.random.key(0), 2)
  return {"fc1": {"kernel": jax.random.normal(keys[0], (30, 40)), "bias": jnp.zeros(40)},
          "fc2": {"kernel": jax.random.normal(keys[1], (40, 10)), "bias": jnp.zeros(10)}}


def _optg_state(params, schedule_sparsity):
  """An OptG state with random scores whose mask was refreshed at ``schedule_sparsity``."""
  tx = optg_jax.mask_optimizer(SPARSITY, 0.1, sparsity_schedule=schedules.constant(
      schedule_sparsity), refresh=schedules.every_n_steps(1))
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  _, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  return state


def test_optg_final_masks_are_the_top_scores_at_the_target():
  params = _tiny_params()
  state = _optg_state(params, 0.5)
  assert float(masks_lib.sparsity_summary(state.masks).sparsity) == pytest.approx(0.5)
  masks = optg_jax.final_masks(params, state, SPARSITY)
  assert int(masks_lib.sparsity_summary(masks).kept) == 160
  prunable = masks_lib.prunable_tree(params)
  expected = masks_lib.global_masks(state.scores, prunable, SPARSITY)
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  swapped = optg_jax.with_masks((state, optax.EmptyState()), masks)
  effective = optg_jax.effective_params(params, swapped)
  assert int(jnp.sum(effective["fc1"]["kernel"] != 0)) == int(jnp.sum(masks["fc1"]["kernel"]))
  assert swapped[0].scores is state.scores


def test_final_masks_of_other_methods_and_dense():
  params = _tiny_params()
  state = optg_jax.magnitude(0.8).init(params)
  assert optg_jax.final_masks(params, state) is state.masks
  assert optg_jax.final_masks(params, state, 0.8) is state.masks
  with pytest.raises(ValueError, match=f"sparsity={SPARSITY}"):
    optg_jax.final_masks(params, state, SPARSITY)
  dense = optg_jax.final_masks(params, optax.sgd(0.1).init(params))
  assert float(masks_lib.sparsity_summary(dense).sparsity) == 0.0
  assert dense["fc1"]["bias"].shape == ()
  with pytest.raises(ValueError, match="sparsity"):
    optg_jax.final_masks(params, _optg_state(params, 0.5), 1.0)
  with pytest.raises(ValueError, match="exactly one"):
    optg_jax.with_masks(optax.sgd(0.1).init(params), dense)


def _lenet():
  model = models.get_model("lenet300100")
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  return model, params


def test_layer_flops_of_dense_and_conv_layers():
  model, params = _lenet()
  flops = report.layer_flops(model, {"params": params}, jnp.zeros((1, 28, 28, 1)))
  assert flops == {"fc1/kernel": 2 * 784 * 300, "fc2/kernel": 2 * 300 * 100,
                   "classifier/kernel": 2 * 100 * 10}
  resnet = models.get_model("resnet20")
  sample = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: resnet.init(jax.random.key(0), jnp.zeros(sample.shape)))
  flops = report.layer_flops(resnet, variables, sample)
  kernels = [p for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if x.ndim >= 2]
  assert len(flops) == len(kernels) == 20
  assert flops["stage1_block1/conv1/kernel"] == 2 * 3 * 3 * 16 * 16 * 32 * 32
  assert sum(flops.values()) == pytest.approx(2 * 40.55e6, rel=1e-3)  # 40.55 M multiply-adds


def test_report_and_summary_table():
  model, params = _lenet()
  prunable = masks_lib.prunable_tree(params)
  scores = jax.tree.map(jnp.abs, params)
  masks = masks_lib.layerwise_masks(scores, prunable, SPARSITY)
  flops = report.layer_flops(model, {"params": params}, jnp.zeros((1, 28, 28, 1)))
  rep = report.build(masks, params, flops)
  assert (rep.params, rep.kept, rep.total_params) == (266_200, KEPT, 266_610)
  assert rep.kept_flops == pytest.approx(0.1 * rep.flops)
  fc1 = next(layer for layer in rep.layers if layer.name == "fc1/kernel")
  assert (fc1.shape, fc1.kept, fc1.density) == ((784, 300), 23_520, pytest.approx(0.1))
  table = report.summary_table(rep, method="gmp", sparse_accuracy=0.9, dense_accuracy=None)
  assert "n/a" in table and "90.00%" in table and "fc2/kernel" in table
  assert json.loads(json.dumps(report.to_json(rep)))["kept"] == KEPT


# ------------------------------------------------------------------------------------------------
# training.fit evaluates each epoch with the masks it trained with, too.


def test_fit_evaluates_each_epoch_with_its_own_masks():
  train_split, test_split = data.load_mnist_5k(seed=0)
  small = data.Split(train_split.images[::20], train_split.labels[::20])  # 200 digits, all classes
  test_small = data.Split(test_split.images[:200], test_split.labels[:200])
  model = models.get_model("lenet300100")

  def fit(method, on_epoch=None):
    tx = recipes.make_optimizer(method, SPARSITY, steps_per_epoch=SPE, epochs=3)
    return training.fit(model, tx, small, test_small, epochs=3, batch_size=50, on_epoch=on_epoch)

  next_masks = []  # on_epoch sees the state after the epoch's last update: the next epoch's mask
  optg = fit("optg", lambda epoch, state, *_: next_masks.append(
      jax.tree.map(np.asarray, optg_jax.get_masks(state.opt_state))))
  dense = fit("dense")
  trained = [0.0, SPARSITY / (1 + math.exp(0.5)), SPARSITY / (1 + math.exp(-0.5))]
  assert [round(s * N) for s in optg.sparsity] == [_removed(p) for p in trained]
  assert dense.sparsity == [0.0] * 3
  # Epoch 1 trained the dense network: the dense run's numbers, exactly.
  assert (optg.loss[0], optg.test_accuracy[0]) == (dense.loss[0], dense.test_accuracy[0])
  # Epoch 3's accuracy: the final weights with the mask installed at the end of epoch 2.
  logits = model.apply({"params": optg_jax.apply_masks(optg.state.params, next_masks[1])},
                       test_small.images)
  assert optg.test_accuracy[2] == int(np.sum(np.argmax(np.asarray(logits), -1)
                                             == test_small.labels)) / 200
