"""TFDS builder `fashion_mnist_local`: Fashion-MNIST from local IDX files.

Debian's package `dataset-fashion-mnist` (`apt-get install -y
dataset-fashion-mnist`, about 30 MB) installs the four gzipped IDX files of
Xiao et al. (2017) in `/usr/share/datasets/fashion-mnist/`:

  train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  (60,000 examples)
  t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz   (10,000 examples)

The stock `fashion_mnist` builder downloads the same files; this one reads
them from disk with NumPy, so it prepares offline and without TensorFlow:

  builder = FashionMnistLocal(data_dir=..., file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source(split="test")   # random access

or simply `load_split("fashion_mnist_local", "test", data_dir)`. The features
match the stock builder: `image` uint8 `[28, 28, 1]`, `label` in `[0, 10)`.
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from line_jax.data._idx import read_idx

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_fashion_mnist(
    split: str, source_dir: str | os.PathLike = DEBIAN_FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split straight from the IDX files, without TFDS.

  Args:
    split: "train" or "test".
    source_dir: folder holding the four `*-ubyte.gz` files.

  Returns:
    `(images, labels)`: uint8 `[N, 28, 28]` and uint8 `[N]`.

  Raises:
    FileNotFoundError: naming the missing file and the Debian package.
    ValueError: if images and labels disagree in count or shape.
  """
  if split not in _FILES:
    raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
  paths = [os.path.join(os.fspath(source_dir), name) for name in _FILES[split]]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{path} not found. Install Debian's dataset-fashion-mnist "
          f"(apt-get install -y dataset-fashion-mnist) or pass the folder "
          "that holds the four Fashion-MNIST IDX files as source_dir."
      )
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"{paths[0]}: expected uint8 [N, H, W], got "
                     f"{images.dtype} {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"{paths[1]} has {labels.shape} labels for "
                     f"{images.shape[0]} images")
  return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local IDX files (no download, no TF)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Reads the Debian dataset-fashion-mnist files."}

  def __init__(
      self, *, source_dir: str | os.PathLike = DEBIAN_FASHION_MNIST_DIR, **kwargs
  ):
    """Builder reading from `source_dir`; other kwargs go to TFDS."""
    self._source_dir = os.fspath(source_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST read from local IDX files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are already on disk.
    return {split: self._generate_examples(split) for split in _FILES}

  def _generate_examples(self, split):
    images, labels = read_fashion_mnist(split, self._source_dir)
    for i in range(images.shape[0]):
      # PIL images are encoded by Pillow; NumPy ones would need TensorFlow.
      yield i, {"image": PIL.Image.fromarray(images[i]), "label": int(labels[i])}
