"""ResNet-50 (v1.5) on ImageNet (tfds ``imagenet2012``, prepared by hand).

OptG's ImageNet config: 100 epochs, batch 256, peak lr 0.1, weight decay 1e-4, label smoothing
0.1.
"""

from configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
      model="resnet50", dataset="imagenet2012", epochs=100, batch_size=256, lr=0.1,
      weight_decay=1e-4, label_smoothing=0.1)
