"""CIFAR ResNets of depth 6n+2 (He et al. 2016, §4.2): ResNet-20/32/56 and the generic family."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from optg_jax.models import common

_SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
  """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU. ``(B, H, W, C) -> (B, H/s, W/s, F)``.

  Where the shape changes, shortcut ``'A'`` subsamples by the stride and zero-pads channels
  (half the new channels before, half after, as in the widely used PyTorch CIFAR ResNets);
  ``'B'`` uses a 1×1 conv with stride and BN.
  """

  features: int
  strides: int = 1
  shortcut: str = "A"
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    conv = lambda f, k, s, p, name: common.conv(f, k, s, p, name, self.kernel_init, self.dtype)
    y = conv(self.features, 3, self.strides, 1, "conv1")(x)
    y = nn.relu(common.batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, 1, 1, "conv2")(y)
    y = common.batch_norm(train, self.dtype, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == "A":
        x = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        x = conv(self.features, 1, self.strides, 0, "shortcut_conv")(x)
        x = common.batch_norm(train, self.dtype, "shortcut_bn")(x)
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """ResNet of depth ``6n+2``: a 3×3 stem, three stages of ``n`` basic blocks, GAP, linear.

  Stage ``i`` has ``widths[i]`` channels and starts with stride 2 for ``i > 0``; the stem has
  ``widths[0]`` channels. Input ``(B, 32, 32, 3)``; output logits ``(B, num_classes)``. Layers
  are named ``stem_conv``, ``stem_bn``, ``stage{i}_block{j}`` (1-based) and ``classifier``.
  Convs are bias-free; the classifier has a bias unless ``classifier_bias=False``.
  OptG's "ResNet50_cifar10" is ``CifarResNet(50, widths=(32, 64, 128), classifier_bias=False)``.

  Attributes:
    depth: total depth ``6n+2`` (20, 32, 44, 56, 110, ...).
    widths: channels of the three stages.
    num_classes: number of output logits.
    shortcut: ``'A'`` (subsample + zero-pad, no parameters) or ``'B'`` (1×1 conv + BN).
    classifier_bias: whether the final dense layer has a bias.
    kernel_init: initialiser of all conv and dense kernels (default untruncated Kaiming normal).
    dtype: computation dtype.
  """

  depth: int
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10
  shortcut: str = "A"
  classifier_bias: bool = True
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"depth must be 6n+2 with n >= 1, got {self.depth}")
    if self.shortcut not in _SHORTCUTS:
      raise ValueError(f"shortcut must be one of {_SHORTCUTS}, got {self.shortcut!r}")
    if len(self.widths) != 3:
      raise ValueError(f"widths must have 3 entries, got {tuple(self.widths)}")
    x = nn.Conv(self.widths[0], (3, 3), padding=common.pad(1), use_bias=False,
                kernel_init=self.kernel_init, dtype=self.dtype, name="stem_conv")(
                    jnp.asarray(x, self.dtype))
    x = nn.relu(common.batch_norm(train, self.dtype, "stem_bn")(x))
    for i, width in enumerate(self.widths):
      for j in range((self.depth - 2) // 6):
        x = BasicBlock(width, strides=2 if i > 0 and j == 0 else 1, shortcut=self.shortcut,
                       kernel_init=self.kernel_init, dtype=self.dtype,
                       name=f"stage{i + 1}_block{j + 1}")(x, train)
    return nn.Dense(self.num_classes, use_bias=self.classifier_bias,
                    kernel_init=self.kernel_init, dtype=self.dtype,
                    name="classifier")(common.global_avg_pool(x))


class ResNet20(CifarResNet):
  """ResNet-20 (n = 3): 268,336 conv+dense weights, 269,722 parameters with option A."""

  depth: int = 20


class ResNet32(CifarResNet):
  """ResNet-32 (n = 5): 464,154 parameters with option A."""

  depth: int = 32


class ResNet56(CifarResNet):
  """ResNet-56 (n = 9): 853,018 parameters with option A."""

  depth: int = 56
