"""Accuracy board: every registered method on mnist5k LeNet-300-100, one stated epoch budget.

Each method of ``optg_jax.recipes.names()`` runs its reference chain
(``recipes.make_optimizer``) with the main job's presets (``examples/configs/default.py``:
``METHODS`` for its options, ``MODEL_OPTIONS`` for its model variant, e.g. the signed
supermask's FCN) and its recipe's weight init (``recipes.init_params``), at each sparsity and
seed, for ``--epochs`` epochs at batch 100 on the 4,000 training digits, and is scored on the
1,000 test digits with its final model (``training.final_model``: what the compact file ships).
Methods with rounds (lottery tickets, Continuous Sparsification, RST) take ``--epochs`` per
round and train ``recipes.total_epochs`` in all, as the main job does; the board says so.

Methods without a sparsity target (``dense``, ``signed_supermask``, see :data:`NO_TARGET`) run
once per seed; every row reports the sparsity the final masks reached.

Outputs in ``--out``: ``accuracy_sweep.json`` (every cell, written after each one: an
interrupted sweep continues where it stopped), ``accuracy_sweep.md`` (mean ± std per method and
sparsity), ``accuracy_sweep.png`` (accuracy against density on a log axis, one line per method,
error bars; needs matplotlib).

  python benchmarks/accuracy_sweep.py --out benchmarks/board     # the board (see README)
  python benchmarks/accuracy_sweep.py --quick --out /tmp/board   # 1 epoch, 2 methods (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from optg_jax import data
from optg_jax import models
from optg_jax import recipes
from optg_jax import training

BATCH = 100
NO_TARGET = ("dense", "signed_supermask", "continuous_sparsification")
"""Methods whose sparsity is not an input (the recipe ignores it): run once per seed, with the
target recorded as ``None``."""

QUICK = {"epochs": 1, "seeds": [0], "methods": ["optg", "magnitude"], "sparsities": [0.5, 0.9],
         "train_examples": 500, "test_examples": 200}
"""The ``--quick`` run (under a minute), for the tests; GMP's window needs 2 epochs or more
(at 1 it never prunes), so the quick run pairs OptG with one-shot magnitude pruning."""

_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs" / "default.py"


def job_presets() -> tuple[dict[str, Any], dict[str, Any]]:
  """The main job's per-method options and model options (``examples/configs/default.py``)."""
  spec = importlib.util.spec_from_file_location("_job_config_default", _CONFIG)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return dict(module.METHODS), dict(module.MODEL_OPTIONS)


def epochs_used(method: str, epochs: int, sparsity: float | None = None,
                options: dict[str, Any] | None = None) -> int:
  """The epochs ``method`` trains for with rounds of ``epochs`` (``recipes.total_epochs``:
  ``epochs`` for methods without rounds)."""
  if options is None:
    options = job_presets()[0].get(method, {})
  return recipes.total_epochs(method, sparsity or 0.0, epochs, **options)


class _Reinit:
  """A Flax model whose ``init`` re-initialises the params as ``method``'s recipe needs
  (``recipes.init_params``), for ``training.fit``; ``apply`` is the model's."""

  def __init__(self, model: Any, reinit: Callable[[Any], Any]):
    self.model, self.reinit = model, reinit

  def init(self, *args, **kwargs):
    variables = dict(self.model.init(*args, **kwargs))
    variables["params"] = self.reinit(variables["params"])
    return variables

  def apply(self, *args, **kwargs):
    return self.model.apply(*args, **kwargs)


def run_cell(method: str, sparsity: float | None, seed: int, epochs: int, *,
             train_examples: int | None = None, test_examples: int | None = None,
             presets: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
  """One run: the final test accuracy (a fraction), the sparsity reached, the epochs used
  (``sparsity`` ``None`` for the :data:`NO_TARGET` methods)."""
  methods, model_options = presets or job_presets()
  options = dict(methods.get(method, {}))
  train, test = data.load_mnist_5k(seed=seed)
  train = data.Split(train.images[:train_examples], train.labels[:train_examples])
  test = data.Split(test.images[:test_examples], test.labels[:test_examples])
  used = epochs_used(method, epochs, sparsity, options)
  tx = recipes.make_optimizer(method, sparsity or 0.0,
                              steps_per_epoch=len(train.labels) // BATCH,
                              epochs=epochs, seed=seed, **options)
  model = models.get_model("lenet300100", **model_options.get(method, {}))
  wrapped = _Reinit(model, lambda p: recipes.init_params(method, p, seed, **options))
  start = time.perf_counter()
  result = training.fit(wrapped, tx, train, test, epochs=used, batch_size=BATCH, seed=seed)
  final, masks = training.final_model(result.state)
  correct = int(jax.jit(training.make_eval_step(model))(final, test.images, test.labels))
  return {"method": method, "target": sparsity, "seed": seed,
          "accuracy": correct / len(test.labels),
          "sparsity": training.sparsity_of(masks), "epochs_used": used,
          "seconds": round(time.perf_counter() - start, 2)}


def cells(methods: Sequence[str], sparsities: Sequence[float],
          seeds: Sequence[int]) -> list[tuple[str, float | None, int]]:
  """``(method, sparsity, seed)`` of a sweep; :data:`NO_TARGET` methods once per seed."""
  out = []
  for method in methods:
    targets = [None] if method in NO_TARGET else list(sparsities)
    out += [(method, p, s) for p in targets for s in seeds]
  return out


def _key(method: str, sparsity: float | None, seed: int) -> str:
  return f"{method}|{sparsity!r}|{seed}"


def sweep(path: pathlib.Path, todo: Sequence[tuple[str, float | None, int]], epochs: int,
          **run_kwargs: Any) -> dict[str, Any]:
  """Runs the cells not yet in the JSON file ``path``, saving it after each; returns it."""
  record = json.loads(path.read_text()) if path.exists() else {"epochs": epochs, "cells": {}}
  if record["epochs"] != epochs:
    raise ValueError(f"{path} holds a sweep of {record['epochs']} epochs, not {epochs}")
  presets = job_presets()
  for method, sparsity, seed in todo:
    key = _key(method, sparsity, seed)
    if key in record["cells"]:
      continue
    record["cells"][key] = run_cell(method, sparsity, seed, epochs, presets=presets, **run_kwargs)
    print(json.dumps(record["cells"][key]), flush=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
  return record


def summary(record: dict[str, Any]) -> list[dict[str, Any]]:
  """Mean and std over seeds per ``(method, target)``, in the order of the cells."""
  groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
  for cell in record["cells"].values():
    groups.setdefault((cell["method"], cell["target"]), []).append(cell)
  rows = []
  for (method, target), runs in groups.items():
    acc = 100 * np.array([r["accuracy"] for r in runs])
    reached = 100 * np.array([r["sparsity"] for r in runs])
    rows.append({"method": method, "target": target, "seeds": [r["seed"] for r in runs],
                 "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                 "sparsity_mean": float(reached.mean()),
                 "epochs_used": sorted({r["epochs_used"] for r in runs})})
  return rows


def markdown(rows: Sequence[dict[str, Any]], epochs: int) -> str:
  lines = [f"Budget: {epochs} epochs per run (more where `epochs used` says so); test accuracy "
           "in %, mean ± std over seeds; sparsity reached by the final masks in %.", "",
           "| method | target | sparsity reached | test accuracy | seeds | epochs used |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    target = "—" if r["target"] is None else f"{100 * r['target']:g}%"
    lines.append(f"| {r['method']} | {target} | {r['sparsity_mean']:.2f}% | "
                 f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | {len(r['seeds'])} | "
                 f"{', '.join(map(str, r['epochs_used']))} |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path, epochs: int) -> bool:
  """Accuracy against density (log axis, sparser to the right), one line per method with error
  bars, the dense model as a dashed line; the whole range on the left, the top 12 points on the
  right. ``False`` without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  best = max(r["accuracy_mean"] for r in rows)
  markers = "os^vDPX*<>"
  for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["sparsity_mean"])
    density = [max(100 - r["sparsity_mean"], 1e-2) for r in mine]
    acc, err = [r["accuracy_mean"] for r in mine], [r["accuracy_std"] for r in mine]
    for ax in axes:
      if len(mine) == 1 and mine[0]["sparsity_mean"] == 0:
        ax.axhline(acc[0], color="black", linestyle="--", linewidth=1, label=f"{method} (100%)")
      else:
        ax.errorbar(density, acc, yerr=err, marker=markers[i % len(markers)], capsize=3,
                    label=method)
  for ax in axes:
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_locator(ticker.FixedLocator([100, 50, 20, 10, 5, 2, 1]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("density: weights kept (log scale; sparser to the right)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].set_title(f"mnist5k, LeNet-300-100, {epochs} epochs: all")
  axes[1].set_ylim(best - 12, best + 1)
  axes[1].set_title("top 12 points")
  axes[1].legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98, 0.99])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--methods", nargs="+", default=None,
                      help="default: every registered method (recipes.names())")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/board"))
  parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
  args = parser.parse_args(argv)
  run_kwargs = {}
  if args.quick:
    args.epochs, args.seeds, args.methods, args.sparsities = (
        QUICK["epochs"], QUICK["seeds"], QUICK["methods"], QUICK["sparsities"])
    run_kwargs = {"train_examples": QUICK["train_examples"],
                  "test_examples": QUICK["test_examples"]}
  methods = args.methods or list(recipes.names())
  args.out.mkdir(parents=True, exist_ok=True)
  print(f"# {platform.processor() or platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, jax {jax.__version__}; {args.epochs} epochs, "
        f"seeds {args.seeds}, methods {methods}", flush=True)
  record = sweep(args.out / "accuracy_sweep.json", cells(methods, args.sparsities, args.seeds),
                 args.epochs, **run_kwargs)
  rows = summary(record)
  table = markdown(rows, args.epochs)
  (args.out / "accuracy_sweep.md").write_text(table)
  print(table)
  if not plot(rows, args.out / "accuracy_sweep.png", args.epochs):
    print("matplotlib is not installed: no accuracy_sweep.png")
  return {"record": record, "rows": rows, "table": table}


if __name__ == "__main__":
  main()
