"""The in-memory loaders the streaming input pipeline replaced.

`load_image_folder` decodes a whole folder into one array in one thread;
`benchmarks.input_pipeline` measures the grain pipeline against it, and the
tests use it as an independent reference for the pipeline's pixels.
`load_split` reads a whole TFDS split into memory, `load_curated` a curated
OOD folder, and `FashionMnistLocal` is the TFDS builder that prepared
Fashion-MNIST from Debian's files before the library read them directly
(`line_jax.data.fashion_mnist_source`; the committed checkpoint's config
still names it). The library streams instead (`line_jax.data.image_batches` over
an `ImageFolderSource` or a `TfdsSource`): nothing in `line_jax` uses these.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from line_jax import data


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(directory: str | os.PathLike) -> list[pathlib.Path]:
  """All image files under `directory`, recursively, in sorted path order."""
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist")
  return sorted(
      p for p in root.rglob("*")
      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(
    directory: str | os.PathLike,
    image_size: int,
    *,
    resize_size: int | None = None,
    grayscale: bool = False,
    max_images: int | None = None,
) -> np.ndarray:
  """Decodes every image under `directory` into one array.

  Args:
    directory: a folder of image files (subfolders are searched too).
    image_size: side of the square center crop.
    resize_size: shorter side before the crop; defaults to `image_size`.
    grayscale: decode to one channel (Pillow's "L") instead of RGB.
    max_images: keep only the first this many files (in sorted order).

  Returns:
    uint8 `[N, image_size, image_size, C]`, C = 1 if `grayscale` else 3.

  Raises:
    FileNotFoundError: if the folder is missing.
    ValueError: if it holds no image file.
  """
  paths = list_images(directory)[:max_images]
  if not paths:
    raise ValueError(
        f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
  mode, channels = ("L", 1) if grayscale else ("RGB", 3)
  out = np.empty((len(paths), image_size, image_size, channels), np.uint8)
  for i, path in enumerate(paths):
    with PIL.Image.open(path) as pil:
      image = np.asarray(pil.convert(mode)).reshape(pil.height, pil.width, channels)
    out[i] = data.resize_center_crop(
        image, resize_size or image_size, image_size)
  return out


def load_curated(
    name: str,
    root: str | os.PathLike,
    *,
    image_size: int | None = None,
    resize_size: int | None = None,
    max_images: int | None = None,
) -> np.ndarray:
  """Loads a curated set already unpacked under `root`.

  Args:
    name: a key of `CURATED_OOD`, e.g. "lsun_c" or "inaturalist".
    root: the folder `download_curated` unpacked into.
    image_size: crop side; defaults to the set's benchmark (32 or 224).
    resize_size: shorter side before the crop; defaults to the set's own
      (32 or 256) when `image_size` is None too, else to `image_size`.
    max_images: keep only the first this many files.

  Returns:
    uint8 `[N, image_size, image_size, 3]`.
  """
  spec = _curated(name)
  if image_size is None:
    image_size, resize_size = spec.image_size, resize_size or spec.resize_size
  return load_image_folder(
      pathlib.Path(root) / spec.folder, image_size,
      resize_size=resize_size, max_images=max_images)


def _curated(name: str) -> data.CuratedSet:
  if name not in data.CURATED_OOD:
    raise ValueError(
        f"unknown curated OOD set {name!r}; known: {', '.join(data.CURATED_OOD)}")
  return data.CURATED_OOD[name]


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
      benchmark's evaluation split from `data.STOCK_DATASETS`.
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
    if name not in data.STOCK_DATASETS:
      raise ValueError(f"no default split for {name!r}: pass split=")
    split = data.STOCK_DATASETS[name].eval_split
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
      image = data.resize_center_crop(
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


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local IDX files (no download, no TF)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Reads the Debian dataset-fashion-mnist files."}

  def __init__(
      self, *, source_dir: str | os.PathLike = data.DEBIAN_FASHION_MNIST_DIR, **kwargs
  ):
    """Builder reading from `source_dir`; other kwargs go to TFDS."""
    self._source_dir = os.fspath(source_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST read from local IDX files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=data.FASHION_MNIST_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are already on disk.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    images, labels = data.read_fashion_mnist(split, self._source_dir)
    for i in range(images.shape[0]):
      # PIL images are encoded by Pillow; NumPy ones would need TensorFlow.
      yield i, {"image": PIL.Image.fromarray(images[i]), "label": int(labels[i])}
