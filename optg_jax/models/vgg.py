"""CIFAR VGG-16/19 with batch norm and a single linear classifier (OptG, OpenLTH, RST)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from optg_jax.models import common

# Conv widths; "M" is a 2×2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M")
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
  """conv3×3-BN-ReLU stacks with max-pools, global average pooling, one linear layer.

  Input ``(B, 32, 32, 3)``; after the five pools the map is ``(B, 1, 1, 512)``, so the global
  average pool (OptG's ``AvgPool2d(1)``) only drops the spatial axes. Output logits
  ``(B, num_classes)``. Layers are named ``conv{i}``/``bn{i}`` (1-based) and ``classifier``.
  As in OptG, convs are bias-free and the classifier has a bias.

  Attributes:
    config: conv widths, with ``"M"`` for a 2×2 max-pool.
    num_classes: number of output logits.
    use_bias: whether the convs have (zero-initialised) biases.
    kernel_init: initialiser of all conv and dense kernels (default untruncated Kaiming normal).
    dtype: computation dtype.
  """

  config: Sequence[int | str] = VGG19_CONFIG
  num_classes: int = 10
  use_bias: bool = False
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    x = jnp.asarray(x, self.dtype)
    i = 0
    for width in self.config:
      if width == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      i += 1
      x = nn.Conv(width, (3, 3), padding=common.pad(1), use_bias=self.use_bias,
                  kernel_init=self.kernel_init, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(common.batch_norm(train, self.dtype, f"bn{i}")(x))
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init, dtype=self.dtype,
                    name="classifier")(common.global_avg_pool(x))


class VGG16(VGG):
  """VGG-16: 13 convs (14,710,464 conv weights), 14,724,042 parameters for 10 classes."""

  config: Sequence[int | str] = VGG16_CONFIG


class VGG19(VGG):
  """VGG-19: 16 convs (20,018,880 conv weights), 20,035,018 parameters for 10 classes."""

  config: Sequence[int | str] = VGG19_CONFIG
