"""OpenOOD's image lists: one `<path> <label>` line per image, paths relative to a root.

OpenOOD v1.5 ships its benchmarks as lists (`benchmark_imglist/cifar10/
test_mnist.txt`, ...) over one image folder (`images_classic/`); a user who
downloaded its files, or only some of them, has that layout. The path is
everything before the line's first space and the label the integer after it
(OpenOOD's `ImglistDataset` splits the same way); -1 marks an OOD image.

`ImageListSource` is such a list as a record source: the listed files that
exist, in list order, and what is missing, so that nothing is dropped
without its count being known (`listed`, `missing`).
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np

from line_jax.data._sources import Record


def read_image_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  """`(paths, labels)` of an OpenOOD image list, in line order.

  Blank lines are ignored. A label may be followed by more text (OpenOOD's
  lists for other tasks append JSON there), which is ignored.

  Returns:
    `paths` relative to the list's image root, int32 `labels` `[n]`.

  Raises:
    FileNotFoundError: the list does not exist.
    ValueError: naming the file and line of a line that is not
      `<path> <integer label>`, or a list with no line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image list {path} does not exist")
  paths, labels = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      name, _, rest = line.partition(" ")
      label = rest.split(maxsplit=1)[0] if rest.strip() else ""
      try:
        labels.append(int(label))
      except ValueError:
        raise ValueError(f"{path}:{number}: expected '<path> <integer label>', got "
                         f"{line[:80]!r}") from None
      paths.append(name)
  if not paths:
    raise ValueError(f"image list {path} lists no image")
  return paths, np.asarray(labels, np.int32)


class ImageListSource(Sequence):
  """The images of an OpenOOD list that exist under `root`, in list order.

  Attributes:
    list_path: the list file.
    root: the folder its paths are relative to (OpenOOD's `images_classic/`).
    listed: how many images the list names.
    missing: list paths (relative) of the images absent under `root`.
    paths: `[n]` absolute paths of the present images, in list order.
    labels: int32 `[n]`, the list's labels of those (-1: OOD).
  """

  def __init__(self, list_path: str | os.PathLike, root: str | os.PathLike, *,
               allow_missing: bool = False):
    """Reads the list and looks for each file (no image is opened).

    Args:
      list_path: an OpenOOD list (`read_image_list`).
      root: the folder the list's paths are relative to.
      allow_missing: keep the present images where some are absent (they
        are counted in `missing`); False raises instead.

    Raises:
      FileNotFoundError: a list or root that does not exist; without
        `allow_missing`, images absent, with their count and the first ones.
    """
    self.list_path, self.root = os.fspath(list_path), os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"image root {self.root} does not exist")
    names, labels = read_image_list(self.list_path)
    found = np.array([os.path.isfile(os.path.join(self.root, n)) for n in names], bool)
    self.listed = len(names)
    self.missing = [n for n, ok in zip(names, found) if not ok]
    if self.missing and not allow_missing:
      raise FileNotFoundError(
          f"{self.list_path}: {len(self.missing):,} of {self.listed:,} listed images are "
          f"absent under {self.root} (first: {', '.join(self.missing[:3])})")
    self.paths = [os.path.join(self.root, n) for n, ok in zip(names, found) if ok]
    self.labels = labels[found]

  @property
  def name(self) -> str:
    """The list's file name without `.txt` (`test_mnist`)."""
    return os.path.splitext(os.path.basename(self.list_path))[0]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Record:
    return self.paths[index], int(self.labels[index])

  def __repr__(self) -> str:
    return (f"ImageListSource({self.list_path!r}, {len(self):,} of {self.listed:,} listed "
            "images)")
