"""Accuracy sweep on the embedded MNIST digits: LeNet-300-100, every method, 95/98/99 % sparsity.

Runs the reference chains of ``optg_jax.recipes`` (per-epoch warm-up + cosine SGD, momentum 0.9,
weight decay 5e-4 on all weights) for ``--epochs`` epochs at batch 100 on the 4,000-digit train
split and prints the final test accuracy on the 1,000 test digits, mean ± std over seeds.

  python benchmarks/mnist_accuracy.py --epochs 40 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from optg_jax import data
from optg_jax import models
from optg_jax import recipes
from optg_jax import training


def run(method: str, sparsity: float, seed: int, epochs: int, batch_size: int) -> float:
  train, test = data.load_mnist_5k(seed=seed)
  tx = recipes.make_optimizer(method, sparsity, steps_per_epoch=len(train.labels) // batch_size,
                              epochs=epochs, seed=seed)
  result = training.fit(models.get_model("lenet300100"), tx, train, test, epochs=epochs,
                        batch_size=batch_size, seed=seed)
  final, masks = training.final_model(result.state)  # what the compact file ships
  evaluate = jax.jit(training.make_eval_step(models.get_model("lenet300100")))
  return int(evaluate(final, test.images, test.labels)) / len(test.labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98, 0.99])
  parser.add_argument("--methods", nargs="+", default=["optg", "gmp", "snip", "magnitude",
                                                        "random"])
  args = parser.parse_args()
  print(f"# {platform.processor() or platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, jax {jax.__version__}; epochs {args.epochs}, "
        f"batch {args.batch_size}, seeds {args.seeds}")
  configs = [("dense", 0.0)] + [(m, p) for m in args.methods for p in args.sparsities]
  print(f"| method | sparsity | test accuracy (mean ± std) | seconds/run |\n|---|---|---|---|")
  for method, sparsity in configs:
    start = time.perf_counter()
    accs = [run(method, sparsity, s, args.epochs, args.batch_size) for s in args.seeds]
    per_run = (time.perf_counter() - start) / len(args.seeds)
    print(f"| {method} | {sparsity:.0%} | {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} "
          f"| {per_run:.1f} |", flush=True)


if __name__ == "__main__":
  main()
