"""Data: the TensorFlow-free mnist5k builder, its split, loaders, augmentation, resume, errors."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from optg_jax import data
from optg_jax.data import mnist_5k
from optg_jax.data import transforms as T


class OptgTinyImages(tfds.core.GeneratorBasedBuilder):
  """48 random 32x32x3 uint8 images, 4 classes: stands in for a prepared tfds set (cifar10)."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=4),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(48):
      yield i, {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": i % 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  data.data_source("mnist5k", "train", data_dir=path)
  OptgTinyImages(data_dir=path).download_and_prepare(file_format="array_record")
  return path


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_builds_and_reads_without_tensorflow(tmp_path):
  package_root = pathlib.Path(data.__file__).parents[2]
  script = textwrap.dedent(f"""
      import sys

      class HideTensorFlow:  # Makes TensorFlow look uninstalled, even where it is.
        def __init__(self, finder):
          self.finder = finder

        def __getattr__(self, name):
          return getattr(self.finder, name)

        def find_spec(self, name, path=None, target=None):
          if name == "tensorflow" or name.startswith("tensorflow."):
            return None
          return self.finder.find_spec(name, path, target)

      sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
      from optg_jax import data
      batch = next(data.load("mnist5k", "train", batch_size=10, data_dir={str(tmp_path)!r}))
      assert batch["image"].shape == (10, 28, 28, 1), batch["image"].shape
      assert len(data.data_source("mnist5k", "test", data_dir={str(tmp_path)!r})) == 1000
      assert "tensorflow" not in sys.modules
      try:
        import tensorflow
      except ModuleNotFoundError:
        print("OK")
  """)
  path = os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, PYTHONPATH=path)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")
  assert (tmp_path / "mnist5k" / "1.0.0" / "mnist5k-train.array_record-00000-of-00001").exists()


def test_builder_split_is_stratified_and_matches_load_mnist_5k(data_dir):
  images, labels = mnist_5k.read_npz()
  splits = {}
  for name in ("train", "test"):
    source = data.data_source("mnist5k", name, data_dir=data_dir)
    examples = source.__getitems__(list(range(len(source))))
    splits[name] = (np.stack([e["image"] for e in examples]),
                    np.array([e["label"] for e in examples]))
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
  assert x_train.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(y_train, minlength=10), 400)
  np.testing.assert_array_equal(np.bincount(y_test, minlength=10), 100)

  def keys(x, y):
    return [xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y)]

  train_keys, test_keys = keys(x_train, y_train), keys(x_test, y_test)
  assert not set(train_keys) & set(test_keys)
  assert sorted(train_keys + test_keys) == sorted(keys(images[..., None], labels))
  train, test = data.load_mnist_5k(seed=0)
  np.testing.assert_array_equal(x_train / np.float32(255.0), train.images)
  np.testing.assert_array_equal(y_train, train.labels)
  np.testing.assert_array_equal(x_test / np.float32(255.0), test.images)
  np.testing.assert_array_equal(y_test, test.labels)


def test_load_mnist_5k_seeds():
  train, test = data.load_mnist_5k(seed=1)
  assert train.images.shape == (4000, 28, 28, 1) and train.images.dtype == np.float32
  assert train.labels.dtype == np.int32 and len(test.labels) == 1000
  np.testing.assert_array_equal(np.bincount(test.labels), 100)
  assert not np.array_equal(train.labels, data.load_mnist_5k(seed=0)[0].labels)


def test_batches_and_epochs(data_dir):
  it = data.load("mnist5k", "test", batch_size=300, seed=0, data_dir=data_dir, num_epochs=1,
                 drop_remainder=False)
  batches = list(it)
  assert [len(b["label"]) for b in batches] == [300, 300, 300, 100]
  image = np.concatenate([b["image"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  assert image.dtype == np.float32 and label.dtype == np.int32
  assert image.min() == 0.0 and image.max() == 1.0
  _, test = data.load_mnist_5k(0)
  assert sorted(map(bytes, image)) == sorted(map(bytes, test.images))
  ordered = data.load("mnist5k", "test", batch_size=1000, shuffle=False, data_dir=data_dir)
  np.testing.assert_array_equal(next(ordered)["label"], test.labels)


def test_same_seed_same_batches_other_seed_other_order(data_dir):
  kw = dict(batch_size=64, data_dir=data_dir)
  a = _take(data.load("mnist5k", "train", seed=3, **kw), 70)  # crosses an epoch boundary
  b = _take(data.load("mnist5k", "train", seed=3, **kw), 70)
  _assert_batches_equal(a, b)
  c = next(data.load("mnist5k", "train", seed=4, **kw))
  assert not np.array_equal(a[0]["label"], c["label"])
  epoch1 = np.concatenate([x["label"] for x in a])[:4000]
  epoch2 = np.concatenate([x["label"] for x in a])[4000:4000 + 400]
  assert not np.array_equal(epoch1[:400], epoch2)
  np.testing.assert_array_equal(np.bincount(epoch1), 400)


@pytest.mark.parametrize("name, preprocess", [("mnist5k", None), ("optg_tiny_images", "cifar10")])
def test_resume_equals_uninterrupted(data_dir, name, preprocess):
  kw = dict(batch_size=20, seed=7, data_dir=data_dir, preprocess=preprocess)
  reference = _take(data.load(name, "train", **kw), 9)
  it = data.load(name, "train", **kw)
  _take(it, 4)
  state = it.get_state()
  assert state == {"step": 4} and it.step == 4
  restored = data.load(name, "train", **kw)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 5), reference[4:])
  _assert_batches_equal(_take(data.load(name, "train", start_step=4, **kw), 5), reference[4:])
  it.set_state({"step": 2})
  _assert_batches_equal(_take(it, 3), reference[2:5])


def test_tfds_name_with_cifar_preset(data_dir):
  source = tfds.data_source("optg_tiny_images", split="train", data_dir=data_dir)
  raw = np.stack([source[i]["image"] for i in range(len(source))])
  plain = next(data.load("optg_tiny_images", "train", batch_size=48, shuffle=False,
                         data_dir=data_dir))
  np.testing.assert_array_equal(plain["image"], raw / np.float32(255))
  np.testing.assert_array_equal(plain["label"], [source[i]["label"] for i in range(48)])

  kw = dict(batch_size=16, seed=1, data_dir=data_dir, preprocess="cifar10")
  evals = next(data.load("optg_tiny_images", "train", augment=False, shuffle=False, **kw))
  np.testing.assert_allclose(evals["image"], T.normalize(raw[:16], T.CIFAR10_MEAN, T.CIFAR10_STD))
  train = _take(data.load("optg_tiny_images", "train", cache=True, num_threads=0, **kw), 4)
  _assert_batches_equal(train, _take(data.load("optg_tiny_images", "train", **kw), 4))
  assert train[0]["image"].shape == (16, 32, 32, 3) and train[0]["image"].dtype == np.float32
  lo = (0 - np.array(T.CIFAR10_MEAN)) / T.CIFAR10_STD
  hi = (1 - np.array(T.CIFAR10_MEAN)) / T.CIFAR10_STD
  assert np.all(train[0]["image"] >= lo - 1e-5) and np.all(train[0]["image"] <= hi + 1e-5)
  plain = next(data.load("optg_tiny_images", "train", augment=False, **kw))
  np.testing.assert_array_equal(plain["label"], train[0]["label"])
  assert not np.allclose(plain["image"], train[0]["image"])


def test_random_crop_and_flip():
  images = np.random.default_rng(0).integers(1, 256, (8, 32, 32, 3), np.uint8)
  crops = T.random_crop(images, np.random.default_rng(1), 32, padding=4)
  np.testing.assert_array_equal(crops, T.random_crop(images, np.random.default_rng(1), 32, 4))
  assert crops.shape == images.shape and crops.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for crop, image in zip(crops, padded):
    windows = [image[t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
    assert any(np.array_equal(crop, w) for w in windows)
  flips = T.random_flip(images, np.random.default_rng(2))
  flipped = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flips, images)]
  kept = [np.array_equal(f, x) for f, x in zip(flips, images)]
  assert all(a or b for a, b in zip(flipped, kept)) and any(flipped) and any(kept)


def test_imagenet_preset_on_variable_sizes():
  rng = np.random.default_rng(0)
  sizes = [(300, 400), (500, 240), (64, 64)]
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
  lo = (0 - np.array(T.IMAGENET_MEAN)) / T.IMAGENET_STD
  hi = (1 - np.array(T.IMAGENET_MEAN)) / T.IMAGENET_STD
  for fn in T.PRESETS["imagenet2012"]:
    out = fn(images, np.random.default_rng(5))
    assert out.shape == (3, 224, 224, 3) and out.dtype == np.float32
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)
    np.testing.assert_array_equal(out, fn(images, np.random.default_rng(5)))
  train = T.PRESETS["imagenet2012"].train
  assert not np.array_equal(train(images, np.random.default_rng(5)),
                            train(images, np.random.default_rng(6)))
  flat = np.full((100, 150, 3), 77, np.uint8)
  assert np.all(T.random_resized_crop(flat, np.random.default_rng(0)) == 77)
  assert T.resize_center_crop(images[0]).shape == (224, 224, 3)
  np.testing.assert_array_equal(T.resize_box(images[0], (0, 0, 300, 400), (300, 400)), images[0])
  halved = images[0].reshape(150, 2, 200, 2, 3).mean(axis=(1, 3))
  np.testing.assert_array_equal(T.resize_box(images[0], (0, 0, 300, 400), (150, 200)),
                                np.rint(halved))


def test_mnist_presets_scale_to_unit_interval():
  images = np.array([[[[0]], [[255]]]], np.uint8)
  for fn in T.PRESETS["mnist"]:
    np.testing.assert_array_equal(fn(images, None), [[[[0.0]], [[1.0]]]])


def test_shard_batch():
  batch = {"image": np.arange(8 * 3).reshape(8, 3), "label": np.arange(8)}
  sharded = data.shard_batch(batch, 4)
  assert sharded["image"].shape == (4, 2, 3) and sharded["label"].shape == (4, 2)
  np.testing.assert_array_equal(sharded["label"].reshape(-1), batch["label"])
  with pytest.raises(ValueError, match="batch size 8 is not divisible by num_devices=3"):
    data.shard_batch(batch, 3)
  with pytest.raises(ValueError, match="same leading batch axis"):
    data.shard_batch({"a": np.zeros(4), "b": np.zeros(6)}, 2)
  with pytest.raises(ValueError, match="num_devices"):
    data.shard_batch(batch, 0)


def test_unknown_name_lists_known_names(tmp_path):
  with pytest.raises(ValueError, match="unknown data set 'no_such_set'.*mnist5k, mnist, cifar10"):
    data.load("no_such_set", "train", batch_size=8, data_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown preprocess 'cifar11'"):
    data.load("mnist5k", "train", batch_size=8, data_dir=tmp_path, preprocess="cifar11")


def test_missing_data_dir(tmp_path):
  missing = tmp_path / "absent"
  with pytest.raises(ValueError, match=f"data_dir '{missing}' does not exist"):
    data.load("mnist5k", "train", batch_size=8, data_dir=missing)
  assert not missing.exists()


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_unprepared_tfds_set_says_how_to_prepare(tmp_path, name):
  with pytest.raises(FileNotFoundError) as info:
    data.load(name, "train", batch_size=8, data_dir=tmp_path)
  message = str(info.value)
  assert f"tfds build {name} --data_dir {tmp_path} --file_format array_record" in message
  assert "pip install tensorflow" in message and "never downloads" in message
  assert info.value.__cause__ is None and info.value.__context__ is None


def test_set_without_random_access_says_how_to_rebuild(data_dir, tmp_path):
  shutil.copytree(data_dir / "optg_tiny_images", tmp_path / "optg_tiny_images")
  info = tmp_path / "optg_tiny_images" / "1.0.0" / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(ValueError, match="stored as tfrecord.*--file_format array_record"):
    data.load("optg_tiny_images", "train", batch_size=8, data_dir=tmp_path)


def test_bad_arguments(data_dir):
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    data.load("mnist5k", "train", batch_size=0, data_dir=data_dir)
  with pytest.raises(ValueError, match="num_epochs"):
    data.load("mnist5k", "train", batch_size=8, num_epochs=0, data_dir=data_dir)
  with pytest.raises(ValueError, match="start_step"):
    data.load("mnist5k", "train", batch_size=8, start_step=-1, data_dir=data_dir)
  with pytest.raises(ValueError, match="Unknown split 'valid'"):
    data.load("mnist5k", "valid", batch_size=8, data_dir=data_dir)
