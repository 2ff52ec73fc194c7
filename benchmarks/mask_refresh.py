"""Global mask refresh: exact top-k over a ResNet-50-shaped score tree, vs a full sort.

Two tables, all in one run on this machine, every time a median over ``--repeats`` runs after
compilation (``block_until_ready``); nothing is asserted but the masks' equality below.

1. Size sweep. For N from 1M to 25.5M (the ResNet-50 prunable kernels: 54 leaves, every leaf
   scaled by N / 25.5M), the jitted ``select.global_topk_masks`` at ``--sparsity`` on normal
   scores, on OptG-like scores (half exact zeros, the rest tiny) and on all-tied scores,
   ``jnp.sort`` of the same N scores concatenated, and one elementwise pass over them (each
   score compared with a constant, the result summed per leaf: what one step of the search
   reads), with the normal selection's time in passes.
2. Ways to select, on the ResNet-50 kernels in their own shapes (normal scores): the global
   top-k (its planner choosing the split keys), the same search bisecting the key range with
   plain count passes (``select.api._bisection_topk_masks``: same masks, no planner, so the
   planner's worth is measured), layerwise selection (``masks.layerwise_masks``, the same
   sparsity in every leaf), and the global top-k on scores sharded over 8 simulated CPU devices
   (a child process with ``--xla_force_host_platform_device_count=8``; each leaf split along
   its largest axis divisible by 8, replicated if none is; masks sharded the same). The child
   checks its masks equal the one-device ones and reads the compiled program (HLO) for
   all-gather / all-to-all / collective-permute ops that move more than 65,536 elements (the
   sample's size), and adds up what they move: a sharded selection should all-reduce counts
   and gather its sample only, not move scores. Every row
   gives its time in elementwise passes measured in the same process (the 8-device row also
   against the one-device pass: the simulated devices share this machine's cores).

  python benchmarks/mask_refresh.py --out mask_refresh.json   # full tables
  python benchmarks/mask_refresh.py --quick                   # small, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import masks as masks_lib
from optg_jax import models
from optg_jax import select

SAMPLE = 65_536  # the search's sample size: a collective moving more than this moves scores
DEVICES = 8
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute")


def resnet50_shapes() -> list[tuple[int, ...]]:
  variables = jax.eval_shape(lambda: models.get_model("resnet50").init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return [x.shape for x in jax.tree.leaves(variables["params"]) if len(x.shape) >= 2]


def scaled(shapes: list[tuple[int, ...]], n: int) -> list[tuple[int, ...]]:
  """Flat leaf shapes with the proportions of ``shapes`` and about ``n`` entries in all."""
  full = sum(int(np.prod(s)) for s in shapes)
  return [(max(1, round(int(np.prod(s)) * n / full)),) for s in shapes]


def narrowed(shapes: list[tuple[int, ...]], factor: int) -> list[tuple[int, ...]]:
  """The shapes with their two channel axes (the last two) divided by ``factor``."""
  return [s[:-2] + tuple(max(1, d // factor) for d in s[-2:]) for s in shapes]


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def normal_leaves(shapes, seed: int) -> list[jax.Array]:
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


@jax.jit
def one_pass(leaves):
  """One elementwise pass: every score compared with a constant, counted per leaf."""
  return [jnp.sum((x >= 0.5).astype(jnp.uint8).astype(jnp.float32)) for x in leaves]


def machine() -> str:
  return (f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}")


def size_sweep(shapes, sizes, sparsity, repeats) -> list[dict]:
  full = sum(int(np.prod(s)) for s in shapes)
  print("| N | leaves | normal (ms) | OptG-like (ms) | all tied (ms) | jnp.sort (ms) "
        "| one pass (ms) | normal / pass | sort / normal |\n"
        "|---|---|---|---|---|---|---|---|---|")
  topk = jax.jit(select.global_topk_masks)
  sort = jax.jit(lambda leaves: jnp.sort(jnp.concatenate([x.ravel() for x in leaves])))
  rows = []
  for n in sizes:
    leaf_shapes = shapes if n == full else scaled(shapes, n)
    n = sum(int(np.prod(s)) for s in leaf_shapes)
    normal = normal_leaves(leaf_shapes, n)
    keys = jax.random.split(jax.random.key(n + 1), len(leaf_shapes))
    optg_like = [jnp.where(jax.random.bernoulli(k, 0.5, s), 0.0, 1e-6 * x)
                 for k, s, x in zip(keys, leaf_shapes, normal)]
    tied = [jnp.zeros(s) for s in leaf_shapes]
    k = select.keep_count(n, sparsity)
    row = {"n": n, "leaves": len(leaf_shapes),
           "pass_ms": median_ms(one_pass, normal, repeats=repeats),
           "normal_ms": median_ms(topk, normal, k, repeats=repeats),
           "optg_like_ms": median_ms(topk, optg_like, k, repeats=repeats),
           "tied_ms": median_ms(topk, tied, k, repeats=repeats),
           "sort_ms": median_ms(sort, normal, repeats=max(1, repeats // 2))}
    rows.append(row)
    print(f"| {n:,} | {len(leaf_shapes)} | {row['normal_ms']:.1f} | {row['optg_like_ms']:.1f} "
          f"| {row['tied_ms']:.1f} | {row['sort_ms']:.0f} | {row['pass_ms']:.1f} "
          f"| {row['normal_ms'] / row['pass_ms']:.1f} | {row['sort_ms'] / row['normal_ms']:.0f}x |",
          flush=True)
  return rows


def ways(shapes, sparsity, repeats, hlo_path=None) -> tuple[list[dict], dict]:
  """Table 2: the ways to select on ``shapes`` (their own shapes), and the sharded check."""
  n = sum(int(np.prod(s)) for s in shapes)
  k = select.keep_count(n, sparsity)
  leaves = normal_leaves(shapes, 0)
  pass_ms = median_ms(one_pass, leaves, repeats=repeats)
  planner = jax.jit(select.global_topk_masks)
  bisection = jax.jit(select.api._bisection_topk_masks)  # pylint: disable=protected-access
  layerwise = jax.jit(lambda x: masks_lib.layerwise_masks(x, [True] * len(x), sparsity))
  want = planner(leaves, k)
  same = all(np.array_equal(a, b) for a, b in zip(want, bisection(leaves, k)))
  rows = [{"way": "one elementwise pass", "ms": pass_ms},
          {"way": "global (planner)", "ms": median_ms(planner, leaves, k, repeats=repeats)},
          {"way": "global (bisection only)",
           "ms": median_ms(bisection, leaves, k, repeats=repeats), "same_masks": same},
          {"way": "layerwise", "ms": median_ms(layerwise, leaves, repeats=repeats)}]
  for row in rows:
    row["passes"] = row["ms"] / pass_ms
  sharded = run_sharded(shapes, sparsity, repeats, [np.asarray(m) for m in want], hlo_path)
  rows.append({"way": f"global, {DEVICES} devices sharded", "ms": sharded["ms"],
               "passes": sharded["ms"] / pass_ms,
               "passes_there": sharded["ms"] / sharded["pass_ms"],
               "same_masks": sharded["same_masks"]})
  return rows, sharded


def run_sharded(shapes, sparsity, repeats, want, hlo_path=None) -> dict:
  """Runs `sharded_worker` in a child process with 8 CPU devices; compares its masks."""
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    spec = os.path.join(tmp, "spec.json")
    out = os.path.join(tmp, "out.npz")
    with open(spec, "w") as f:
      json.dump({"shapes": shapes, "sparsity": sparsity, "repeats": repeats,
                 "hlo": hlo_path and os.path.abspath(hlo_path)}, f)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + f" --xla_force_host_platform_device_count={DEVICES}").strip()}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--sharded-worker", spec,
                           out], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"the {DEVICES}-device child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    got = np.load(out)
    result["same_masks"] = all(np.array_equal(got[f"m{i}"], m) for i, m in enumerate(want))
  return result


def leaf_sharding(mesh, shape):
  """Split along the largest axis divisible by the device count (the first such), else replicate."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  axes = [i for i, d in enumerate(shape) if d % DEVICES == 0]
  if not axes:
    return NamedSharding(mesh, PartitionSpec())
  axis = max(axes, key=lambda i: (shape[i], -i))
  return NamedSharding(mesh, PartitionSpec(*[("d" if i == axis else None)
                                             for i in range(len(shape))]))


def moved_scores(hlo: str) -> tuple[list[str], int]:
  """The collectives (but all-reduce) of a compiled HLO text whose result, per device, holds
  more than SAMPLE elements (the sample's pieces are gathered, each far smaller), and the
  elements the results of all of them hold in all, per device."""
  found, total = [], 0
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if not m:
      continue
    dims = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
    size = sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in dims)
    total += size
    if size > SAMPLE:
      found.append(f"{m.group(2)} {m.group(1).strip()[:200]}")
  return found, total


def sharded_worker(spec_path: str, out_path: str) -> None:
  """Child process: the global top-k on scores sharded over 8 devices; prints one JSON line."""
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  with open(spec_path) as f:
    spec = json.load(f)
  shapes = [tuple(s) for s in spec["shapes"]]
  devices = jax.devices()
  assert len(devices) == DEVICES, devices
  mesh = Mesh(np.array(devices), ("d",))
  shardings = [leaf_sharding(mesh, s) for s in shapes]
  leaves = [jax.device_put(x, s) for x, s in zip(normal_leaves(shapes, 0), shardings)]
  n = sum(int(np.prod(s)) for s in shapes)
  k = select.keep_count(n, spec["sparsity"])
  topk = jax.jit(select.global_topk_masks, static_argnums=1, out_shardings=shardings)
  start = time.perf_counter()
  compiled = topk.lower(leaves, k).compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  if spec["hlo"]:
    with open(spec["hlo"], "w") as f:
      f.write(hlo)
  got = compiled(leaves)
  assert all(m.sharding == s for m, s in zip(got, shardings))
  np.savez(out_path, **{f"m{i}": np.asarray(m) for i, m in enumerate(got)})
  moved, moved_elements = moved_scores(hlo)
  sample = jax.eval_shape(lambda x: select._sample.sample_keys(x, n), leaves).shape[0]
  ops = {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES + ("all-reduce",)}
  print(json.dumps({"ms": median_ms(compiled, leaves, repeats=spec["repeats"]),
                    "pass_ms": median_ms(one_pass, leaves, repeats=spec["repeats"]),
                    "compile_s": compile_s, "collectives": ops, "moves_scores": moved,
                    "moved_elements": moved_elements, "sample": sample,
                    "sharded_leaves": sum(len(s.spec) > 0 for s in shardings)}))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="N = 200k; every 9th kernel with channels / 2")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--out", default=None, help="JSON file to write")
  parser.add_argument("--hlo", default=None, help="file to write the 8-device program's HLO to")
  parser.add_argument("--sharded-worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.sharded_worker:
    sharded_worker(*args.sharded_worker)
    return None
  shapes = resnet50_shapes()
  full = sum(int(np.prod(s)) for s in shapes)
  sizes = [200_000] if args.quick else [1_000_000, 4_000_000, 12_000_000, full]
  print(f"# {machine()}; ResNet-50 prunable kernels: {len(shapes)} leaves, {full:,} weights; "
        f"sparsity {args.sparsity}")
  way_shapes = narrowed(shapes, 2)[::18] if args.quick else shapes
  # --quick sweeps 3 leaves: compiling the 54-leaf search three times takes most of a minute.
  sweep = size_sweep(way_shapes if args.quick else shapes, sizes, args.sparsity, args.repeats)
  n = sum(int(np.prod(s)) for s in way_shapes)
  print(f"\n# {len(way_shapes)} leaves in their own shapes, {n:,} normal scores"
        f"{' (every 18th kernel, channels / 2)' if args.quick else ''}, sparsity {args.sparsity}")
  rows, sharded = ways(way_shapes, args.sparsity, args.repeats, args.hlo)
  print("| selection | ms | / one pass | same masks |\n|---|---|---|---|")
  for row in rows:
    note = ""
    if "passes_there" in row:
      note = f" ({row['passes_there']:.1f} of the {DEVICES}-device pass)"
    same = {True: "yes", False: "NO"}.get(row.get("same_masks"), "")
    print(f"| {row['way']} | {row['ms']:.1f} | {row['passes']:.1f}{note} | {same} |")
  print(f"\n{DEVICES}-device program: {sharded['sharded_leaves']} of {len(way_shapes)} leaves "
        f"sharded, compiled in {sharded['compile_s']:.0f} s; collectives "
        f"{sharded['collectives']}; moving more than {SAMPLE:,} elements: "
        f"{len(sharded['moves_scores'])}; all but all-reduce move {sharded['moved_elements']:,} "
        f"elements per device, the sample holds {sharded['sample']:,}")
  for op in sharded["moves_scores"][:10]:
    print(f"  {op}")
  result = {"machine": machine(), "sparsity": args.sparsity, "repeats": args.repeats,
            "quick": args.quick, "sizes": sweep, "ways": rows,
            "sharded": {key: sharded[key] for key in (
                "compile_s", "collectives", "moves_scores", "moved_elements", "sample",
                "sharded_leaves")}}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
