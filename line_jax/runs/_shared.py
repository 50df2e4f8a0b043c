"""What every run shares: how it runs, the named data sets it reads, atomic JSON."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from line_jax import data
from line_jax import distributed


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a run runs, not what it computes (never part of a run's record).

  Attributes:
    workers: decoding threads of the input pipeline (None: one per core).
    cache_dir: the feature cache shared by fit, tune and evaluate
      (`line_jax.features.cache`); None keeps features in a temporary folder.
    progress: progress bars (a terminal) or lines (a log); False is silent.
  """

  workers: int | None = None
  cache_dir: str | None = None
  progress: bool = True


def check_positive(**values: int | None) -> None:
  """Counts that must be at least 1 where given, named as their flags."""
  for name, value in values.items():
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def open_dataset(spec: str, split: str, num_classes: int, *,
                 limit: int | None = None) -> Sequence:
  """The records of data set `spec`'s `split` (`data.open_source`), checked.

  Args:
    spec: 'fashion_mnist', 'tfds:NAME' or a folder.
    split: "train" or "test".
    num_classes: the model's classes; labels a source knows must lie below.
    limit: only the first this many records.
  """
  source = data.open_source(spec, split)
  if limit is not None:
    source = data.Subset.range(source, 0, min(limit, len(source)))
  if len(source) == 0:
    raise ValueError(f"dataset {spec!r} ({split}) holds no image")
  labels = getattr(source, "labels", None)
  if labels is not None and len(labels):
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"labels of {spec!r} must lie in [0, {num_classes}) for this model, "
                       f"got [{labels.min()}, {labels.max()}]")
  return source


def own_shard(source: Sequence, batch_size: int, *, allow_empty: bool = False) -> Sequence:
  """This process's contiguous shard of whole batches (all of it on one process)."""
  if jax.process_count() == 1:
    return source
  start, stop = distributed.batch_shard(len(source), batch_size)
  if start == stop and not allow_empty:
    raise ValueError(f"a set of {len(source)} images leaves this process no batch of "
                     f"{batch_size}; use a smaller --batch-size or fewer processes")
  return data.Subset.range(source, start, stop)


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = True,
               default=None) -> None:
  """`value` as JSON, atomically: a reader sees the old file or the whole new one.
  `default` turns what JSON cannot hold into what it can (`json.dump`'s)."""
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=sort_keys, default=default)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
