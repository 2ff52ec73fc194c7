"""Global mask refresh: exact top-k over a ResNet-50-shaped score tree, vs a full sort.

For N from 1M to 25.5M (the ResNet-50 prunable kernels: 54 leaves, every leaf scaled by
N / 25.5M), times the jitted ``select.global_topk_masks`` at 90% sparsity on normal-distributed
scores, on OptG-like scores (half exact zeros, the rest tiny), and on all-tied scores, and
``jnp.sort`` of the same N scores concatenated, all in one run on this machine. Times are medians
over ``--repeats`` runs after compilation (``block_until_ready``); nothing is asserted.

  python benchmarks/mask_refresh.py            # full table
  python benchmarks/mask_refresh.py --quick    # small N only, a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import models
from optg_jax import select


def resnet50_shapes() -> list[tuple[int, ...]]:
  variables = jax.eval_shape(lambda: models.get_model("resnet50").init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return [x.shape for x in jax.tree.leaves(variables["params"]) if len(x.shape) >= 2]


def scaled(shapes: list[tuple[int, ...]], n: int) -> list[tuple[int, ...]]:
  """Flat leaf shapes with the proportions of ``shapes`` and about ``n`` entries in all."""
  full = sum(int(np.prod(s)) for s in shapes)
  return [(max(1, round(int(np.prod(s)) * n / full)),) for s in shapes]


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="N = 100k and 1M only")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sparsity", type=float, default=0.9)
  args = parser.parse_args()
  shapes = resnet50_shapes()
  full = sum(int(np.prod(s)) for s in shapes)
  sizes = [100_000, 1_000_000] if args.quick else [1_000_000, 4_000_000, 12_000_000, full]
  print(f"# {platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}; ResNet-50 prunable kernels: {len(shapes)} leaves, "
        f"{full:,} weights; sparsity {args.sparsity}")
  print("| N | leaves | normal (ms) | OptG-like (ms) | all tied (ms) | jnp.sort (ms) "
        "| sort / normal |\n|---|---|---|---|---|---|---|")
  topk = jax.jit(select.global_topk_masks)
  sort = jax.jit(lambda leaves: jnp.sort(jnp.concatenate([x.ravel() for x in leaves])))
  for n in sizes:
    leaf_shapes = shapes if n == full else scaled(shapes, n)
    n = sum(int(np.prod(s)) for s in leaf_shapes)
    keys = jax.random.split(jax.random.key(n), 2 * len(leaf_shapes))
    normal = [jax.random.normal(k, s) for k, s in zip(keys, leaf_shapes)]
    optg_like = [jnp.where(jax.random.bernoulli(k, 0.5, s), 0.0, 1e-6 * x)
                 for k, s, x in zip(keys[len(leaf_shapes):], leaf_shapes, normal)]
    tied = [jnp.zeros(s) for s in leaf_shapes]
    k = select.keep_count(n, args.sparsity)
    t_normal = median_ms(topk, normal, k, repeats=args.repeats)
    t_optg = median_ms(topk, optg_like, k, repeats=args.repeats)
    t_tied = median_ms(topk, tied, k, repeats=args.repeats)
    t_sort = median_ms(sort, normal, repeats=max(1, args.repeats // 2))
    print(f"| {n:,} | {len(leaf_shapes)} | {t_normal:.1f} | {t_optg:.1f} | {t_tied:.1f} "
          f"| {t_sort:.0f} | {t_sort / t_normal:.0f}x |", flush=True)


if __name__ == "__main__":
  main()
