"""ResNet-32 on CIFAR-10, the OptG paper's CIFAR benchmark (the settings of ``cifar.py``)."""

from configs import cifar
from configs import default


def get_config() -> default.Config:
  return cifar.get_config("resnet32")
