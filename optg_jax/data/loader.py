"""Deterministic, resumable batch iterators over tfds data sources, built with grain."""

from __future__ import annotations

from collections.abc import Callable
import functools
import os
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from optg_jax.data import builder as builder_lib
from optg_jax.data import transforms

KNOWN_DATASETS = ("mnist5k", "mnist", "cifar10", "cifar100", "imagenet2012")

Batch = dict[str, np.ndarray]
Reader = Callable[[np.ndarray], tuple[Any, np.ndarray]]


class BatchIterator(grain.DatasetIterator):
  """An iterator of batches whose state is the absolute step, ``{'step': int}``.

  ``set_state`` (or ``load(..., start_step=s)``) restarts at batch ``s`` exactly: batch ``s``
  is a pure function of the seed and ``s``, including its augmentation. As a grain
  ``DatasetIterator`` it checkpoints with ``grain.checkpoint`` handlers under orbax.
  """

  def __init__(self, dataset: grain.MapDataset, read_options: grain.ReadOptions, step: int = 0):
    super().__init__()
    self.dataset = dataset  # batch ``i`` is ``dataset[i]``
    self._read_options = read_options
    self._step = step
    self._it = None

  @property
  def step(self) -> int:
    """The index of the next batch."""
    return self._step

  def __next__(self) -> Batch:
    if self._it is None:
      self._it = iter(self.dataset[self._step:].to_iter_dataset(self._read_options))
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._release()
    self._step = int(state["step"])

  def close(self) -> None:
    self._release()
    super().close()

  def _release(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None


def load(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    shuffle: bool = True,
    augment: bool | None = None,
    num_epochs: int | None = None,
    start_step: int = 0,
    drop_remainder: bool = True,
    preprocess: str | None = None,
    cache: bool = False,
    num_threads: int = 4,
    prefetch: int = 4,
) -> BatchIterator:
  """A deterministic iterator of batches ``{'image': float32 (B, H, W, C), 'label': int32 (B,)}``.

  Reads ``name`` (``'mnist5k'``, built from the package on first use, or any tfds image
  classification set already prepared in ``data_dir``; never downloads) through a tfds random
  access data source. Each epoch is a fresh permutation drawn from ``seed``; epochs run back to
  back, so a batch may span two of them.

  Args:
    name: tfds name, optionally with config and version (``'cifar10:3.0.2'``).
    split: tfds split, slicing allowed (``'train[:90%]'``).
    batch_size: examples per batch.
    seed: seeds the epoch permutations and the augmentation.
    data_dir: tfds data dir; default tfds's own (``~/tensorflow_datasets``).
    shuffle: permute each epoch; otherwise read in stored order.
    augment: use the preset's augmenting ``train`` preprocessing; default: ``split`` starts
      with ``'train'``.
    num_epochs: passes over the split; ``None`` repeats forever.
    start_step: index of the first batch, to resume where a run stopped.
    drop_remainder: drop the final short batch.
    preprocess: preset in ``transforms.PRESETS``; default: the data set's own, else ``'mnist'``
      (scale to [0, 1]).
    cache: decode the whole split into memory once (for fixed-size images that fit).
    num_threads: threads preparing batches ahead; 0 prepares them on demand.
    prefetch: batches prepared ahead.

  Returns:
    A ``BatchIterator``, whose ``get_state``/``set_state`` resume it.
  """
  _check_int("batch_size", batch_size, 1)
  _check_int("start_step", start_step, 0)
  _check_int("seed", seed, 0)
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, 1)
  preset = _preset(name, preprocess)
  source = data_source(name, split, data_dir=data_dir)
  augment = split.startswith("train") if augment is None else augment
  fn = preset.train if augment else preset.eval

  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.random_map(functools.partial(_make_batch, read=_reader(source, cache), fn=fn), seed=seed)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return BatchIterator(ds, options, start_step)


def data_source(name: str, split: str, *, data_dir: str | os.PathLike[str] | None = None):
  """The tfds random access source of ``name``/``split`` (``'mnist5k'`` is built if needed).

  Sets of encoded images (``tfds.features.Image``: mnist, cifar, imagenet) decode without
  TensorFlow through Pillow or OpenCV, whichever is installed.
  """
  if data_dir is not None and not os.path.isdir(data_dir):
    raise ValueError(f"data_dir {os.fspath(data_dir)!r} does not exist (or is not a directory)")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(f"unknown data set {name!r}: known names are {', '.join(KNOWN_DATASETS)}, "
                     "or any tfds image classification data set") from None
  if not builder.is_prepared():
    if not isinstance(builder, builder_lib.Mnist5k):
      raise FileNotFoundError(_not_prepared_message(name, builder, data_dir))
    builder.download_and_prepare(file_format="array_record")
  missing = {"image", "label"} - set(builder.info.features.keys())
  if missing:
    raise ValueError(f"data set {name!r} has no {sorted(missing)} features; load() reads image "
                     "classification sets with 'image' and 'label'")
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError:
    raise ValueError(
        f"data set {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
        "which has no random access; prepare it again with `--file_format array_record`"
    ) from None


def shard_batch(batch: Any, num_devices: int) -> Any:
  """Splits every leaf's leading axis: (B, ...) -> (num_devices, B // num_devices, ...)."""
  _check_int("num_devices", num_devices, 1)
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"every leaf needs the same leading batch axis, got sizes {sizes}")
  size = sizes.pop()
  if size % num_devices:
    raise ValueError(f"batch size {size} is not divisible by num_devices={num_devices}")
  return jax.tree.map(lambda x: x.reshape((num_devices, size // num_devices) + x.shape[1:]), batch)


def _preset(name: str, preprocess: str | None) -> transforms.Preset:
  if preprocess is not None:
    if preprocess not in transforms.PRESETS:
      raise ValueError(f"unknown preprocess {preprocess!r}: known presets are "
                       f"{', '.join(transforms.PRESETS)}")
    return transforms.PRESETS[preprocess]
  base = name.split("/")[0].split(":")[0]
  return transforms.PRESETS.get(base, transforms.PRESETS["mnist"])


def _reader(source, cache: bool) -> Reader:
  if cache:
    images, labels = _read(source, np.arange(len(source)))
    images = np.stack(images)
    return lambda idx: (images[idx], labels[idx])
  return functools.partial(_read, source)


def _read(source, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  examples = source.__getitems__(indices.tolist())
  return [e["image"] for e in examples], np.asarray([e["label"] for e in examples], np.int32)


def _make_batch(indices: np.ndarray, rng: np.random.Generator, *, read: Reader,
                fn: transforms.BatchFn) -> Batch:
  images, labels = read(indices)
  return {"image": fn(images, rng), "label": labels}


def _not_prepared_message(name: str, builder, data_dir) -> str:
  target = f" --data_dir {os.fspath(data_dir)}" if data_dir is not None else ""
  return (
      f"tfds data set {name!r} is not prepared in {os.fspath(builder.data_dir_root)} and load() "
      "never downloads. Prepare it once on a machine with network access (image "
      "data sets need TensorFlow to build: `pip install tensorflow`):\n"
      f"  tfds build {name}{target} --file_format array_record\n"
      "then copy the data dir here or point data_dir at it (imagenet2012 also needs the "
      "ILSVRC2012 tar files in `--manual_dir`; see the tfds catalogue)."
  )


def _check_int(name: str, value: Any, minimum: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
