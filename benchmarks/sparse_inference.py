"""Sparse inference benchmark: forward time dense vs sparse layouts, and file size dense vs compact.

Models: LeNet-300-100 (784-300-100-10) and a wide MLP (4096-4096-4096-10), every kernel pruned
to the same sparsity by magnitude (random normal weights), ReLU between layers, biases kept.
For each sparsity (90/95/98/99 %) and batch (1, 64) it times one forward pass (median of
``--repeats`` after a warm-up, milliseconds) of:

  dense       jitted JAX, ``x @ W + b`` with the masked dense W
  bcoo        jitted JAX, ``jax.experimental.sparse.BCOO`` W (``load_sparse(layout='bcoo')``)
  jax_csr     jitted JAX, CSR of Wᵀ as a gather ``x[:, col] * val`` and a ``segment_sum`` by row
  scipy_csr   NumPy/SciPy on the host, ``(Wᵀ_csr @ xᵀ)ᵀ`` (CPU deployment outside JAX)

and writes the compact file (``optg_jax.export.save``) beside the dense ``.npz`` of the same
params. Prints a Markdown table (time relative to dense; < 1 is faster) and writes JSON::

  python benchmarks/sparse_inference.py --out sparse_inference.json
  python benchmarks/sparse_inference.py --quick      # LeNet only, 2 sparsities, a few repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from optg_jax import export

MODELS = {"lenet300100": (784, 300, 100, 10), "mlp4096": (4096, 4096, 4096, 10)}
LAYOUTS = ("dense", "bcoo", "jax_csr", "scipy_csr")


def mlp_params(widths: tuple[int, ...], seed: int = 0) -> dict:
  """``{"fc{i}": {"kernel": (in, out) float32, "bias": (out,) float32}}`` with N(0, 1/in)."""
  rng = np.random.default_rng(seed)
  return {f"fc{i}": {"kernel": (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
                     "bias": (0.01 * rng.standard_normal(b)).astype(np.float32)}
          for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}


def magnitude_masks(params: dict, sparsity: float) -> dict:
  """Per kernel, the ``N - floor(sparsity·N)`` largest ``|W|`` kept; biases all kept."""

  def mask(w):
    keep = w.size - int(np.floor(sparsity * w.size))
    flat = np.zeros(w.size, bool)
    flat[np.argpartition(np.abs(w).ravel(), w.size - keep)[w.size - keep:]] = True
    return flat.reshape(w.shape)

  return {k: {"kernel": mask(v["kernel"]), "bias": np.bool_(True)} for k, v in params.items()}


def _jax_csr(w: np.ndarray) -> tuple:
  """``(values, cols, rows, n_out)`` of Wᵀ in CSR order, for :func:`_csr_matmul`."""
  wt = scipy.sparse.csr_array(np.ascontiguousarray(w.T))
  rows = np.repeat(np.arange(wt.shape[0], dtype=np.int32), np.diff(wt.indptr))
  return (jnp.asarray(wt.data), jnp.asarray(wt.indices.astype(np.int32)), jnp.asarray(rows),
          wt.shape[0])


def _csr_matmul(x: jax.Array, csr: tuple) -> jax.Array:
  """``x @ W`` for ``x`` (batch, in) from Wᵀ's CSR: gather, multiply, sum by output row."""
  values, cols, rows, n_out = csr
  prod = x[:, cols] * values  # (batch, nnz)
  return jax.ops.segment_sum(prod.T, rows, num_segments=n_out, indices_are_sorted=True).T


def forward_fns(params: dict, sparse_bcoo: dict) -> dict[str, Callable]:
  """One forward pass per layout: ``fn(x) -> logits`` (x a NumPy (batch, in) array)."""
  names = sorted(params, key=lambda k: int(k[2:]))
  dense_w = [(jnp.asarray(params[k]["kernel"]), jnp.asarray(params[k]["bias"])) for k in names]
  bcoo_w = [(sparse_bcoo[k]["kernel"], jnp.asarray(params[k]["bias"])) for k in names]
  csr_w = [(_jax_csr(params[k]["kernel"]), jnp.asarray(params[k]["bias"])) for k in names]
  host_w = [(scipy.sparse.csr_array(np.ascontiguousarray(params[k]["kernel"].T)),
             params[k]["bias"]) for k in names]

  def chain(matmul, weights, relu):
    def run(x):
      for i, (w, b) in enumerate(weights):
        x = matmul(x, w) + b
        x = relu(x) if i < len(weights) - 1 else x
      return x
    return run

  jitted = {name: jax.jit(chain(mm, ws, jax.nn.relu)) for name, mm, ws in (
      ("dense", jnp.matmul, dense_w), ("bcoo", lambda x, w: x @ w, bcoo_w),
      ("jax_csr", _csr_matmul, csr_w))}
  host = chain(lambda x, w: (w @ x.T).T, host_w, lambda x: np.maximum(x, 0))
  fns = {k: (lambda f: lambda x: f(x).block_until_ready())(f) for k, f in jitted.items()}
  fns["scipy_csr"] = host
  return fns


def time_ms(fns: dict[str, Callable], x: Any, repeats: int, calls: int = 1,
            fresh: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
  """Median wall time of each ``fn(x)`` in milliseconds (`time_samples`)."""
  samples = time_samples(fns, x, repeats, calls, fresh)
  return {name: statistics.median(t) for name, t in samples.items()}


def time_samples(fns: dict[str, Callable], x: Any, repeats: int, calls: int = 1,
                 fresh: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
  """``repeats`` wall times of each ``fn(x)`` in milliseconds, after two warm-up calls each.

  The layouts take turns (one sample each per round), so a load change on a shared machine
  affects all of them alike and the ratios to dense stay comparable. A sample is the mean of
  ``calls`` back-to-back calls (several for millisecond calls, whose single times are at the
  mercy of the scheduler). ``fresh[name]()`` makes a new argument for each call of that fn,
  outside the timed region (a step that donates its input needs a new one each call).
  """
  fresh = fresh or {}

  def args(name: str, n: int) -> list[Any]:
    return jax.block_until_ready([fresh[name]() for _ in range(n)]) if name in fresh else [x] * n

  for name, fn in fns.items():
    for a in args(name, 2):
      fn(a)
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      todo = args(name, calls)
      t0 = time.perf_counter()
      for a in todo:
        fn(a)
      times[name].append((time.perf_counter() - t0) * 1e3 / calls)
  return times


def run_case(model: str, sparsity: float, batches: tuple[int, ...], repeats: int,
             workdir: str) -> dict:
  """Sizes and times of one model at one sparsity; checks every layout against dense."""
  params = mlp_params(MODELS[model])
  masks = magnitude_masks(params, sparsity)
  path = os.path.join(workdir, f"{model}_{sparsity}.ospk")
  info = export.save(path, params, masks, metadata={"model": model, "method": "magnitude"})
  dense_path = os.path.join(workdir, f"{model}_{sparsity}.npz")
  np.savez(dense_path, **{f"{k}/{n}": v for k, d in params.items() for n, v in d.items()})
  loaded = export.load(path)
  fns = forward_fns(loaded, export.load_sparse(path, layout="bcoo"))
  row = {"model": model, "sparsity": sparsity, "compact_bytes": info["bytes"],
         "dense_bytes": os.path.getsize(dense_path)}
  row["size_ratio"] = row["compact_bytes"] / row["dense_bytes"]
  rng = np.random.default_rng(1)
  for batch in batches:
    x = rng.standard_normal((batch, MODELS[model][0])).astype(np.float32)
    ref = np.asarray(fns["dense"](x))
    for fn in fns.values():
      np.testing.assert_allclose(np.asarray(fn(x)), ref, rtol=1e-4, atol=1e-4)
    for name, ms in time_ms(fns, x, repeats).items():
      row[f"{name}_b{batch}_ms"] = ms
  return row


def markdown(rows: list[dict], batches: tuple[int, ...]) -> str:
  """The table: sizes, dense ms, and each sparse layout's time relative to dense."""
  head = ["model", "sparsity", "compact / dense file"]
  for b in batches:
    head += [f"dense ms b{b}"] + [f"{n} b{b}" for n in LAYOUTS[1:]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["model"], f"{r['sparsity']:.0%}",
             f"{r['compact_bytes'] / 1e6:.3g} MB / {r['dense_bytes'] / 1e6:.3g} MB "
             f"({r['size_ratio']:.1%})"]
    for b in batches:
      dense = r[f"dense_b{b}_ms"]
      cells += [f"{dense:.3g}"] + [f"{r[f'{n}_b{b}_ms'] / dense:.2f}x" for n in LAYOUTS[1:]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="LeNet only, 90 and 99 %%, 3 repeats")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sparsities", default="0.9,0.95,0.98,0.99")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args(argv)
  models = ["lenet300100"] if args.quick else args.models.split(",")
  sparsities = [0.9, 0.99] if args.quick else [float(s) for s in args.sparsities.split(",")]
  repeats = 3 if args.quick else args.repeats
  batches = (1, 64)
  with tempfile.TemporaryDirectory() as workdir:
    rows = [run_case(m, s, batches, repeats, workdir) for m in models for s in sparsities]
  table = markdown(rows, batches)
  print(table)
  if args.out:
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "jax": jax.__version__,
               "backend": jax.default_backend(), "python": sys.version.split()[0]}
    with open(args.out, "w") as f:
      json.dump({"machine": machine, "repeats": repeats, "rows": rows, "table": table}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
