"""Validation of construction-time (Python) arguments shared by every module."""

from __future__ import annotations

from typing import Any

import jax


def concrete(value: Any, name: str) -> Any:
  """``value`` unchanged, or ``TypeError`` naming ``name`` if it is a traced array (e.g. a
  hyperparameter of ``optax.inject_hyperparams`` inside ``jit``): counts, budgets and schedule
  shapes are computed in Python, before tracing."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a Python number, got a traced array: exact keep counts, per-layer "
        "budgets and schedule shapes are computed before tracing. With optax.inject_hyperparams, "
        f"pass it as static: static_args=({name!r}, ...), e.g. static_args=('sparsity', "
        "'steps_per_epoch', 'total_epochs', 'beta') for og.mask_optimizer")
  return value


def sparsity(value: Any, name: str = "sparsity") -> float:
  """``value`` as a float in [0, 1) (NaN rejected), else ``ValueError`` naming ``name``.

  Raises:
    TypeError: ``value`` is a traced array (e.g. a hyperparameter of ``optax.inject_hyperparams``
      inside ``jit``): the exact keep counts and per-layer budgets are computed in Python.
  """
  value = float(concrete(value, name))
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return value
