"""The fold of many scorers over one stream of features, resumable.

Every scorer fits by its `Fold` (`line_jax.scorers._protocol`); this module
runs the folds of several scorers side by side over one stream of
`(features, labels)` batches, the way `python -m line_jax.fit` streams a
training set through a model:

* pass 1 reads the stream once: every scorer that reads data updates its
  accumulator from the same batch, so the model runs once per image;
* scorers that need a second pass (`fold.passes == 2`) read the features
  again from `features.npy` / `labels.npy`, float32 `[n, features]` and
  int32 `[n]` memory maps written during pass 1 (when such a scorer is
  asked for, or `keep_features`, which the feature cache publishes), or from
  a stream's own stored rows (`CachedFeatures`): the model does not run
  twice, and nothing is held in memory whole;
* every `save_every` batches the accumulators and the stream's position go
  to one orbax `CheckpointManager` step (atomic: a step is visible only once
  whole), after the feature rows before it are flushed. Killed at any moment
  and run again, the fold restarts from the last step; the batches after it
  are read again, identically, so the states are bit-identical to those of
  an uninterrupted run.

No scorer is named here: what a scorer accumulates is its own business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import functools
import json
import os
from typing import Any, Protocol

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from line_jax import features as features_lib
from line_jax import scorers
from line_jax.scorers import _common
from line_jax.scorers import _protocol

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
PROGRESS_DIR = "progress"


class Stream(Protocol):
  """A resumable stream of `(features, labels)` NumPy batches.

  `batches(position)` iterates from `position` (None: the start), yielding
  `(features [b, m] float32, labels [b] int, position_after)`, where
  `position_after` is a JSON-able value that resumes after that batch.
  `num_samples` and `num_batches` are the stream's length in samples and
  in batches. `stored` is None, or `(features, labels)` arrays of the whole
  stream that later passes read instead of a copy.
  """

  num_samples: int
  num_batches: int
  stored: tuple[np.ndarray, np.ndarray] | None

  def batches(self, position: Any | None) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
    ...


def _memmap(path: str, shape: tuple[int, ...], dtype, fresh: bool) -> np.memmap:
  if fresh or not os.path.isfile(path):
    tmp = path + ".tmp"
    np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
    os.replace(tmp, path)
  array = np.lib.format.open_memmap(path, mode="r+")
  if array.shape != shape or array.dtype != dtype:
    raise ValueError(f"{path} has {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                     f"{shape}: delete it and its progress/ folder to start over")
  return array


class _Rows:
  """Re-iterable batches of stored feature rows (the second pass)."""

  def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int):
    self._features, self._labels, self._batch_size = features, labels, batch_size

  def __iter__(self):
    for start in range(0, self._labels.shape[0], self._batch_size):
      stop = start + self._batch_size
      yield np.asarray(self._features[start:stop]), self._labels[start:stop]


def fit_stream(
    hparams: Mapping[str, Mapping[str, Any]],
    kernel,
    bias,
    stream: Stream,
    out: str,
    *,
    save_every: int = 20,
    on_batch: Callable[[int], None] | None = None,
    keep_features: bool = False,
    on_stream_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
  """Fits every scorer in `hparams` over `stream`, resumably, in `out`.

  Args:
    hparams: `{scorer name: {hyperparameter: value}}`; the scorers to fit.
    kernel: `[features, classes]` head kernel; bias: `[classes]` or None.
    stream: the training features (see `Stream`).
    out: folder for `progress/` (orbax steps) and `features.npy`.
    save_every: batches between progress saves.
    on_batch: called with the sample count of each batch (progress bars).
    keep_features: write `features.npy` / `labels.npy` even where no scorer
      reads them again (`features_files` names them), if any scorer reads
      the stream.
    on_stream_end: called once the stream is read whole and its rows are on
      disk, before any later pass or `finalize` (which may still fail); not
      called where no scorer reads the stream.

  Returns:
    `{scorer name: fitted state}`.
  """
  folds = {name: scorers.get(name).fold for name in hparams}
  for name, hp in hparams.items():
    scorers.get(name)._check(hp)  # pylint: disable=protected-access
  num_features, num_classes = _common.check_head(kernel, bias)
  accs = {name: folds[name].init(kernel, bias, **hparams[name]) for name in folds}
  readers = [n for n in folds if folds[n].reads_data]
  passes = {n: _protocol.passes_of(folds[n], accs[n]) for n in readers}
  two_pass = [n for n in readers if passes[n] > 1]
  needs_labels = any(folds[n].needs_labels for n in readers)

  pid = jax.process_index()
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(out), PROGRESS_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  step = manager.latest_step()
  position, done = None, 0
  if step is not None:
    saved = manager.restore(step, args=ocp.args.StandardRestore())
    mine = flax.serialization.msgpack_restore(np.asarray(saved[f"p{pid}"]).tobytes())
    accs.update({k: flax.serialization.from_state_dict(accs[k], mine["accs"][k])
                 for k in readers})
    position, done = json.loads(mine["position"]), int(mine["rows"])
  n = stream.num_samples
  rows = labels_all = None
  stored = getattr(stream, "stored", None)
  # With no scorer reading data the stream is not read at all: no rows to keep.
  if (two_pass and stored is None) or (keep_features and readers):
    features_path, labels_path = features_files(out)
    rows = _memmap(features_path, (n, num_features), np.float32, fresh=step is None)
    labels_all = _memmap(labels_path, (n,), np.int32, fresh=step is None)
  # A save is collective: every process's accumulators and position go into
  # one orbax step (process 0 writes it). So saves fall on batch indices that
  # every process reaches, up to the shortest shard's count, and at the end.
  common = _smallest(stream.num_batches)

  def save(index: int) -> None:
    if rows is not None:
      rows.flush()  # The rows a saved step vouches for are on disk first.
      labels_all.flush()
    mine = flax.serialization.msgpack_serialize({
        "accs": {k: flax.serialization.to_state_dict(jax.tree.map(np.asarray, accs[k]))
                 for k in readers},
        "position": json.dumps(position), "rows": done})
    parts = _protocol.gather_bytes(mine)
    manager.save(index, args=ocp.args.StandardSave(
        {f"p{i}": np.frombuffer(part, np.uint8) for i, part in enumerate(parts)}))

  index = step or 0
  if done and on_batch is not None:
    on_batch(done)  # Resumed: the progress starts where the saved step ended.
  final = _largest(stream.num_batches)  # The last save's step, the same everywhere.
  if readers:
    if done < n:
      for features, labels, position in stream.batches(position):
        _common.check_batch(features, labels, num_features, num_classes,
                            needs_labels=needs_labels)
        for name in readers:
          accs[name] = folds[name].update(accs[name], features, labels)
        size = features.shape[0]
        if rows is not None:
          rows[done:done + size] = features
          labels_all[done:done + size] = labels
        done += size
        index += 1
        if on_batch is not None:
          on_batch(size)
        if index % save_every == 0 and index <= common and index < final:
          save(index)
      if done != n:
        raise ValueError(f"the stream held {done} samples, expected {n}")
    if step != final:
      save(final)
  manager.wait_until_finished()
  manager.close()
  if readers and _samples(n) == 0:
    raise _common.no_batches()
  if readers and on_stream_end is not None:
    on_stream_end()  # The final save above flushed the rows.

  for name in readers:
    fold, acc = folds[name], _merged(folds[name], accs[name])
    for _ in range(passes[name] - 1):
      acc = fold.next_pass(acc)
      for features, labels in _Rows(*(stored or (rows, labels_all)), 1024):
        acc = fold.update(acc, features, labels)
      acc = _merged(fold, acc)
    accs[name] = acc
  return {name: folds[name].finalize(accs[name]) for name in folds}


def features_files(out: str) -> tuple[str, str]:
  """This process's `(features.npy, labels.npy)` paths in `out`."""
  suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
  return (os.path.join(out, FEATURES_FILE.replace(".npy", suffix + ".npy")),
          os.path.join(out, LABELS_FILE.replace(".npy", suffix + ".npy")))


def _every(count: int) -> np.ndarray:
  """Every process's `count`, in process order."""
  if jax.process_count() == 1:
    return np.asarray([count])
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.ravel(multihost_utils.process_allgather(np.asarray([count], np.int64)))


def _smallest(count: int) -> int:
  return int(np.min(_every(count)))


def _largest(count: int) -> int:
  return int(np.max(_every(count)))


def _samples(n: int) -> int:
  """The sample count of all processes' streams together."""
  return int(np.sum(_every(n)))


def _merged(fold, acc):
  """Every process's accumulator merged in process order (itself on one process)."""
  if jax.process_count() == 1:
    return acc
  return _protocol.merge_all(fold, _protocol.gather(acc))


class ImageFeatures:
  """A `Stream` of a model's features over an image pipeline.

  Args:
    batches: a `line_jax.data.ImageBatches` (its position is grain's).
    model, variables: a model returning `(logits, features)`, or any model
      with `head` (`line_jax.features.extract`).
    mean, std: the normalisation the model was trained with, per channel.
    head: the model's final Dense layer, whose input is the features.
  """

  def __init__(self, batches, model, variables, mean, std, head: str | None = None):
    self._batches = batches
    self._extract = functools.partial(features_lib.extract, model, variables, mean=mean,
                                      std=std, batch_size=batches.batch_size, progress=False,
                                      head=head)
    self.num_samples = batches.num_records
    self.num_batches = len(batches)
    self.stored = None

  def batches(self, position):
    iterator = self._batches.iterator(position)
    for images, labels in iterator:
      yield (np.asarray(self._extract(images)[1]), np.asarray(labels, np.int32),
             self._batches.position(iterator))


class CachedFeatures:
  """A `Stream` over stored features (a `line_jax.feature_cache` entry).

  Its position is the next row; later passes read the stored arrays
  themselves.

  Args:
    features: `[n, m]` float32; labels: `[n]` int32 (memmaps are read batch
      by batch).
    batch_size: rows per batch.
  """

  def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int):
    self.stored = (features, labels)
    self._batch_size = batch_size
    self.num_samples = features.shape[0]
    self.num_batches = -(-self.num_samples // batch_size)

  def batches(self, position):
    features, labels = self.stored
    for start in range(position or 0, self.num_samples, self._batch_size):
      stop = min(start + self._batch_size, self.num_samples)
      yield (np.asarray(features[start:stop]), np.asarray(labels[start:stop], np.int32), stop)
