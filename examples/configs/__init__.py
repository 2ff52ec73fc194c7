"""One config per model / data set (``get_config()`` in each module), and the one of a model."""

from __future__ import annotations

import importlib

from configs import cifar
from configs import default

# The config module of each model that has its own; the other CIFAR models use ``cifar``.
BY_MODEL = {
    "lenet300100": "lenet300100_mnist5k",
    "resnet32": "resnet32_cifar10",
    "resnet50": "resnet50_imagenet",
    "mobilenetv1": "mobilenetv1_imagenet",
}


def for_model(model: str) -> default.Config:
  """The reference config of ``model`` (its data set, budget and hyperparameters).

  Raises:
    ValueError: no config knows ``model``.
  """
  if model in BY_MODEL:
    return importlib.import_module(f"configs.{BY_MODEL[model]}").get_config()
  if model in cifar.MODELS:
    return cifar.get_config(model)
  known = sorted({*BY_MODEL, *cifar.MODELS})
  raise ValueError(f"no config for model {model!r}; known: {', '.join(known)}")
