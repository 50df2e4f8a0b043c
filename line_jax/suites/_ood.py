"""The OOD sets of a benchmark as sources: the paper's, offline, or a user's.

The paper's sets are read from `--data-dir` where present (see
`line_jax.suites`): SVHN from torchvision's `test_32x32.mat` with the
official per-label selection, curated folders as image-folder sources,
Places365 from TFDS. Where a suite has none of them, its offline sets
(`line_jax.data.ood_set`, built at the network's input shape) stand in.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import re

import numpy as np

from line_jax import data
from line_jax.suites import _catalog


def load_svhn_mat(path: str | os.PathLike, per_label: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """SVHN's cropped-digit `.mat` file, as torchvision reads it.

  Args:
    path: `test_32x32.mat` (or train / extra) of the SVHN format 2 release.
    per_label: keep the first this many images of each label in file order
      (`select_svhn_data.py`: 1,000); None keeps all.

  Returns:
    `(images, labels)`: uint8 `[n, 32, 32, 3]`, int32 `[n]` in `[0, 10)`
    (the file's label 10, digit 0, becomes 0 as in torchvision).
  """
  from scipy import io  # MATLAB v5 reader: plain arrays, nothing executed.

  mat = io.loadmat(os.fspath(path))
  images = np.transpose(mat["X"], (3, 0, 1, 2))  # [32, 32, 3, n] -> [n, 32, 32, 3].
  labels = mat["y"].reshape(-1).astype(np.int32)
  if per_label is not None:
    # On the file's own labels (1..10), as the official loop; 10 -> 0 after.
    keep = _catalog.first_per_label(labels, per_label)
    images, labels = images[keep], labels[keep]
  return np.ascontiguousarray(images, dtype=np.uint8), labels % 10


def paper_set(source: _catalog.OodSource, data_dir: str) -> Sequence:
  """One of the paper's OOD sets under `data_dir`, as a record source."""
  if source.kind == "svhn_mat":
    images, labels = load_svhn_mat(source.path(data_dir), source.per_label)
    return data.ArraySource(images[:source.max_images], labels[:source.max_images],
                            name=source.name)
  if source.kind == "curated":
    folder = data.ImageFolderSource(source.path(data_dir), flat=True)
    return folder if source.max_images is None else _first(folder, source.max_images)
  split = source.split if source.max_images is None else f"{source.split}[:{source.max_images}]"
  return data.TfdsSource(source.dataset, split, data_dir, label_key=None)


def _first(source: Sequence, count: int) -> Sequence:
  return data.Subset(source, np.arange(min(count, len(source))))


def offline_sets(suite: _catalog.Suite, size: int = 2000, seed: int = 0
                 ) -> dict[str, Sequence]:
  """The suite's offline OOD sets, built at its input shape, in memory."""
  return {name: data.ArraySource(
      data.ood_set(name, size, seed, side=suite.image_size, channels=suite.channels),
      name=name)
          for name in suite.offline_ood}


def suite_sets(suite: _catalog.Suite, data_dir: str | None, size: int = 2000
               ) -> dict[str, Sequence]:
  """The paper's sets present under `data_dir`; the offline ones if none is.

  Raises:
    FileNotFoundError: when neither is available, listing what is missing.
  """
  present, absent = _catalog.paper_ood(suite, data_dir)
  if present:
    return {s.name: paper_set(s, data_dir) for s in present}
  if suite.offline_ood:
    return offline_sets(suite, size)
  raise FileNotFoundError("no OOD set found:\n  - " + "\n  - ".join(absent))


def extra_sets(specs: Sequence[str | tuple[str, str]], image_shape: tuple[int, int, int],
               taken: Sequence[str], *, flag: str = "--extra-ood") -> dict[str, Sequence]:
  """Reads `--extra-ood NAME=PATH` sets (`flag` names the option in errors):
  a `.npy` of uint8 images of the benchmark's shape, or a folder of image
  files of any size (resized and cropped for the model by the pipeline);
  errors name the path and problem. A name is a plain word: letters, digits,
  "_", "-", "." (no ":", which line_jax's own set names use)."""
  out = {}
  for spec in specs:
    name, path = data.parse_extra_ood(spec) if isinstance(spec, str) else spec
    if not re.fullmatch(r"[\w.-]+", name):
      raise ValueError(f"{flag} name {name!r}: use letters, digits, '_', '-' or '.'")
    if name in out or name in taken or name == "average":
      raise ValueError(f"{flag} name {name!r} is already taken; choose another")
    if os.path.isdir(path):
      out[name] = data.ImageFolderSource(path, flat=True)
    else:
      out[name] = data.ArraySource(data.load_ood_npy(path, image_shape), name=name)
  return out
