"""Image-folder OOD sets: the curated archives the OOD literature shares.

These sets are not in TFDS. Each is a tarball of image files; `download_curated`
fetches and unpacks one, which the benchmarks then read as an
`ImageFolderSource` through the input pipeline.

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


def _spec(name: str) -> CuratedSet:
  if name not in CURATED_OOD:
    raise ValueError(
        f"unknown curated OOD set {name!r}; known: {', '.join(CURATED_OOD)}")
  return CURATED_OOD[name]
