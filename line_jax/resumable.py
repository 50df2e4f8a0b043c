"""A fold over a long stream that survives being killed: orbax progress steps.

`accumulate(fold, acc, stream, folder)` is `fold.accumulate_parts` over a
`Stream` of `(features, labels)` batches (a model over an image pipeline, or
stored rows), with what a run of hours needs:

* every `save_every` batches the accumulator and the stream's position go
  to one atomic orbax step in `folder/progress/`, after the feature rows
  before them are flushed; killed and run again, the fold restarts from the
  last step and reads the rest identically: a bit-identical result;
* later passes read the features from `features.npy` / `labels.npy` memory
  maps written in the first pass (or the stream's own stored rows): the
  model runs once, and nothing is held in memory whole;
* on multi-host each process folds its own stream into its own rows; a
  save is collective (process 0 writes every process's part), so saves fall
  on batch indices every process reaches;
* a stream that drops records (`Stream.skipped`: images that cannot be
  decoded) holds fewer samples than `num_samples`: its rows are cut to the
  samples kept once it is read, and a batch it dropped whole comes as an
  empty batch, still a step, so the steps of every process stay aligned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import json
import os
from typing import Any, Protocol

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from line_jax import distributed
from line_jax import fold as fold_lib

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
PROGRESS_DIR = "progress"
ROWS_PER_BATCH = 4096  # Stored rows read per batch by a later pass.


class Stream(Protocol):
  """A resumable stream of `(features, labels)` NumPy batches.

  `batches(position)` iterates from `position` (None: the start), yielding
  `(features [b, m] float32, labels [b] int, position_after)`, where
  `position_after` is a JSON-able value that resumes after that batch.
  `num_samples` and `num_batches` are the stream's length in samples and
  in batches. `stored` is None, or `(features, labels)` arrays of the whole
  stream that later passes read instead of a copy.

  A stream may also have `skipped`: None, or the records it dropped so far
  (of a resumed stream, those before its position too). Then `num_samples`
  is its records, the samples are those less the dropped ones, and a batch
  whose every record was dropped is yielded empty (`[0, m]`, `[0]`), so that
  `num_batches` stays exact.
  """

  num_samples: int
  num_batches: int
  stored: tuple[np.ndarray, np.ndarray] | None

  def batches(self, position: Any | None) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
    ...


class StoredRows:
  """A `Stream` over stored features (`[n, m]` float32, `[n]` int32; memmaps
  are read batch by batch). Its position is the next row."""

  def __init__(self, features: np.ndarray, labels: np.ndarray,
               batch_size: int = ROWS_PER_BATCH):
    self.stored = (features, labels)
    self._batch_size = batch_size
    self.num_samples = features.shape[0]
    self.num_batches = -(-self.num_samples // batch_size)

  def batches(self, position=None):
    features, labels = self.stored
    for start in range(position or 0, self.num_samples, self._batch_size):
      stop = min(start + self._batch_size, self.num_samples)
      yield (np.asarray(features[start:stop]), np.asarray(labels[start:stop], np.int32), stop)

  def __iter__(self):
    """The `(features, labels)` batches, as `fit_from_batches` takes them."""
    for features, labels, _ in self.batches():
      yield features, labels


def rows_files(folder: str) -> tuple[str, str]:
  """This process's `(features.npy, labels.npy)` paths in `folder`."""
  suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
  return (os.path.join(folder, FEATURES_FILE.replace(".npy", suffix + ".npy")),
          os.path.join(folder, LABELS_FILE.replace(".npy", suffix + ".npy")))


def resumed(folder: str) -> bool:
  """Whether `folder` holds a saved step of an earlier run's stream."""
  progress = os.path.join(folder, PROGRESS_DIR)
  return os.path.isdir(progress) and any(n.isdigit() for n in os.listdir(progress))


def _memmap(path: str, shape: tuple[int, ...], dtype, fresh: bool,
            cut: int | None = None) -> np.memmap:
  """The rows file `path`, made `shape` where `fresh`; `cut`: the rows an
  existing file may already have been cut to (`cut_rows`) by a finished stream."""
  if fresh or not os.path.isfile(path):
    tmp = path + ".tmp"
    np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
    os.replace(tmp, path)
  array = np.lib.format.open_memmap(path, mode="r+")
  if array.shape[1:] != shape[1:] or array.shape[0] not in (shape[0], cut) or (
      array.dtype != dtype):
    raise ValueError(f"{path} has {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                     f"{shape}: delete it and its progress/ folder to start over")
  return array


def cut_rows(path: str, rows: int) -> None:
  """Cuts the `.npy` file `path` to its first `rows` rows, in place (no copy).

  Its header is rewritten at the same length with the new shape (fewer
  digits, padded with spaces as NumPy pads it), then the data truncated.
  No memory map of the file may be open.
  """
  fmt = np.lib.format
  with open(path, "r+b") as f:
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = read(f)
    offset = f.tell()
    if not 0 <= rows <= shape[0] or fortran:
      raise ValueError(f"cannot cut {path} of shape {shape} to {rows} rows")
    start = 8 + (2 if version == (1, 0) else 4)  # Magic, version, header length.
    header = repr({"descr": fmt.dtype_to_descr(dtype), "fortran_order": False,
                   "shape": (rows, *shape[1:])})
    f.seek(start)
    f.write(header.ljust(offset - start - 1).encode("latin1") + b"\n")
    f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


class _Progress:
  """The orbax steps of one run: what was folded, and where the stream stands."""

  def __init__(self, folder: str, save_every: int, num_batches: int):
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(folder), PROGRESS_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
    self.save_every = save_every
    self.step = self.manager.latest_step()
    # Saves are collective: up to the shortest shard's batch count, and the
    # last one (the same step number everywhere) at the end of the stream.
    batches = distributed.counts(num_batches)
    self.common, self.final = int(batches.min()), int(batches.max())

  def restore(self, acc: Any) -> tuple[Any, Any, int]:
    """`(acc, position, rows)` of the latest step (`acc` itself where none)."""
    if self.step is None:
      return acc, None, 0
    saved = self.manager.restore(self.step, args=ocp.args.StandardRestore())
    mine = flax.serialization.msgpack_restore(
        np.asarray(saved[f"p{jax.process_index()}"]).tobytes())
    if "acc" not in mine:
      raise ValueError(f"{self.manager.directory} holds progress of an older line_jax; "
                       "delete it (and the run's folder) to start the fit over")
    return (flax.serialization.from_state_dict(acc, mine["acc"]),
            json.loads(mine["position"]), int(mine["rows"]))

  def due(self, index: int) -> bool:
    return index % self.save_every == 0 and index <= self.common and index < self.final

  def save(self, index: int, acc: Any, position: Any, rows: int) -> None:
    mine = flax.serialization.msgpack_serialize({
        "acc": flax.serialization.to_state_dict(jax.tree.map(np.asarray, acc)),
        "position": json.dumps(position), "rows": rows})
    parts = distributed.gather_bytes(mine)
    self.manager.save(index, args=ocp.args.StandardSave(
        {f"p{i}": np.frombuffer(part, np.uint8) for i, part in enumerate(parts)}))

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def accumulate(
    fold: fold_lib.Fold,
    acc: Any,
    stream: Stream,
    folder: str,
    *,
    num_features: int,
    check: Callable[[Any, Any], None] | None = None,
    save_every: int = 20,
    on_batch: Callable[[int], None] | None = None,
    keep_rows: bool = False,
    on_stream_end: Callable[[], None] | None = None,
) -> Any:
  """`fold` over `stream` from `acc`, resumably, in `folder`; not finalized.

  Args:
    fold: the `Fold` (usually a `line_jax.fold.chain`).
    acc: its `init` accumulator (replaced by the latest saved step's).
    stream: this process's training features (see `Stream`).
    folder: for `progress/` (orbax steps) and the feature rows.
    num_features: the width of the stream's features.
    check: called on every batch of the first pass.
    save_every: batches between progress saves.
    on_batch: called with the sample count of each batch (progress bars).
    keep_rows: write `features.npy` / `labels.npy` even where no later pass
      reads them (`rows_files` names them).
    on_stream_end: called once the stream is read whole and its rows are on
      disk, before any later pass or `finalize` (which may still fail).

  Returns:
    The accumulator of every pass, merged over processes.
  """
  if not fold.reads_data:
    return acc
  progress = _Progress(folder, save_every, stream.num_batches)
  acc, position, done = progress.restore(acc)
  stored = getattr(stream, "stored", None)
  rows = labels = None
  if (fold_lib.passes_of(fold, acc) > 1 and stored is None) or keep_rows:
    paths = rows_files(folder)
    n, fresh = stream.num_samples, progress.step is None
    rows = _memmap(paths[0], (n, num_features), np.float32, fresh, cut=done)
    labels = _memmap(paths[1], (n,), np.int32, fresh, cut=done)
  state = {"position": position, "done": done, "index": progress.step or 0, "acc": acc}
  if done and on_batch is not None:
    on_batch(done)  # Resumed: progress starts where the saved step ended.

  def first_pass():
    # Read from the saved position even at the end: a stream that drops
    # records learns from it those it dropped before (`Stream.skipped`).
    for features, labels_, position_ in stream.batches(state["position"]):
      size = features.shape[0]
      if rows is not None and size:
        rows[state["done"]:state["done"] + size] = features
        labels[state["done"]:state["done"] + size] = labels_
      state["position"], state["done"] = position_, state["done"] + size
      if size:
        yield features, labels_
      else:  # Dropped whole, yet a step: saves fall on the same steps everywhere.
        after_batch(state["acc"], 0)
    skipped = getattr(stream, "skipped", None) or ()
    if state["done"] != stream.num_samples - len(skipped):
      dropped = f" ({stream.num_samples} less {len(skipped)} dropped)" if skipped else ""
      raise ValueError(f"the stream held {state['done']} samples, expected "
                       f"{stream.num_samples - len(skipped)}{dropped}")

  def flush():
    if rows is not None:  # The rows a saved step vouches for are on disk first.
      rows.flush()
      labels.flush()

  def after_batch(part_acc, size):
    state["index"] += 1
    state["acc"] = part_acc
    if on_batch is not None:
      on_batch(size)
    if progress.due(state["index"]):
      flush()
      progress.save(state["index"], part_acc, state["position"], state["done"])

  def after_pass(index, part_acc):
    nonlocal rows, labels
    if index:
      return
    if progress.step != progress.final:
      flush()
      progress.save(progress.final, part_acc, state["position"], state["done"])
    progress.close()
    if rows is not None and (rows.shape[0], labels.shape[0]) != (state["done"],) * 2:
      # Records were dropped: the files keep the rows read, no trailing zeros
      # (each file on its own: a run killed between the two cuts finishes here).
      flush()
      rows = labels = None
      for path in paths:
        if np.lib.format.open_memmap(path, mode="r").shape[0] != state["done"]:
          cut_rows(path, state["done"])
      rows, labels = (np.lib.format.open_memmap(path, mode="r") for path in paths)
    if distributed.total(state["done"]) and on_stream_end is not None:
      on_stream_end()

  def read(index):
    if index == 0:
      return [first_pass()]
    return [StoredRows(*(stored or (rows, labels)))]

  try:
    return fold_lib.accumulate_parts(fold, acc, read, check=check, resumed_samples=done,
                                     on_batch=after_batch, on_pass_end=after_pass)
  finally:
    progress.close()
