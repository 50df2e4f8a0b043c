"""Exact `np.percentile` of every value in a stream, in two passes.

ReAct's threshold is a percentile of all training activations: n x m values,
2.6e9 for ImageNet with a ResNet-50 (10 GiB of float32), too many to sort at
once. Each float32 maps to a 32-bit key with the same order, so:

1. count every key by its top 16 bits (a 65,536-bin histogram);
2. the two order statistics NumPy interpolates between lie in known bins;
   count the low 16 bits of the keys in those bins only.

The two histograms pin both order statistics down exactly, and NumPy's own
float64 interpolation between them gives `np.percentile(all_values, p)` with
no approximation. Memory is two histograms; work is two passes over the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from line_jax.line import _percentile
from line_jax.scorers import _select

_BITS = 16
_BINS = 1 << _BITS
_LOW = np.uint32(_BINS - 1)


def _from_key(key: int) -> float:
  return float(_select.from_key(jnp.uint32(key)))


@jax.jit
def _high_counts(x: jax.Array) -> jax.Array:
  high = (_select.to_key(x).ravel() >> _BITS).astype(jnp.int32)
  return jnp.bincount(high, length=_BINS)


@jax.jit
def _low_counts(x: jax.Array, high: jax.Array) -> jax.Array:
  keys = _select.to_key(x).ravel()
  low = jnp.where(keys >> _BITS == high, keys & _LOW, _BINS).astype(jnp.int32)
  # Keys outside the bin land in an extra bin that is dropped.
  return jnp.bincount(low, length=_BINS + 1)[:_BINS]


def _locate(counts: np.ndarray, rank: int) -> tuple[int, int]:
  """Bin holding the `rank`-th smallest value (0-based), and its rank inside."""
  cumulative = np.cumsum(counts)
  index = int(np.searchsorted(cumulative, rank, side="right"))
  return index, rank - (int(cumulative[index - 1]) if index else 0)


def percentile_from_batches(
    batches: Callable[[], Iterable[jax.Array]], p: float
) -> float:
  """`np.percentile` (method "linear") of all values of all batches, exactly.

  Args:
    batches: called twice, each call returns an iterable over the same
      finite float arrays (any shape, read as float32) in the same order;
      fewer than 2**31 values per array.
    p: percentile in [0, 100].

  Returns:
    The float64 percentile, equal to `np.percentile(np.concatenate(all
    values flattened).astype(np.float64), p)`.

  Raises:
    ValueError: if there is no value, or the second pass differs in size.
  """
  high = np.zeros(_BINS, np.int64)
  for x in batches():
    high += np.asarray(_high_counts(x), np.int64)
  total = int(high.sum())
  if total == 0:
    raise ValueError("batches is empty: no value to take a percentile of")
  previous, following, gamma = _percentile.numpy_position(total, p)

  wanted = {rank: _locate(high, rank) for rank in (previous, following)}
  bins = sorted({b for b, _ in wanted.values()})
  low = {b: np.zeros(_BINS, np.int64) for b in bins}
  seen = 0
  for x in batches():
    seen += int(np.prod(x.shape))
    for b in bins:
      low[b] += np.asarray(_low_counts(x, jnp.uint32(b)), np.int64)
  if seen != total:
    raise ValueError(
        f"the second pass over the batches saw {seen} values, the first "
        f"{total}: batches must yield the same data each time"
    )

  def value(rank: int) -> float:
    b, inside = wanted[rank]
    key_low, _ = _locate(low[b], inside)
    return _from_key((b << _BITS) | key_low)

  return float(_percentile.numpy_lerp(value(previous), value(following), gamma))
