"""Validation of construction-time (Python) arguments shared by every module."""

from __future__ import annotations

from typing import Any


def sparsity(value: Any, name: str = "sparsity") -> float:
  """``value`` as a float in [0, 1) (NaN rejected), else ``ValueError`` naming ``name``."""
  value = float(value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return value
