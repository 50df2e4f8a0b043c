"""Loads a TFDS split into NumPy arrays through `tfds.data_source`.

`tfds.data_source` gives random access over array_record files and needs no
TensorFlow once a dataset is prepared. Preparing the stock builders, however,
does need TensorFlow (their extraction code uses `tf.io`) and a network; on a
machine with neither, prepare elsewhere and pass the `data_dir`, or use
`fashion_mnist_local`, which prepares from Debian's files offline.

Dataset names are the stock TFDS names:

| Role | Name              | Split used for evaluation | Images              |
|------|-------------------|---------------------------|---------------------|
| ID   | `cifar10`         | `test` (10,000)           | 32x32x3             |
| ID   | `cifar100`        | `test` (10,000)           | 32x32x3             |
| ID   | `imagenet2012`    | `validation` (50,000)     | variable, RGB       |
| ID   | `fashion_mnist`   | `test` (10,000)           | 28x28x1             |
| ID   | `fashion_mnist_local` | `test` (10,000)       | 28x28x1 (offline)   |
| OOD  | `svhn_cropped`    | `test` (26,032)           | 32x32x3             |
| OOD  | `dtd`             | `test` (1,880)            | variable, RGB       |
| OOD  | `places365_small` | `validation` (36,500)     | 256x256x3           |

`imagenet2012` cannot be downloaded by TFDS: put `ILSVRC2012_img_train.tar`
and `ILSVRC2012_img_val.tar` (from https://image-net.org/download-images) in a
folder and pass it as `manual_dir` (TFDS's default is
`<data_dir>/downloads/manual/`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

# Registers `fashion_mnist_local` with TFDS.
from line_jax.data import _fashion_mnist_local  # noqa: F401
from line_jax.data import _preprocess


@dataclasses.dataclass(frozen=True)
class StockDataset:
  """How the benchmark uses one TFDS dataset.

  Attributes:
    role: "id" (in-distribution) or "ood".
    eval_split: the split the benchmark evaluates on.
    fixed_size: True when every image has the same shape, so no resize is
      needed to stack them.
  """

  role: str
  eval_split: str
  fixed_size: bool


STOCK_DATASETS = {
    "cifar10": StockDataset("id", "test", True),
    "cifar100": StockDataset("id", "test", True),
    "imagenet2012": StockDataset("id", "validation", False),
    "fashion_mnist": StockDataset("id", "test", True),
    "fashion_mnist_local": StockDataset("id", "test", True),
    "svhn_cropped": StockDataset("ood", "test", True),
    "dtd": StockDataset("ood", "test", False),
    "places365_small": StockDataset("ood", "validation", True),
}


def load_split(
    name: str,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    resize_size: int | None = None,
    max_examples: int | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
    builder_kwargs: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole TFDS split into memory.

  Args:
    name: a TFDS name, e.g. "cifar10", "svhn_cropped", "fashion_mnist_local".
    split: any TFDS split string ("test", "train[:1000]"); None takes the
      benchmark's evaluation split from `STOCK_DATASETS`.
    data_dir: TFDS data folder; None uses TFDS's default (`$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).
    image_size: if set, every image is resized so its shorter side is
      `resize_size` and then center-cropped to `image_size` x `image_size`.
      Required for datasets whose images vary in size ("imagenet2012", "dtd").
    resize_size: shorter side before the crop; defaults to `image_size`
      (ImageNet evaluation uses 256 with `image_size=224`).
    max_examples: read only the first this many examples.
    manual_dir: folder holding manually downloaded archives (imagenet2012).
    download: prepare the dataset if it is not yet in `data_dir`.
    builder_kwargs: passed to the builder, e.g. `{"source_dir": ...}` for
      `fashion_mnist_local`.

  Returns:
    `(images, labels)`: uint8 `[N, H, W, C]` and int32 `[N]`.

  Raises:
    ValueError: if images differ in shape and `image_size` is None, or the
      split is empty.
  """
  if split is None:
    if name not in STOCK_DATASETS:
      raise ValueError(f"no default split for {name!r}: pass split=")
    split = STOCK_DATASETS[name].eval_split
  # TFDS only defaults to array_record when neither data_dir nor
  # builder_kwargs is given; random access needs it in every case.
  builder_kwargs = {"file_format": "array_record", **(builder_kwargs or {})}
  prepare_kwargs = {}
  if manual_dir is not None:
    prepare_kwargs["download_config"] = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir))
  source = tfds.data_source(
      name,
      split=split,
      data_dir=None if data_dir is None else os.fspath(data_dir),
      download=download,
      builder_kwargs=builder_kwargs,
      download_and_prepare_kwargs=prepare_kwargs or None,
  )
  count = len(source) if max_examples is None else min(max_examples, len(source))
  if count == 0:
    raise ValueError(f"{name} split {split!r} is empty")
  images, labels = None, np.empty((count,), np.int32)
  # One record at a time: `__getitems__` would be faster but TFDS's own
  # `mock_data` breaks it, and these loaders are tested under `mock_data`.
  for i in range(count):
    example = source[i]
    image = np.asarray(example["image"], np.uint8)
    if image.ndim == 2:
      image = image[:, :, None]
    if image_size is not None:
      image = _preprocess.resize_center_crop(
          image, resize_size or image_size, image_size)
    if images is None:  # Filled in place: no second copy at the end.
      images = np.empty((count, *image.shape), np.uint8)
    elif image.shape != images.shape[1:]:
      raise ValueError(
          f"{name} images differ in shape ({images.shape[1:]} then "
          f"{image.shape} at index {i}): pass image_size= to resize and "
          "crop them")
    images[i] = image
    labels[i] = example["label"]
  return images, labels
