"""The one switch between the CPU's and an accelerator's layout of a computation.

A few computations are fastest in one shape on XLA:CPU and in another on a
GPU or TPU: logits class-major for small batches, row chunks that stay in
cache, radix selection in a rolled loop, LINe's grouped walk over classes.
Each such choice reads a `Layout`, a hashable value passed down to jitted
functions as a static argument, so one program can be traced for either
device and tests pick one without touching private constants:

    scorer.score(state, features)                        # the layout of features' device
    scorer.score(state, features, layout=layout.ACCELERATOR)

`for_arrays` picks the layout of the device an array lives on; NumPy input
and traced values (no device yet) take the default backend's. This module
is the only place line_jax asks JAX which backend it runs on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Layout:
  """How computations are shaped for one kind of device.

  Attributes:
    cpu: XLA:CPU (threads over cache-sized blocks) rather than an
      accelerator (one wide kernel over the whole batch).
  """

  cpu: bool

  # CPU batches up to this size take class-major logits `[classes, batch]`:
  # the fused reductions over them ran faster than over `[batch, classes]`
  # at batch 256, and slower at 4096 (benchmarks/results/cpu).
  CLASS_MAJOR_MAX_BATCH = 2048

  def class_major(self, batch: int) -> bool:
    """Whether a `batch`-row input's logits come class-major (trace time)."""
    return self.cpu and batch <= self.CLASS_MAJOR_MAX_BATCH

  def rows_per_chunk(self, rows: int, chunk: int) -> int:
    """`chunk` rows at a time on the CPU (cache-sized blocks); all `rows` at
    once on an accelerator (one kernel)."""
    return chunk if self.cpu else max(rows, 1)

  def __repr__(self) -> str:
    return "layout.CPU" if self.cpu else "layout.ACCELERATOR"


CPU = Layout(cpu=True)
ACCELERATOR = Layout(cpu=False)


def default() -> Layout:
  """The layout of JAX's default backend."""
  return CPU if jax.default_backend() == "cpu" else ACCELERATOR


def resolve(layout: Layout | None) -> Layout:
  """`layout`, or the default backend's where it is None."""
  return default() if layout is None else layout


def for_arrays(*arrays: Any) -> Layout:
  """The layout of the device the first placed `jax.Array` lives on.

  NumPy arrays, lists and tracers carry no device: the default backend's
  layout, where JAX will put them.
  """
  for array in arrays:
    if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
      try:
        platform = next(iter(array.devices())).platform
      except (RuntimeError, StopIteration):  # Deleted or donated buffers.
        continue
      return CPU if platform == "cpu" else ACCELERATOR
  return default()
