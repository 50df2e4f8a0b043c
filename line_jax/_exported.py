"""An exported detector, loaded and called with jax and numpy alone.

    detector = line_jax.export.load("det/")        # no model code, no scorer module
    out = detector(images)                         # uint8 [n, H, W, C]
    out.score, out.is_ood, out.pred                # [n] float32, bool, int32

A folder `line_jax.detector.Detector.export` wrote:

* `function.stablehlo`: `jax.export`'s serialised function `(weights, mean,
  std, threshold, images) -> (score, is_ood, pred)`, backbone and scorer in
  one computation, its batch dimension symbolic (`8*groups`), and
  `function_small.stablehlo`, the same for batches of 1, 2 and 4;
* `weights.npz`: the network's variables and the scorer's state, flattened
  (`w00000`, ...), read without pickle;
* `manifest.json`: the input (height, width, channels, resize, mean, std),
  the threshold and its calibration, the scorer, the platforms it was
  lowered for, the versions that wrote it.

Mean, std and threshold are data: editing `manifest.json`'s threshold moves
the decisions without exporting again. Batches are padded to buckets (1, 2,
4, then `_buckets.bucket`'s multiples of 8), so a stream of sizes 1..300
compiles a handful of times.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _buckets
from line_jax import _json
from line_jax import layout

FORMAT = "line_jax.exported/1"
MANIFEST = "manifest.json"
FUNCTION = "function.stablehlo"  # Batches of 8, 16, ...: a few images per pass on a CPU.
SMALL_FUNCTION = "function_small.stablehlo"  # Batches of 1, 2, 4: one pass.
WEIGHTS = "weights.npz"
# Rows per call: bounds the device memory a large request takes.
MAX_ROWS_PER_CALL = 256


class Decisions(NamedTuple):
  """Per input: `score` `[n]` float32 (higher = more in-distribution; NaN
  for a bad input), `is_ood` `[n]` bool (score below the threshold, or NaN),
  `pred` `[n]` int32 (the classifier's own class)."""

  score: np.ndarray
  is_ood: np.ndarray
  pred: np.ndarray


def weight_name(index: int) -> str:
  return f"w{index:05d}"


class ExportedDetector:
  """A loaded export: call it on uint8 `[n, H, W, C]` images.

  Attributes:
    manifest: `manifest.json` as a dict.
    input_shape: `(H, W, C)` the images must have.
    threshold: inputs scoring at least this are in-distribution.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    self.manifest = _read_manifest(path)
    self._exported, self._small = (_read_function(path, name)
                                   for name in (FUNCTION, SMALL_FUNCTION))
    platform = layout.platform()
    lowered = tuple(self._exported.platforms)
    if platform not in lowered and not (platform == "gpu" and "cuda" in lowered):
      raise ValueError(f"{path} was exported for {', '.join(lowered)}, not {platform}: "
                       "export it again with that platform")
    self._weights = _read_weights(path, int(self.manifest["weights"]))
    spec = self.manifest["input"]
    self.input_shape = (int(spec["height"]), int(spec["width"]), int(spec["channels"]))
    self._mean = jnp.asarray(spec["mean"], jnp.float32)
    self._std = jnp.asarray(spec["std"], jnp.float32)
    self.threshold = float(self.manifest["threshold"])
    self._call = layout.network_jit(self._exported.call)
    self._call_small = layout.network_jit(self._small.call)

  def __call__(self, images) -> Decisions:
    """`Decisions` of uint8 `images` `[n, H, W, C]` (NumPy or JAX)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 pixels, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != self.input_shape:
      raise ValueError(f"images must be [n, {', '.join(map(str, self.input_shape))}] "
                       f"(n, H, W, C), got shape {images.shape}; resize them as the "
                       f"manifest's input says: {self.manifest['input']}")
    parts = [self._run(images[i:i + MAX_ROWS_PER_CALL])
             for i in range(0, images.shape[0], MAX_ROWS_PER_CALL)]
    if not parts:
      return Decisions(np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.int32))
    return Decisions(*(np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(3)))

  def _run(self, images: np.ndarray):
    n = images.shape[0]
    images = _buckets.pad_images(images)  # Zero images: their outputs are dropped below.
    call = self._call if images.shape[0] % _buckets.SMALLEST == 0 else self._call_small
    out = call(self._weights, self._mean, self._std, jnp.float32(self.threshold), images)
    return [np.asarray(a)[:n] for a in out]

  def __repr__(self) -> str:
    return (f"ExportedDetector({self.manifest['scorer']}, input {self.input_shape}, "
            f"threshold {self.threshold:.6g}, platforms {list(self._exported.platforms)})")


def _read_manifest(path: str) -> dict[str, Any]:
  return _json.read_object(os.path.join(path, MANIFEST), format=FORMAT,
                           missing=f"{path} is not an exported line_jax detector")


def _read_function(path: str, name: str):
  try:
    with open(os.path.join(path, name), "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))
  except Exception as e:  # A damaged file fails in flatbuffers, struct, jaxlib alike.
    raise ValueError(f"{path}/{name}: cannot read the exported function: {e}") from e


def _read_weights(path: str, count: int) -> list[jax.Array]:
  file = os.path.join(path, WEIGHTS)
  try:
    with np.load(file, allow_pickle=False) as npz:
      names = set(npz.files)
      missing = [weight_name(i) for i in range(count) if weight_name(i) not in names]
      if missing or len(names) != count:
        raise ValueError(f"{file} holds {len(names)} arrays, the manifest {count}")
      return [jnp.asarray(npz[weight_name(i)]) for i in range(count)]
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{file}: corrupt or truncated weights: {e}") from e


def load(path: str | os.PathLike) -> ExportedDetector:
  """The detector `Detector.export` (or `python -m line_jax.export`) wrote to `path`."""
  return ExportedDetector(path)
