"""Optional dependencies: a module that needs an extra says, in one line, which one to install."""

from __future__ import annotations

import importlib


def require(module: str, extra: str, *packages: str) -> None:
  """Imports ``packages``; if one is missing, raises a one-line ``ImportError`` naming ``extra``.

  Example: ``require('optg_jax.data', 'data', 'grain', 'tensorflow_datasets')`` raises
  ``ImportError: optg_jax.data needs the 'data' extra: pip install 'optg-jax[data]'``.
  """
  for package in packages:
    try:
      importlib.import_module(package)
    except ImportError:
      raise ImportError(f"{module} needs the {extra!r} extra: pip install 'optg-jax[{extra}]' "
                        f"({package} is not installed)") from None
