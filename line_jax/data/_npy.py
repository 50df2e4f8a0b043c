"""User-supplied OOD sets from `.npy` files (`--extra-ood NAME=PATH.npy`)."""

from __future__ import annotations

import os

import numpy as np


def parse_extra_ood(spec: str) -> tuple[str, str]:
  """Splits a command-line `NAME=PATH.npy` into `(name, path)`.

  Raises:
    ValueError: if there is no `=`, or the name or the path is empty.
  """
  name, sep, path = spec.partition("=")
  name, path = name.strip(), path.strip()
  if not sep or not name or not path:
    raise ValueError(f"expected NAME=PATH.npy, got {spec!r}")
  return name, path


def load_ood_npy(
    path: str | os.PathLike, image_shape: tuple[int, int, int] = (28, 28, 1)
) -> np.ndarray:
  """Loads and checks a uint8 image array saved with `np.save`.

  Args:
    path: a `.npy` file (never unpickled: object arrays are refused).
    image_shape: `(H, W, C)` every image must have. With C = 1 the channel
      axis may be left out of the file (`[N, H, W]`).

  Returns:
    uint8 `[N, H, W, C]`.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming the problem: not a `.npy` array, object dtype, not
      uint8, 0-d, wrong image shape, or no image.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"OOD file {path} does not exist")
  try:
    array = np.load(path, allow_pickle=False)
  except ValueError as e:  # Object arrays and non-.npy files land here.
    raise ValueError(
        f"{path} is not a plain .npy array readable without pickle ({e}); "
        "save a uint8 array with np.save") from e
  if not isinstance(array, np.ndarray):  # An .npz archive, not one array.
    array.close()
    raise ValueError(f"{path} is an .npz archive; expected one .npy array")
  h, w, c = image_shape
  expected = f"[N, {h}, {w}, {c}]" + (f" or [N, {h}, {w}]" if c == 1 else "")
  if array.ndim == 0:
    raise ValueError(f"{path} holds a 0-d scalar; expected {expected}")
  if array.dtype != np.uint8:
    raise ValueError(
        f"{path} has dtype {array.dtype}; expected uint8 pixels in [0, 255] "
        "(convert with np.clip(x, 0, 255).astype(np.uint8))")
  shape = array.shape
  if c == 1 and array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4 or array.shape[1:] != (h, w, c):
    raise ValueError(f"{path} has shape {shape}; expected {expected}")
  if array.shape[0] == 0:
    raise ValueError(f"{path} holds no image (shape {shape})")
  return array
