"""Honest timing: warm-up, synchronisation, median of repeats."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

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
  try:
    import os
    env["threads"]["cpu_count"] = os.cpu_count()
    import torch
    env["versions"]["torch"] = torch.__version__
    env["threads"]["torch_intra_op"] = torch.get_num_threads()
    if torch.cuda.is_available():
      env["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return env
