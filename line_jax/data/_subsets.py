"""The one rule for part of a data set: `subset_of`, `hold_out`, `subset_indices`.

Every CLI that takes part of a source takes it by this rule: `fit
--max-examples`, `train --max-examples`, `evaluate --max-train / --max-test`
and the ID validation rows of `tune --val-size` (the rest of the source is
tune's fitting set). Deterministic: the same rows every time, no seed.

* Where the source knows its labels without decoding an image (a `labels`
  array: ImageFolder, `.npy`, Fashion-MNIST and in-memory sources), the
  subset is stratified: each label gets its proportional share of the rows,
  rounded by largest remainder (within one row of it), and every label keeps
  at least one row once the subset has a row for each (taken from the labels
  most above their share). A label's rows are those of the evenly spaced
  rows over the whole source that hold it, thinned or topped up evenly
  among its own rows to its share.
* Elsewhere (TFDS, which decodes to learn a label) the rows are evenly
  spaced over the source.

Why not the first rows: a folder is sorted by class, so its first rows are
one class (and its last rows, as a hold-out, another). Why the evenly
spaced rows first: on a shuffled set they already hold about each share, so
a stratified subset keeps nearly the rows evenly spaced subsets used to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from line_jax.data import _sources


def _evenly(count: int, size: int) -> np.ndarray:
  """`count` positions of `range(size)` spread evenly, first and last kept."""
  return np.linspace(0, size - 1, count).round().astype(np.int64)


def _shares(sizes: np.ndarray, count: int) -> np.ndarray:
  """`count` rows over groups of `sizes` rows: largest remainder, at least one each."""
  total = int(sizes.sum())
  quotas, remainders = np.divmod(sizes * count, total)  # Integers: no rounding ties lost.
  # Ties go to the larger group, then the lower label.
  order = np.lexsort((np.arange(sizes.size), -sizes, -remainders))
  quotas[order[:count - int(quotas.sum())]] += 1
  if count >= sizes.size:
    for empty in np.flatnonzero(quotas == 0):
      # From the group most above its exact share, `quotas * total - sizes * count`.
      excess = np.where(quotas > 1, quotas * total - sizes * count, np.iinfo(np.int64).min)
      quotas[int(np.argmax(excess))] -= 1
      quotas[empty] += 1
  return quotas


def _select(size: int, count: int, labels: np.ndarray | None) -> np.ndarray:
  grid = _evenly(count, size)
  if labels is None:
    return grid
  on_grid = np.zeros(size, bool)
  on_grid[grid] = True
  order = np.argsort(labels, kind="stable")  # Each label's rows in source order.
  _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
  picked = []
  for start, group, quota in zip(starts, sizes, _shares(sizes.astype(np.int64), count)):
    rows = order[start:start + group]
    near, rest = rows[on_grid[rows]], rows[~on_grid[rows]]
    if near.size >= quota:
      picked.append(near[_evenly(quota, near.size)])
    else:
      picked += [near, rest[_evenly(quota - near.size, rest.size)]]
  return np.sort(np.concatenate(picked))


def known_labels(source: Sequence) -> np.ndarray | None:
  """`[len(source)]` labels where `source` holds them without decoding, else None."""
  labels = getattr(source, "labels", None)
  return None if labels is None else np.asarray(labels).reshape(-1)


def subset_indices(source: Sequence, count: int) -> np.ndarray:
  """The rows of `source` the subset rule keeps (module docstring): int64, sorted.

  Args:
    source: a random-access source.
    count: rows to keep, at most `len(source)`.

  Raises:
    ValueError: for a count below 1 or above the source's length, or labels
      that are not one per record.
  """
  size = len(source)
  if not 1 <= count <= size:
    raise ValueError(f"a subset of {source!r} needs between 1 and {size} rows, got {count}")
  labels = known_labels(source)
  if labels is not None and labels.shape != (size,):
    raise ValueError(f"{source!r} has {labels.size} labels for {size} records")
  return _select(size, count, labels)


def subset_of(source: Sequence, count: int | None) -> Sequence:
  """`count` rows of `source` by the subset rule; `source` itself when `count`
  is None or at least its length."""
  if count is None or count >= len(source):
    return source
  return _sources.Subset(source, subset_indices(source, count))


def hold_out(source: Sequence, count: int) -> tuple[_sources.Subset, _sources.Subset]:
  """`(held, rest)`: `count` rows by the subset rule, and every other row.

  Disjoint, and together the whole source, each in source order.

  Raises:
    ValueError: unless `0 < count < len(source)` (the rest must hold a row).
  """
  if not 0 < count < len(source):
    raise ValueError(f"a hold-out of {source!r} needs between 1 and {len(source) - 1} "
                     f"rows, got {count}")
  held = subset_indices(source, count)
  rest = np.setdiff1d(np.arange(len(source)), held, assume_unique=True)
  return _sources.Subset(source, held), _sources.Subset(source, rest)
