"""Random-access image sources: `len(source)` records, `source[i]` one record.

A record is `(image, label)`:

* `image` is either a file path (`str`, decoded later, in a pipeline worker)
  or a uint8 array `[H, W]` / `[H, W, C]` (already pixels);
* `label` is an `int`; -1 where the set has no labels (a flat OOD folder).

Nothing is decoded when a source is made and no source holds the images
whole: folders keep their sorted file list, `.npy` pairs are memory-mapped,
TFDS reads array_record files by index. Only `ArraySource` (tests, the
embedded OOD sets) and Fashion-MNIST (47 MB of uint8 at most) sit in memory.
Every source is a plain `Sequence`, so `grain.MapDataset.source` takes it.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib
from typing import Any

import numpy as np

from line_jax.data import _fashion_mnist

# torchvision's `IMG_EXTENSIONS` (datasets/folder.py) plus GIF; compared to
# the lower-cased file name, as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                  ".tiff", ".webp", ".gif")
NO_LABEL = -1

Record = tuple[Any, int]


def _is_hidden(name: str) -> bool:
  # `.ipynb_checkpoints/`, `.DS_Store`, macOS's AppleDouble `._x.jpg`: never
  # data, and a hidden folder taken for a class would shift every label.
  return name.startswith(".")


def _is_image(name: str) -> bool:
  return not _is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def _images_under(folder: str) -> list[str]:
  """Image files under `folder`, hidden names skipped at every depth.

  torchvision's order: directories as `os.walk` yields them, sorted, then
  file names sorted within each.
  """
  found = []
  for root, dirs, names in os.walk(folder, followlinks=True):
    dirs[:] = [d for d in dirs if not _is_hidden(d)]  # Not descended into.
    found.append((root, sorted(n for n in names if _is_image(n))))
  return [os.path.join(root, name) for root, names in sorted(found) for name in names]


class ImageFolderSource(Sequence):
  """Image files in torchvision's `ImageFolder` layout, or a flat folder.

  With class subfolders (`root/<class>/**/<image>`), the sorted subfolder
  names are the classes and their positions the labels, exactly as
  torchvision's `ImageFolder` (files directly in `root` are ignored, as
  there). A folder with no subfolder is a flat, unlabelled set (an OOD set):
  its images, sorted, with label -1.

  Hidden names, those starting with ".", are skipped at every depth, files
  and folders alike: `.ipynb_checkpoints/` is no class (torchvision would
  make it class 0 and shift every label), `.DS_Store` and macOS's `._x.jpg`
  AppleDouble files are no images. `check_class_names` compares `classes`
  with the classes a model was trained on.

  Attributes:
    root: the folder.
    classes: the class names, sorted; `()` for a flat folder.
    paths: `[N]` image paths in record order.
    labels: int32 `[N]`.
  """

  def __init__(self, root: str | os.PathLike, *, flat: bool | None = None):
    """Lists the files (no image is opened).

    Args:
      root: the folder.
      flat: True reads every image under `root` (recursively) as unlabelled;
        False requires class subfolders; None (default) decides by whether
        `root` has subfolders.

    Raises:
      FileNotFoundError: if `root` is not a folder.
      ValueError: if it holds no image, or a class folder holds none.
    """
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"image folder {self.root} does not exist")
    subfolders = sorted(e.name for e in os.scandir(self.root)
                        if e.is_dir() and not _is_hidden(e.name))
    if flat is None:
      flat = not subfolders
    if flat:
      self.classes = ()
      self.paths = _images_under(self.root)
      self.labels = np.full(len(self.paths), NO_LABEL, np.int32)
    else:
      if not subfolders:
        raise ValueError(f"{self.root} has no class subfolder")
      self.classes = tuple(subfolders)
      per_class = [_images_under(os.path.join(self.root, c)) for c in subfolders]
      empty = [c for c, files in zip(subfolders, per_class) if not files]
      if empty:
        raise ValueError(
            f"class folder(s) {empty} under {self.root} hold no image file "
            f"({', '.join(IMG_EXTENSIONS)})")
      self.paths = [p for files in per_class for p in files]
      self.labels = np.repeat(np.arange(len(subfolders), dtype=np.int32),
                              [len(files) for files in per_class])
    if not self.paths:
      raise ValueError(
          f"no image file ({', '.join(IMG_EXTENSIONS)}) under {self.root}")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Record:
    return self.paths[index], int(self.labels[index])

  def __repr__(self) -> str:
    return (f"ImageFolderSource({self.root!r}, {len(self)} images, "
            f"{len(self.classes)} classes)")


def check_class_names(found: Sequence[str], expected: Sequence[str], *,
                      where: str = "the image folder", against: str = "the model") -> None:
  """Raises unless `found` equals `expected`: the same names in the same order.

  A label is a class's position in the sorted folder names, so a class more
  or less, or the model's classes in another order, would mislabel every
  image after it without any error.

  Args:
    found: the data's class names, e.g. `ImageFolderSource.classes`.
    expected: the classes the model was trained on, label `i` at `i`.
    where, against: how the message names the data and the model.

  Raises:
    ValueError: naming the classes missing from `found` and those not in
      `expected`, or, for the same names in another order, the labels that
      differ.
  """
  found, expected = [str(c) for c in found], [str(c) for c in expected]
  if found == expected:
    return
  found_set, expected_set = set(found), set(expected)
  missing = [c for c in expected if c not in found_set]
  unexpected = [c for c in found if c not in expected_set]
  head = (f"the classes of {where} ({len(found)}) do not match those of {against} "
          f"({len(expected)})")
  if missing or unexpected or len(found) != len(expected):
    parts = ([f"in {against} but not in {where}: {missing}"] if missing else []) + (
        [f"in {where} but not in {against}: {unexpected}"] if unexpected else [])
    raise ValueError(f"{head}: {'; '.join(parts) or 'a name repeats'}. Labels are "
                     "positions in the sorted class folder names, so they would not "
                     f"be {against}'s classes")
  differ = [i for i, (f, e) in enumerate(zip(found, expected)) if f != e]
  shown = ", ".join(f"label {i} is {found[i]!r} here but {expected[i]!r} in {against}"
                    for i in differ[:3])
  raise ValueError(f"{head}: the same names in a different order ({shown}"
                   f"{', ...' if len(differ) > 3 else ''}); labels follow the sorted "
                   f"folder names, so {len(differ)} classes would be mislabelled")


class ArraySource(Sequence):
  """Images already in memory (tests, the embedded OOD sets).

  Attributes:
    images: uint8 `[N, H, W]` or `[N, H, W, C]`.
    labels: int32 `[N]`; -1 everywhere when none were given.
  """

  def __init__(self, images, labels=None, *, name: str = "images"):
    """Checks dtypes and lengths; `name` is how errors call the array."""
    images = np.asarray(images) if not isinstance(images, np.ndarray) else images
    if images.dtype != np.uint8:
      raise ValueError(
          f"{name} has dtype {images.dtype}; expected uint8 pixels in "
          "[0, 255] (convert with np.clip(x, 0, 255).astype(np.uint8))")
    if images.ndim not in (3, 4):
      raise ValueError(f"{name} has shape {images.shape}; expected [N, H, W] "
                       "or [N, H, W, C]")
    if images.shape[0] == 0:
      raise ValueError(f"{name} holds no image (shape {images.shape})")
    if labels is None:
      labels = np.full(images.shape[0], NO_LABEL, np.int32)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
      raise ValueError(
          f"labels must be integers of shape [{images.shape[0]}], got "
          f"{labels.dtype} {labels.shape}")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.name = name

  def __len__(self) -> int:
    return self.images.shape[0]

  def __repr__(self) -> str:
    where = getattr(self.images, "filename", None)
    return (f"ArraySource({self.name!r}, {len(self)} images"
            + (f" in {where}" if where else "") + ")")

  def __getitem__(self, index: int) -> Record:
    # A memmap row is read here, in the worker thread, not up front.
    return np.asarray(self.images[index]), int(self.labels[index])


class Subset(Sequence):
  """The records of `source` at `indices`, in that order (a view, no copy).

  Attributes:
    source: the source viewed.
    indices: int64 `[k]` positions in `source`.
    labels: `[k]` labels where `source` knows its labels up front, else None.
  """

  def __init__(self, source: Sequence, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64).reshape(-1)
    if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
      raise IndexError(f"indices outside [0, {len(source)}) for a subset of {source!r}")
    labels = getattr(source, "labels", None)
    self.labels = None if labels is None else np.asarray(labels)[self.indices]

  @classmethod
  def range(cls, source: Sequence, start: int, stop: int) -> "Subset":
    """Records `[start, stop)` of `source` (clipped to its length)."""
    return cls(source, np.arange(start, max(start, min(stop, len(source)))))

  def __len__(self) -> int:
    return self.indices.size

  def __getitem__(self, index: int):
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    return self.source[int(self.indices[index])]

  def __repr__(self) -> str:
    return f"Subset({self.source!r}, {len(self)} records)"


def npy_source(folder: str | os.PathLike) -> ArraySource:
  """`folder/images.npy` (uint8) and `folder/labels.npy`, memory-mapped.

  `labels.npy` is optional (an unlabelled OOD set). Files are read without
  pickle (`allow_pickle=False`) and mapped (`mmap_mode='r'`), so opening a
  set of any size costs no memory; pixels are read as records are.

  Raises:
    FileNotFoundError: if the folder or `images.npy` is missing.
    ValueError: naming the file: not a plain array, wrong dtype or shape,
      or image and label counts that differ.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"npy folder {folder} does not exist")
  images_path, labels_path = folder / "images.npy", folder / "labels.npy"
  if not images_path.is_file():
    raise FileNotFoundError(f"{images_path} not found")
  images = _load_npy(images_path)
  labels = _load_npy(labels_path) if labels_path.is_file() else None
  if labels is not None and labels.shape != images.shape[:1]:
    raise ValueError(f"{labels_path} has shape {labels.shape}; expected "
                     f"[{images.shape[0]}], one label per image of {images_path}")
  return ArraySource(images, labels, name=str(images_path))


def _load_npy(path: pathlib.Path) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as e:  # Object arrays and non-.npy files land here.
    raise ValueError(f"{path} is not a plain .npy array readable without "
                     f"pickle ({e})") from e


def fashion_mnist_source(split: str = "train", source_dir: str | os.PathLike | None = None
                         ) -> ArraySource:
  """Fashion-MNIST from Debian's IDX files (`dataset-fashion-mnist`).

  The gzipped files are read whole (47 MB for the training images): they
  cannot be memory-mapped compressed, and that is small.

  Args:
    split: "train" (60,000) or "test" (10,000).
    source_dir: the folder of the four IDX files; None is Debian's.

  Returns:
    An `ArraySource` of uint8 `[N, 28, 28]` images, labels in `[0, 10)`.

  Raises:
    FileNotFoundError: naming a missing file and the Debian package.
  """
  images, labels = _fashion_mnist.read_fashion_mnist(
      split, source_dir or _fashion_mnist.DEBIAN_FASHION_MNIST_DIR)
  return ArraySource(images, labels, name=f"Fashion-MNIST {split}")


class TfdsSource(Sequence):
  """A prepared TFDS split through `tfds.data_source` (array_record, no TF).

  Each record is read and its image decoded by TFDS when indexed, in a
  pipeline worker.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None,
               *, image_key: str = "image", label_key: str | None = "label",
               download: bool = False, builder_kwargs: dict | None = None):
    """Opens the split.

    Args:
      name: a TFDS name, e.g. "cifar10" or "imagenet2012".
      split: any TFDS split string ("train", "test[:1000]").
      data_dir: TFDS data folder; None is TFDS's default.
      image_key, label_key: the features holding the image and the label;
        `label_key=None` gives label -1.
      download: prepare the dataset when it is not in `data_dir` yet.
      builder_kwargs: passed to the builder (array_record is forced).

    Raises:
      ValueError: if the split is empty.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
      self._source = tfds.data_source(
          name, split=split, data_dir=self.data_dir, download=download,
          builder_kwargs={"file_format": "array_record", **(builder_kwargs or {})})
    except (KeyError, AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
      where = self.data_dir or ("TFDS's data folder ($TFDS_DATA_DIR, else "
                                "~/tensorflow_datasets)")
      raise ValueError(
          f"TFDS dataset {name!r} (split {split!r}) is not prepared under {where}; "
          f"nothing is downloaded here: prepare it first (`tfds build {name} --file_format "
          f"array_record --data_dir DIR`, then TFDS_DATA_DIR=DIR), or pass a folder of "
          f"images [{type(e).__name__}: {str(e).splitlines()[0][:160]}]") from e
    if len(self._source) == 0:
      raise ValueError(f"TFDS {name} split {split!r} is empty")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    # TFDS sources (and its mocks) do not all raise IndexError past the end,
    # which `Sequence.__iter__` needs to stop.
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    example = self._source[index]
    label = NO_LABEL if self.label_key is None else int(example[self.label_key])
    return np.asarray(example[self.image_key]), label

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} records)"
