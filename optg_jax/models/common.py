"""Initialisers and layer helpers shared by the model zoo.

PyTorch's ``kaiming_normal_`` and ``xavier_normal_`` draw from an *untruncated* normal, whereas
``nn.initializers.he_normal`` truncates at two standard deviations. The zoo therefore defaults to
``variance_scaling(..., "normal")``. Fans follow the kernel layout: a conv kernel
``(kh, kw, in/groups, out)`` has fan-in ``kh·kw·in/groups``, as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = nn.initializers.Initializer

# N(0, 2/fan_in): torch.nn.init.kaiming_normal_(mode="fan_in", nonlinearity="relu").
kaiming_normal: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# N(0, 2/(fan_in + fan_out)): torch.nn.init.xavier_normal_.
xavier_normal: Initializer = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
# U(±1/sqrt(fan_in)): PyTorch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)).
torch_default: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": nn.relu, "elu": nn.elu}


def get_activation(activation: str | Callable[[Array], Array]) -> Callable[[Array], Array]:
  """Resolves ``'relu'``/``'elu'`` to the function; a callable passes through."""
  if callable(activation):
    return activation
  if activation not in _ACTIVATIONS:
    raise ValueError(
        f"activation must be a callable or one of {sorted(_ACTIVATIONS)}, got {activation!r}")
  return _ACTIVATIONS[activation]


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there, i.e. 0.9 here; eps 1e-5).

  Batch statistics in training, running averages in evaluation. Scale starts at 1, bias at 0.
  Flax folds the biased batch variance into the running variance, PyTorch the unbiased one
  (a factor n/(n-1), n = B·H·W).
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def global_avg_pool(x: Array) -> Array:
  """(B, H, W, C) -> (B, C)."""
  return jnp.mean(x, axis=(1, 2))


def pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's ``padding=p`` on both spatial axes.

  Flax's ``'SAME'`` pads a stride-2 3×3 conv on an even input by (0, 1), PyTorch by (1, 1).
  """
  return ((p, p), (p, p))


def conv(features: int, kernel: int, strides: int, padding: int, name: str,
         kernel_init: Initializer, dtype: Dtype) -> nn.Conv:
  """A bias-free square conv with PyTorch-style symmetric ``padding`` (pixels per side)."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=pad(padding),
                 use_bias=False, kernel_init=kernel_init, dtype=dtype, name=name)
