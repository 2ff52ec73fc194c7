"""Readable names for pytree key paths, shared by every module that selects leaves by path."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

KeyPath = tuple[Any, ...]


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(path: KeyPath) -> str:
  """Joins a key path into ``'params/Dense_0/kernel'`` form (dict keys, attributes, indices).

  The trailing ``.value`` attribute of a ``flax.nnx`` variable is left out, so an ``nnx.State``
  leaf reads ``'fc2/kernel'``, as a user writes it.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return "/".join(_key_name(k) for k in path)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
  """True if any regular expression in ``patterns`` is found in the path string ``name``."""
  return any(re.search(p, name) for p in patterns)


def lookup_override(name: str, overrides: Mapping[str, Any] | None) -> Any:
  """The value of the first pattern in ``overrides`` found in ``name``, else ``None``."""
  if not overrides:
    return None
  for pattern, value in overrides.items():
    if re.search(pattern, name):
      return value
  return None


def check_patterns_match(patterns: Iterable[str], names: Iterable[str], argument: str) -> None:
  """Raises ``ValueError`` naming ``argument`` if a regex of ``patterns`` matches none of
  ``names`` (path strings): a pattern that selects nothing is a typo, not a no-op."""
  names = list(names)
  for pattern in patterns:
    if not any(re.search(pattern, name) for name in names):
      shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
      raise ValueError(f"{argument}: pattern {pattern!r} matches no leaf (paths look like "
                       f"{shown})")
