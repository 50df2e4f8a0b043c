"""Offline OOD sets: real images already on this machine, no network.

Each set is built deterministically as uint8 `[size, side, side, channels]`.
The default Fashion-MNIST benchmark uses the first seven at 28x28 gray
(`OOD_SET_NAMES`, 2,000 images each); the CIFAR benchmarks, where the paper's
sets are absent, use all eight at 32x32 RGB (`fashion_mnist` included). Sets
whose source is gray (letters, digits, textures, faces, fashion_mnist) repeat
their gray level in every channel; `photos` keeps the colour of its colour
sources and the noise sets draw each channel independently. Letters and
digits are white on black like Fashion-MNIST; the photographic sets keep
their own levels. Building the seven 28x28 sets at the default size takes
about 2 s on one CPU core.

`docs/ood_sets.md` says how each set is made.
"""

from __future__ import annotations

import os
import zlib
from typing import Callable, Iterable

import numpy as np
import PIL.Image

from line_jax.data import _fashion_mnist
from line_jax.data import _glyphs
from line_jax.data import _idx

SIDE = 28
FASHION_MNIST_TEST = os.path.join(_fashion_mnist.DEBIAN_FASHION_MNIST_DIR,
                                  "t10k-images-idx3-ubyte.gz")


def _resize(image: np.ndarray, side: int) -> np.ndarray:
  """uint8 `[H, W]` or `[H, W, 3]` -> `[side, side(, 3)]`, antialiased bilinear."""
  return np.asarray(PIL.Image.fromarray(image).resize((side, side), PIL.Image.BILINEAR))


def _random_crops(
    sources: list[np.ndarray], n: int, rng: np.random.Generator, side: int,
    min_side: int, max_side: int,
) -> np.ndarray:
  """`n` square crops from `sources` (`[H, W]` or `[H, W, 3]`), each resized to side."""
  out = np.empty((n, side, side, *sources[0].shape[2:]), np.uint8)
  which = rng.integers(0, len(sources), n)
  for i in range(n):
    src = sources[which[i]]
    h, w = src.shape[:2]
    crop = int(rng.integers(min_side, min(max_side, h, w) + 1))
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    out[i] = _resize(np.ascontiguousarray(src[top:top + crop, left:left + crop]), side)
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


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


# Each builder returns uint8 `[n, side, side]` (gray: channels are repeated
# after) or `[n, side, side, channels]` (it handles colour itself).
def _letters(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  del channels  # Gray glyphs.
  return _glyphs.letter_glyphs(n, rng, side)


def _digits(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  del channels
  from sklearn.datasets import load_digits  # Heavy import, only when asked.

  images = load_digits().images  # float64 [1797, 8, 8] in [0, 16].
  which = _draw_indices(len(images), n, rng)
  shifts = rng.integers(-2, 3, (n, 2))
  inner = round(side * 20 / 28)  # MNIST: a 20x20 digit in a 28x28 frame.
  margin = (side - inner) // 2
  out = np.zeros((n, side, side), np.uint8)
  for i in range(n):
    digit = np.round(images[which[i]] * (255 / 16)).astype(np.uint8)
    top, left = margin + shifts[i, 0], margin + shifts[i, 1]
    out[i, top:top + inner, left:left + inner] = _resize(digit, inner)
  return out


def _textures(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  del channels  # scikit-image's textures are gray.
  from skimage import data

  sources = [data.brick(), data.grass(), data.gravel()]
  return _random_crops(sources, n, rng, side, min_side=side, max_side=160)


def _photos(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  from skimage import data

  sources = [f() for f in (data.camera, data.astronaut, data.coffee, data.chelsea,
                           data.rocket, data.coins)]
  sources.append(data.stereo_motorcycle()[0])
  convert = _gray if channels == 1 else _rgb
  return _random_crops([convert(s) for s in sources], n, rng, side, min_side=48,
                       max_side=512)


def _faces(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  del channels
  from skimage import data

  faces = data.lfw_subset()[:100]  # The last 100 are non-faces.
  if faces.dtype != np.uint8:  # scikit-image 0.26 gives floats in [0, 1].
    faces = np.round(np.clip(faces, 0, 1) * 255).astype(np.uint8)
  which = _draw_indices(len(faces), n, rng)
  out = np.empty((n, side, side), np.uint8)
  for i in range(n):
    crop = int(rng.integers(21, 26))
    top, left = rng.integers(0, 26 - crop, 2)
    image = faces[which[i], top:top + crop, left:left + crop]
    if rng.random() < 0.5:
      image = image[:, ::-1]
    out[i] = _resize(np.ascontiguousarray(image), side)
  return out


def _fashion_mnist(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  del channels
  if not os.path.isfile(FASHION_MNIST_TEST):
    raise FileNotFoundError(
        f"{FASHION_MNIST_TEST} not found: install Debian's dataset-fashion-mnist "
        "(apt-get install -y dataset-fashion-mnist)")
  images = _idx.read_idx(FASHION_MNIST_TEST)  # uint8 [10000, 28, 28].
  which = _draw_indices(len(images), n, rng)
  if side == images.shape[1]:
    return images[which]
  return np.stack([_resize(images[i], side) for i in which])


def _gaussian(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  shape = (n, side, side) if channels == 1 else (n, side, side, channels)
  return np.clip(np.round(rng.normal(127.5, 64.0, shape)), 0, 255).astype(np.uint8)


def _uniform(n: int, rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
  shape = (n, side, side) if channels == 1 else (n, side, side, channels)
  return rng.integers(0, 256, shape, dtype=np.uint8)


_BUILDERS: dict[str, Callable[[int, np.random.Generator, int, int], np.ndarray]] = {
    "letters": _letters,
    "digits": _digits,
    "textures": _textures,
    "photos": _photos,
    "faces": _faces,
    "fashion_mnist": _fashion_mnist,
    "gaussian": _gaussian,
    "uniform": _uniform,
}

# The default Fashion-MNIST benchmark's sets (Fashion-MNIST is its ID data).
OOD_SET_NAMES = tuple(name for name in _BUILDERS if name != "fashion_mnist")
# Every set this module builds.
ALL_SET_NAMES = tuple(_BUILDERS)


def ood_set(name: str, size: int = 2000, seed: int = 0, *, side: int = SIDE,
            channels: int = 1) -> np.ndarray:
  """Builds one offline OOD set from real images already on this machine
  (`docs/ood_sets.md` says how each set is made).

  Args:
    name: one of `ALL_SET_NAMES`.
    size: number of images.
    seed: base seed; the set's stream is `default_rng([seed, crc32(name)])`.
    side: image side in pixels (28 for Fashion-MNIST, 32 for CIFAR).
    channels: 1 (gray) or 3 (RGB).

  Returns:
    uint8 `[size, side, side, channels]`.
  """
  if name not in _BUILDERS:
    raise ValueError(
        f"unknown embedded OOD set {name!r}; known: {', '.join(ALL_SET_NAMES)}")
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  if side < 16:  # The digit frame and glyph sizes need room.
    raise ValueError(f"side must be >= 16, got {side}")
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  images = _BUILDERS[name](size, rng, side, channels)
  if images.ndim == 3:
    images = np.repeat(images[..., None], channels, axis=-1)
  return images


def ood_sets(
    names: Iterable[str] | None = None, size: int = 2000, seed: int = 0, *,
    side: int = SIDE, channels: int = 1,
) -> dict[str, np.ndarray]:
  """Builds several offline OOD sets; `OOD_SET_NAMES` by default.

  Args:
    names: subset of `ALL_SET_NAMES`; None means `OOD_SET_NAMES`, in order.
    size: number of images per set.
    seed: base seed (each set derives its own stream from it and its name).
    side, channels: image shape, as in `ood_set`.

  Returns:
    `{name: uint8 [size, side, side, channels]}`.
  """
  names = OOD_SET_NAMES if names is None else tuple(names)
  return {name: ood_set(name, size, seed, side=side, channels=channels) for name in names}


# Images no test set uses: the validation OOD set `python -m line_jax.tune` selects on.
VALIDATION_SOURCES = ("moon", "page", "text", "clock", "cell", "microaneurysms",
                      "hubble_deep_field", "immunohistochemistry")


def validation_ood(size: int = 2000, seed: int = 0) -> np.ndarray:
  """uint8 `[size, 28, 28, 1]` validation OOD images, disjoint from every test set.

  Half are random square crops of `skimage.data` images no test set uses
  (`VALIDATION_SOURCES`; gray), half Gaussian-blurred uniform noise (smooth
  blobs; the test noise sets are i.i.d. pixels). Seeded: the same images for
  the same `seed`.
  """
  from skimage import data  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([seed, zlib.crc32(b"tune-validation")])
  sources = [_gray(getattr(data, name)()) for name in VALIDATION_SOURCES]
  crops = _random_crops(sources, size // 2, rng, 28, min_side=28, max_side=256)
  noise = rng.uniform(0, 255, (size - size // 2, 28, 28)).astype(np.float32)
  blurred = _blur(noise, sigma=rng.uniform(1.0, 3.0, size - size // 2))
  return np.concatenate([crops, blurred])[..., None]


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """Gaussian blur per image, contrast stretched back to [0, 255], uint8."""
  from skimage.filters import gaussian  # pylint: disable=g-import-not-at-top

  out = np.empty(images.shape, np.uint8)
  for i, (image, s) in enumerate(zip(images, sigma)):
    smooth = gaussian(image, sigma=float(s), preserve_range=True)
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-6)
    out[i] = np.round(smooth * 255).astype(np.uint8)
  return out
