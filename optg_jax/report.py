"""What a sparse model keeps: per-layer parameters and FLOPs, a summary table, and plots.

FLOPs are counted per example for each prunable kernel (a multiply-add is 2 FLOPs): a kernel
``w`` applied at ``positions`` output locations costs ``2·w.size·positions``, that is
``2·k·k·cin·cout·Hout·Wout`` for a conv (``cin/groups`` for grouped and depthwise ones) and
``2·in·out`` for a dense layer. The output shapes come from ``jax.eval_shape`` of the model with
flax's ``capture_intermediates`` (nothing is computed). A sparse kernel keeps its FLOPs in
proportion to its weight density. Biases, normalisation and activations are not counted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from optg_jax import _extras

_extras.require("optg_jax.report", "flax", "flax")

import flax.linen as nn
import jax
import numpy as np

from optg_jax import _paths
from optg_jax import masks as masks_lib

PyTree = Any


class LayerReport(NamedTuple):
  """One prunable kernel: ``name`` (param path), ``shape``, ``params`` and ``kept`` weights,
  ``flops`` of the dense layer and ``kept_flops`` (``flops · kept/params``), per example.
  ``flops`` is ``None`` where the kernel's output shape is unknown (it was not a module's
  kernel)."""
  name: str
  shape: tuple[int, ...]
  params: int
  kept: int
  flops: int | None
  kept_flops: float | None

  @property
  def density(self) -> float:
    return self.kept / self.params


class Report(NamedTuple):
  """A model's sparsity: ``layers`` (prunable kernels), ``total_params`` (every parameter,
  biases and norms included), and the totals over the prunable layers."""
  layers: tuple[LayerReport, ...]
  total_params: int

  @property
  def params(self) -> int:
    return sum(layer.params for layer in self.layers)

  @property
  def kept(self) -> int:
    return sum(layer.kept for layer in self.layers)

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.params

  @property
  def flops(self) -> int:
    return sum(layer.flops or 0 for layer in self.layers)

  @property
  def kept_flops(self) -> float:
    return sum(layer.kept_flops or 0.0 for layer in self.layers)


def layer_flops(model: nn.Module, variables: PyTree, sample: Any) -> dict[str, int]:
  """Dense FLOPs per example of each kernel of ``model``, keyed by param path (``'fc1/kernel'``),
  in the order the network runs its layers.

  Args:
    model: a flax linen module called as ``model.apply(variables, x, train=False)``.
    variables: its variables (``{'params': ..., 'batch_stats': ...}``); arrays or
      ``jax.ShapeDtypeStruct``s.
    sample: an input batch (or its ``jax.ShapeDtypeStruct``), e.g. ``(1, H, W, C)``.

  Returns:
    FLOPs of every param leaf with ``ndim >= 2`` whose module's output was captured, in the
    order the modules are first called.
  """
  calls: dict[tuple[str, ...], int] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.scope is not None:
      calls.setdefault(tuple(context.module.scope.path), len(calls))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                 mutable=["intermediates"]), variables, sample)
  positions = {}
  for path, out in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    keys = _keys(path)
    module = keys[:keys.index("__call__")]
    per_example = math.prod(out.shape[1:-1]) if len(out.shape) > 1 else 1
    positions[module] = positions.get(module, 0) + per_example
  flops = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    module = _keys(path)[:-1]
    if np.ndim(leaf) >= 2 and module in positions:
      flops.append((calls.get(module, len(calls)), _paths.path_str(path),
                    2 * math.prod(np.shape(leaf)) * positions[module]))
  return {name: count for _, name, count in sorted(flops, key=lambda f: f[0])}


def build(masks: PyTree, params: PyTree, flops: Mapping[str, int] | None = None) -> Report:
  """The per-layer report of ``masks`` (bool, the params' treedef; scalar leaves not prunable).

  ``flops`` (from :func:`layer_flops`) gives each kernel's dense FLOPs by param path; its order
  (the order the network runs) is the order of the layers, the others follow in ``jax.tree``
  order.
  """
  flops = flops or {}
  summary = masks_lib.sparsity_summary(masks)
  shapes = {_paths.path_str(p): np.shape(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  order = {name: i for i, name in enumerate(flops)}
  layers = []
  for name, leaf in sorted(summary.leaves.items(), key=lambda kv: order.get(kv[0], len(order))):
    kept, dense = int(leaf.kept), flops.get(name)
    kept_flops = None if dense is None else dense * kept / leaf.total
    layers.append(LayerReport(name, shapes[name], leaf.total, kept, dense, kept_flops))
  total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
  return Report(tuple(layers), total)


def summary_table(report: Report, *, method: str, sparse_accuracy: float | None,
                  dense_accuracy: float | None) -> str:
  """A plain-text table: dense-equivalent vs sparse accuracy, parameters and FLOPs, then per
  layer the shape, kept weights, sparsity and FLOPs. Unknown accuracies print ``n/a``."""
  kept_all = report.total_params - report.params + report.kept
  rows = [
      ("", "dense", method),
      ("test accuracy", _pct(dense_accuracy), _pct(sparse_accuracy)),
      ("sparsity (prunable)", "0.00%", _pct(report.sparsity)),
      ("params (prunable)", f"{report.params:,}",
       f"{report.kept:,} ({_pct(report.kept / report.params)})"),
      ("params (all)", f"{report.total_params:,}",
       f"{kept_all:,} ({_pct(kept_all / report.total_params)})"),
      ("FLOPs/example", _count(report.flops),
       f"{_count(report.kept_flops)} ({_pct(_ratio(report.kept_flops, report.flops))})"),
  ]
  head = _columns(rows, ("<", ">", ">"))
  layers = [("layer", "shape", "params", "kept", "sparsity", "FLOPs", "kept FLOPs")]
  layers += [(l.name, "x".join(map(str, l.shape)), f"{l.params:,}", f"{l.kept:,}",
              _pct(1 - l.density), _count(l.flops), _count(l.kept_flops))
             for l in report.layers]
  return head + "\n\n" + _columns(layers, ("<", ">", ">", ">", ">", ">", ">"))


def to_json(report: Report) -> dict[str, Any]:
  """``report`` as a JSON-ready dict (totals and a list of layers)."""
  return {"params": report.params, "kept": report.kept, "sparsity": report.sparsity,
          "total_params": report.total_params, "flops": report.flops,
          "kept_flops": report.kept_flops,
          "layers": [dict(layer._asdict(), shape=list(layer.shape), density=layer.density)
                     for layer in report.layers]}


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a JSON-lines file (``[]`` if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_history(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]], *,
                 label: str, dense: Sequence[Mapping[str, Any]] = (),
                 final: Mapping[str, Any] | None = None) -> None:
  """PNG of test accuracy (left) and sparsity (right) per epoch.

  ``records`` (and the optional ``dense`` baseline's) hold ``epoch``, ``test_accuracy`` and
  ``sparsity``, as the lines of ``metrics.jsonl``: each epoch's accuracy with the mask it was
  trained with. ``final`` (the same keys) is the final model, drawn as its own point (for OptG
  the last epoch's mask once at the target; with ``final='reselect'`` or a ramp that never
  reached it, the final scores' mask at the target, which no epoch trained with).
  """
  fig, (acc, spa) = _figure(2, (10, 4))
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  for runs, name in ((records, label), (dense, "dense")):
    if runs:
      acc.plot([r["epoch"] for r in runs], [100 * r["test_accuracy"] for r in runs],
               marker=".", label=name)
      spa.plot([r["epoch"] for r in runs], [100 * r["sparsity"] for r in runs],
               marker=".", label=name)
  if final is not None:
    name = f"{label}, final model"
    acc.plot([final["epoch"]], [100 * final["test_accuracy"]], "r*", markersize=12, label=name)
    spa.plot([final["epoch"]], [100 * final["sparsity"]], "r*", markersize=12, label=name)
  acc.set(xlabel="epoch", ylabel="test accuracy (%)",
          title="test accuracy, with the mask each epoch trained with")
  spa.set(xlabel="epoch", ylabel="sparsity (%)", title="sparsity of the prunable weights",
          ylim=(-2, 102))
  for ax in (acc, spa):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
  _save(fig, path)


def plot_layer_density(path: str | os.PathLike[str], report: Report, *, title: str = "") -> None:
  """PNG bar chart of each prunable layer's density (kept fraction of its weights)."""
  names = [layer.name for layer in report.layers]
  fig, (ax,) = _figure(1, (max(6.0, 0.35 * len(names) + 2), 4.5))
  ax.bar(range(len(names)), [100 * layer.density for layer in report.layers])
  ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 4 else 0, fontsize=8)
  ax.set(ylabel="density (% of weights kept)",
         title=title or f"per-layer density, {100 * (1 - report.sparsity):.2f}% kept overall")
  ax.grid(axis="y", alpha=0.3)
  _save(fig, path)


def _figure(ncols: int, size: tuple[float, float]):
  # The object-oriented API renders with Agg and leaves pyplot's global backend alone.
  _extras.require("plotting in optg_jax.report", "train", "matplotlib")
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=size, layout="constrained")
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path) -> None:
  # pylint: disable-next=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  fig.savefig(os.fspath(path), dpi=100)


def _keys(path) -> tuple[str, ...]:
  return tuple(_paths.path_str((k,)) for k in path)


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else None


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}%"


def _count(x: float | None) -> str:
  if x is None:
    return "n/a"
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if x >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"


def _columns(rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(align))]
  return "\n".join("  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip()
                   for row in rows)
