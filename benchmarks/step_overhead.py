"""Jitted train-step overhead: every registered method's step time relative to a dense step.

For each method of ``optg_jax.recipes.names()`` (``'dense'`` is the baseline) this builds the
method's reference chain (``recipes.make_optimizer``: the method, then weight decay and SGD
momentum; the method alone for frozen-weight methods; the method's own chain for methods with
rounds), the design's one train step (``training.make_train_step``) on the same model and the
same batch, and compiles it ahead of time, donating the state as the main job's step does
(``jax.jit(step, donate_argnums=0).lower(...).compile()``, whose wall time is the *compile
time*, in seconds; ``--no-donate`` for a step that keeps its input). The dense step is the ``'dense'`` recipe's chain
(``identity → add_decayed_weights → sgd(momentum)``) on the same model and batch.

Two kinds of step are timed, from states set to a chosen step count (every ``count`` and
``round_step`` field of the optimizer state set to ``t``, after two real steps from init so
that scores and momenta are not all zeros, see :func:`at_step`). The update of a state at count
``t`` computes the masks of step ``t + 1``, so:

* *steady* (non-refresh) step: ``t = k·spe`` with ``k = epochs // 2``, where no method refreshes;
* *refresh* step: the count whose update recomputes the mask (:func:`refresh_count`): OptG and
  GMP refresh at the epoch boundary (``t = k·spe − 1``), RST when extrusion ends
  (``t = ceil(E/2)·spe − 1 = k·spe − 1``, ``E`` even), SNIP in the update of step 0, lottery
  tickets and Continuous Sparsification at the end of round 0 (``t = E·spe − 1``: new masks and
  the rewind). One-shot magnitude and random pruning select once at init (no refresh step);
  signed supermask and edge-popup recompute the mask in every update (every step refreshes: the
  steady step is their refresh step).

For the methods whose refresh is a top-k of a score (:data:`REFRESH_POOL`), the refresh step
is also compared with *a dense step plus one mask refresh*: the same top-k (the method's
distribution, ``og.Selection(...).masks`` of ``|W|`` at the target), jitted alone and timed in
the same rounds (the issue's target: ``refresh / (dense + selection) <= 1``).

Timing: a warm-up, then ``--repeats`` interleaved rounds (method step, dense step, method step,
...) with ``block_until_ready``, each sample the mean of ``--calls`` back-to-back calls (by
default enough for about 20 ms: a single millisecond step is at the mercy of the scheduler);
a trial's ratio is the median method time over the median dense time of the same rounds, and
the ratio reported is the median of ``--trials`` trials (default 3), each a pass over every
method and kind of step, so that a slow spell of a shared machine spoils one trial of a few
cases, not a whole row; beside it, the range over the trials, and the ratio of the fastest
samples (the least disturbed by other jobs, as noise on a shared machine only adds time). All
in one process. Each call steps a fresh copy of the same state (made outside the timed region, since
the step consumes its input), so each call does the same work. Prints a Markdown table and writes JSON (``--out``)::

  python benchmarks/step_overhead.py --out step_overhead.json          # LeNet-300-100, b128
  python benchmarks/step_overhead.py --model resnet20                   # CIFAR ResNet-20, b128
  python benchmarks/step_overhead.py --model resnet50 --batch 4 --methods optg,gmp
  python benchmarks/step_overhead.py --quick     # LeNet, 3 methods, 3 repeats (run in tests)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optg_jax as og
from optg_jax import models
from optg_jax import recipes
from optg_jax import training
from sparse_inference import time_samples  # the interleaved timer of the sibling benchmark

BATCH = {"lenet300100": 128, "resnet20": 128, "resnet50": 4}
"""Default batch per model (ResNet-50: a small batch, for a CPU)."""
QUICK_METHODS = ("optg", "gmp", "magnitude")
INIT_ONLY = ("magnitude", "random")
"""Methods whose mask is selected at init only: no update refreshes it."""
EVERY_STEP = ("signed_supermask", "edge_popup")
"""Methods that recompute the mask in every update: every step is a refresh step."""
REFRESH_POOL = {"optg": "global", "gmp": "uniform", "snip": "global", "lottery_ticket": "global"}
"""The distribution of the top-k that each method's refresh step runs (its default): the
refresh step is compared with a dense step plus this selection timed alone."""


def method_names(spec: str | None) -> list[str]:
  """The methods of a comma-separated ``spec`` (unknown names fail early), or every registered
  method but ``'dense'``."""
  methods = spec.split(",") if spec else [m for m in recipes.names() if m != "dense"]
  for m in methods:
    recipes.get_recipe(m)
  return methods


def method_options(method: str, model: str) -> dict[str, Any]:
  """The recipe options the benchmark passes: CS masks every kernel of an MLP (its reference
  masks the 3×3 convolutions only, which LeNet-300-100 has none of)."""
  if method == "continuous_sparsification" and model == "lenet300100":
    return {"layers": "all"}
  return {}


def refresh_count(method: str, steps_per_epoch: int, epochs: int) -> int | None:
  """The count ``t`` whose update recomputes the masks (see the module doc); ``None`` for
  methods with no refresh step (init-only) or a refresh in every step."""
  k = epochs // 2
  if method in INIT_ONLY or method in EVERY_STEP:
    return None
  if method == "snip":
    return 0  # og.snip(num_batches=1): the mask of step 1 is computed in the update of step 0
  if method in ("lottery_ticket", "continuous_sparsification"):
    return epochs * steps_per_epoch - 1  # the last update of round 0
  return k * steps_per_epoch - 1  # optg, gmp (inside its window), rst (end of extrusion)


def at_step(opt_state: Any, t: int) -> Any:
  """``opt_state`` with every ``count`` and ``round_step`` field (optax's step counters, the
  methods' counts, ``og.rounds``' step in round 0) set to ``t``: the state of step ``t`` as far
  as schedules and refresh predicates see it."""

  def set_field(path, x):
    name = getattr(path[-1], "name", None) if path else None
    return jnp.full_like(x, t) if name in ("count", "round_step") else x

  return jax.tree_util.tree_map_with_path(set_field, opt_state)


def build(model_name: str, method: str, images: np.ndarray, labels: np.ndarray, *,
          sparsity: float, steps_per_epoch: int, epochs: int, donate: bool = True
          ) -> dict[str, Any]:
  """The compiled step of ``method`` on ``model_name`` (donating its state, as the main job's
  step does, unless ``donate`` is false), its compile time (s) and its state after two real
  steps from init."""
  model = models.get_model(model_name)
  options = method_options(method, model_name)
  tx = recipes.make_optimizer(method, sparsity, steps_per_epoch=steps_per_epoch, epochs=epochs,
                              **options)
  state = copy_of(training.init(model, tx, images[:1], seed=0, init_params=functools.partial(
      recipes.init_params, method, seed=0, **options)))  # leaves that share a buffer, own ones
  start = time.perf_counter()
  step = jax.jit(training.make_train_step(model, tx), donate_argnums=(0,) if donate else ()
                 ).lower(state, images, labels).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, _ = step(state, images, labels)
  return {"step": step, "state": jax.block_until_ready(state), "compile_s": compile_s}


def copy_of(state: Any) -> Any:
  """A copy of ``state`` in new buffers: a donating step consumes the one it is given."""
  return jax.tree.map(jnp.copy, state)


def calls_for(fn, target_ms: float = 20.0) -> int:
  """How many back-to-back calls of ``fn()`` take about ``target_ms`` (at least 1)."""
  fn()
  start = time.perf_counter()
  for _ in range(3):
    fn()
  each_ms = (time.perf_counter() - start) * 1e3 / 3
  return max(1, round(target_ms / each_ms))


def run_model(model_name: str, methods: list[str], *, batch: int, repeats: int,
              sparsity: float, steps_per_epoch: int, epochs: int, calls: int | None = None,
              trials: int = 3, donate: bool = True,
              hlo_dir: str | None = None) -> list[dict[str, Any]]:
  """One row per method and kind of step (``'steady'``, ``'refresh'``): times in ms, ratio to
  the dense step of the same interleaved rounds (the median over ``trials`` passes over every
  method, each ratio in ``trial_ratios``), compile times in s. With ``hlo_dir``, each compiled
  step's HLO text (dense included) is written there."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, *models.input_shape(model_name))).astype(np.float32)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  kwargs = {"sparsity": sparsity, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
            "donate": donate}
  dense = build(model_name, "dense", images, labels, **kwargs)
  dense_state = at_step(dense["state"], epochs // 2 * steps_per_epoch)
  if calls is None:
    calls = calls_for(lambda: jax.block_until_ready(
        dense["step"](copy_of(dense_state), images, labels)))
  built = {}
  for method in methods:
    built[method] = build(model_name, method, images, labels, **kwargs)
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      for name, b in (("dense", dense), (method, built[method])):
        with open(os.path.join(hlo_dir, f"{model_name}_{name}.hlo.txt"), "w") as f:
          f.write(b["step"].as_text())
  cases = [(m, kind, count) for m in methods for kind, count in step_counts(
      m, steps_per_epoch, epochs)]
  timed = {}  # per case: the functions timed side by side, and their fresh arguments
  for method, kind, count in cases:
    b = built[method]
    fns = {"method": lambda s, b=b: jax.block_until_ready(b["step"](s, images, labels)),
           "dense": lambda s: jax.block_until_ready(dense["step"](s, images, labels))}
    state = at_step(b["state"], count)
    fresh = {"method": lambda s=state: copy_of(s), "dense": lambda: copy_of(dense_state)}
    if kind == "refresh" and method in REFRESH_POOL:
      fns["selection"] = selection_fn(REFRESH_POOL[method], b["state"].params, sparsity)
    timed[(method, kind, count)] = (fns, fresh)
  trial_samples = {case: [] for case in cases}
  for _ in range(trials):  # every case once per trial: a slow spell of the machine hits one
    for case in cases:
      fns, fresh = timed[case]
      trial_samples[case].append(time_samples(fns, None, repeats, calls, fresh))
  rows = []
  for (method, kind, count), runs in trial_samples.items():
    medians = [{name: statistics.median(t) for name, t in run.items()} for run in runs]
    ratios = [ms["method"] / ms["dense"] for ms in medians]
    fastest = {name: min(min(run[name]) for run in runs) for name in runs[0]}
    ms = {name: statistics.median(m[name] for m in medians) for name in medians[0]}
    rows.append({"model": model_name, "batch": batch, "method": method, "kind": kind,
                 "count": count, "calls": calls, "trials": trials,
                 "every_step_refreshes": method in EVERY_STEP,
                 "method_ms": ms["method"], "dense_ms": ms["dense"],
                 "ratio": statistics.median(ratios), "trial_ratios": ratios,
                 "ratio_of_fastest": fastest["method"] / fastest["dense"],
                 "compile_s": built[method]["compile_s"], "dense_compile_s": dense["compile_s"]})
    if "selection" in ms:
      budget = [m["method"] / (m["dense"] + m["selection"]) for m in medians]
      rows[-1].update(selection_ms=ms["selection"],
                      vs_dense_plus_selection=statistics.median(budget))
    print(f"# {model_name} {method} {kind} (count {count}): {rows[-1]['ratio']:.3f}x "
          f"(trials {', '.join(f'{r:.3f}' for r in ratios)})", file=sys.stderr, flush=True)
  return rows


def step_counts(method: str, steps_per_epoch: int, epochs: int) -> list[tuple[str, int]]:
  """``(kind, count)`` of the steps timed for ``method``: the steady one, and the refresh one
  where the method has one (:func:`refresh_count`)."""
  kinds = [("steady", epochs // 2 * steps_per_epoch)]
  refresh = refresh_count(method, steps_per_epoch, epochs)
  if refresh is not None:
    kinds.append(("refresh", refresh))
  return kinds


def selection_fn(distribution: str, params: Any, sparsity: float):
  """``_ -> masks``: one mask refresh alone, the top-k of ``|W|`` over the prunable leaves of
  ``params`` at ``sparsity`` with ``distribution`` (jitted; the argument is ignored)."""
  selection = og.Selection(distribution)
  select = jax.jit(lambda p: selection.masks(jax.tree.map(jnp.abs, p), p, 1.0, sparsity))
  return lambda x: jax.block_until_ready(select(params))


def refresh_note(method: str) -> str:
  if method in INIT_ONLY:
    return "none (mask from init)"
  if method in EVERY_STEP:
    return "every step"
  return "-"


def markdown(rows: list[dict[str, Any]]) -> str:
  """One line per model and method: steady and refresh step / dense, ms, compile times."""
  head = ["model (batch)", "method", "steady step / dense [trials] (fastest / fastest)",
          "refresh step / dense",
          "refresh / (dense + selection)", "dense step ms", "compile s (method / dense)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
  for r in rows:
    by_key.setdefault((r["model"], r["method"]), {})[r["kind"]] = r
  for (model, method), kinds in by_key.items():
    steady = kinds["steady"]
    refresh = (f"{kinds['refresh']['ratio']:.3f}" if "refresh" in kinds
               else refresh_note(method))
    if method in EVERY_STEP:
      refresh = f"{steady['ratio']:.3f} (every step)"
    budget = kinds.get("refresh", {}).get("vs_dense_plus_selection")
    budget = "-" if budget is None else (
        f"{budget:.3f} (selection {kinds['refresh']['selection_ms']:.3g} ms)")
    spread = f"{min(steady['trial_ratios']):.2f}-{max(steady['trial_ratios']):.2f}"
    lines.append(f"| {model} ({steady['batch']}) | {method} | {steady['ratio']:.3f} "
                 f"[{spread}] ({steady['ratio_of_fastest']:.3f}) | "
                 f"{refresh} | {budget} | {steady['dense_ms']:.3g} | "
                 f"{steady['compile_s']:.2f} / {steady['dense_compile_s']:.2f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="lenet300100", choices=sorted(BATCH))
  parser.add_argument("--batch", type=int, default=None, help="default: 128, ResNet-50 4")
  parser.add_argument("--methods", default=None,
                      help="comma-separated (default: every registered method but dense)")
  parser.add_argument("--repeats", type=int, default=31, help="interleaved rounds")
  parser.add_argument("--no-donate", dest="donate", action="store_false",
                      help="steps that do not donate their state (unchanged state leaves, such "
                           "as masks between refreshes, are then copied to new buffers)")
  parser.add_argument("--trials", type=int, default=3,
                      help="passes over every method; each ratio is the median of its trials")
  parser.add_argument("--calls", type=int, default=None,
                      help="back-to-back calls per sample (default: about 20 ms of dense steps)")
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--steps-per-epoch", type=int, default=100)
  parser.add_argument("--epochs", type=int, default=10, help="even (see refresh_count)")
  parser.add_argument("--quick", action="store_true",
                      help=f"LeNet-300-100, {', '.join(QUICK_METHODS)}, 3 repeats")
  parser.add_argument("--out", default=None, help="JSON file to write")
  parser.add_argument("--dump-hlo", default=None, metavar="DIR",
                      help="write each compiled step's HLO text to DIR/<model>_<method>.hlo.txt")
  args = parser.parse_args(argv)
  if args.epochs % 2:
    parser.error("--epochs must be even (RST's extrusion then ends at an epoch boundary)")
  model = "lenet300100" if args.quick else args.model
  methods = list(QUICK_METHODS) if args.quick else method_names(args.methods)
  repeats = 3 if args.quick else args.repeats
  batch = args.batch or BATCH[model]
  rows = run_model(model, methods, batch=batch, repeats=repeats, sparsity=args.sparsity,
                   steps_per_epoch=args.steps_per_epoch, epochs=args.epochs,
                   calls=1 if args.quick else args.calls, donate=args.donate,
                   trials=1 if args.quick else args.trials,
                   hlo_dir=args.dump_hlo)
  table = markdown(rows)
  print(table)
  if args.out:
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "jax": jax.__version__,
               "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "python": sys.version.split()[0]}
    with open(args.out, "w") as f:
      json.dump({"machine": machine, "repeats": repeats, "sparsity": args.sparsity,
                 "steps_per_epoch": args.steps_per_epoch, "epochs": args.epochs, "rows": rows,
                 "table": table}, f, indent=1)
  return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
