"""OptG at short budgets: the reference ramp, the budget ramp, both selection rules and GMP.

LeNet-300-100 on mnist5k, batch 100, each method's reference chain (per-epoch warm-up + cosine
SGD, momentum 0.9, weight decay 5e-4), test accuracy of the final model (``training.final_model``:
what the compact file ships), for E epochs and target P, mean ± std over seeds, and in
parentheses the mean accuracy of the last epoch (its weights with the mask it trained with).
Nothing is asserted; the table of issue 11 comes from::

  python benchmarks/optg_short_budget.py --epochs 10 20 40 --sparsity 0.95 0.98 --seeds 0 1 2

and the comparison of the selection rules (``selection_rule`` of ``og.mask_optimizer``, with the
main job's ``ramp='auto'``) from::

  python benchmarks/optg_short_budget.py --epochs 10 20 --variants "optg auto, exact" \
      "optg auto, reference"
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from optg_jax import data
from optg_jax import models
from optg_jax import recipes
from optg_jax import training

BATCH = 100
VARIANTS = {"optg (reference ramp)": ("optg", {"ramp": "reference"}),
            "optg (budget ramp)": ("optg", {"ramp": "budget"}),
            "optg (budget ramp, reselect)": ("optg", {"ramp": "budget", "final": "reselect"}),
            "optg auto, exact": ("optg", {"ramp": "auto", "selection_rule": "exact"}),
            "optg auto, reference": ("optg", {"ramp": "auto", "selection_rule": "reference"}),
            "gmp": ("gmp", {})}
DEFAULT_VARIANTS = ("optg (reference ramp)", "optg (budget ramp)", "gmp")


def final_accuracy(method: str, options: dict, sparsity: float, epochs: int, seed: int,
                   trace: bool = False) -> tuple[float, float]:
  """The final model's test accuracy and the last epoch's (its weights with the mask it trained
  with); ``trace`` prints the sparsity each epoch trained at."""
  train, test = data.load_mnist_5k(seed=seed)
  tx = recipes.make_optimizer(method, sparsity, steps_per_epoch=len(train.labels) // BATCH,
                              epochs=epochs, seed=seed, **options)
  model = models.get_model("lenet300100")
  result = training.fit(model, tx, train, test, epochs=epochs, batch_size=BATCH, seed=seed)
  evaluate = jax.jit(training.make_eval_step(model))
  final, masks = training.final_model(result.state)
  accuracy = int(evaluate(final, test.images, test.labels)) / len(test.labels)
  if trace:
    print(json.dumps({"method": method, "options": options, "sparsity": sparsity, "seed": seed,
                      "epochs": epochs, "trained_sparsity": [round(s, 5) for s in result.sparsity],
                      "final_sparsity": training.sparsity_of(masks), "accuracy": accuracy,
                      "last_epoch_accuracy": result.test_accuracy[-1]}), flush=True)
  return accuracy, result.test_accuracy[-1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 40])
  parser.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.98])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                      default=list(DEFAULT_VARIANTS))
  parser.add_argument("--trace", action="store_true",
                      help="print each run's per-epoch trained sparsity and final sparsity")
  args = parser.parse_args()
  print("| P | E | " + " | ".join(args.variants) + " |")
  print("|---|---|" + "---|" * len(args.variants))
  for p in args.sparsity:
    for e in args.epochs:
      means, runs = {}, {}
      for name in args.variants:
        method, options = VARIANTS[name]
        runs[name] = [final_accuracy(method, options, p, e, s, args.trace) for s in args.seeds]
        final, last = 100 * np.asarray(runs[name]).T
        means[name] = (float(final.mean()), float(final.std()), float(last.mean()))
      print(f"| {p} | {e} | " + " | ".join(f"{m:.2f} ± {s:.2f} ({last:.2f})"
                                           for m, s, last in means.values()) + " |", flush=True)
      print(json.dumps({"sparsity": p, "epochs": e, "seeds": args.seeds,
                        "mean_std_last": means, "final_last_per_seed": runs}), flush=True)


if __name__ == "__main__":
  main()
