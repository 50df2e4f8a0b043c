"""The input pipeline: a source's records to uint8 batches, on grain.

    source = ImageFolderSource("imagenet/train")
    batches = image_batches(source, Preprocess(224, 256), batch_size=256)
    for images, labels in batches:          # uint8 [b, 224, 224, 3], int32 [b]
      ...

The stages, in grain's terms:

    MapDataset.source(source)           random access, nothing decoded
      [.shuffle(seed)]                  optional, seeded: same order every run
      [[start:stop] or [index::count]]  this JAX process's shard
    MapDataset.source(chunks)           each batch's records cut into chunks
      .map(decode_chunk)                Preprocess each record, stack
      .to_iter_dataset(ReadOptions(num_threads=workers))
      .batch(chunks_per_batch)          concatenated; the last, partial
                                        batch is kept

Decoding runs in `workers` threads: Pillow releases the GIL while it decodes
and resizes, so threads scale here where worker processes would pay to start
interpreters and to copy every image back. A thread's task is a chunk of up
to 32 records of one batch, not one record: grain hands each task from thread
to thread through a future, which on a busy CPU can cost more than decoding
a 32x32 JPEG, and a chunk pays it once for many records. A
batch is still cut into at least `workers` chunks, so every thread is busy
even on a set of one batch. The output order is the source's (or the seeded
shuffle's) whatever the number of workers.

An iterator's position is `batches.position(iterator)`: a small JSON-able
dict of ints (the next batch's first record, the stream's length and batch
size) that `batches.iterator(position)` resumes from, so the fit CLI can save
it with orbax next to its accumulators.

A file Pillow cannot decode stops the stream with a `BadImageError` naming
it. `image_batches(..., skip_bad_images=True)` drops such records instead:
their batches come out shorter (never padded with made-up pixels), each is
warned about once and listed in `ImageBatches.skipped`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import functools
import os
from typing import Any, NamedTuple
import warnings

import grain
import jax
import numpy as np
import PIL.Image

from line_jax import distributed
from line_jax.data import _preprocess

# Appended to a `BadImageError` when nothing skips it.
SKIP_HINT = ("pass skip_bad_images=True to image_batches (--skip-bad-images on the "
             "command line) to drop undecodable images and list them in "
             "ImageBatches.skipped")


class BadImageError(ValueError):
  """A record that is no image: a file Pillow cannot decode, or pixels that
  are not uint8 `[H, W]` / `[H, W, C]`. `image_batches(skip_bad_images=True)`
  drops the records whose `preprocess` raises it."""


class SkippedImage(NamedTuple):
  """A record that `image_batches(..., skip_bad_images=True)` dropped.

  Attributes:
    index: its index in the source (before any shuffle or shard).
    path: the image file; None for a record held as pixels.
    error: why it could not be decoded, naming the file or the record.
  """

  index: int
  path: str | None
  error: str


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """One record `(image or path, label)` to `(uint8 [S, S, C], int32)`.

  Files are decoded with Pillow and converted to "L" (C = 1) or "RGB"
  (C = 3) as torchvision's `pil_loader` does; arrays are converted through
  Pillow too, so both kinds give the same pixels. Then `Resize(resize_size)`
  and `CenterCrop(image_size)` by `line_jax.data.resize_center_crop`, which
  matches torchvision's PIL path pixel for pixel. A record that is no image
  raises `BadImageError` (a `ValueError`) naming the file.

  Attributes:
    image_size: side of the square center crop; None keeps images as they
      are (they must then all have one shape to be batched).
    resize_size: shorter side before the crop; None is `image_size`.
    channels: 1 (grayscale) or 3 (RGB), what the model takes.
    fast_decode: let the JPEG decoder skip resolution the resize would throw
      away (`PIL.Image.draft`). Several times faster on large JPEGs, but the
      pixels differ slightly from torchvision's: opt-in, never the default.
  """

  image_size: int | None = None
  resize_size: int | None = None
  channels: int = 3
  fast_decode: bool = False

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels}")
    for name in ("image_size", "resize_size"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if self.resize_size is not None and self.image_size is None:
      raise ValueError("resize_size needs image_size (the crop) too")

  @property
  def mode(self) -> str:
    return "L" if self.channels == 1 else "RGB"

  def __call__(self, record: tuple[Any, int]) -> tuple[np.ndarray, np.int32]:
    image, label = record
    if isinstance(image, (str, os.PathLike)):
      pixels = self._decode(image)
    else:
      pixels = self._convert(np.asarray(image))
    if self.image_size is not None:
      pixels = _preprocess.resize_center_crop(
          pixels, self.resize_size or self.image_size, self.image_size)
    return pixels, np.int32(label)

  def _decode(self, path) -> np.ndarray:
    try:
      with PIL.Image.open(path) as pil:
        if self.fast_decode and self.image_size is not None:
          side = self.resize_size or self.image_size
          # Keeps both sides >= `side`, so the shorter side is still resized.
          pil.draft(self.mode, (side, side))
        # Converting to the mode a file already has is a copy (Pillow's
        # `convert` returns `self.copy()`): skipping it changes no pixel and
        # saves about a fifth of a large RGB JPEG's decoding time.
        pixels = np.asarray(pil if pil.mode == self.mode else pil.convert(self.mode))
    except (OSError, SyntaxError, ValueError) as e:
      # UnidentifiedImageError and truncated files are OSErrors.
      raise BadImageError(f"cannot decode image file {os.fspath(path)}: {e}") from e
    return pixels.reshape(*pixels.shape[:2], self.channels)

  def _convert(self, image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise BadImageError(f"expected a uint8 [H, W] or [H, W, C] image, got "
                          f"{image.dtype} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
      image = image[:, :, 0]
    if (image.ndim == 2 and self.channels == 1) or (
        image.ndim == 3 and image.shape[2] == self.channels):
      return image.reshape(*image.shape[:2], self.channels)
    pixels = np.asarray(PIL.Image.fromarray(image).convert(self.mode))
    return pixels.reshape(*pixels.shape[:2], self.channels)


@dataclasses.dataclass(frozen=True)
class ImageBatches:
  """A re-iterable stream of `(images, labels)` batches; see `image_batches`.

  Iterating starts a fresh pass; `iterator(position)` resumes one.

  Attributes:
    dataset: the grain `IterDataset`.
    num_records: records in this process's shard.
    batch_size: records per batch (the last batch may hold fewer).
    chunks: how batches are cut into thread tasks (grain counts those).
    skip_bad_images: whether undecodable records are dropped (see `skipped`).
  """

  dataset: grain.IterDataset
  num_records: int
  batch_size: int
  chunks: _Chunks
  skip_bad_images: bool = False
  # Source index -> SkippedImage, filled by the batching in the consumer's
  # thread as batches are read, over every pass.
  _skipped: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def __len__(self) -> int:
    """Number of batches, the last partial one included.

    With `skip_bad_images`, a batch whose every record was skipped is not
    yielded, so this is an upper bound.
    """
    return -(-self.num_records // self.batch_size)

  @property
  def skipped(self) -> tuple[SkippedImage, ...]:
    """The records dropped so far (in the batches read), by source index."""
    return tuple(sorted(self._skipped.values()))

  def __iter__(self) -> grain.DatasetIterator:
    return self.iterator()

  def iterator(self, position: dict | None = None) -> grain.DatasetIterator:
    """A new iterator, at the start or at a saved `position`.

    Raises:
      ValueError: if `position` was saved from a stream of another length or
        batch size, or is not between two batches.
    """
    iterator = iter(self.dataset)
    if position is not None:
      if (position.get("num_records"), position.get("batch_size")) != (
          self.num_records, self.batch_size):
        raise ValueError(
            f"position {position} was saved from another stream: this one has "
            f"{self.num_records} records in batches of {self.batch_size}")
      record = position["next_record"]
      if not (0 <= record <= self.num_records and (
          record % self.batch_size == 0 or record == self.num_records)):
        raise ValueError(f"position {position} is not between two batches")
      batch = -(-record // self.batch_size)
      # grain's own state: the index of the next chunk (thread task).
      iterator.set_state({"next_index": min(batch * self.chunks.per_batch,
                                            len(self.chunks))})
    return iterator

  def position(self, iterator: grain.DatasetIterator) -> dict[str, int]:
    """Where `iterator` is, as a JSON-able dict of ints.

    `next_record` is the first record of the next batch (`num_records` at
    the end), skipped records counted; `iterator(position)` resumes there.
    """
    chunk = iterator.get_state()["next_index"]
    batch = -(-chunk // self.chunks.per_batch)
    return {"next_record": min(batch * self.batch_size, self.num_records),
            "num_records": self.num_records, "batch_size": self.batch_size}


def image_batches(
    source,
    preprocess: Callable[[Any], Any],
    *,
    batch_size: int,
    workers: int | None = None,
    prefetch: int | None = None,
    shard: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
    skip_bad_images: bool = False,
) -> ImageBatches:
  """Builds the grain pipeline over a random-access source.

  Args:
    source: a sequence of records (`ImageFolderSource`, `ArraySource`, ...).
    preprocess: record -> `(uint8 [H, W, C], int32)`, usually `Preprocess`.
    batch_size: records per batch; the last batch keeps the remainder.
    workers: decoding threads; None is `os.cpu_count()`, 0 decodes in the
      calling thread.
    prefetch: records decoded ahead of the consumer (rounded up to whole
      chunks); None is two batches.
    shard: None reads every record; "contiguous" or "strided" reads this
      process's share (`line_jax.distributed.record_shard`: a block of the
      files, or records `i, i + n, ...`).
    process_index, process_count: the shard to read; None takes
      `jax.process_index()` / `jax.process_count()`.
    seed: shuffle the records with this seed before sharding (the same
      permutation in every process and every run); None keeps source order.
    skip_bad_images: drop the records whose `preprocess` raises
      `BadImageError` (a file Pillow cannot decode) from their batch, which
      comes out shorter; each is warned about once and listed in the
      result's `skipped`. False (default): such a record stops the stream.

  Returns:
    An `ImageBatches`: iterate it for `(images, labels)`, uint8
    `[b, H, W, C]` and int32 `[b]`.

  Raises:
    BadImageError: while iterating, without `skip_bad_images`, naming the
      file (or the record index) that cannot be decoded.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  # The stream holds source indices, so that a skipped record is reported
  # by its index in the source (grain's shuffle depends only on the length).
  indices = grain.MapDataset.range(len(source))
  if seed is not None:
    indices = indices.shuffle(seed)
  if shard is not None:
    indices = indices[distributed.record_shard(len(indices), shard, process_index,
                                               process_count)]
  per_batch = -(-batch_size // min(MAX_CHUNK, max(1, batch_size // max(workers, 1))))
  chunks = _Chunks(len(indices), batch_size, per_batch)
  prefetch = 2 * batch_size if prefetch is None else prefetch
  dataset = grain.MapDataset.source(chunks).map(
      functools.partial(_decode_chunk, source, indices, preprocess, skip_bad_images))
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=workers,
      prefetch_buffer_size=-(-max(prefetch, 0) * per_batch // batch_size)))
  skipped = {}
  dataset = dataset.batch(per_batch, batch_fn=functools.partial(_join_chunks, skipped))
  if skip_bad_images:
    # A batch whose every record was skipped; the iterator's state (the
    # position) passes through grain's filter unchanged.
    dataset = dataset.filter(lambda batch: batch[1].size > 0)
  return ImageBatches(dataset, len(indices), batch_size, chunks, skip_bad_images, skipped)


# Records per thread task at most: enough to make grain's hand-off between
# threads negligible next to decoding even 32x32 JPEGs, few enough that a
# batch of 256 still feeds 8 threads.
MAX_CHUNK = 32


class _Chunks(Sequence):
  """Record ranges `(start, stop)`: each batch cut into `per_batch` chunks.

  Batch `b` covers records `[b * batch_size, min((b + 1) * batch_size, n))`;
  it is cut into `per_batch` near-equal ranges (fewer for a last batch
  smaller than `per_batch`, so that no range is empty). Grouping the chunks
  `per_batch` at a time then gives back exactly the batches.
  """

  def __init__(self, n: int, batch_size: int, per_batch: int):
    self.n, self.batch_size, self.per_batch = n, batch_size, per_batch
    self.full, last = divmod(n, batch_size)
    self.last_chunks = min(per_batch, last)

  def __len__(self) -> int:
    return self.full * self.per_batch + self.last_chunks

  def __getitem__(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"chunk {index} out of range for {len(self)}")
    batch, part = divmod(index, self.per_batch)
    start = batch * self.batch_size
    size = min(self.batch_size, self.n - start)
    parts = self.per_batch if batch < self.full else self.last_chunks
    return start + part * size // parts, start + (part + 1) * size // parts


def _decode_chunk(source, indices, preprocess, skip: bool, bounds: tuple[int, int]):
  """Stream records `[start, stop)` to `(images [k, H, W, C], labels [k], skipped)`.

  `k` is the records kept; with none kept `images` is an empty `[0]`.
  """
  parts, skipped = [], []
  for i in range(*bounds):
    index = int(indices[i])
    record = source[index]
    try:
      image, label = preprocess(record)
    except BadImageError as e:
      path = record[0] if isinstance(record[0], (str, os.PathLike)) else None
      # A file's error names it already; pixels are named by their index.
      error = str(e) if path is not None else f"record {index} of {source!r}: {e}"
      if not skip:
        raise BadImageError(f"{error}; {SKIP_HINT}") from e
      skipped.append(SkippedImage(index, None if path is None else os.fspath(path), error))
      continue
    parts.append((image[None], np.asarray([label], np.int32)))
  if not parts:
    return np.zeros((0,), np.uint8), np.zeros((0,), np.int32), skipped
  return (*_concatenate(parts), skipped)


def _join_chunks(log: dict, chunks):
  """One batch from its chunks; records and warns about each new skipped image.

  Runs in the consumer's thread (grain's batching), so warnings come in
  stream order.
  """
  for chunk in chunks:
    for skipped in chunk[2]:
      if skipped.index not in log:
        log[skipped.index] = skipped
        warnings.warn(f"skipped an image that cannot be decoded: {skipped.error}")
  kept = [chunk[:2] for chunk in chunks if chunk[1].size]
  if not kept:
    return chunks[0][:2]
  return _concatenate(kept)


def _concatenate(parts):
  try:
    return (np.concatenate([images for images, _ in parts]),
            np.concatenate([labels for _, labels in parts]))
  except ValueError as e:
    shapes = sorted({images.shape[1:] for images, _ in parts})
    raise ValueError(f"images of one batch differ in shape {shapes}: give "
                     "Preprocess an image_size to resize and crop them") from e


def prefetch_to_device(batches: Iterable[Any], size: int = 2,
                       sharding: jax.sharding.Sharding | None = None) -> Iterator[Any]:
  """Yields each batch already copied to the device, `size` batches ahead.

  The copy of the next batches is dispatched (asynchronously) while the
  caller works on the current one.

  Args:
    batches: an iterable of pytrees of NumPy arrays.
    size: batches in flight, >= 1.
    sharding: where to put them; None is the default device.

  Yields:
    The same pytrees as `jax.Array`s.
  """
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  queue = []
  for batch in batches:
    queue.append(jax.device_put(batch, sharding))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
