"""The main job: train a sparse network with any optg_jax method, checkpointed and resumable.

  python examples/train.py --method optg --sparsity 0.98 --model lenet300100 --dataset mnist5k \\
      --workdir /tmp/optg_lenet

Each method trains with its reference chain (``optg_jax.recipes.make_optimizer``) and the
reference hyperparameters of the model (``PRESETS``, from the OptG paper's configs); every flag
overrides them. The one train step is jitted and runs data parallel over all local devices.
After each epoch the run evaluates on the test split, saves an orbax checkpoint into
``WORKDIR/checkpoints`` and appends a line to ``WORKDIR/metrics.jsonl``; ``--resume`` continues
from the last checkpoint and ends exactly as an uninterrupted run does. On mnist5k the dense
baseline is trained with the same budget into ``WORKDIR/dense`` (``--no-dense-baseline`` skips
it). The run ends with a dense vs sparse summary (accuracy, parameters and FLOPs per layer) on
stdout and in ``summary.txt`` / ``summary.json``, and PNG plots in the workdir. For OptG the
final model uses the mask of the final scores at the full target sparsity, as the reference does.

Bad input ends with a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
from typing import Any, NamedTuple

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from optg_jax import checkpoint
from optg_jax import data
from optg_jax import masks as masks_lib
from optg_jax import models
from optg_jax import parallel
from optg_jax import recipes
from optg_jax import report
from optg_jax import training
from optg_jax.methods import base
from optg_jax.methods import final

PROG = "train.py"
NUM_CLASSES = {"mnist5k": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
TEST_SPLIT = {"imagenet2012": "validation"}
IN_MEMORY = ("mnist5k", "mnist", "cifar10", "cifar100")  # small enough to decode once


class Preset(NamedTuple):
  """Reference hyperparameters of a model: SGD momentum 0.9 on the per-epoch warm-up + cosine
  learning rate of ``recipes.warmup_cosine_per_epoch``, peak ``lr``."""
  epochs: int
  batch_size: int
  lr: float
  weight_decay: float
  label_smoothing: float


_CIFAR = Preset(epochs=160, batch_size=256, lr=0.1, weight_decay=5e-4, label_smoothing=0.0)
PRESETS: dict[str, Preset] = {
    "lenet300100": Preset(epochs=40, batch_size=100, lr=0.1, weight_decay=5e-4,
                          label_smoothing=0.0),
    **{name: _CIFAR for name in ("conv2", "conv4", "conv6", "conv8", "resnet20", "resnet32",
                                 "resnet56", "vgg16", "vgg19")},
    "resnet50": Preset(epochs=100, batch_size=256, lr=0.1, weight_decay=1e-4, label_smoothing=0.1),
    "mobilenetv1": Preset(epochs=180, batch_size=256, lr=0.05, weight_decay=4e-5,
                          label_smoothing=0.1),
}


def reference_preset(method: str, model: str) -> Preset:
  """The reference budget of ``model``. Every method trains with it (OptG's configs; the
  baselines are compared at the same budget), so ``method`` only has to be a known one."""
  if method not in recipes.names():
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(recipes.names())}")
  return PRESETS[model]


class Config(NamedTuple):
  """What defines a run (stored in ``config.json``; a resumed run must match it)."""
  method: str
  sparsity: float
  model: str
  dataset: str
  epochs: int
  batch_size: int
  lr: float
  weight_decay: float
  label_smoothing: float
  seed: int
  train_examples: int | None
  test_examples: int | None


class Outcome(NamedTuple):
  """A finished run: the final ``state`` (final masks), ``masks``, its test ``accuracy``, the
  per-epoch ``records`` of ``metrics.jsonl``, and the ``model`` with an input ``sample``."""
  state: training.TrainState
  masks: Any
  accuracy: float
  records: list[dict[str, Any]]
  model: Any
  sample: np.ndarray


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--method", choices=recipes.names(), default=None, help="default optg")
  add("--sparsity", type=float, default=None, help="target sparsity in [0, 1); default 0.9")
  add("--model", type=str.lower, choices=models.MODELS, default=None, help="default lenet300100")
  add("--dataset", choices=data.KNOWN_DATASETS, default=None, help="default mnist5k")
  add("--epochs", type=int, default=None, help="default: the model's preset")
  add("--batch-size", type=int, default=None, help="default: the model's preset")
  add("--lr", type=float, default=None, help="peak learning rate; default: the preset")
  add("--weight-decay", type=float, default=None, help="default: the preset")
  add("--label-smoothing", type=float, default=None, help="default: the preset")
  add("--seed", type=int, default=None, help="init, data order and random masks; default 0")
  add("--train-examples", type=int, default=None, help="train on the first N examples only")
  add("--test-examples", type=int, default=None, help="evaluate on the first N examples only")
  add("--workdir", required=True, help="checkpoints, metrics.jsonl, summary and plots")
  add("--resume", action="store_true", help="continue the run in --workdir")
  add("--data-dir", default=None, help="tfds data dir (default ~/tensorflow_datasets)")
  add("--dense-baseline", action=argparse.BooleanOptionalAction, default=None,
      help="also train the dense model with the same budget (default: on for mnist5k)")
  add("--stop-after", type=int, default=None, metavar="EPOCHS",
      help="stop each run after this epoch, as if preempted; continue with --resume")
  return parser.parse_args(argv)


_DEFAULTS = {"method": "optg", "sparsity": 0.9, "model": "lenet300100", "dataset": "mnist5k",
             "seed": 0, "train_examples": None, "test_examples": None}


def resolve_config(args: argparse.Namespace, stored: dict[str, Any] | None) -> Config:
  """Flags given > the stored run's config (when resuming) > the model's preset > defaults."""
  given = {k: getattr(args, k) for k in Config._fields if getattr(args, k) is not None}
  if stored is not None:
    for key, value in given.items():
      if value != stored.get(key):
        raise UsageError(f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                         f"({stored.get(key)}); resume with its settings or use a new --workdir")
    given = {**stored, **given}
  values = {**_DEFAULTS, **given}
  preset = reference_preset(values["method"], values["model"])
  values = {**preset._asdict(), **values}
  if values["method"] == "dense":
    values["sparsity"] = 0.0
  return _validate(Config(**{k: values[k] for k in Config._fields}))


def _validate(cfg: Config) -> Config:
  if not 0.0 <= cfg.sparsity < 1.0:
    raise UsageError(f"--sparsity must be in [0, 1), got {cfg.sparsity}")
  for name in ("epochs", "batch_size", "train_examples", "test_examples"):
    value = getattr(cfg, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
  if not cfg.lr > 0:
    raise UsageError(f"--lr must be positive, got {cfg.lr}")
  if not cfg.weight_decay >= 0:
    raise UsageError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
  if not 0.0 <= cfg.label_smoothing < 1.0:
    raise UsageError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
  if cfg.seed < 0:
    raise UsageError(f"--seed must be >= 0, got {cfg.seed}")
  return cfg


# ------------------------------------------------------------------------------------------------
# One run: a model trained by one method, in its own directory.


class Setup(NamedTuple):
  """The pieces of a run built from its config, before any training."""
  model: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int
  lr: optax.Schedule
  train_it: data.BatchIterator
  test_it: data.BatchIterator
  sample: np.ndarray


def _split(name: str, n: int | None) -> str:
  return name if n is None else f"{name}[:{n}]"


@contextlib.contextmanager
def _as_usage_errors():
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
  with _as_usage_errors():
    num_train = len(data.data_source(cfg.dataset, train_split, data_dir=data_dir))
    spe = num_train // cfg.batch_size
    if spe < 1:
      raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {num_train} training examples")
    model = models.get_model(cfg.model, NUM_CLASSES[cfg.dataset])
    tx = recipes.make_optimizer(cfg.method, cfg.sparsity, steps_per_epoch=spe, epochs=cfg.epochs,
                                learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                                seed=cfg.seed)
    train_it = data.load(cfg.dataset, train_split, batch_size=cfg.batch_size, seed=cfg.seed,
                         data_dir=data_dir, cache=cache)
    test_it = data.load(cfg.dataset, test_split, batch_size=cfg.batch_size, shuffle=False,
                        augment=False, num_epochs=1, drop_remainder=False, data_dir=data_dir,
                        cache=cache)
  lr = recipes.warmup_cosine_per_epoch(cfg.lr, spe, cfg.epochs)
  sample = train_it.dataset[0]["image"][:1]
  return Setup(model, tx, spe, lr, train_it, test_it, sample)


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: pathlib.Path, value: Any) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  os.replace(tmp, path)


def _sparsity(opt_state: Any) -> float:
  if not base.has_state(opt_state):
    return 0.0
  return float(masks_lib.sparsity_summary(base.get_masks(opt_state)).sparsity)


def _test_accuracy(setup: Setup, evaluate, state: training.TrainState, batch_size: int) -> float:
  setup.test_it.set_state({"step": 0})
  return training.evaluate(evaluate, state, setup.test_it, batch_size)


def train(cfg: Config, workdir: pathlib.Path, *, resume: bool, data_dir: str | None,
          stop_after: int | None, label: str) -> Outcome | None:
  """Trains (or resumes) the run of ``cfg`` in ``workdir``; ``None`` if stopped by ``stop_after``.

  Writes ``config.json``, ``checkpoints/``, ``metrics.jsonl`` and ``result.json``.
  """
  setup = build(cfg, data_dir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.local_mesh(cfg.batch_size)
  state = jax.jit(training.init, static_argnums=(0, 1, 3))(setup.model, setup.tx, setup.sample,
                                                           cfg.seed)
  ckpt = parallel.replicate(checkpoint.new(state, cfg.seed), mesh)
  metrics_path = workdir / "metrics.jsonl"
  mngr = checkpoint.manager(workdir / "checkpoints")
  try:
    elapsed = 0.0
    if resume:
      ckpt, meta = checkpoint.restore(mngr, ckpt, iterator=setup.train_it)
      elapsed = meta["seconds"]
    else:
      _write_json(workdir / "config.json", cfg._asdict())
    records = [r for r in report.read_jsonl(metrics_path) if r["epoch"] <= int(ckpt.epoch)]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    step = parallel.data_parallel(
        training.make_train_step(setup.model, setup.tx, cfg.label_smoothing), mesh,
        donate_state=True)
    evaluate = parallel.data_parallel(training.make_eval_step(setup.model), mesh)
    last = cfg.epochs if stop_after is None else min(stop_after, cfg.epochs)
    ckpt, records = _epochs(cfg, setup, ckpt, records, step, evaluate, mngr, metrics_path,
                            elapsed, last, label)
  finally:
    mngr.wait_until_finished()
    mngr.close()
  if int(ckpt.epoch) < cfg.epochs:
    return None
  return _finish(cfg, setup, ckpt.state, records, evaluate, workdir)


def _epochs(cfg, setup, ckpt, records, step, evaluate, mngr, metrics_path, elapsed, last, label):
  """Epochs ``ckpt.epoch + 1 .. last``: train, evaluate, checkpoint, log."""
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
      bar.set_description(f"{label} epoch {epoch}/{cfg.epochs}")
      state, loss = training.run_steps(step, state, setup.train_it, spe, on_step)
      accuracy = _test_accuracy(setup, evaluate, state, cfg.batch_size)
      seconds = elapsed + time.perf_counter() - start
      record = {"epoch": epoch, "step": epoch * spe, "loss": float(loss),
                "test_accuracy": accuracy, "sparsity": _sparsity(state.opt_state),
                "lr": float(setup.lr((epoch - 1) * spe)), "seconds": round(seconds, 3)}
      ckpt = ckpt._replace(state=state, epoch=jnp.asarray(epoch, jnp.int32),
                          step=jnp.asarray(epoch * spe, jnp.int32))
      checkpoint.save(mngr, ckpt, iterator=setup.train_it,
                      metadata={"config": cfg._asdict(), "seconds": seconds})
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      records.append(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{accuracy:.4f}",
                      sparsity=f"{record['sparsity']:.4f}")
      if bar.disable:
        print(f"{label} epoch {epoch}/{cfg.epochs}  loss {record['loss']:.4f}  test acc "
              f"{accuracy:.4f}  sparsity {record['sparsity']:.4f}  lr {record['lr']:.4f}  "
              f"{spe / (time.perf_counter() - tic):.1f} steps/s", flush=True)
  return ckpt, records


def _finish(cfg, setup, state, records, evaluate, workdir) -> Outcome:
  """The final model (OptG: mask of the final scores at the target sparsity) and its accuracy."""
  masks = jax.jit(final.final_masks, static_argnums=2)(state.params, state.opt_state,
                                                       cfg.sparsity)
  if base.has_state(state.opt_state):
    state = state._replace(opt_state=final.with_masks(state.opt_state, masks))
  accuracy = _test_accuracy(setup, evaluate, state, cfg.batch_size)
  sparsity = float(masks_lib.sparsity_summary(masks).sparsity)
  _write_json(workdir / "result.json", {"method": cfg.method, "test_accuracy": accuracy,
                                        "sparsity": sparsity})
  return Outcome(state, masks, accuracy, records, setup.model, setup.sample)


# ------------------------------------------------------------------------------------------------
# The job: the dense baseline, the sparse run, the summary.


def check_workdir(workdir: pathlib.Path, resume: bool) -> dict[str, Any] | None:
  """The stored config to resume (``None`` for a fresh run); bad workdirs raise UsageError."""
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f"--workdir {workdir} exists and is not a directory")
  runs = [workdir, workdir / "dense"]
  saved = [r for r in runs if checkpoint.latest_step(r / "checkpoints") is not None]
  if resume and not saved:
    raise UsageError(f"--resume: no checkpoint in {workdir}")
  if not resume and saved:
    raise UsageError(f"--workdir {workdir} already holds a run; pass --resume to continue it "
                     "or choose another --workdir")
  return _read_json(workdir / "config.json") if resume else None


def _run(cfg, workdir, args, label) -> Outcome | None:
  resume = args.resume and checkpoint.latest_step(workdir / "checkpoints") is not None
  return train(cfg, workdir, resume=resume, data_dir=args.data_dir, stop_after=args.stop_after,
               label=label)


def _summarize(cfg: Config, workdir: pathlib.Path, outcome: Outcome,
               dense: Outcome | None) -> str:
  variables = {"params": outcome.state.params,
               **({"batch_stats": outcome.state.batch_stats} if outcome.state.batch_stats else {})}
  flops = report.layer_flops(outcome.model, variables, outcome.sample)
  rep = report.build(outcome.masks, outcome.state.params, flops)
  dense_accuracy = outcome.accuracy if cfg.method == "dense" else (
      dense.accuracy if dense is not None else
      (_read_json(workdir / "dense" / "result.json") or {}).get("test_accuracy"))
  table = report.summary_table(rep, method=cfg.method, sparse_accuracy=outcome.accuracy,
                               dense_accuracy=dense_accuracy)
  (workdir / "summary.txt").write_text(table + "\n")
  _write_json(workdir / "summary.json", {
      "config": cfg._asdict(), "dense_accuracy": dense_accuracy,
      "sparse_accuracy": outcome.accuracy, "report": report.to_json(rep)})
  dense_records = dense.records if dense is not None else report.read_jsonl(
      workdir / "dense" / "metrics.jsonl")
  try:
    report.plot_history(workdir / "accuracy_sparsity.png", outcome.records, label=cfg.method,
                        dense=dense_records)
    report.plot_layer_density(workdir / "layer_density.png", rep,
                              title=f"{cfg.model} {cfg.method}: per-layer density")
  except ImportError:
    table += "\n\n(no plots: matplotlib is not installed)"
  return table


def _wants_baseline(args: argparse.Namespace, cfg: Config, workdir: pathlib.Path) -> bool:
  """``--dense-baseline`` if given; when resuming, whether the run has one; else on mnist5k."""
  if cfg.method == "dense":
    return False
  if args.dense_baseline is not None:
    return args.dense_baseline
  if args.resume:
    return (workdir / "dense" / "config.json").exists()
  return cfg.dataset == "mnist5k"


def main(argv: list[str] | None = None) -> int:
  """Runs the job; returns the exit status (2 for bad input, with one line on stderr)."""
  try:
    args = parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
      raise UsageError(f"--stop-after must be a positive integer, got {args.stop_after}")
    workdir = pathlib.Path(args.workdir).expanduser().resolve()
    cfg = resolve_config(args, check_workdir(workdir, args.resume))
    baseline = _wants_baseline(args, cfg, workdir)
    if not args.resume:  # the job's settings, for a later --resume with fewer flags
      workdir.mkdir(parents=True, exist_ok=True)
      _write_json(workdir / "config.json", cfg._asdict())
    start = time.perf_counter()
    print(f"{cfg.method} {cfg.model} on {cfg.dataset}: sparsity {cfg.sparsity}, {cfg.epochs} "
          f"epochs, batch {cfg.batch_size}, lr {cfg.lr}, wd {cfg.weight_decay}, "
          f"{_devices(cfg.batch_size)}", flush=True)
    dense = None
    if baseline:
      dense_cfg = cfg._replace(method="dense", sparsity=0.0)
      dense = _run(dense_cfg, workdir / "dense", args, "dense")
      if dense is None:
        return _stopped(workdir)
    outcome = _run(cfg, workdir, args, cfg.method)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  if outcome is None:
    return _stopped(workdir)
  print(_summarize(cfg, workdir, outcome, dense))
  print(f"\n{time.perf_counter() - start:.0f} s; checkpoints, metrics.jsonl, summary and plots "
        f"in {workdir}")
  return 0


def _devices(batch_size: int) -> str:
  used, local = parallel.local_mesh(batch_size).devices.size, jax.local_device_count()
  if used == local:
    return f"data parallel on {used} {jax.default_backend()} device(s)"
  return (f"data parallel on {used} of {local} {jax.default_backend()} devices (the batch splits "
          f"evenly over {used})")


def _stopped(workdir: pathlib.Path) -> int:
  print(f"stopped as asked by --stop-after; continue with --resume --workdir {workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
