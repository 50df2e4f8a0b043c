"""The embedded OOD sets of the default Fashion-MNIST benchmark.

Real images already on this machine, no network: each set is built
deterministically as uint8 `[size, 28, 28, 1]` (`size` = 2,000 by default).
Letters and digits are white on black like Fashion-MNIST; the photographic
sets keep their own gray levels. Building all seven at the default size takes
about 2 s on one CPU core.

| Set        | Source (package)                     | Source size       | How one image is made                          |
|------------|--------------------------------------|-------------------|------------------------------------------------|
| `letters`  | fonts in /usr/share/fonts, Pillow    | A-J x ~80 faces   | notMNIST-style white letter on black, random   |
|            | (Debian font packages, see _glyphs)  |                   | face, size 18-32 px, shift -3..3 px            |
| `digits`   | `sklearn.datasets.load_digits`       | 1,797 8x8 digits  | 0-16 scaled to 0-255, bilinear to 20x20, put   |
|            | (scikit-learn)                       |                   | in the 28x28 centre (MNIST layout) -2..2 px    |
| `textures` | `skimage.data` brick, grass, gravel  | 3 x 512x512       | random square crop of 28-160 px, bilinear      |
|            | (scikit-image)                       |                   | (antialiased) down to 28x28                    |
| `photos`   | `skimage.data` photos (1)            | 7 photos          | luma (ITU-R 601) gray, random square crop of   |
|            | (scikit-image)                       |                   | >= 48 px, bilinear down to 28x28               |
| `faces`    | `skimage.data.lfw_subset()[:100]`    | 100 25x25 faces   | random 21-25 px crop, mirrored half the time,  |
|            | (scikit-image; [100:] are non-faces) |                   | bilinear up to 28x28                           |
| `gaussian` | NumPy                                | -                 | i.i.d. N(127.5, 64^2) per pixel, rounded and   |
|            |                                      |                   | clipped to [0, 255]                            |
| `uniform`  | NumPy                                | -                 | i.i.d. uniform integers in [0, 255]            |

(1) camera, astronaut, coffee, chelsea, rocket, coins, stereo_motorcycle[0].

Seed: set `name` draws all its randomness from
`np.random.default_rng([seed, zlib.crc32(name.encode())])` (`seed` = 0 by
default), so a set depends only on `seed`, its name and `size`, never on which
other sets are built with it. The bytes are identical across runs given the
same NumPy, Pillow and scikit-learn / scikit-image data and, for `letters`,
the same font files.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable

import numpy as np
import PIL.Image

from line_jax.data import _glyphs

SIDE = 28


def _resize(image: np.ndarray, side: int = SIDE) -> np.ndarray:
  """uint8 `[H, W]` -> uint8 `[side, side]`, antialiased bilinear (Pillow)."""
  return np.asarray(PIL.Image.fromarray(image).resize((side, side), PIL.Image.BILINEAR))


def _random_crops(
    sources: list[np.ndarray], n: int, rng: np.random.Generator, min_side: int,
    max_side: int,
) -> np.ndarray:
  """`n` square crops from grayscale `sources`, each resized to 28x28."""
  out = np.empty((n, SIDE, SIDE), np.uint8)
  which = rng.integers(0, len(sources), n)
  for i in range(n):
    src = sources[which[i]]
    h, w = src.shape
    side = int(rng.integers(min_side, min(max_side, h, w) + 1))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    out[i] = _resize(src[top:top + side, left:left + side])
  return out


def _draw_indices(count: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """`n` indices in `[0, count)`: each index once before any repeats."""
  passes = -(-n // count)
  return np.concatenate([rng.permutation(count) for _ in range(passes)])[:n]


def _gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    return image.astype(np.uint8)
  return np.asarray(PIL.Image.fromarray(image[..., :3]).convert("L"))


def _letters(n: int, rng: np.random.Generator) -> np.ndarray:
  return _glyphs.letter_glyphs(n, rng, SIDE)


def _digits(n: int, rng: np.random.Generator) -> np.ndarray:
  from sklearn.datasets import load_digits  # Heavy import, only when asked.

  images = load_digits().images  # float64 [1797, 8, 8] in [0, 16].
  which = _draw_indices(len(images), n, rng)
  shifts = rng.integers(-2, 3, (n, 2))
  out = np.zeros((n, SIDE, SIDE), np.uint8)
  for i in range(n):
    digit = np.round(images[which[i]] * (255 / 16)).astype(np.uint8)
    top, left = 4 + shifts[i, 0], 4 + shifts[i, 1]
    out[i, top:top + 20, left:left + 20] = _resize(digit, 20)
  return out


def _textures(n: int, rng: np.random.Generator) -> np.ndarray:
  from skimage import data

  sources = [data.brick(), data.grass(), data.gravel()]
  return _random_crops(sources, n, rng, min_side=28, max_side=160)


def _photos(n: int, rng: np.random.Generator) -> np.ndarray:
  from skimage import data

  sources = [_gray(f()) for f in (
      data.camera, data.astronaut, data.coffee, data.chelsea, data.rocket,
      data.coins)]
  sources.append(_gray(data.stereo_motorcycle()[0]))
  return _random_crops(sources, n, rng, min_side=48, max_side=512)


def _faces(n: int, rng: np.random.Generator) -> np.ndarray:
  from skimage import data

  faces = data.lfw_subset()[:100]  # The last 100 are non-faces.
  if faces.dtype != np.uint8:  # scikit-image 0.26 gives floats in [0, 1].
    faces = np.round(np.clip(faces, 0, 1) * 255).astype(np.uint8)
  which = _draw_indices(len(faces), n, rng)
  out = np.empty((n, SIDE, SIDE), np.uint8)
  for i in range(n):
    side = int(rng.integers(21, 26))
    top, left = rng.integers(0, 26 - side, 2)
    crop = faces[which[i], top:top + side, left:left + side]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    out[i] = _resize(np.ascontiguousarray(crop))
  return out


def _gaussian(n: int, rng: np.random.Generator) -> np.ndarray:
  noise = rng.normal(127.5, 64.0, (n, SIDE, SIDE))
  return np.clip(np.round(noise), 0, 255).astype(np.uint8)


def _uniform(n: int, rng: np.random.Generator) -> np.ndarray:
  return rng.integers(0, 256, (n, SIDE, SIDE), dtype=np.uint8)


_BUILDERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "letters": _letters,
    "digits": _digits,
    "textures": _textures,
    "photos": _photos,
    "faces": _faces,
    "gaussian": _gaussian,
    "uniform": _uniform,
}

OOD_SET_NAMES = tuple(_BUILDERS)


def ood_set(name: str, size: int = 2000, seed: int = 0) -> np.ndarray:
  """Builds one embedded OOD set (see the module docstring for each).

  Args:
    name: one of `OOD_SET_NAMES`.
    size: number of images.
    seed: base seed; the set's stream is `default_rng([seed, crc32(name)])`.

  Returns:
    uint8 `[size, 28, 28, 1]`.
  """
  if name not in _BUILDERS:
    raise ValueError(
        f"unknown embedded OOD set {name!r}; known: {', '.join(OOD_SET_NAMES)}")
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  return _BUILDERS[name](size, rng)[..., None]


def ood_sets(
    names: Iterable[str] | None = None, size: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
  """Builds several embedded OOD sets; all of them by default.

  Args:
    names: subset of `OOD_SET_NAMES`; None means all, in that order.
    size: number of images per set.
    seed: base seed (each set derives its own stream from it and its name).

  Returns:
    `{name: uint8 [size, 28, 28, 1]}`.
  """
  names = OOD_SET_NAMES if names is None else tuple(names)
  return {name: ood_set(name, size, seed) for name in names}
