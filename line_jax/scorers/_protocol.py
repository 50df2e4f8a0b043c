"""The accumulator protocol every scorer fits by, and the one fold over it.

In the manner of optax's `(init, update)` pairs, a scorer's fit is a `Fold`:

    acc = fold.init(kernel, bias, **hparams)       # validates; no data yet
    for each pass (fold.passes: 1, or 2 where a pass needs the one before):
      for features, labels in batches:
        acc = fold.update(acc, features, labels)   # pure; jitted inside
      acc = fold.next_pass(acc)                    # between passes, host side
    state = fold.finalize(acc)                     # host side: percentiles, eigh

An accumulator is a pytree (sums, counts, Chan-merged moments, histograms,
bank rows) that holds everything `finalize` needs, the head and the
hyperparameters included, so a fold can be stopped, saved with orbax and
resumed anywhere. `merge(a, b)` combines the accumulators of two disjoint
parts of the data: the cross-device and cross-process reduction lives in the
fold (`line_jax.fold`), not in each scorer.

`run` is the fold over one stream; the registry's `fit` and
`fit_from_batches` are `run` over one batch and over a stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from line_jax.scorers import _common


def _identity(acc):
  return acc


class Fold(NamedTuple):
  """How one scorer fits: pure functions over an accumulator pytree.

  Attributes:
    init: `init(kernel, bias, **hparams) -> acc`; checks the head
      (`[features, classes]` kernel, `[classes]` bias or None) and the
      hyperparameters, and starts an empty accumulator. Its keyword-only
      parameters and their defaults are the scorer's hyperparameters.
    update: `update(acc, features, labels) -> acc` for one validated batch,
      `features: [batch, features]`, `labels: [batch]` or None; pure.
    finalize: `finalize(acc) -> state`, on the host, once all passes are done.
    merge: `merge(a, b) -> acc` for two disjoint parts of one pass over the
      data, each folded from the same accumulator (`init`'s, or
      `next_pass`'s): the accumulator of both parts, `a`'s data first.
    passes: how many times the batches are read: an int, or
      `passes(acc) -> int` of `init`'s accumulator where the hyperparameters
      decide (LINe reads twice only to resolve a percentile clip).
    next_pass: `next_pass(acc) -> acc` between passes (host side).
    needs_labels: whether None labels are an error.
    reads_data: False for scorers that fit nothing from data: the fold does
      not read the batches at all.
  """

  init: Callable[..., Any]
  update: Callable[[Any, Any, Any], Any]
  finalize: Callable[[Any], Any]
  merge: Callable[[Any, Any], Any]
  passes: int | Callable[[Any], int] = 1
  next_pass: Callable[[Any], Any] = _identity
  needs_labels: bool = False
  reads_data: bool = True


def passes_of(fold: Fold, acc: Any) -> int:
  """How many passes `fold` makes from `init`'s accumulator `acc`."""
  return fold.passes(acc) if callable(fold.passes) else fold.passes


def add_fields(*names: str) -> Callable[[Any, Any], Any]:
  """A `merge` that adds the named fields (pytrees) and keeps the rest of `a`."""

  def merge(a, b):
    return dataclasses.replace(a, **{
        n: jax.tree.map(jnp.add, getattr(a, n), getattr(b, n)) for n in names})
  return merge


def merge_all(fold: Fold, parts: Sequence[Any]) -> Any:
  """`fold.merge` over `parts` in order, float64 kept float64.

  Accumulators that crossed processes come back as NumPy arrays; outside
  `enable_x64` JAX would add float64 NumPy leaves in float32.
  """
  with jax.enable_x64(True):
    return functools.reduce(fold.merge, parts)


def keep_first(a, b):
  """`merge` of accumulators that hold no data (head-only scorers)."""
  del b
  return a


def head_fold(make_state: Callable[..., Any]) -> Fold:
  """The `Fold` of a scorer that learns nothing from data.

  Args:
    make_state: `make_state(kernel, bias, **hparams) -> state`, checking the
      head and the hyperparameters; its keyword-only parameters are the
      scorer's hyperparameters. The state is the accumulator.
  """
  return Fold(init=make_state, update=lambda acc, features, labels: acc,
              finalize=_identity, merge=keep_first, reads_data=False)


def run(fold: Fold, batches: Iterable, kernel, bias, *, validate: bool = True,
        **hparams) -> Any:
  """The fold over a stream: `fold.finalize` of every batch, every pass.

  Args:
    fold: the scorer's `Fold`.
    batches: iterable of `(features, labels)`, `features: [batch, features]`,
      `labels: [batch]` or None; re-iterable (not a generator) when
      `fold.passes > 1`.
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    validate: check each batch on the first pass (False where the caller
      already checked the data).
    **hparams: the scorer's hyperparameters.

  Returns:
    The fitted state.

  Raises:
    ValueError: on an empty stream, a bad batch, or a later pass that sees a
      different number of samples than the first.
  """
  acc = fold.init(kernel, bias, **hparams)
  if not fold.reads_data:
    return fold.finalize(acc)
  passes = passes_of(fold, acc)
  num_features, num_classes = _common.check_head(kernel, bias)
  batches = _common.batches_of(batches, passes=passes)
  first = None
  for index in range(passes):
    seen = 0
    for features, labels in batches:
      if validate and index == 0:
        _common.check_batch(features, labels, num_features, num_classes,
                            needs_labels=fold.needs_labels)
      acc = fold.update(acc, features, labels)
      seen += int(np.shape(features)[0])
    if first is None:
      if seen == 0:
        raise _common.no_batches()
      first = seen
    elif seen != first:
      raise ValueError(
          f"pass {index + 1} over the batches saw {seen} samples, the first "
          f"{first}: batches must yield the same data each time")
    if index + 1 < passes:
      acc = fold.next_pass(acc)
  return fold.finalize(acc)


def run_parts(fold: Fold, parts: Sequence[Iterable], kernel, bias, **hparams) -> Any:
  """The fold over several disjoint streams, merged after each pass.

  What a data-parallel fit computes: each part (a process's own batches) is
  folded from the same accumulator, and the parts' accumulators are merged
  in order before the next pass. Equals `run` over the parts one after the
  other, up to the order of floating-point sums.

  Args:
    fold: the scorer's `Fold`.
    parts: re-iterables of `(features, labels)` batches (empty ones allowed).
    kernel, bias, **hparams: as `run`.
  """
  acc = fold.init(kernel, bias, **hparams)
  if not fold.reads_data:
    return fold.finalize(acc)
  passes = passes_of(fold, acc)
  num_features, num_classes = _common.check_head(kernel, bias)
  for index in range(passes):
    accs, seen = [], 0
    for part in parts:
      part_acc = acc
      for features, labels in part:
        if index == 0:
          _common.check_batch(features, labels, num_features, num_classes,
                              needs_labels=fold.needs_labels)
        part_acc = fold.update(part_acc, features, labels)
        seen += int(np.shape(features)[0])
      accs.append(part_acc)
    if not seen:
      raise _common.no_batches()
    acc = merge_all(fold, accs)
    if index + 1 < passes:
      acc = fold.next_pass(acc)
  return fold.finalize(acc)


def gather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (every process must call this).

  Sent padded to the longest through `process_allgather`; on one process,
  `[data]`.
  """
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  array = np.frombuffer(data, np.uint8)
  sizes = np.ravel(multihost_utils.process_allgather(np.asarray([array.size], np.int64)))
  padded = np.zeros((int(np.max(sizes)),), np.uint8)
  padded[:array.size] = array
  everyone = multihost_utils.process_allgather(padded)
  return [row[:int(size)].tobytes() for row, size in zip(everyone, sizes)]


def gather(acc: Any) -> list[Any]:
  """Every process's accumulator, in process order (every process calls this).

  Accumulators may differ in shape between processes (KNN's bank rows), so
  each travels as msgpack bytes (flax.serialization; no pickle).
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  state = jax.tree.map(np.asarray, flax.serialization.to_state_dict(acc))
  return [flax.serialization.from_state_dict(acc, flax.serialization.msgpack_restore(part))
          for part in gather_bytes(flax.serialization.msgpack_serialize(state))]


def run_processes(fold: Fold, batches: Iterable, kernel, bias, **hparams) -> Any:
  """`run_parts` across JAX processes: each passes only its own batches.

  After `jax.distributed.initialize`, every process calls this with its own
  `(features, labels)` batches (any sizes, any count, none at all); after
  each pass the processes exchange their accumulators and merge them in
  process order, so every process finishes with the same state, the one
  `run_parts` gives on the processes' batches in that order.
  """
  acc = fold.init(kernel, bias, **hparams)
  if not fold.reads_data:
    return fold.finalize(acc)
  passes = passes_of(fold, acc)
  num_features, num_classes = _common.check_head(kernel, bias)
  batches = _common.batches_of(batches, passes=passes)
  for index in range(passes):
    local = acc
    for features, labels in batches:
      if index == 0:
        _common.check_batch(features, labels, num_features, num_classes,
                            needs_labels=fold.needs_labels)
      local = fold.update(local, features, labels)
    parts = gather(local)
    if index == 0 and not _any_data(fold, acc, parts):
      raise _common.no_batches()
    acc = merge_all(fold, parts)
    if index + 1 < passes:
      acc = fold.next_pass(acc)
  return fold.finalize(acc)


def _any_data(fold: Fold, empty: Any, parts: Sequence[Any]) -> bool:
  """Whether any part's accumulator differs from the empty one."""
  empty_leaves = jax.tree.leaves(empty)
  return any(
      any(np.shape(a) != np.shape(b) or not np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(part), empty_leaves))
      for part in parts)
