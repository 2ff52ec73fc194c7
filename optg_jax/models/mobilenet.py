"""MobileNet-V1 (Howard et al. 2017) for 224×224 ImageNet, as in STR and OptG."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from optg_jax.models import common

# (output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class DepthwiseSeparable(nn.Module):
  """Depthwise 3×3 (stride s) -BN-ReLU, pointwise 1×1 -BN-ReLU. ``(B,H,W,C) -> (B,H/s,W/s,F)``."""

  features: int
  strides: int = 1
  kernel_init: common.Initializer = common.kaiming_normal
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    channels = x.shape[-1]
    x = nn.Conv(channels, (3, 3), strides=(self.strides, self.strides), padding=common.pad(1),
                feature_group_count=channels, use_bias=False, kernel_init=self.kernel_init,
                dtype=self.dtype, name="dw_conv")(x)
    x = nn.relu(common.batch_norm(train, self.dtype, "dw_bn")(x))
    x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=self.kernel_init,
                dtype=self.dtype, name="pw_conv")(x)
    return nn.relu(common.batch_norm(train, self.dtype, "pw_bn")(x))


class MobileNetV1(nn.Module):
  """conv_bn(3→32, stride 2), 13 depthwise-separable blocks, GAP, bias-free linear 1024→classes.

  All convs are bias-free; depthwise kernels are ``(3, 3, 1, C)``. Input ``(B, 224, 224, 3)``;
  the last map is ``(B, 7, 7, 1024)``; output logits ``(B, num_classes)``. Layers are named
  ``stem_conv``, ``stem_bn``, ``block{i}`` (1-based, with ``dw_conv``, ``dw_bn``, ``pw_conv``,
  ``pw_bn``) and ``classifier``. For 1000 classes the conv and dense kernels hold 4,209,088
  weights; with the BN scales and biases, 4,230,976 parameters.

  OptG's MobileNet-V1 leaves its convs at PyTorch's default init and gives only the classifier
  Kaiming normal: ``kernel_init=common.torch_default, classifier_init=common.kaiming_normal``.

  Attributes:
    num_classes: number of output logits.
    kernel_init: initialiser of the conv kernels (default untruncated Kaiming normal).
    classifier_init: initialiser of the classifier kernel; ``None`` means ``kernel_init``.
    dtype: computation dtype.
  """

  num_classes: int = 1000
  kernel_init: common.Initializer = common.kaiming_normal
  classifier_init: common.Initializer | None = None
  dtype: common.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: common.Array, train: bool = False) -> common.Array:
    x = nn.Conv(32, (3, 3), strides=(2, 2), padding=common.pad(1), use_bias=False,
                kernel_init=self.kernel_init, dtype=self.dtype, name="stem_conv")(
                    jnp.asarray(x, self.dtype))
    x = nn.relu(common.batch_norm(train, self.dtype, "stem_bn")(x))
    for i, (features, strides) in enumerate(BLOCKS):
      x = DepthwiseSeparable(features, strides, kernel_init=self.kernel_init, dtype=self.dtype,
                             name=f"block{i + 1}")(x, train)
    init = self.kernel_init if self.classifier_init is None else self.classifier_init
    return nn.Dense(self.num_classes, use_bias=False, kernel_init=init, dtype=self.dtype,
                    name="classifier")(common.global_avg_pool(x))
