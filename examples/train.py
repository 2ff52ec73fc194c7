"""The main job as a library: ``train_and_evaluate(config, workdir)`` trains one config.

  python examples/train.py --method optg --sparsity 0.98 --model lenet300100 --dataset mnist5k \\
      --workdir /tmp/optg_lenet

(run as a script, this file is ``examples/main.py``, the job's command line). The config
(``examples/configs/``) names the model, data set, method and budget; the method's chain is its
reference recipe (``optg_jax.recipes.make_optimizer``) with the method's preset options. The one
train step is jitted and runs data parallel over all local devices. After each epoch the run
evaluates on the test split with the masks the epoch was trained with, saves an orbax checkpoint
into ``WORKDIR/checkpoints`` and appends a line to ``WORKDIR/metrics.jsonl``; a run whose workdir
holds a checkpoint continues from it and ends exactly as an uninterrupted run does. With a dense
baseline, the dense model trains with the same budget into ``WORKDIR/dense``. The job ends with a
dense vs sparse summary (accuracy, parameters and FLOPs per layer) in ``summary.txt`` /
``summary.json``, and PNG plots in the workdir. The final model is ``og.final_params`` (what
``model.ospk`` ships): for OptG the mask its last epoch trained with once at the target; the
summary reports the last epoch's accuracy beside it whenever the two differ.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import sys
import time
from typing import Any, NamedTuple

if __name__ == "__main__":  # the command line is examples/main.py's (same flags)
  import main  # pylint: disable=import-self
  sys.exit(main.main(prog="train.py"))

# pylint: disable=wrong-import-position
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optg_jax as og
from optg_jax import checkpoint  # needs the 'train' extra; says so in one line
from optg_jax import data
from optg_jax import models
from optg_jax import parallel
from optg_jax import recipes
from optg_jax import report
from optg_jax import training

from tqdm import tqdm  # pylint: disable=wrong-import-order

from configs import default  # pylint: disable=wrong-import-order

Config = default.Config
NUM_CLASSES = {"mnist5k": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
TEST_SPLIT = {"imagenet2012": "validation"}
IN_MEMORY = ("mnist5k", "mnist", "cifar10", "cifar100")  # small enough to decode once


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit status 2."""


class NonFiniteError(Exception):
  """The loss went NaN or infinite: reported as one line on stderr, exit status 1; the
  checkpoint of the last good epoch is kept."""


class Outcome(NamedTuple):
  """A finished run: the trained ``state``, the final model's ``masks`` and test ``accuracy``
  (``training.final_model``: what the compact file ships), the per-epoch ``records`` of
  ``metrics.jsonl``, and the ``model`` with an input ``sample``."""
  state: training.TrainState
  masks: Any
  accuracy: float
  records: list[dict[str, Any]]
  model: Any
  sample: np.ndarray


class Setup(NamedTuple):
  """The pieces of a run built from its config, before any training."""
  model: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int
  lr: optax.Schedule
  train_it: data.BatchIterator
  test_it: data.BatchIterator
  sample: np.ndarray
  epochs: int  # of the whole run (rounds included)


def _split(name: str, n: int | None) -> str:
  return name if n is None else f"{name}[:{n}]"


@contextlib.contextmanager
def as_usage_errors():
  """Turns the library's ``ValueError``/``FileNotFoundError`` into a one-line ``UsageError`` and
  hides absl warnings meanwhile (tfds probing a data dir that turns out not to be prepared)."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(" ".join(str(e).split())) from None
  finally:
    absl_logging.set_verbosity(level)


def build(cfg: Config, data_dir: str | None) -> Setup:
  """Model, optimizer and data iterators of ``cfg``; bad input raises ``UsageError``."""
  train_split = _split("train", cfg.train_examples)
  test_split = _split(TEST_SPLIT.get(cfg.dataset, "test"), cfg.test_examples)
  cache = cfg.dataset in IN_MEMORY
  with as_usage_errors():
    num_train = len(data.data_source(cfg.dataset, train_split, data_dir=data_dir))
    spe = num_train // cfg.batch_size
    if spe < 1:
      raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {num_train} training examples")
    model = models.get_model(cfg.model, NUM_CLASSES[cfg.dataset],
                             **cfg.model_options.get(cfg.method, {}))
    tx = recipes.make_optimizer(
        cfg.method, cfg.sparsity, steps_per_epoch=spe, epochs=cfg.epochs, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, momentum=cfg.momentum, warmup_epochs=cfg.warmup_epochs,
        seed=cfg.seed, **cfg.method_options)
    if cfg.skip_nonfinite:  # a whole epoch of bad steps goes through, and stops the run
      tx = optax.apply_if_finite(tx, max_consecutive_errors=spe)
    epochs = total_epochs(cfg)
    train_it = data.load(cfg.dataset, train_split, batch_size=cfg.batch_size, seed=cfg.seed,
                         data_dir=data_dir, cache=cache)
    test_it = data.load(cfg.dataset, test_split, batch_size=cfg.batch_size, shuffle=False,
                        augment=False, num_epochs=1, drop_remainder=False, data_dir=data_dir,
                        cache=cache)
  lr = recipes.warmup_cosine_per_epoch(cfg.lr, spe, cfg.epochs, cfg.warmup_epochs)
  if recipes.get_recipe(cfg.method).builds_chain:
    lr = None  # the method's rounds or phases drive the schedule
  sample = train_it.dataset[0]["image"][:1]
  return Setup(model, tx, spe, lr, train_it, test_it, sample, epochs)


def total_epochs(cfg: Config) -> int:
  """Epochs of the whole run: ``cfg.epochs``, or for methods with rounds (lottery tickets,
  Continuous Sparsification, RST) ``cfg.epochs`` per round as their recipe counts them."""
  return recipes.total_epochs(cfg.method, cfg.sparsity, cfg.epochs, **cfg.method_options)


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
  return json.loads(path.read_text()) if path.exists() else None


def write_json(path: pathlib.Path, value: Any) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  os.replace(tmp, path)


def _test_accuracy(setup: Setup, evaluate, state: training.TrainState, batch_size: int) -> float:
  setup.test_it.set_state({"step": 0})
  return training.evaluate(evaluate, state, setup.test_it, batch_size)


def train_run(cfg: Config, workdir: pathlib.Path, *, data_dir: str | None = None,
              stop_after: int | None = None, label: str | None = None) -> Outcome | None:
  """Trains the run of ``cfg`` in ``workdir``, continuing from its last checkpoint if there is
  one; ``None`` if stopped by ``stop_after`` (epochs).

  Writes ``config.json``, ``checkpoints/``, ``metrics.jsonl`` and ``result.json``.
  """
  setup = build(cfg, data_dir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.local_mesh(cfg.batch_size)
  init_params = functools.partial(recipes.init_params, cfg.method, seed=cfg.seed,
                                  **cfg.method_options)
  state = jax.jit(training.init, static_argnums=(0, 1, 3, 4))(
      setup.model, setup.tx, setup.sample, cfg.seed, init_params)
  ckpt = parallel.replicate(checkpoint.new(state, cfg.seed), mesh)
  metrics_path = workdir / "metrics.jsonl"
  mngr = checkpoint.manager(workdir / "checkpoints")
  try:
    elapsed = 0.0
    if mngr.latest_step() is not None:
      ckpt, meta = checkpoint.restore_newest_good(
          mngr, ckpt, iterator=setup.train_it, report=lambda line: print(line, flush=True))
      elapsed = meta["seconds"]
    else:
      write_json(workdir / "config.json", cfg.to_json())
    records = [r for r in report.read_jsonl(metrics_path) if r["epoch"] <= int(ckpt.epoch)]
    metrics_path.write_text("".join(json_line(r) for r in records))
    step = parallel.data_parallel(
        training.make_train_step(setup.model, setup.tx, cfg.label_smoothing,
                                 skip_nonfinite=cfg.skip_nonfinite), mesh,
        donate_state=True)
    evaluate = parallel.data_parallel(training.make_eval_step(setup.model), mesh)
    last = setup.epochs if stop_after is None else min(stop_after, setup.epochs)
    ckpt, records = _epochs(cfg, setup, ckpt, records, step, evaluate, mngr, metrics_path,
                            elapsed, last, label or cfg.method)
  finally:
    mngr.wait_until_finished()
    mngr.close()
  if int(ckpt.epoch) < setup.epochs:
    return None
  return _finish(cfg, setup, ckpt.state, records, evaluate, workdir)


def _epochs(cfg, setup, ckpt, records, step, evaluate, mngr, metrics_path, elapsed, last, label):
  """Epochs ``ckpt.epoch + 1 .. last``: train, evaluate with the epoch's masks, checkpoint, log."""
  spe, first = setup.steps_per_epoch, int(ckpt.epoch)
  bar = tqdm(total=last * spe, initial=first * spe, desc=label, unit="step", disable=None,
             dynamic_ncols=True)
  state, start = ckpt.state, time.perf_counter()

  def on_step(i, loss):
    bar.update()
    if i % 20 == 0:
      bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

  with bar:
    for epoch in range(first + 1, last + 1):
      tic = time.perf_counter()
      phase = training.phase_of(state.opt_state)  # of the epoch's first step
      bar.set_description(f"{label} epoch {epoch}/{setup.epochs}{_where(phase)}")
      state, loss, masks, nonfinite, first_bad, trained = training.run_epoch(
          step, state, setup.train_it, spe, on_step)
      _check_finite(cfg, state, int(nonfinite), int(first_bad), epoch, spe, metrics_path)
      accuracy = _test_accuracy(setup, evaluate, trained, cfg.batch_size)
      seconds = elapsed + time.perf_counter() - start
      record = {"epoch": epoch, "step": epoch * spe, "loss": float(loss),
                "test_accuracy": accuracy, "sparsity": training.sparsity_of(masks),
                "lr": None if setup.lr is None else float(setup.lr((epoch - 1) * spe)),
                "seconds": round(seconds, 3), **phase}
      if int(nonfinite):
        record["skipped_steps"] = int(nonfinite)
      collapsed = training.collapsed_layers(masks)
      if collapsed:  # a layer pruned to 100 %: the network is disconnected
        record["collapsed_layers"] = collapsed
      ckpt = ckpt._replace(state=state, epoch=jnp.asarray(epoch, jnp.int32),
                           step=jnp.asarray(epoch * spe, jnp.int32))
      checkpoint.save(mngr, ckpt, iterator=setup.train_it,
                      metadata={"config": cfg.to_json(), "seconds": seconds})
      with metrics_path.open("a") as f:
        f.write(json_line(record))
      records.append(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{accuracy:.4f}",
                      sparsity=f"{record['sparsity']:.4f}")
      if bar.disable:
        lr = "" if record["lr"] is None else f"  lr {record['lr']:.4f}"
        print(f"{label} epoch {epoch}/{setup.epochs}{_where(phase)}  loss {record['loss']:.4f}  "
              f"test acc {accuracy:.4f}  sparsity {record['sparsity']:.4f}{lr}  "
              f"{spe / (time.perf_counter() - tic):.1f} steps/s", flush=True)
  return ckpt, records


def json_line(record: dict[str, Any]) -> str:
  """``record`` as one line of strict JSON: a float that is not finite becomes ``null``."""
  clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
           for k, v in record.items()}
  return json.dumps(clean, allow_nan=False) + "\n"


def _check_finite(cfg, state, nonfinite, first_bad, epoch, spe, metrics_path) -> None:
  """Stops the run (``NonFiniteError``) after an epoch with a non-finite loss, or, with
  ``--skip-nonfinite``, after an epoch of only non-finite steps or with non-finite weights;
  the epoch is logged (``null`` loss) and not checkpointed."""
  tolerated = nonfinite < spe if cfg.skip_nonfinite else nonfinite == 0
  if tolerated and bool(training.all_finite(state.params)):
    return
  step = (epoch - 1) * spe + max(first_bad, 0) + 1
  leaf = (training.first_nonfinite_leaf(state.params) or
          "none in the params (the loss of that batch)")
  kept = f"the last good checkpoint is epoch {epoch - 1}" if epoch > 1 else "no checkpoint yet"
  message = (f"non-finite loss at step {step} (epoch {epoch}); first non-finite leaf: {leaf}; "
             f"{kept}"
             + ("" if cfg.skip_nonfinite else "; --skip-nonfinite skips such steps instead"))
  with metrics_path.open("a") as f:
    f.write(json_line({"epoch": epoch, "step": epoch * spe, "loss": None,
                       "nonfinite_steps": nonfinite, "stopped": message}))
  raise NonFiniteError(message)


def _where(phase: dict[str, Any]) -> str:
  """`` (round 2)``, `` (extrusion, cycle 1)`` or ``''``: the round or phase for the logs."""
  if "round" in phase:
    return f" (round {phase['round'] + 1})"
  if "phase" in phase:
    return f" ({phase['phase']}, cycle {phase['cycle'] + 1})"
  return ""


def _finish(cfg, setup, state, records, evaluate, workdir) -> Outcome:
  """The final model (``og.final_params``, what the compact file ships) and its accuracy,
  beside the last epoch's."""
  final, masks = jax.jit(training.final_model)(state)
  accuracy = _test_accuracy(setup, evaluate, final, cfg.batch_size)
  sparsity = float(og.sparsity_summary(masks).sparsity)
  result = {"method": cfg.method, "test_accuracy": accuracy, "sparsity": sparsity,
            "weights_remaining": 1.0 - sparsity,
            "last_epoch": {k: records[-1][k] for k in ("test_accuracy", "sparsity")}}
  skipped = skipped_steps(state.opt_state)
  if skipped is not None:
    result["skipped_steps"] = skipped
  result["collapsed_layers"] = training.collapsed_layers(masks)
  if cfg.method == "signed_supermask":
    result["inverted"] = float(og.methods.signed_supermask.inverted_fraction(state.opt_state))
  result["compact_model"] = export_model(cfg, final, masks, workdir / COMPACT_MODEL)
  write_json(workdir / "result.json", result)
  return Outcome(state, masks, accuracy, records, setup.model, setup.sample)


def skipped_steps(opt_state: Any) -> int | None:
  """Steps ``optax.apply_if_finite`` skipped (``--skip-nonfinite``), or ``None`` without it."""
  if isinstance(opt_state, optax.ApplyIfFiniteState):
    return int(opt_state.total_notfinite)
  return None


COMPACT_MODEL = "model.ospk"  # the shipped model: og.export's compact file (examples/infer.py)


def export_model(cfg: Config, final: training.TrainState, masks: Any,
                 path: pathlib.Path) -> dict[str, Any]:
  """Writes the final model (``training.final_model``: ``params`` as deployed, the final masks'
  zeros kept sparse; ``batch_stats`` whole) compactly with ``og.export``. Returns ``{"file",
  "bytes", "dense_bytes"}`` (``dense_bytes``: the same variables stored dense)."""
  variables, keep = {"params": final.params}, {"params": masks}
  if final.batch_stats:
    variables["batch_stats"] = final.batch_stats
    keep["batch_stats"] = jax.tree.map(lambda _: True, final.batch_stats)
  info = og.export.save(path, variables, keep, metadata={
      "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset})
  return {"file": path.name, "bytes": info["bytes"], "dense_bytes": info["dense_bytes"]}


def wants_baseline(cfg: Config) -> bool:
  """Whether the job trains a dense baseline: ``cfg.dense_baseline``, by default on mnist5k."""
  if cfg.method == "dense":
    return False
  return cfg.dataset == "mnist5k" if cfg.dense_baseline is None else cfg.dense_baseline


def train_and_evaluate(config: Config, workdir: str | os.PathLike[str], *,
                       data_dir: str | None = None, stop_after: int | None = None
                       ) -> tuple[Outcome, Outcome | None] | None:
  """Trains ``config`` (and its dense baseline) in ``workdir`` and writes the summary.

  Each run continues from its checkpoint if ``workdir`` holds one. Returns the sparse run's
  and the dense baseline's :class:`Outcome` (``None`` without a baseline), or ``None`` if
  ``stop_after`` stopped the job before the end.
  """
  workdir = pathlib.Path(workdir)
  dense = None
  if wants_baseline(config):
    dense_cfg = config.replace(method="dense", sparsity=0.0, dense_baseline=False)
    dense = train_run(dense_cfg, workdir / "dense", data_dir=data_dir, stop_after=stop_after,
                      label="dense")
    if dense is None:
      return None
  outcome = train_run(config, workdir, data_dir=data_dir, stop_after=stop_after)
  if outcome is None:
    return None
  summarize(config, workdir, outcome, dense)
  return outcome, dense


def summarize(cfg: Config, workdir: pathlib.Path, outcome: Outcome,
              dense: Outcome | None) -> str:
  """Writes ``summary.txt``, ``summary.json`` and the plots; returns the summary table."""
  variables = {"params": outcome.state.params,
               **({"batch_stats": outcome.state.batch_stats} if outcome.state.batch_stats else {})}
  flops = report.layer_flops(outcome.model, variables, outcome.sample)
  rep = report.build(outcome.masks, outcome.state.params, flops)
  dense_accuracy = outcome.accuracy if cfg.method == "dense" else (
      dense.accuracy if dense is not None else
      (read_json(workdir / "dense" / "result.json") or {}).get("test_accuracy"))
  table = report.summary_table(rep, method=cfg.method, sparse_accuracy=outcome.accuracy,
                               dense_accuracy=dense_accuracy)
  if cfg.method == "signed_supermask":  # it keeps, hides or inverts each weight
    inverted = float(og.methods.signed_supermask.inverted_fraction(outcome.state.opt_state))
    table += (f"\nweights remaining {1 - rep.sparsity:.2%} of the masked weights, of which "
              f"{inverted / max(1 - rep.sparsity, 1e-12):.2%} inverted ({inverted:.2%} of all)")
  last = outcome.records[-1]  # a finished run has trained at least one epoch
  if last["test_accuracy"] != outcome.accuracy:
    table += (f"\nfinal model: test accuracy {outcome.accuracy:.2%} at sparsity "
              f"{rep.sparsity:.2%}; the last epoch trained to {last['test_accuracy']:.2%} at sparsity "
              f"{last['sparsity']:.2%} (the final model's masks or weights differ from those "
              "the last epoch was evaluated with)")
  skipped = skipped_steps(outcome.state.opt_state)
  if skipped is not None:
    table += f"\n--skip-nonfinite: {skipped} step(s) with a non-finite loss skipped"
  collapsed = training.collapsed_layers(outcome.masks)
  if collapsed:
    table += (f"\nWARNING: {', '.join(collapsed)} pruned to 100 %: the network is disconnected "
              "there (its output does not depend on the input)")
  if cfg.method == "continuous_sparsification":
    options = cfg.method_options
    table += (f"\nContinuous Sparsification sets no target: its ticket [s > 0] reached sparsity "
              f"{rep.sparsity:.2%} (s0 {options.get('s0', 0.0)}: higher is denser; penalty "
              f"{options.get('penalty', 1e-8)}: higher is sparser)")
  dense_records = dense.records if dense is not None else report.read_jsonl(
      workdir / "dense" / "metrics.jsonl")
  final = {"epoch": total_epochs(cfg), "test_accuracy": outcome.accuracy, "sparsity": rep.sparsity}
  try:
    report.plot_history(workdir / "accuracy_sparsity.png", outcome.records, label=cfg.method,
                        dense=dense_records, final=final)
    report.plot_layer_density(workdir / "layer_density.png", rep,
                              title=f"{cfg.model} {cfg.method}: per-layer density")
  except ImportError as e:
    table += f"\n\n(no plots: {e})"
  (workdir / "summary.txt").write_text(table + "\n")
  write_json(workdir / "summary.json", {
      "config": cfg.to_json(), "dense_accuracy": dense_accuracy,
      "sparse_accuracy": outcome.accuracy,
      "last_epoch_accuracy": last["test_accuracy"],
      "report": report.to_json(rep)})
  return table

