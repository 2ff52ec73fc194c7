"""ImageNet ResNet-50 v1.5 (torchvision layout, as in STR and OptG)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from optg_jax.models import common


class Bottleneck(nn.Module):
  """1×1-3×3-1×1 bottleneck with expansion 4; the stride sits on the 3×3 conv (v1.5).

  ``(B, H, W, C) -> (B, H/s, W/s, 4·features)``. Where the shape changes, the shortcut is a
  strided 1×1 conv + BN.
  """

  features: int
  strides: int = 1
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    conv = lambda f, k, s, p, name: common.conv(f, k, s, p, name, self.kernel_init, self.dtype)
    out = 4 * self.features
    y = conv(self.features, 1, 1, 0, "conv1")(x)
    y = nn.relu(common.batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, self.strides, 1, "conv2")(y)
    y = nn.relu(common.batch_norm(train, self.dtype, "bn2")(y))
    y = conv(out, 1, 1, 0, "conv3")(y)
    y = common.batch_norm(train, self.dtype, "bn3")(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.strides, 0, "downsample_conv")(x)
      x = common.batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Bottleneck ResNet: 7×7/2 stem, 3×3/2 max-pool, four stages, GAP, bias-free linear.

  Input ``(B, 224, 224, 3)`` (any size that survives a 32× reduction); output logits
  ``(B, num_classes)``. Layers are named ``stem_conv``, ``stem_bn``, ``stage{i}_block{j}``
  (1-based) and ``classifier``. The classifier is bias-free because STR/OptG implement it as a
  1×1 conv: the prunable conv+dense weights of ResNet-50 total exactly 25,502,912.
  BN scales all start at 1 (no zero-init of the last BN in each block).

  Attributes:
    stage_sizes: number of blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    widths: bottleneck widths per stage (block outputs are 4× these).
    num_classes: number of output logits.
    kernel_init: initialiser of all conv and dense kernels (default untruncated Kaiming normal).
    dtype: computation dtype.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    x = nn.Conv(self.widths[0], (7, 7), strides=(2, 2), padding=common.pad(3), use_bias=False,
                kernel_init=self.kernel_init, dtype=self.dtype, name="stem_conv")(
                    jnp.asarray(x, self.dtype))
    x = nn.relu(common.batch_norm(train, self.dtype, "stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=common.pad(1))
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(size):
        x = Bottleneck(width, strides=2 if i > 0 and j == 0 else 1,
                       kernel_init=self.kernel_init, dtype=self.dtype,
                       name=f"stage{i + 1}_block{j + 1}")(x, train)
    return nn.Dense(self.num_classes, use_bias=False, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="classifier")(common.global_avg_pool(x))


class ResNet50(ResNet):
  """ResNet-50 v1.5: 25,502,912 conv+dense weights, 25,556,032 parameters for 1000 classes."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
