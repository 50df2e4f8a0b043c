"""One name for a data set, the same in every CLI: `open_source(spec, split)`.

| spec                         | source                                               |
|------------------------------|------------------------------------------------------|
| `fashion_mnist`              | Debian's Fashion-MNIST files (`dataset-fashion-mnist`) |
| `tfds:NAME`                  | a prepared TFDS data set (`tfds.data_source`, no TF)  |
| a folder with `images.npy`   | `images.npy` / `labels.npy` (no pickle)              |
| a folder with `SPLIT/`       | that subfolder, in torchvision's ImageFolder layout  |
| any other folder             | the folder itself, in ImageFolder layout (or flat)   |

Nothing is downloaded: a name that is not there is an error that says what
to install or prepare.
"""

from __future__ import annotations

import os

from line_jax.data import _sources


def open_source(spec: str, split: str = "train"):
  """The random-access source that `spec` names (see the module docstring).

  Args:
    spec: a data set name or a folder.
    split: "train" or "test" (a TFDS split string for `tfds:`).

  Raises:
    ValueError: for a spec that names nothing usable.
  """
  if spec == "fashion_mnist":
    return _sources.fashion_mnist_source(split)
  if spec.startswith("tfds:"):
    return _sources.TfdsSource(spec[len("tfds:"):], split)
  if not os.path.isdir(spec):
    raise ValueError(f"dataset {spec!r} is neither 'fashion_mnist', 'tfds:NAME', nor a "
                     "folder (images.npy + labels.npy, or images in class subfolders)")
  if os.path.isfile(os.path.join(spec, "images.npy")):
    return _sources.npy_source(spec)
  if os.path.isdir(os.path.join(spec, split)):
    return _sources.ImageFolderSource(os.path.join(spec, split))
  return _sources.ImageFolderSource(spec)
