"""Validation of construction-time (Python) arguments shared by every module."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def number(value: Any, name: str, *, integer: bool = False, traced: bool = True) -> Any:
  """``value`` unchanged if it is a real number, else ``TypeError`` naming ``name``.

  A real number is a Python or NumPy int or float (not a bool), or a scalar array of a real
  dtype: a concrete one, or a traced one (a hyperparameter of ``optax.inject_hyperparams``
  inside ``jit``) unless ``traced`` is ``False``. Only the type is checked; ranges are the
  caller's.

  Args:
    value: the argument.
    name: the argument's name, for the message.
    integer: an integer is required (an int, or an integer dtype).
    traced: a traced array is accepted (``False``: ``TypeError`` from :func:`concrete`, for
      arguments used in Python).

  Raises:
    TypeError: ``value`` is not a real number (e.g. a string), not an integer with
      ``integer``, or traced without ``traced``.
  """
  if isinstance(value, jax.core.Tracer) and not traced:
    concrete(value, name)
  kind = "an integer" if integer else "a real number"
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be {kind}, got the bool {value!r}.")
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    ok = jnp.issubdtype(value.dtype, jnp.integer) or (
        not integer and jnp.issubdtype(value.dtype, jnp.floating))
    if np.ndim(value) == 0 and ok:
      return value
  elif isinstance(value, int) or (isinstance(value, float) and not integer):
    return value
  raise TypeError(f"{name} must be {kind}, got {value!r}.")


def sparsity(value: Any, name: str = "sparsity") -> float:
  """``value`` as a float in [0, 1) (NaN rejected), else ``ValueError`` naming ``name``.

  Raises:
    TypeError: ``value`` is not a real number (:func:`number`), or is a traced array (e.g. a
      hyperparameter of ``optax.inject_hyperparams`` inside ``jit``): the exact keep counts and
      per-layer budgets are computed in Python.
  """
  value = float(number(value, name, traced=False))
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return value
