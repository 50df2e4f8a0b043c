"""Honest timing: warm-up, synchronisation, median of repeats."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 2,
                   sync: Callable[[object], None] | None = None) -> float:
  """Median wall time of `fn()` after `warmup` untimed calls.

  Args:
    fn: the work; its result is passed to `sync` before the clock stops.
    repeats: timed calls.
    warmup: untimed calls first (compilation, caches, lazy set-up).
    sync: waits for asynchronous work (default: `jax.block_until_ready`).
  """
  sync = sync or jax.block_until_ready
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_rates(fns: Sequence[Callable[[], object]], samples: int, *, repeats: int,
                      rounds: int, settle_s: float = 0.03, wake: bool = True) -> list[float]:
  """samples/s of each of `fns`: median call time over `rounds` blocks of `repeats`.

  `interleaved_blocks` says how the calls are made; this is the median of
  all of one implementation's calls.

  Args:
    fns: the implementations, each doing the same work on `samples` samples.
    samples: samples per call.
    repeats, rounds, settle_s, wake: as in `interleaved_blocks`.
  """
  times = interleaved_blocks(fns, repeats=repeats, rounds=rounds, settle_s=settle_s, wake=wake)
  return [samples / statistics.median(t for block in blocks for t in block)
          for blocks in times]


def interleaved_blocks(fns: Sequence[Callable[[], object]], *, repeats: int, rounds: int,
                       settle_s: float = 0.03, wake: bool = True,
                       wake_s: float = 0.0) -> list[list[list[float]]]:
  """Call times of each of `fns`, `[fn][round][repeat]` seconds, taken in turns.

  Each `fn` must wait for its own result (`block_until_ready`,
  `torch.cuda.synchronize`). One untimed warm-up call each first
  (compilation, caches, thread pools). The implementations take turns block
  by block, so slow drifts of a shared machine's load hit all alike. Between
  blocks we pause: after a call PyTorch's OpenMP workers spin for
  milliseconds (libgomp's default spin count) and XLA's briefly, and on a
  few cores a spinning neighbour would be timed as part of the next block.

  Args:
    fns: the implementations, each doing the same work.
    repeats: timed calls per block.
    rounds: blocks per implementation.
    settle_s: pause before each block.
    wake: one untimed call at the start of each block. Calls of tens of
      milliseconds and more (a backbone) need neither it nor the pause:
      with `repeats=1, settle_s=0, wake=False` the implementations simply
      alternate call by call.
    wake_s: with `wake`, untimed calls go on until this many seconds have
      passed, so that the block times the implementation running steadily.
      On this project's 2-core VM a multi-threaded call stays slow for tens
      of milliseconds after its workers were idle (XLA's park sooner than
      PyTorch's spinning OpenMP workers), which a block of a few short
      calls would time instead.
  """
  for fn in fns:
    fn()
  times: list[list[list[float]]] = [[] for _ in fns]
  for _ in range(rounds):
    for fn, blocks in zip(fns, times):
      time.sleep(settle_s)
      if wake:
        woken = time.perf_counter()
        fn()  # untimed: wakes the thread pools after the pause
        while time.perf_counter() - woken < wake_s:
          fn()
      spent = []
      for _ in range(repeats):
        start = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - start)
      blocks.append(spent)
  return times


def environment() -> dict:
  """Device, library versions and thread counts, recorded with every result."""
  import flax
  import numpy as np
  env = {
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
      "num_devices": jax.device_count(),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "versions": {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__},
      "threads": {},
  }
  env["threads"]["cpu_count"] = os.cpu_count()
  env["threads"]["cpu_affinity"] = len(os.sched_getaffinity(0))
  for var in ("OMP_NUM_THREADS", "XLA_FLAGS"):
    if var in os.environ:
      env["threads"][var] = os.environ[var]
  try:
    import torch
    env["versions"]["torch"] = torch.__version__
    env["threads"]["torch_intra_op"] = torch.get_num_threads()
    if torch.cuda.is_available():
      env["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return env
