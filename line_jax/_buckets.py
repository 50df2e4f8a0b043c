"""Bucketed padding: a stream of batch sizes compiles O(log batch) times.

A jitted `score(state, features)` compiles once per distinct batch size, which
costs most of a second at each new size when serving. `Bucketed` wraps it:
the rows are padded up to the next bucket, by repeating the last row (not
zeros: some scores divide by row sums), the jitted function runs at the
bucket's shape, and the padding's scores are dropped. Every score is a
function of its own row alone, so the kept scores are those of the unpadded
batch.

Buckets: 8, 16, ..., 4096 (powers of two), then eight steps per doubling
(4608, 5120, ..., 8192, 9216, ...): at most 12.5 % padding above 4096 and
still O(log batch) shapes. Padding and slicing happen on the host, so they
compile nothing (an eager `x[:n]` compiles for every `n`); an accelerator
array whose batch is not a bucket is fetched once, and its scores put back.
Under a trace (`jax.jit`, `jax.vmap`) the shapes belong to the enclosing
computation, so the wrapper calls the jitted function unchanged. Outside one,
features may be NumPy, JAX, a list or a PyTorch tensor
(`_validation.as_array`), and the computation takes the layout of the device
they are on (`line_jax.layout.for_arrays`) unless `layout=` is given.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import numpy as np

from line_jax import _validation
from line_jax import layout as layout_lib

SMALLEST = 8
# Powers of two up to here; finer steps above, where doubling wastes more.
POWER_OF_TWO_UP_TO = 4096
STEPS_PER_DOUBLING = 8


def bucket(n: int, smallest: int = SMALLEST) -> int:
  """The padded batch size for `n` rows (`n` itself for `n < 1`).

  `smallest`: the least bucket, a power of two; images take 1 (a network
  run on 8 padded images costs 8 times one image's, where a score's
  padding costs nothing).
  """
  if n < 1:
    return n
  if n <= smallest:
    return smallest
  top = 1 << (n - 1).bit_length()  # The smallest power of two >= n.
  if top <= POWER_OF_TWO_UP_TO:
    return top
  step = top // (2 * STEPS_PER_DOUBLING)
  return -(-n // step) * step


def pad_images(images: np.ndarray) -> np.ndarray:
  """uint8 `[n, H, W, C]` with zero images appended up to `bucket(n, smallest=1)`
  (1, 2, 4, then the score buckets): a padded image costs a whole network
  pass, so images are not padded to 8."""
  n = images.shape[0]
  padded = bucket(n, smallest=1)
  if padded == n:
    return images
  return np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])


@functools.cache
def _layout_of_device(sharding: jax.sharding.SingleDeviceSharding) -> layout_lib.Layout:
  """The layout of the one device of `sharding` (`layout.for_device`)."""
  return layout_lib.for_device(next(iter(sharding.device_set)))


def _traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class Bucketed:
  """`fn(state, features, **kwargs) -> [batch]`, padded to `bucket(batch)` rows.

  Attributes:
    __wrapped__: the jitted function itself (for `lower`, `vmap` and jit of
      your own; other attribute reads, such as `lower`, go to it too).
  """

  def __init__(self, fn: Callable[..., jax.Array],
               check_state: Callable[[Any], None] | None = None):
    functools.update_wrapper(self, fn)
    self.__wrapped__ = fn
    self._check_state = check_state

  def __call__(self, state: Any, features: Any, **kwargs) -> jax.Array:
    fn = self.__wrapped__
    if self._check_state is not None:
      self._check_state(state)
    if (isinstance(features, jax.Array) and not isinstance(features, jax.core.Tracer)
        and "layout" not in kwargs
        and isinstance(features.sharding, jax.sharding.SingleDeviceSharding)
        and features.ndim == 2 and bucket(features.shape[0]) == features.shape[0]):
      # The common call, kept short (a small head's whole score takes tens
      # of microseconds): an array placed on one device whose batch is a
      # bucket runs as it is, whatever the state (traced or not).
      return fn(state, features, layout=_layout_of_device(features.sharding))
    if _traced((state, features)):
      return fn(state, features, **kwargs)
    # NumPy, JAX, lists and PyTorch tensors; a TypeError names anything else.
    features = _validation.as_array("features", features)
    if "layout" not in kwargs:  # The layout of the device the features are on.
      kwargs["layout"] = layout_lib.for_arrays(features)
    if isinstance(features, jax.Array) and len(features.sharding.device_set) > 1:
      return fn(state, features, **kwargs)  # Sharded: no padding, the split is the caller's.
    if features.ndim != 2 or bucket(features.shape[0]) == features.shape[0]:
      return fn(state, features, **kwargs)  # Nothing to pad (or its own shape error).
    n = features.shape[0]
    rows = np.asarray(features)
    padded = np.concatenate([rows, np.repeat(rows[-1:], bucket(n) - n, axis=0)])
    out = fn(state, padded, **kwargs)
    # Sliced on the host: an eager `out[:n]` would compile for every `n`.
    return jax.device_put(np.asarray(out)[:n], out.sharding)

  def __getattr__(self, name: str) -> Any:
    if name == "__wrapped__":  # Not set yet (copy, pickle): no recursion.
      raise AttributeError(name)
    return getattr(self.__wrapped__, name)

  def __repr__(self) -> str:
    return f"Bucketed({self.__wrapped__!r})"


def bucketed(fn: Callable[..., jax.Array],
             check_state: Callable[[Any], None] | None = None) -> Bucketed:
  """`fn` wrapped in `Bucketed`; `check_state(state)` raises for a state `fn`
  must not score (a `Bucketed` is unwrapped first)."""
  if isinstance(fn, Bucketed):
    fn = fn.__wrapped__
  return Bucketed(fn, check_state)
