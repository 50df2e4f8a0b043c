"""Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files, no download, no TFDS.

`read_fashion_mnist(split)` reads the four gzipped IDX files Debian installs
in `/usr/share/datasets/fashion-mnist/` (`apt-get install -y
dataset-fashion-mnist`); `fashion_mnist_source` streams them.
"""

from __future__ import annotations

import os

import numpy as np

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
