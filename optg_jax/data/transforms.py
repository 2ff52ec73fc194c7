"""NumPy image preprocessing of the papers, seeded by a ``np.random.Generator`` per batch.

Images are uint8 (H, W, C) until ``normalize`` turns a batch into float32 (B, H, W, C). Each preset
maps a batch of images (a uint8 array, or a list of differently sized ones) and a generator to
float32 images: ``train`` augments, ``eval`` is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math
from typing import NamedTuple

import numpy as np

Images = np.ndarray | Sequence[np.ndarray]
BatchFn = Callable[[Images, np.random.Generator], np.ndarray]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(images: Images, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> np.ndarray:
  """uint8 (B, H, W, C) -> float32 ``x / 255``, then ``(x - mean) / std`` per channel if given."""
  x = np.asarray(images).astype(np.float32)
  if mean is None:
    return np.divide(x, np.float32(255), out=x)
  std = np.asarray(std, np.float32)
  x *= 1 / (255 * std)
  x -= np.asarray(mean, np.float32) / std
  return x


def random_crop(images: np.ndarray, rng: np.random.Generator, size: int,
                padding: int = 0) -> np.ndarray:
  """A random ``size`` x ``size`` window of each zero-padded image: (B, H, W, C) -> (B, s, s, C)."""
  images = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  b, h, w, _ = images.shape
  if size > min(h, w):
    raise ValueError(f"crop size {size} exceeds the padded image size {(h, w)}")
  top = rng.integers(0, h - size + 1, size=b)
  left = rng.integers(0, w - size + 1, size=b)
  rows = top[:, None, None] + np.arange(size)[None, :, None]
  cols = left[:, None, None] + np.arange(size)[None, None, :]
  return images[np.arange(b)[:, None, None], rows, cols]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Flips each image of (B, H, W, C) left-right with probability 1/2."""
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def resize_box(image: np.ndarray, box: tuple[float, float, float, float],
               size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of ``box = (top, left, height, width)`` of (H, W, C) to ``size`` (uint8)."""
  top, left, bh, bw = box
  h, w = image.shape[:2]

  def taps(start, extent, n, limit):
    pos = np.clip(start + (np.arange(n) + 0.5) * (extent / n) - 0.5, 0, limit - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, limit - 1), (pos - lo).astype(np.float32)

  y0, y1, wy = taps(top, bh, size[0], h)
  x0, x1, wx = taps(left, bw, size[1], w)
  wx, wy = wx[None, :, None], wy[:, None, None]

  def lerp_columns(rows):
    return np.take(rows, x0, axis=1) * (1 - wx) + np.take(rows, x1, axis=1) * wx

  out = lerp_columns(image[y0]) * (1 - wy) + lerp_columns(image[y1]) * wy
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (torchvision's ``RandomResizedCrop``): (H, W, C) -> uint8 (s, s, C)."""
  h, w = image.shape[:2]
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return resize_box(image, (top, left, ch, cw), (size, size))
  aspect = w / h
  if aspect < ratio[0]:
    cw, ch = w, round(w / ratio[0])
  elif aspect > ratio[1]:
    cw, ch = round(h * ratio[1]), h
  else:
    cw, ch = w, h
  return resize_box(image, ((h - ch) // 2, (w - cw) // 2, ch, cw), (size, size))


def resize_center_crop(image: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
  """Resize the shorter side to ``resize``, keep the central ``crop`` square: -> uint8 (c, c, C)."""
  h, w = image.shape[:2]
  extent = crop * min(h, w) / resize
  return resize_box(image, ((h - extent) / 2, (w - extent) / 2, extent, extent), (crop, crop))


class Preset(NamedTuple):
  """A data set's preprocessing: ``train`` (augmenting) and ``eval``, both ``(images, rng)``."""
  train: BatchFn
  eval: BatchFn


def _scale(images: Images, rng: np.random.Generator) -> np.ndarray:
  del rng
  return normalize(images)


def _cifar_train(images: Images, rng: np.random.Generator, mean, std) -> np.ndarray:
  images = random_flip(random_crop(np.asarray(images), rng, 32, padding=4), rng)
  return normalize(images, mean, std)


def _cifar_eval(images: Images, rng: np.random.Generator, mean, std) -> np.ndarray:
  del rng
  return normalize(images, mean, std)


def _imagenet_train(images: Images, rng: np.random.Generator) -> np.ndarray:
  crops = np.stack([random_resized_crop(image, rng) for image in images])
  return normalize(random_flip(crops, rng), IMAGENET_MEAN, IMAGENET_STD)


def _imagenet_eval(images: Images, rng: np.random.Generator) -> np.ndarray:
  del rng
  crops = np.stack([resize_center_crop(image) for image in images])
  return normalize(crops, IMAGENET_MEAN, IMAGENET_STD)


def _cifar(mean, std) -> Preset:
  return Preset(functools.partial(_cifar_train, mean=mean, std=std),
                functools.partial(_cifar_eval, mean=mean, std=std))


PRESETS: dict[str, Preset] = {
    "mnist": Preset(_scale, _scale),
    "cifar10": _cifar(CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _cifar(CIFAR100_MEAN, CIFAR100_STD),
    "imagenet2012": Preset(_imagenet_train, _imagenet_eval),
}
