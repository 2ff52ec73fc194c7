"""Optimizer-state memory: bytes per prunable weight of each method's state, beside SGD and Adam.

For each model and each method of ``optg_jax.recipes.names()`` the reference chain
(``recipes.make_optimizer``) is initialised abstractly (``jax.eval_shape``: shapes and dtypes,
nothing allocated), and its state's bytes (``size · itemsize`` of every array leaf) are split:

* ``method``: the method's registered state (``og.methods.base.find_state``: scores and their
  optimizer's state, masks, logits, snapshots, counters), *without* the weights' optimizer that
  methods with rounds own (``RoundsState.inner_state``);
* ``masks``: the part of ``method`` that is the masks the forward pass uses (bool: 1 byte per
  weight; a scalar ``True`` at non-prunable leaves; real multipliers for soft masks);
* ``optimizer``: everything else in the chain's state, the weights' optimizer (SGD momentum);
* ``total``: the whole state.

Every figure is divided by the model's prunable weights ``N``: the entries of the kernels the
default filter selects (``og.masks.prunable_tree``, ``ndim >= 2``), the same ``N`` for every row;
biases and norms are in the numerators (e.g. SGD momentum is a little over 4 bytes per weight).
The rows ``sgd_momentum`` and ``adam`` are ``optax.sgd(0.1, momentum=0.9)`` and
``optax.adam(1e-3)`` alone. Prints a Markdown table and writes JSON::

  python benchmarks/memory.py --out memory.json    # LeNet-300-100, ResNet-20, ResNet-50
  python benchmarks/memory.py --quick              # LeNet, optg and magnitude (run in tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optg_jax import masks as masks_lib
from optg_jax import models
from optg_jax import recipes
from optg_jax.methods import base
from optg_jax.methods import rounds
from step_overhead import method_names  # what both benchmarks measure, and with which options
from step_overhead import method_options

MODELS = ("lenet300100", "resnet20", "resnet50")
QUICK_METHODS = ("optg", "magnitude")
BASELINES = {"sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
             "adam": lambda: optax.adam(1e-3)}


def nbytes(tree: Any) -> int:
  """Bytes of the array leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
  return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def split_state(opt_state: Any) -> dict[str, int]:
  """Bytes of ``opt_state`` split as the module doc says: ``method``, ``masks``, ``optimizer``,
  ``total``."""
  total = nbytes(opt_state)
  if not base.has_state(opt_state):
    return {"method": 0, "masks": 0, "optimizer": total, "total": total}
  state = base.find_state(opt_state)
  own = state._replace(inner_state=None) if isinstance(state, rounds.RoundsState) else state
  method = nbytes(own)
  return {"method": method, "masks": nbytes(state.masks), "optimizer": total - method,
          "total": total}


def abstract_params(model_name: str) -> Any:
  """The model's params as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  model = models.get_model(model_name)
  sample = jnp.zeros((1, *models.input_shape(model_name)), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))["params"]


def run_model(model_name: str, methods: list[str], sparsity: float) -> list[dict[str, Any]]:
  """One row per optimizer: bytes and bytes per prunable weight of each part of its state."""
  params = abstract_params(model_name)
  n = sum(int(np.prod(p.shape)) for p, keep in zip(
      jax.tree.leaves(params), jax.tree.leaves(masks_lib.prunable_tree(params))) if keep)
  chains = {name: make() for name, make in BASELINES.items()}
  for method in methods:
    chains[method] = recipes.make_optimizer(method, sparsity, steps_per_epoch=100, epochs=10,
                                            **method_options(method, model_name))
  rows = []
  for name, tx in chains.items():
    parts = split_state(jax.eval_shape(tx.init, params))
    rows.append({"model": model_name, "method": name, "prunable_weights": n,
                 **{f"{k}_bytes": v for k, v in parts.items()},
                 **{f"{k}_bytes_per_weight": v / n for k, v in parts.items()}})
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  head = ["model (N prunable)", "method", "method state B/w", "of which masks B/w",
          "weights' optimizer B/w", "total B/w", "total MB"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append(
        f"| {r['model']} ({r['prunable_weights']:,}) | {r['method']} | "
        f"{r['method_bytes_per_weight']:.2f} | {r['masks_bytes_per_weight']:.2f} | "
        f"{r['optimizer_bytes_per_weight']:.2f} | {r['total_bytes_per_weight']:.2f} | "
        f"{r['total_bytes'] / 1e6:.1f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--methods", default=None,
                      help="comma-separated (default: every registered method but dense)")
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--quick", action="store_true",
                      help=f"LeNet-300-100, {', '.join(QUICK_METHODS)}")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args(argv)
  model_names = ["lenet300100"] if args.quick else args.models.split(",")
  methods = list(QUICK_METHODS) if args.quick else method_names(args.methods)
  rows = [r for m in model_names for r in run_model(m, methods, args.sparsity)]
  table = markdown(rows)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "sparsity": args.sparsity, "rows": rows,
                 "table": table}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
