"""Per-layer sparsity allocation: uniform, Erdős–Rényi-Kernel (ERK) and global.

Every function takes ``shapes``, a pytree whose leaves are arrays or ``jax.ShapeDtypeStruct`` for
the prunable leaves and ``None`` for the others, and returns the same structure with a Python
float sparsity (fraction of the leaf's weights that are zero) per prunable leaf and ``None``
elsewhere. These are plain Python computations on static shapes, done once before training.

``overrides`` maps regular expressions to sparsities. A leaf whose path (``'params/Conv_0/kernel'``,
see :func:`optg_jax._paths.path_str`) contains a match (``re.search``) takes the value of the first
matching pattern; every pattern must match at least one prunable leaf.

Example::

  shapes = jax.tree.map(lambda x: x if x.ndim >= 2 else None, params)
  per_layer = distributions.erk(shapes, 0.9, overrides={"Dense_.*/kernel": 0.0})
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from optg_jax._paths import lookup_override, path_str

from optg_jax import _checks

DISTRIBUTIONS = ("uniform", "erk", "global")
"""Names accepted by :func:`layer_sparsities`."""

# Relative slack on weight counts for float rounding when checking that a budget can be met.
_REL_TOL = 1e-9


def _flatten(shapes: Any) -> tuple[list[tuple[str, tuple[int, ...] | None]], Any]:
  """``(path string, shape or None)`` per leaf in flattening order, and the treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: x is None)
  entries = []
  for path, leaf in leaves:
    name = path_str(path)
    if leaf is None:
      entries.append((name, None))
    elif hasattr(leaf, "shape"):
      entries.append((name, tuple(int(d) for d in leaf.shape)))
    else:
      raise TypeError(
          f"shapes: leaf {name!r} must be an array, a jax.ShapeDtypeStruct or None, "
          f"got {type(leaf).__name__}."
      )
  if all(shape is None for _, shape in entries):
    raise ValueError("shapes: no prunable leaves (every leaf is None).")
  return entries, treedef


def _resolve_overrides(
    entries: Sequence[tuple[str, tuple[int, ...] | None]],
    overrides: Mapping[str, float] | None,
) -> list[float | None]:
  """The override of each leaf (``None`` where none applies, and for non-prunable leaves)."""
  overrides = dict(overrides or {})
  for pattern, value in overrides.items():
    _checks.sparsity(value, f"overrides[{pattern!r}]")
  names = [name for name, shape in entries if shape is not None]
  for pattern in overrides:
    if not any(re.search(pattern, name) for name in names):
      raise ValueError(f"overrides: pattern {pattern!r} matches no prunable leaf.")
  return [
      None if shape is None else lookup_override(name, overrides) for name, shape in entries
  ]


def uniform(
    shapes: Any, sparsity: float, *, overrides: Mapping[str, float] | None = None
) -> Any:
  """The same sparsity for every prunable leaf.

  Args:
    shapes: pytree of arrays / ``jax.ShapeDtypeStruct`` (prunable) and ``None`` (not prunable).
    sparsity: fraction of each leaf's weights that are zero, in [0, 1).
    overrides: regex -> sparsity for the leaves whose path matches.

  Returns:
    ``shapes``' structure with a float sparsity per prunable leaf and ``None`` elsewhere.
  """
  sparsity = _checks.sparsity(sparsity, "sparsity")
  entries, treedef = _flatten(shapes)
  fixed = _resolve_overrides(entries, overrides)
  values = [
      None if shape is None else (sparsity if value is None else float(value))
      for (_, shape), value in zip(entries, fixed)
  ]
  return jax.tree_util.tree_unflatten(treedef, values)


def _solve_densities(sizes: Sequence[int], raw: Sequence[float], budget: float) -> list[float]:
  """Densities ``min(1, eps * raw_l)`` with ``sum(density_l * size_l) == budget``.

  Leaves whose density would exceed 1 are made dense and ``eps`` is solved again for the rest,
  until none exceeds 1. Making all of them dense at once gives the same result as RigL's one at a
  time: capping a leaf frees budget for the others, so ``eps`` only grows.
  """
  dense = [False] * len(sizes)
  while True:
    free = [i for i in range(len(sizes)) if not dense[i]]
    if not free:
      return [1.0] * len(sizes)
    remaining = budget - sum(sizes[i] for i in range(len(sizes)) if dense[i])
    eps = remaining / math.fsum(raw[i] * sizes[i] for i in free)
    over = [i for i in free if eps * raw[i] > 1.0]
    if not over:
      return [1.0 if dense[i] else eps * raw[i] for i in range(len(sizes))]
    for i in over:
      dense[i] = True


def erk(
    shapes: Any,
    sparsity: float,
    *,
    overrides: Mapping[str, float] | None = None,
    power_scale: float = 1.0,
) -> Any:
  """Erdős–Rényi-Kernel allocation (Evci et al. 2020, RigL), with a fixed total kept count.

  The density of leaf ``l`` is ``eps * ((Σ dims_l) / (Π dims_l)) ** power_scale`` (all dims of a
  conv kernel ``(kh, kw, in, out)``; Erdős–Rényi for a dense ``(in, out)`` kernel), with one
  factor ``eps`` chosen so that the prunable leaves keep ``(1 - sparsity) * N`` weights in total,
  ``N`` the number of prunable weights. A leaf whose density would exceed 1 is made dense and
  ``eps`` is solved again for the rest, until none exceeds 1. Overridden leaves keep their
  override and the others share what is left of the same total budget (unlike RigL, which
  leaves overridden layers out of the budget).

  Args:
    shapes: pytree of arrays / ``jax.ShapeDtypeStruct`` (prunable) and ``None`` (not prunable).
      Each prunable leaf is one layer; split stacked (scanned) kernels before calling.
    sparsity: fraction of all prunable weights that are zero, in [0, 1).
    overrides: regex -> sparsity for the leaves whose path matches.
    power_scale: exponent on the ERK ratio; 1 is ERK, 0 is uniform. Finite and >= 0.

  Returns:
    ``shapes``' structure with a float sparsity per prunable leaf and ``None`` elsewhere.

  Raises:
    ValueError: for a bad argument, a non-overridden leaf with no dims or no weights, or
      overrides that make the total budget impossible to meet.
  """
  sparsity = _checks.sparsity(sparsity, "sparsity")
  power_scale = float(power_scale)
  if not (math.isfinite(power_scale) and power_scale >= 0.0):
    raise ValueError(f"power_scale must be finite and >= 0, got {power_scale!r}.")
  entries, treedef = _flatten(shapes)
  fixed = _resolve_overrides(entries, overrides)

  prunable = [i for i, (_, shape) in enumerate(entries) if shape is not None]
  total = sum(math.prod(entries[i][1]) for i in prunable)
  asked = (1.0 - sparsity) * total
  kept_fixed = 0.0
  free = []
  for i in prunable:
    name, shape = entries[i]
    if fixed[i] is not None:
      kept_fixed += (1.0 - fixed[i]) * math.prod(shape)
    elif len(shape) < 1:
      raise ValueError(f"shapes: ERK needs at least 1 dim, leaf {name!r} has shape {shape}.")
    elif math.prod(shape) == 0:
      raise ValueError(f"shapes: leaf {name!r} has no weights (shape {shape}).")
    else:
      free.append(i)

  sizes = [math.prod(entries[i][1]) for i in free]
  budget = asked - kept_fixed
  slack = _REL_TOL * max(total, 1)
  if (not free and abs(budget) > slack) or (free and budget <= 0) or budget > sum(sizes) + slack:
    raise ValueError(
        f"overrides: the overridden leaves keep {kept_fixed:.1f} weights and the others at most "
        f"{sum(sizes)}, which cannot add up to the {asked:.1f} of {total} asked by sparsity "
        f"{sparsity} (the others must keep more than 0 and at most all of their weights)."
    )

  raw = [(sum(entries[i][1]) / math.prod(entries[i][1])) ** power_scale for i in free]
  densities = dict(zip(free, _solve_densities(sizes, raw, budget)))
  values = []
  for i, (_, shape) in enumerate(entries):
    if shape is None:
      values.append(None)
    elif fixed[i] is not None:
      values.append(float(fixed[i]))
    else:
      values.append(min(max(1.0 - densities[i], 0.0), 1.0))
  return jax.tree_util.tree_unflatten(treedef, values)


def layer_sparsities(
    name: str, shapes: Any, sparsity: float, *, overrides: Mapping[str, float] | None = None
) -> Any | None:
  """Per-leaf sparsities by distribution name: ``'uniform'``, ``'erk'`` or ``'global'``.

  Args:
    name: one of :data:`DISTRIBUTIONS`.
    shapes: pytree of arrays / ``jax.ShapeDtypeStruct`` (prunable) and ``None`` (not prunable).
    sparsity: overall sparsity of the prunable weights, in [0, 1).
    overrides: regex -> sparsity for the leaves whose path matches (not with ``'global'``).

  Returns:
    The per-leaf sparsities of :func:`uniform` or :func:`erk`, or ``None`` for ``'global'``:
    the caller then selects over one pool of all prunable weights.
  """
  if name == "uniform":
    return uniform(shapes, sparsity, overrides=overrides)
  if name == "erk":
    return erk(shapes, sparsity, overrides=overrides)
  if name == "global":
    _checks.sparsity(sparsity, "sparsity")
    _flatten(shapes)
    if overrides:
      raise ValueError("overrides are not supported with the 'global' distribution.")
    return None
  raise ValueError(f"name must be one of {', '.join(map(repr, DISTRIBUTIONS))}; got {name!r}.")
