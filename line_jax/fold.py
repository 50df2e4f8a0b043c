"""The one fold every fit runs: accumulators over batches, passes, processes.

In the manner of optax's `(init, update)` pairs, a scorer's fit is a `Fold`:

    acc = fold.init(kernel, bias, **hparams)       # validates; no data yet
    for each pass (fold.passes: 1, or 2 where a pass needs the one before):
      for features, labels in batches:
        acc = fold.update(acc, features, labels)   # pure; jitted inside
      acc = merged over processes                  # fold.merge, process order
      acc = fold.next_pass(acc)                    # between passes, host side
    state = fold.finalize(acc)                     # host side: percentiles, eigh

An accumulator is a pytree (sums, counts, Chan-merged moments, histograms,
bank rows) that holds everything `finalize` needs, the head and the
hyperparameters included, so a fold can be stopped, saved with orbax and
resumed anywhere. `merge(a, b)` combines the accumulators of two disjoint
parts of one pass, each folded from the same accumulator: that is how
processes (and `accumulate_parts`) reduce.

`accumulate` is the loop, written once; `fit` is `init`, `accumulate` and
`finalize`. `chain` folds many scorers over one stream as one `Fold`
(`line_jax.resumable` runs it with orbax saves between batches). The
registry's `Scorer.fit` and `fit_from_batches`, `python -m line_jax.fit`,
`evaluate` and `tune` all fit through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax import distributed


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


def merge_all(fold: Fold, parts: Sequence[Any]) -> Any:
  """`fold.merge` over `parts` in order, float64 kept float64.

  Accumulators that crossed processes come back as NumPy arrays; outside
  `enable_x64` JAX would add float64 NumPy leaves in float32.
  """
  with jax.enable_x64(True):
    return functools.reduce(fold.merge, parts)


def no_batches() -> ValueError:
  """The error for a stream that held no sample."""
  return ValueError("batches is empty: no training sample to fit on")


def reiterable(batches: Iterable, passes: int) -> Iterable:
  """`batches`, checked to be readable `passes` times.

  A generator or other iterator can only be read once; a scorer that needs
  two passes over the training data says so instead of silently seeing an
  empty second pass.
  """
  if passes > 1 and isinstance(batches, Iterator):
    raise TypeError(
        f"this scorer reads the training batches {passes} times; pass a "
        "re-iterable (a list, or an object whose __iter__ starts over), not a "
        "one-shot iterator or generator")
  return batches


def batch_check(fold: Fold, kernel, bias) -> Callable[[Any, Any], None]:
  """`check(features, labels)` of one streamed batch against the head."""
  num_features, num_classes = _validation.kernel(kernel)

  def check(features, labels):
    _validation.train_batch(features, labels, num_features, num_classes,
                            needs_labels=fold.needs_labels)
  return check


def accumulate_parts(
    fold: Fold,
    acc: Any,
    read: Callable[[int], Sequence[Iterable]],
    *,
    check: Callable[[Any, Any], None] | None = None,
    across_processes: bool = True,
    resumed_samples: int = 0,
    on_batch: Callable[[Any, int], None] | None = None,
    on_pass_end: Callable[[int, Any], None] | None = None,
) -> Any:
  """The fold loop: every pass of `fold` from `acc`, merged; not finalized.

  Each pass folds this process's parts, each from the pass's starting
  accumulator, and merges them in order (`merge_all`), then, with
  `across_processes`, every process's merged accumulator in process order.
  So one process with one part is the plain fold, and N processes (or N
  parts) give the state of their data in that order, up to the order of
  floating-point sums.

  Args:
    fold: the `Fold` (a scorer's, or a `chain` of them).
    acc: the accumulator to start from (`fold.init`'s, or a restored one
      that has already folded `resumed_samples` samples of the first pass).
    read: `read(pass_index)` -> this process's parts, each an iterable of
      `(features, labels)` batches.
    check: called on every batch of the first pass (None: trusted data).
    across_processes: merge the processes' accumulators after each pass.
    resumed_samples: samples of the first pass `acc` already holds.
    on_batch: `on_batch(acc, size)` after each batch of the first pass.
    on_pass_end: `on_pass_end(index, acc)` after a pass, before the merge
      across processes (`acc`: this process's part).

  Raises:
    ValueError: when the first pass holds no sample (over all processes),
      or a later pass sees another number of samples than the first.
  """
  passes = passes_of(fold, acc)
  first = None
  for index in range(passes):
    seen = resumed_samples if index == 0 else 0
    folded = []
    for part in read(index):
      part_acc = acc
      for features, labels in part:
        if index == 0 and check is not None:
          check(features, labels)
        part_acc = fold.update(part_acc, features, labels)
        size = int(np.shape(features)[0])
        seen += size
        if index == 0 and on_batch is not None:
          on_batch(part_acc, size)
      folded.append(part_acc)
    acc = merge_all(fold, folded) if len(folded) > 1 else (folded[0] if folded else acc)
    if on_pass_end is not None:
      on_pass_end(index, acc)
    if across_processes and jax.process_count() > 1:
      acc = merge_all(fold, _gathered(acc))
      seen = distributed.total(seen)
    if first is None:
      if seen == 0:
        raise no_batches()
      first = seen
    elif seen != first:
      raise ValueError(
          f"pass {index + 1} over the batches saw {seen} samples, the first "
          f"{first}: batches must yield the same data each time")
    if index + 1 < passes:
      acc = fold.next_pass(acc)
  return acc


def _gathered(acc: Any) -> list[Any]:
  """Every process's accumulator, in process order. Of a `chain`, only the
  members still reading travel: the others are already merged, the same
  everywhere (a bank would otherwise cross every process again)."""
  if not isinstance(acc, Chained):
    return distributed.gather(acc)
  parts = distributed.gather({name: acc.accs[name] for name in acc.active()})
  return [acc.replace(accs={**acc.accs, **part}) for part in parts]


def accumulate(fold: Fold, acc: Any, batches: Iterable, **kwargs) -> Any:
  """`accumulate_parts` over one re-iterable (or, for one pass, one-shot)
  stream of `(features, labels)` batches; the keywords are its."""
  batches = reiterable(batches, passes_of(fold, acc))
  return accumulate_parts(fold, acc, lambda index: [batches], **kwargs)


def fit(fold: Fold, batches: Iterable, kernel, bias, *, validate: bool = True,
        across_processes: bool = True, **hparams) -> Any:
  """`fold.finalize` of the fold over `batches`: a fitted state.

  Args:
    fold: the scorer's `Fold`.
    batches: `(features, labels)` batches, `features: [batch, features]`,
      `labels: [batch]` or None; re-iterable where `fold.passes > 1`.
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    validate: check each batch of the first pass (False where the caller
      already checked the data).
    across_processes: after `jax.distributed.initialize`, `batches` are this
      process's and the state is that of every process's batches.
    **hparams: the scorer's hyperparameters.
  """
  acc = fold.init(kernel, bias, **hparams)
  if fold.reads_data:
    acc = accumulate(fold, acc, batches, across_processes=across_processes,
                     check=batch_check(fold, kernel, bias) if validate else None)
  return fold.finalize(acc)


def fit_parts(fold: Fold, parts: Sequence[Iterable], kernel, bias, **hparams) -> Any:
  """The state of several disjoint re-iterable streams, merged after each pass:
  what N processes compute, on one (`accumulate_parts`)."""
  acc = fold.init(kernel, bias, **hparams)
  if fold.reads_data:
    acc = accumulate_parts(fold, acc, lambda index: parts,
                           check=batch_check(fold, kernel, bias), across_processes=False)
  return fold.finalize(acc)


# --- many scorers over one stream ------------------------------------------------------


@flax.struct.dataclass
class Chained:
  """The accumulator of a `chain`: each member's, and where the passes stand.

  Attributes:
    accs: `{name: member accumulator}`.
    passes: static; `((name, passes), ...)` of every member that reads data.
    index: static; the pass being read (0-based).
  """

  accs: dict[str, Any]
  passes: tuple[tuple[str, int], ...] = flax.struct.field(pytree_node=False)
  index: int = flax.struct.field(pytree_node=False, default=0)

  def active(self) -> list[str]:
    """The members that read the current pass."""
    return [name for name, count in self.passes if count > self.index]


def chain(folds: Mapping[str, Fold]) -> Fold:
  """Many folds as one, over one stream (in the manner of `optax.chain`).

  `chain(folds).init(kernel, bias, **{name: hparams})` starts every member;
  each batch updates the members still reading (a one-pass member is done
  after the first pass, a two-pass one reads the data again); `merge`
  merges member by member; `finalize` returns `{name: state}`. The model
  runs once per image however many scorers fit.
  """
  folds = dict(folds)
  readers = [name for name, f in folds.items() if f.reads_data]

  def init(kernel, bias, **hparams):
    unknown = sorted(set(hparams) - set(folds))
    if unknown:
      raise ValueError(f"chain has no member {', '.join(unknown)}")
    accs = {name: f.init(kernel, bias, **hparams.get(name, {})) for name, f in folds.items()}
    return Chained(accs, tuple((n, passes_of(folds[n], accs[n])) for n in readers))

  def update(acc: Chained, features, labels) -> Chained:
    accs = dict(acc.accs)
    for name in acc.active():
      accs[name] = folds[name].update(accs[name], features, labels)
    return acc.replace(accs=accs)

  def merge(a: Chained, b: Chained) -> Chained:
    active = a.active()
    return a.replace(accs={
        name: folds[name].merge(a.accs[name], b.accs[name]) if name in active
        else a.accs[name] for name in folds})

  def next_pass(acc: Chained) -> Chained:
    accs = dict(acc.accs)
    for name, count in acc.passes:
      if count > acc.index + 1:
        accs[name] = folds[name].next_pass(accs[name])
    return acc.replace(accs=accs, index=acc.index + 1)

  def finalize(acc: Chained) -> dict[str, Any]:
    return {name: folds[name].finalize(acc.accs[name]) for name in folds}

  return Fold(init=init, update=update, finalize=finalize, merge=merge,
              passes=lambda acc: max([count for _, count in acc.passes], default=1),
              next_pass=next_pass,
              needs_labels=any(folds[n].needs_labels for n in readers),
              reads_data=bool(readers))
