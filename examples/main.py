"""Train a sparse network with any optg_jax method: the main job's command line.

  python examples/main.py --method optg --sparsity 0.98 --model lenet300100 --workdir DIR
  python examples/main.py --config examples/configs/resnet32_cifar10.py --workdir DIR

(``python examples/train.py`` takes the same flags.) The settings come from the model's config in
``examples/configs/`` (or ``--config FILE``); every flag overrides them. ``--resume`` continues
the run in ``--workdir``; ``--stop-after N`` stops after epoch N as if preempted. Bad input ends
with a one-line error on stderr and exit status 2; a missing optional dependency with one line
naming the extra to install (``pip install 'optg-jax[train]'``) and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time
from typing import Any

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # configs/, train.py

# pylint: disable=wrong-import-position
import configs
from configs import default

try:
  import train
except ImportError as e:  # an extra is missing: the message names it
  sys.exit(f"{pathlib.Path(sys.argv[0]).name}: error: {e}")

import optg_jax as og
from optg_jax import checkpoint
from optg_jax import data
from optg_jax import models
from optg_jax import parallel
from optg_jax import recipes

UsageError = train.UsageError
FLAGS = ("method", "sparsity", "model", "dataset", "epochs", "batch_size", "lr", "weight_decay",
         "label_smoothing", "seed", "train_examples", "test_examples", "dense_baseline",
         "skip_nonfinite")


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
  parser = _Parser(prog=prog, description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--config", default=None, metavar="FILE",
      help="a config file with get_config(); default: the config of --model")
  add("--method", default=None, help=f"{', '.join(recipes.names())}; default optg")
  add("--sparsity", type=float, default=None, help="target sparsity in [0, 1); default 0.9")
  add("--model", type=str.lower, choices=models.MODELS, default=None, help="default lenet300100")
  add("--dataset", choices=data.KNOWN_DATASETS, default=None, help="default: the config's")
  add("--epochs", type=int, default=None, help="default: the config's")
  add("--batch-size", type=int, default=None, help="default: the config's")
  add("--lr", type=float, default=None, help="peak learning rate; default: the config's")
  add("--weight-decay", type=float, default=None, help="default: the config's")
  add("--label-smoothing", type=float, default=None, help="default: the config's")
  add("--seed", type=int, default=None, help="init, data order and random masks; default 0")
  add("--train-examples", type=int, default=None, help="train on the first N examples only")
  add("--test-examples", type=int, default=None, help="evaluate on the first N examples only")
  add("--workdir", required=True, help="checkpoints, metrics.jsonl, summary and plots")
  add("--resume", action="store_true", help="continue the run in --workdir")
  add("--data-dir", default=None, help="tfds data dir (default ~/tensorflow_datasets)")
  add("--dense-baseline", action=argparse.BooleanOptionalAction, default=None,
      help="also train the dense model with the same budget (default: on for mnist5k)")
  add("--skip-nonfinite", action="store_true", default=None,
      help="skip the steps whose loss or gradients are not finite (optax.apply_if_finite) "
      "instead of stopping; the summary counts them")
  add("--stop-after", type=int, default=None, metavar="EPOCHS",
      help="stop each run after this epoch, as if preempted; continue with --resume")
  args = parser.parse_args(argv)
  if args.stop_after is not None and args.stop_after < 1:
    raise UsageError(f"--stop-after must be a positive integer, got {args.stop_after}")
  return args


def load_config(path: str) -> default.Config:
  """``get_config()`` of the config file ``path``."""
  spec = importlib.util.spec_from_file_location(f"configs.{pathlib.Path(path).stem}", path)
  if spec is None or not pathlib.Path(path).is_file():
    raise UsageError(f"--config {path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def resolve_config(args: argparse.Namespace, stored: dict[str, Any] | None) -> default.Config:
  """Flags given > the stored run's config (when resuming) > the config file or the model's
  config > the defaults."""
  given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
  if stored is not None:
    for key, value in given.items():
      if value != stored.get(key):
        raise UsageError(f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                         f"({stored.get(key)}); resume with its settings or use a new --workdir")
    with train.as_usage_errors():
      return _validate(default.Config.from_json(stored))
  if args.config is not None:
    base = load_config(args.config)
  else:
    with train.as_usage_errors():
      base = configs.for_model(given.get("model", default.Config.model))
  cfg = base.replace(**given)
  if cfg.method == "dense":
    cfg = cfg.replace(sparsity=0.0)
  return _validate(cfg)


def _validate(cfg: default.Config) -> default.Config:
  if cfg.method not in cfg.methods or cfg.method not in recipes.names():
    valid = [m for m in cfg.methods if m in recipes.names()]
    raise UsageError(f"unknown method {cfg.method!r}; valid: {', '.join(valid)}")
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


def check_workdir(workdir: pathlib.Path, resume: bool) -> dict[str, Any] | None:
  """The stored config to resume (``None`` for a fresh run); bad workdirs raise UsageError."""
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f"--workdir {workdir} exists and is not a directory")
  saved = [r for r in (workdir, workdir / "dense")
           if checkpoint.latest_step(r / "checkpoints") is not None]
  if resume and not saved:
    raise UsageError(f"--resume: no checkpoint in {workdir}")
  if not resume and saved:
    raise UsageError(f"--workdir {workdir} already holds a run; pass --resume to continue it "
                     "or choose another --workdir")
  return train.read_json(workdir / "config.json") if resume else None


def main(argv: list[str] | None = None, prog: str = "main.py") -> int:
  """Runs the job; returns the exit status (2 for bad input, with one line on stderr)."""
  try:
    args = parse_args(argv, prog)
    workdir = pathlib.Path(args.workdir).expanduser().resolve()
    cfg = resolve_config(args, check_workdir(workdir, args.resume))
    if not args.resume:  # the job's settings, for a later --resume with fewer flags
      workdir.mkdir(parents=True, exist_ok=True)
      train.write_json(workdir / "config.json", cfg.to_json())
    start = time.perf_counter()
    if recipes.get_recipe(cfg.method).frozen_weights:  # its own options drive it, not lr/wd
      settings = f"frozen weights, {dict(cfg.method_options)}"
    else:
      warmup = recipes.scaled_warmup(cfg.epochs, cfg.warmup_epochs)
      settings = (f"sparsity {cfg.sparsity}, lr {cfg.lr} (warm-up {warmup} epochs), "
                  f"wd {cfg.weight_decay}")
    if cfg.method == "optg":
      ramp = cfg.method_options.get("ramp", "reference")
      settings += f", {og.methods.optg.resolve_ramp(ramp, cfg.epochs)} ramp (ramp={ramp!r})"
    print(f"{cfg.method} {cfg.model} on {cfg.dataset}: {settings}, {_budget(cfg)}, batch "
          f"{cfg.batch_size}, {_devices(cfg.batch_size)}", flush=True)
    done = train.train_and_evaluate(cfg, workdir, data_dir=args.data_dir,
                                    stop_after=args.stop_after)
  except UsageError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except train.NonFiniteError as e:
    print(f"{prog}: stopped: {e}", file=sys.stderr)
    return 1
  if done is None:
    print(f"stopped as asked by --stop-after; continue with --resume --workdir {workdir}")
    return 0
  print((workdir / "summary.txt").read_text().rstrip("\n"))
  print(f"\n{time.perf_counter() - start:.0f} s; checkpoints, metrics.jsonl, summary and plots "
        f"in {workdir}")
  return 0


def _budget(cfg: train.Config) -> str:
  """``40 epochs``, or for methods with rounds how the run's epochs are made up."""
  with train.as_usage_errors():
    total = train.total_epochs(cfg)
  options = cfg.method_options
  if cfg.method == "lottery_ticket":
    rate = options.get("rate", 0.2)
    levels = recipes.lottery_levels(cfg.sparsity, rate, options.get("levels"))
    return (f"{levels} IMP levels reaching sparsity {1 - (1 - rate) ** levels:.4f} ({cfg.epochs} "
            f"epochs each, rewound to epoch {options.get('rewind_epoch', 0)}): {total} epochs")
  if cfg.method == "continuous_sparsification":
    return (f"{options.get('num_rounds', 3)} search rounds of {cfg.epochs} epochs and the ticket "
            f"(no sparsity target: s0 {options.get('s0', 0.0)}, penalty "
            f"{options.get('penalty', 1e-8)} steer it): {total} epochs")
  if cfg.method == "rst":
    return f"{total - cfg.epochs} epochs of extrusion and {cfg.epochs} of finetuning"
  return f"{total} epochs"


def _devices(batch_size: int) -> str:
  used, local = parallel.local_mesh(batch_size).devices.size, jax.local_device_count()
  if used == local:
    return f"data parallel on {used} {jax.default_backend()} device(s)"
  return (f"data parallel on {used} of {local} {jax.default_backend()} devices (the batch splits "
          f"evenly over {used})")


if __name__ == "__main__":
  sys.exit(main())
