"""Everything that crosses JAX processes, in one place (the only user of
`multihost_utils`).

After `initialize` every process runs the same program on its own share of
the data and exchanges: `barrier`; `gather_bytes` / `gather` / `gather_rows`
(bytes, pytrees as msgpack, array rows; in process order, nothing pickled);
`counts` (and `total`, `everyone`) of one int each.
The split: `batch_shard` (contiguous shards of whole batches, so the model
sees the batches one process would) and `record_shard` (the pipeline's
contiguous or strided shards). On one process each is the identity.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def initialize(coordinator: str | None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize`, before anything else touches JAX.

  Args:
    coordinator: "HOST:PORT" of process 0; "auto" lets JAX find its peers
      (Cloud TPU, SLURM, Open MPI); None runs one process.
    num_processes: processes in all (with "HOST:PORT").
    process_id: this process, 0-based (with "HOST:PORT").
  """
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      raise ValueError("--num-processes and --process-id need --coordinator")
    return
  if coordinator == "auto":
    jax.distributed.initialize()
    return
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
  jax.distributed.initialize(coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=120)


def is_primary() -> bool:
  """Whether this process writes the shared outputs (process 0)."""
  return jax.process_index() == 0


def _multihost_utils():
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils


def barrier(name: str) -> None:
  """All processes wait here (no-op on one process)."""
  if jax.process_count() > 1:
    _multihost_utils().sync_global_devices(name)


def counts(count: int) -> np.ndarray:
  """`[processes]` int64: every process's `count`, in process order."""
  if jax.process_count() == 1:
    return np.asarray([count], np.int64)
  return np.ravel(_multihost_utils().process_allgather(np.asarray([count], np.int64)))


def total(count: int) -> int:
  return int(np.sum(counts(count)))


def everyone(flag: bool) -> bool:
  """Whether `flag` holds on every process (the same answer everywhere)."""
  return bool(np.all(counts(int(bool(flag)))))


def gather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (every process must call this).

  Sent padded to the longest through `process_allgather`; on one process,
  `[data]`.
  """
  if jax.process_count() == 1:
    return [data]
  array = np.frombuffer(data, np.uint8)
  sizes = counts(array.size)
  padded = np.zeros((int(np.max(sizes)),), np.uint8)
  padded[:array.size] = array
  everyone_ = _multihost_utils().process_allgather(padded)
  return [row[:int(size)].tobytes() for row, size in zip(everyone_, sizes)]


def gather(tree: Any) -> list[Any]:
  """Every process's pytree, in process order, as NumPy leaves.

  Trees may differ in leaf shapes between processes (KNN's bank rows), not
  in structure: each travels as msgpack bytes (flax.serialization).
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  state = jax.tree.map(np.asarray, flax.serialization.to_state_dict(tree))
  if jax.process_count() == 1:
    return [flax.serialization.from_state_dict(tree, state)]
  return [flax.serialization.from_state_dict(tree, flax.serialization.msgpack_restore(part))
          for part in gather_bytes(flax.serialization.msgpack_serialize(state))]


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows of `local` (`[n_i, ...]`), concatenated in process order."""
  return local if jax.process_count() == 1 else np.concatenate(gather(np.asarray(local)))


def batch_shard(num_records: int, batch_size: int, index: int | None = None,
                count: int | None = None) -> tuple[int, int]:
  """Process `index` of `count`'s records `[start, stop)`, whole batches each.

  Shard boundaries fall on multiples of `batch_size`, so every process's
  batches are exactly the batches one process would read (the same rows
  together, so the model computes the same bits), and only the last shard
  ends with a partial batch. `index` and `count` default to this process.
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  batches = -(-num_records // batch_size)
  first, last = index * batches // count, (index + 1) * batches // count
  return min(first * batch_size, num_records), min(last * batch_size, num_records)


SHARD_MODES = ("contiguous", "strided")


def record_shard(num_records: int, mode: str, index: int | None = None,
                 count: int | None = None) -> slice:
  """Process `index` of `count`'s records as a slice of `range(num_records)`.

  "contiguous" is the block `[i * N // n, (i + 1) * N // n)` (disk
  locality), "strided" the records `i, i + n, ...`; either way the shards
  cover every record once and differ in size by at most one. `index` and
  `count` default to this process.
  """
  if mode not in SHARD_MODES:
    raise ValueError(f"shard must be one of {SHARD_MODES}, got {mode!r}")
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process index {index} out of range for {count} processes")
  if mode == "strided":
    return slice(index, None, count)
  return slice(index * num_records // count, (index + 1) * num_records // count)
