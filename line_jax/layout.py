"""The one switch between the CPU's and an accelerator's layout of a computation.

Some computations are fastest in one shape on XLA:CPU and another on a GPU or
TPU: class-major logits for small batches, cache-sized row chunks, radix
selection in a rolled loop, LINe's grouped walk over classes, a network's
pass over a few images at a time. Each reads a
`Layout`, a static argument of the jitted functions, so tests pick one
without patching anything:

    scorer.score(state, features)                        # features' device's layout
    scorer.score(state, features, layout=layout.ACCELERATOR)

A computation that runs a network is also compiled with XLA options of its
own on the CPU (`network_jit`, `Layout.network_compiler_options`).

The only module that asks JAX for the backend (`default`, `for_arrays`,
`for_device`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp


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

  # A network's pass over this many pixels of input at a time on the CPU
  # (8 CIFAR images) keeps its activations in cache; a pass over a whole
  # batch of 256 spills them to memory (benchmarks/network_passes.py).
  PIXELS_PER_PASS = 8 * 32 * 32

  def images_per_pass(self, batch: int, height: int, width: int) -> int:
    """Images per network pass within one call of `batch` (a divisor of it):
    on the CPU about `PIXELS_PER_PASS` pixels, at least 2 images; on an
    accelerator the whole batch (one wide kernel)."""
    if not self.cpu or batch <= 2:
      return max(batch, 1)
    want = max(2, self.PIXELS_PER_PASS // max(height * width, 1))
    return max(d for d in range(1, min(want, batch) + 1) if batch % d == 0)

  def rows_per_chunk(self, rows: int, chunk: int) -> int:
    """`chunk` rows at a time on the CPU (cache-sized blocks); all `rows` at
    once on an accelerator (one kernel)."""
    return chunk if self.cpu else max(rows, 1)

  def sorts_on_host(self) -> bool:
    """Whether wide row sorts go to NumPy: XLA:CPU's sort compares element by
    element (3.1 s against NumPy's 0.48 s for 335 rows of 50,000 floats);
    an accelerator's sort is one fast kernel."""
    return self.cpu

  # XLA:CPU hands convolutions, element-wise and reduction fusions to YNNPACK
  # by default (jax 0.10); a network's convolutions ran 1.3-1.6x faster on
  # XLA's own kernels (benchmarks/network_passes.py). Its dots stay there.
  CPU_NETWORK_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type",
                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),)

  def network_compiler_options(self) -> dict[str, Any]:
    """XLA options for a computation that runs a network: on the CPU
    `CPU_NETWORK_OPTIONS` less any option `XLA_FLAGS` sets (the user's choice
    wins), or none where this XLA refuses them; on an accelerator none."""
    return dict(_known_options(self.CPU_NETWORK_OPTIONS)) if self.cpu else {}

  def __repr__(self) -> str:
    return "layout.CPU" if self.cpu else "layout.ACCELERATOR"


CPU = Layout(cpu=True)
ACCELERATOR = Layout(cpu=False)


def default() -> Layout:
  """The layout of JAX's default backend."""
  return CPU if jax.default_backend() == "cpu" else ACCELERATOR


def platform() -> str:
  """JAX's default backend: "cpu", "gpu", "tpu" (what an export must have been lowered for)."""
  return jax.default_backend()


@functools.cache
def _known_options(options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
  """`options` less those `XLA_FLAGS` sets, or {} where this XLA refuses any
  of them (an option of one XLA release may be gone from the next)."""
  flags = {flag.split("=")[0] for flag in os.environ.get("XLA_FLAGS", "").split()}
  chosen = {name: value for name, value in options if f"--{name}" not in flags}
  if not chosen:
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=chosen).lower(
        jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError:  # "No such compile option", an unknown value.
    return {}
  return chosen


def network_jit(fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` for a computation that runs a network,
  compiled with the default layout's `network_compiler_options`.

  The jit is made at the first call, when JAX's backend is known; the
  returned function's `jitted()` is it.
  """
  @functools.cache
  def jitted():
    return jax.jit(fn, compiler_options=default().network_compiler_options() or None,
                   **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return jitted()(*args, **kwargs)

  call.jitted = jitted
  return call


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
        device = next(iter(array.devices()))
      except (RuntimeError, StopIteration):  # Deleted or donated buffers.
        continue
      return for_device(device)
  return default()


def for_device(device: jax.Device) -> Layout:
  """The layout of computations on `device`."""
  return CPU if device.platform == "cpu" else ACCELERATOR
