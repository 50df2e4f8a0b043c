"""Features of an image set, extracted once into `.npy` memmaps and reused.

The network is by far the slowest stage of an evaluation (DenseNet-BC-100 on
the CPU: tens of images per second), and every scorer, the ablation and a
rerun read the same features. So each set is streamed through the input
pipeline once, batch by batch, and its logits, features and labels are
written into `.npy` files opened as memmaps: memory holds one batch of images
whatever the set's size. A set's files are reused while its fingerprint (the
model's variables, the normalisation, the preprocessing and the source's
identity) is unchanged; the fingerprint is written last, so an interrupted
extraction is redone, never half read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import numpy as np

from line_jax import features as features_lib


@dataclasses.dataclass(frozen=True)
class CachedSet:
  """One set's outputs of the network, memory-mapped.

  Attributes:
    logits: float32 `[n, classes]`.
    features: float32 `[n, features]`.
    labels: int32 `[n]` (-1 where the set has none).
    seconds: wall time of the extraction, whenever it ran.
    cached: read back from an earlier run's files.
  """

  logits: np.ndarray
  features: np.ndarray
  labels: np.ndarray
  seconds: float = 0.0
  cached: bool = False

  def __len__(self) -> int:
    return self.features.shape[0]

  def batches(self, batch_size: int = 4096) -> "MemmapBatches":
    """The re-iterable `(features, labels)` stream `fit_from_batches` takes."""
    return MemmapBatches(self.features, self.labels, batch_size)


@dataclasses.dataclass(frozen=True)
class MemmapBatches:
  """Re-iterable `(features [b, m], labels [b])` slices of cached arrays.

  Two-pass scorers (ReAct, ViM) iterate it twice; each pass reads the memmap
  again instead of holding the set.
  """

  features: np.ndarray
  labels: np.ndarray
  batch_size: int = 4096

  def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, self.features.shape[0], self.batch_size):
      stop = start + self.batch_size
      yield np.asarray(self.features[start:stop]), np.asarray(self.labels[start:stop])


def fingerprint(*parts: Any) -> str:
  """A short hex digest of arrays, pytrees of arrays and JSON-able values."""
  digest = hashlib.sha1()
  for part in parts:
    for leaf in jax.tree_util.tree_leaves(part):
      if isinstance(leaf, (np.ndarray, jax.Array)) or hasattr(leaf, "__array__"):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
      else:
        digest.update(json.dumps(leaf, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:16]


def _paths(folder: str, name: str) -> dict[str, str]:
  return {kind: os.path.join(folder, f"{name}.{kind}.npy")
          for kind in ("logits", "features", "labels")} | {
              "meta": os.path.join(folder, f"{name}.json")}


def _read(paths: dict[str, str], key: str) -> CachedSet | None:
  try:
    with open(paths["meta"]) as f:
      meta = json.load(f)
    if meta.get("key") != key:
      return None
    arrays = {k: np.load(paths[k], mmap_mode="r", allow_pickle=False)
              for k in ("logits", "features", "labels")}
  except (OSError, ValueError):
    return None
  return CachedSet(**arrays, seconds=float(meta.get("seconds", 0.0)), cached=True)


def extract_to_cache(
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    num_images: int,
    model: Any,
    variables: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    folder: str | os.PathLike,
    name: str,
    key: str,
    progress: bool = True,
) -> CachedSet:
  """Runs the network over a stream of image batches into memmaps.

  Args:
    batches: an iterable of `(images, labels)`, uint8 `[b, H, W, C]` and
      `[b]`, no batch larger than the first (the input pipeline's); run by
      `line_jax.features.iter_extract_batches` (one compilation).
    num_images: images in the stream.
    model, variables: a `line_jax.models` network returning
      `(logits, features)`, and its variables.
    mean, std: `[C]` normalisation in [0, 1] pixel units.
    folder: where the `.npy` files go (made if needed).
    name: file stem of this set.
    key: the set's fingerprint; files with another key are overwritten.
    progress: show a tqdm bar.

  Returns:
    The `CachedSet`, read back memory-mapped.
  """
  folder = os.fspath(folder)
  paths = _paths(folder, name)
  cached = _read(paths, key)
  if cached is not None:
    return cached
  os.makedirs(folder, exist_ok=True)
  if os.path.exists(paths["meta"]):
    os.remove(paths["meta"])  # Stale until the new key is written.
  start = time.perf_counter()
  out, row = None, 0
  label = f"features: {name}" if progress else False
  # The pipeline's threads decode the next batches while the network runs.
  for logits, feats, labels in features_lib.iter_extract_batches(
      model, variables, batches, mean=mean, std=std, progress=label, total=num_images):
    valid = feats.shape[0]
    if out is None:
      out = {
          "logits": _open(paths["logits"], (num_images, logits.shape[1])),
          "features": _open(paths["features"], (num_images, feats.shape[1])),
          "labels": _open(paths["labels"], (num_images,), np.int32),
      }
    out["logits"][row:row + valid] = logits
    out["features"][row:row + valid] = feats
    out["labels"][row:row + valid] = np.asarray(labels)
    row += valid
  if row != num_images:
    raise ValueError(f"{name}: the stream gave {row} images, expected {num_images}")
  for array in out.values():
    array.flush()
  seconds = time.perf_counter() - start
  with open(paths["meta"], "w") as f:
    json.dump({"key": key, "images": num_images, "seconds": seconds}, f)
  return dataclasses.replace(_read(paths, key), cached=False)


def _open(path: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
  return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
