"""MobileNet-V1 on ImageNet (tfds ``imagenet2012``, prepared by hand).

OptG's MobileNet config: 180 epochs, batch 256, peak lr 0.05, weight decay 4e-5, label
smoothing 0.1.
"""

from configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
      model="mobilenetv1", dataset="imagenet2012", epochs=180, batch_size=256, lr=0.05,
      weight_decay=4e-5, label_smoothing=0.1)
