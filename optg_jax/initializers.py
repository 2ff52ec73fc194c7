"""Re-initialisations of the prunable kernels of any params pytree, as the supermask papers use.

Supermask methods train masks over *frozen* random weights, so the weights' distribution is part
of the method. Each function here draws new values for the prunable leaves of ``params`` (default:
every float leaf with ``ndim >= 2``; ``exclude=``/``filter_fn=`` as in
:func:`optg_jax.masks.prunable_tree`) and keeps every other leaf as it is. Leaf ``i`` in flatten
order draws from ``jax.random.split(key, #leaves)[i]``. Fans follow the kernel layout: a Dense
kernel ``(in, out)`` and a conv kernel ``(kh, kw, in, out)`` have ``fan_in = prod(shape[:-1])``
and ``fan_out = prod(shape[:-2])·out`` (TensorFlow's and PyTorch's convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from optg_jax import masks as masks_lib

PyTree = Any
LeafInit = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
"""``(key, shape, dtype) -> array``."""


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(fan_in, fan_out)`` of a kernel of ``shape`` (``(in, out)`` or ``(kh, kw, in, out)``)."""
  if len(shape) < 2:
    raise ValueError(f"a kernel needs at least 2 dims, got shape {shape}")
  receptive = math.prod(shape[:-2])
  return receptive * shape[-2], receptive * shape[-1]


def reinit(params: PyTree, key: jax.Array, init: LeafInit, *, exclude: Iterable[str] = (),
           filter_fn: Callable[[str, Any], bool] | None = None) -> PyTree:
  """``params`` with every prunable leaf replaced by ``init(key_i, shape, dtype)``."""
  prunable = masks_lib.prunable_tree(params, exclude=exclude, filter_fn=filter_fn)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  flags = jax.tree.leaves(prunable)
  drawn = [init(k, jnp.shape(p), jnp.result_type(p)) if keep else p
           for k, p, keep in zip(keys, leaves, flags)]
  return jax.tree.unflatten(treedef, drawn)


def signed_constant_init(scale: float = 2.0, fan_scale: float = 1.0) -> LeafInit:
  """``±√(scale/(fan_scale·fan_in))``, the sign of a standard normal draw (0 counts as +)."""

  def init(key, shape, dtype):
    sign = jnp.where(jax.random.normal(key, shape) >= 0, 1.0, -1.0)
    return (sign * math.sqrt(scale / (fan_scale * fans(shape)[0]))).astype(dtype)

  return init


def kaiming_normal_init(key: jax.Array, shape: tuple[int, ...], dtype: Any,
                        fan_scale: float = 1.0) -> jax.Array:
  """``N(0, 2/(fan_scale·fan_in))``, untruncated (PyTorch's ``kaiming_normal_``)."""
  std = math.sqrt(2.0 / (fan_scale * fans(shape)[0]))
  return (jax.random.normal(key, shape) * std).astype(dtype)


def uniform_init(scale: float) -> LeafInit:
  """``U(±√(scale/fan_in))`` (``scale = 4.5``: the signed supermask paper's "ELU" baseline)."""

  def init(key, shape, dtype):
    bound = math.sqrt(scale / fans(shape)[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def kaiming_uniform_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """``U(±1/√fan_in)`` (PyTorch's ``kaiming_uniform_(a=√5)``: edge-popup's score init)."""
  bound = 1.0 / math.sqrt(fans(shape)[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def xavier_uniform_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """``U(±√(6/(fan_in + fan_out)))`` (the signed supermask's mask init)."""
  bound = math.sqrt(6.0 / sum(fans(shape)))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def elus(params: PyTree, key: jax.Array, factor: float = 1.5, **selection: Any) -> PyTree:
  """ELUS (the signed supermask's weights): ``±√(factor·2/fan_in)``, i.e. ``±√(3/fan_in)`` for
  the default factor 1.5 (FCN, Conv2-8, ResNet-20); ResNet-56 uses 1.3."""
  return reinit(params, key, signed_constant_init(2.0 * factor), **selection)


def signed_constant(params: PyTree, key: jax.Array, fan_scale: float = 1.0,
                    **selection: Any) -> PyTree:
  """edge-popup's signed Kaiming constant: ``±√(2/fan_in)`` (its "usc" configs).

  ``fan_scale`` multiplies the fan: the code's scaled "sc" configs use ``1 − k`` (``k`` the
  fraction kept; probably a bug, its issue #9), the paper ``k``.
  """
  return reinit(params, key, signed_constant_init(2.0, fan_scale), **selection)


def kaiming_normal(params: PyTree, key: jax.Array, fan_scale: float = 1.0,
                   **selection: Any) -> PyTree:
  """edge-popup's Kaiming normal: ``N(0, 2/fan_in)``, untruncated ("ukn"; ``fan_scale`` as in
  :func:`signed_constant` for "kn")."""
  return reinit(params, key, lambda k, s, d: kaiming_normal_init(k, s, d, fan_scale),
                **selection)


def elu_uniform(params: PyTree, key: jax.Array, **selection: Any) -> PyTree:
  """The signed supermask paper's dense "ELU" baseline init: ``U(±√(4.5/fan_in))``."""
  return reinit(params, key, uniform_init(4.5), **selection)
