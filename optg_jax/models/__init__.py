"""Flax linen models of the papers optg_jax implements, and a registry by name.

Every model is ``nn.Module`` with ``__call__(x, train=False)`` on NHWC inputs, returns logits,
takes ``num_classes`` and ``kernel_init`` (default untruncated Kaiming normal, PyTorch's
``kaiming_normal_``), and names its output layer ``classifier``. Models with BatchNorm keep
running statistics in the ``batch_stats`` collection, to be made mutable when ``train=True``::

  model = get_model("resnet20")
  variables = model.init(rng, jnp.zeros((1, *input_shape("resnet20"))))
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optg_jax import _extras

_extras.require("optg_jax.models", "flax", "flax")

import flax.linen as nn

from optg_jax.models.cifar_resnet import BasicBlock
from optg_jax.models.cifar_resnet import CifarResNet
from optg_jax.models.cifar_resnet import ResNet20
from optg_jax.models.cifar_resnet import ResNet32
from optg_jax.models.cifar_resnet import ResNet56
from optg_jax.models.common import kaiming_normal
from optg_jax.models.common import torch_default
from optg_jax.models.common import xavier_normal
from optg_jax.models.conv import Conv2
from optg_jax.models.conv import Conv4
from optg_jax.models.conv import Conv6
from optg_jax.models.conv import Conv8
from optg_jax.models.conv import ConvNet
from optg_jax.models.lenet import LeNet300100
from optg_jax.models.mobilenet import MobileNetV1
from optg_jax.models.resnet import Bottleneck
from optg_jax.models.resnet import ResNet
from optg_jax.models.resnet import ResNet50
from optg_jax.models.vgg import VGG
from optg_jax.models.vgg import VGG16
from optg_jax.models.vgg import VGG19

_MNIST = (28, 28, 1)
_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)

# name -> (constructor, default input (H, W, C)).
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
    "lenet300100": (LeNet300100, _MNIST),
    "conv2": (Conv2, _CIFAR),
    "conv4": (Conv4, _CIFAR),
    "conv6": (Conv6, _CIFAR),
    "conv8": (Conv8, _CIFAR),
    "resnet20": (ResNet20, _CIFAR),
    "resnet32": (ResNet32, _CIFAR),
    "resnet56": (ResNet56, _CIFAR),
    "vgg16": (VGG16, _CIFAR),
    "vgg19": (VGG19, _CIFAR),
    "resnet50": (ResNet50, _IMAGENET),
    "mobilenetv1": (MobileNetV1, _IMAGENET),
}

MODELS: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], tuple[int, int, int]]:
  key = str(name).lower()
  if key not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
  return _REGISTRY[key]


def get_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
  """Builds a registered model by (case-insensitive) name.

  Args:
    name: one of ``MODELS``.
    num_classes: number of logits; ``None`` keeps the model's default (10 for the MNIST/CIFAR
      nets, 1000 for ResNet-50 and MobileNet-V1).
    **kwargs: further model attributes (``kernel_init``, ``shortcut``, ``activation``, ...).

  Returns:
    The unbound module.

  Raises:
    ValueError: for an unknown name.
  """
  cls, _ = _lookup(name)
  if num_classes is not None:
    kwargs["num_classes"] = num_classes
  return cls(**kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
  """The default ``(H, W, C)`` input of a registered model (without the batch axis)."""
  return _lookup(name)[1]


__all__ = (
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "Conv2",
    "Conv4",
    "Conv6",
    "Conv8",
    "ConvNet",
    "LeNet300100",
    "MODELS",
    "MobileNetV1",
    "ResNet",
    "ResNet20",
    "ResNet32",
    "ResNet50",
    "ResNet56",
    "VGG",
    "VGG16",
    "VGG19",
    "get_model",
    "input_shape",
    "kaiming_normal",
    "torch_default",
    "xavier_normal",
)
