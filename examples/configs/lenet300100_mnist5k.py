"""LeNet-300-100 on the embedded MNIST digits (4,000 train / 1,000 test): the default run.

OptG's MNIST config: 40 epochs, batch 100, peak lr 0.1, weight decay 5e-4; a dense baseline with
the same budget, for the summary (the default on mnist5k).
"""

from configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
      model="lenet300100", dataset="mnist5k", epochs=40, batch_size=100, lr=0.1,
      weight_decay=5e-4, label_smoothing=0.0)
