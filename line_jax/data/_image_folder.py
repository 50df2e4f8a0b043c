"""Image-folder OOD sets: the curated archives the OOD literature shares.

These sets are not in TFDS. Each is a tarball of image files; `download_curated`
fetches and unpacks one, `load_curated` / `load_image_folder` turn the folder
into a uint8 array, resized and center-cropped like torchvision's
`Resize(resize_size)` + `CenterCrop(image_size)`.

| Name          | Benchmark | Images | Archive (folder inside)                       |
|---------------|-----------|--------|-----------------------------------------------|
| `lsun_c`      | CIFAR     | 10,000 | ODIN's LSUN.tar.gz (`LSUN/`), 36x36 crops      |
| `lsun_r`      | CIFAR     | 10,000 | ODIN's LSUN_resize.tar.gz (`LSUN_resize/`)     |
| `isun`        | CIFAR     |  8,925 | ODIN's iSUN.tar.gz (`iSUN/`)                   |
| `inaturalist` | ImageNet  | 10,000 | MOS's iNaturalist.tar.gz (`iNaturalist/`)      |
| `sun`         | ImageNet  | 10,000 | MOS's SUN.tar.gz (`SUN/`)                      |
| `places`      | ImageNet  | 10,000 | MOS's Places.tar.gz (`Places/`)                |
| `textures`    | ImageNet  |  5,640 | DTD r1.0.1 (`dtd/images/`), all 47 classes     |

ODIN: Liang et al. (2018), github.com/facebookresearch/odin. MOS: Huang & Li
(2021), the ImageNet OOD subsets with ImageNet classes removed. TFDS's `dtd`
`test` split holds only 1,880 of the 5,640 textures, hence `textures` here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tarfile
import urllib.request

import numpy as np
import PIL.Image

from line_jax.data import _preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class CuratedSet:
  """One downloadable image-folder OOD set.

  Attributes:
    url: the archive's public address.
    archive: file name to save the archive under.
    folder: folder, relative to the download root, holding the images.
    image_size: side of the evaluation crop for this benchmark.
    resize_size: shorter side before cropping.
  """

  url: str
  archive: str
  folder: str
  image_size: int
  resize_size: int


_ODIN = "https://www.dropbox.com/s/"
_MOS = "http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/"

CURATED_OOD = {
    "lsun_c": CuratedSet(
        _ODIN + "fhtsw1m3qxlwj6h/LSUN.tar.gz?dl=1", "LSUN.tar.gz", "LSUN",
        32, 32),
    "lsun_r": CuratedSet(
        _ODIN + "moqh2wh8696c3yl/LSUN_resize.tar.gz?dl=1",
        "LSUN_resize.tar.gz", "LSUN_resize", 32, 32),
    "isun": CuratedSet(
        _ODIN + "ssz7qxfqae0cca5/iSUN.tar.gz?dl=1", "iSUN.tar.gz", "iSUN",
        32, 32),
    "inaturalist": CuratedSet(
        _MOS + "iNaturalist.tar.gz", "iNaturalist.tar.gz", "iNaturalist",
        224, 256),
    "sun": CuratedSet(_MOS + "SUN.tar.gz", "SUN.tar.gz", "SUN", 224, 256),
    "places": CuratedSet(
        _MOS + "Places.tar.gz", "Places.tar.gz", "Places", 224, 256),
    "textures": CuratedSet(
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        "dtd-r1.0.1.tar.gz", "dtd/images", 224, 256),
}


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
    out[i] = _preprocess.resize_center_crop(
        image, resize_size or image_size, image_size)
  return out


def _safe_extract(archive: pathlib.Path, root: pathlib.Path) -> None:
  with tarfile.open(archive) as tar:
    if hasattr(tarfile, "data_filter"):
      tar.extractall(root, filter="data")
      return
    # Older Pythons: refuse members that would land outside `root`.
    for member in tar.getmembers():
      target = (root / member.name).resolve()
      if not (member.isfile() or member.isdir()) or root.resolve() not in (
          target, *target.parents):
        raise ValueError(f"unsafe member {member.name!r} in {archive}")
    tar.extractall(root)


def download_curated(name: str, root: str | os.PathLike) -> pathlib.Path:
  """Downloads and unpacks one curated set under `root` (needs a network).

  Args:
    name: a key of `CURATED_OOD`.
    root: download folder; the archive is kept there.

  Returns:
    The folder holding the images, `root / CURATED_OOD[name].folder`.
  """
  spec = _spec(name)
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  archive = root / spec.archive
  if not archive.exists():
    partial = archive.with_name(archive.name + ".part")
    urllib.request.urlretrieve(spec.url, partial)
    partial.rename(archive)
  folder = root / spec.folder
  if not folder.is_dir():
    _safe_extract(archive, root)
  return folder


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
  spec = _spec(name)
  if image_size is None:
    image_size, resize_size = spec.image_size, resize_size or spec.resize_size
  return load_image_folder(
      pathlib.Path(root) / spec.folder, image_size,
      resize_size=resize_size, max_images=max_images)


def _spec(name: str) -> CuratedSet:
  if name not in CURATED_OOD:
    raise ValueError(
        f"unknown curated OOD set {name!r}; known: {', '.join(CURATED_OOD)}")
  return CURATED_OOD[name]
