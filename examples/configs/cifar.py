"""The CIFAR models (Conv-2/4/6/8, ResNet-20/32/56, VGG-16/19) on CIFAR-10.

OptG's CIFAR config: 160 epochs, batch 256, peak lr 0.1, weight decay 5e-4, no label smoothing.
``--dataset cifar100`` trains the same budget on CIFAR-100.
"""

from configs import default

MODELS = ("conv2", "conv4", "conv6", "conv8", "resnet20", "resnet32", "resnet56", "vgg16", "vgg19")


def get_config(model: str = "resnet20") -> default.Config:
  return default.get_config().replace(
      model=model, dataset="cifar10", epochs=160, batch_size=256, lr=0.1, weight_decay=5e-4,
      label_smoothing=0.0)
