"""Conv-2/4/6/8: the small VGG-like CIFAR nets of the lottery-ticket and supermask papers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from optg_jax.models import common


class ConvNet(nn.Module):
  """Pairs of 3×3 convs, a 2×2 max-pool after each pair, then FC 256-256-``num_classes``.

  Pair ``i`` has ``widths[i]`` channels; Conv-k uses the first k/2 of 64/128/256/512. Input
  ``(B, 32, 32, 3)``; output logits ``(B, num_classes)``. No batch norm. Layers are named
  ``conv1 … conv{2·len(widths)}``, ``fc1``, ``fc2`` and ``classifier``.

  The features are flattened in NHWC order, PyTorch flattens NCHW: the FC input is permuted,
  which changes nothing about the function class or the parameter count.

  Biases are off by default, as in edge-popup and the signed supermask (the FC layers there are
  bias-free 1×1 convs); ``use_bias=True`` gives the original lottery-ticket nets.

  Attributes:
    widths: channels of each conv pair.
    num_classes: number of output logits.
    activation: ``'relu'`` (edge-popup), ``'elu'`` (signed supermask) or a callable.
    use_bias: whether convs and dense layers have (zero-initialised) biases.
    kernel_init: initialiser of all kernels (default untruncated Kaiming normal).
    dtype: computation dtype.
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 10
  activation: str | Callable = "relu"
  use_bias: bool = False
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    del train  # No batch norm or dropout.
    act = common.get_activation(self.activation)
    x = jnp.asarray(x, self.dtype)
    for i, width in enumerate(self.widths):
      for j in (1, 2):
        x = act(nn.Conv(width, (3, 3), padding=common.pad(1), use_bias=self.use_bias,
                        kernel_init=self.kernel_init, dtype=self.dtype,
                        name=f"conv{2 * i + j}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for i in (1, 2):
      x = act(nn.Dense(256, use_bias=self.use_bias, kernel_init=self.kernel_init,
                       dtype=self.dtype, name=f"fc{i}")(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="classifier")(x)


class Conv2(ConvNet):
  """Conv-2: 64,64, pool, FC 256-256-10 (4,300,992 weights for 32×32×3 inputs)."""

  widths: Sequence[int] = (64,)


class Conv4(ConvNet):
  """Conv-4: 64,64, pool, 128,128, pool, FC 256-256-10 (2,425,024 weights)."""

  widths: Sequence[int] = (64, 128)


class Conv6(ConvNet):
  """Conv-6: Conv-4 plus 256,256, pool (2,261,184 weights)."""

  widths: Sequence[int] = (64, 128, 256)


class Conv8(ConvNet):
  """Conv-8: Conv-6 plus 512,512, pool (5,275,840 weights)."""

  widths: Sequence[int] = (64, 128, 256, 512)
