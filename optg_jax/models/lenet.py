"""LeNet-300-100: the 784-300-100-10 fully connected MNIST net of the lottery-ticket papers."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from optg_jax.models import common


class LeNet300100(nn.Module):
  """Fully connected 784-300-100-``num_classes`` net.

  Input ``(B, 28, 28, 1)`` or ``(B, 784)`` (anything is flattened per example); output logits
  ``(B, num_classes)``. Layers are named ``fc1``, ``fc2`` and ``classifier``. With biases the
  net has 266,610 parameters (266,200 weights). The signed-supermask "FCN" is this net with
  ``activation="elu", use_bias=False``.

  Attributes:
    num_classes: number of output logits.
    activation: ``'relu'``, ``'elu'`` or a callable.
    use_bias: whether the dense layers have biases (initialised to zero).
    kernel_init: initialiser of the dense kernels (default untruncated Kaiming normal).
    dtype: computation dtype.
  """

  num_classes: int = 10
  activation: str | Callable = "relu"
  use_bias: bool = True
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    del train  # No batch norm or dropout.
    act = common.get_activation(self.activation)
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for i, width in enumerate((300, 100)):
      x = act(nn.Dense(width, use_bias=self.use_bias, kernel_init=self.kernel_init,
                       dtype=self.dtype, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init,
                    dtype=self.dtype, name="classifier")(x)
