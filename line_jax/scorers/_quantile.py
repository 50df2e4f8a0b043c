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
The histograms are an accumulator (`init`, `update`, `next_pass`, `merge`,
`value`), so a scorer's fold carries them.
"""

from __future__ import annotations

import dataclasses

import flax.struct
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


def _locate(counts: np.ndarray, rank: int) -> tuple[int, int]:
  """Bin holding the `rank`-th smallest value (0-based), and its rank inside."""
  cumulative = np.cumsum(counts)
  index = int(np.searchsorted(cumulative, rank, side="right"))
  return index, rank - (int(cumulative[index - 1]) if index else 0)


@dataclasses.dataclass(frozen=True)
class TrainPercentile:
  """A threshold given as a percentile of all training activations.

  Where a paper's threshold is in feature units (LINe's clip of 1.0 for
  DenseNet-BC on CIFAR, 0.8 for ResNet-50 on ImageNet), the same number
  means something else on another network; a percentile does not. A fold
  resolves it exactly (NumPy's `np.percentile` over every training sample
  and unit, by these histograms) and the fitted state holds the value.

  Attributes:
    percentile: in [0, 100].
  """

  percentile: float

  def __post_init__(self):
    from line_jax import _validation  # pylint: disable=g-import-not-at-top
    object.__setattr__(self, "percentile", _validation.percentile("percentile",
                                                                  self.percentile))

  def resolve(self, train_features) -> float:
    """The threshold over in-memory `[n, features]` training activations."""
    return float(np.percentile(np.asarray(train_features, np.float64), self.percentile))


@flax.struct.dataclass
class Histograms:
  """Streaming state of an exact percentile (an accumulator).

  Attributes:
    high: `[65536]` int64 counts of the values' keys by their top 16 bits.
    low: `[2, 65536]` int64 counts by the low 16 bits, inside `bins` only
      (second pass).
    bins: `[2]` int32, the top-16-bit bins holding the two order statistics
      NumPy interpolates between; -1 during the first pass.
    percentile: static, in [0, 100].
  """

  high: jax.Array
  low: jax.Array
  bins: jax.Array
  percentile: float = flax.struct.field(pytree_node=False)


def init(percentile: float) -> Histograms:
  """Empty histograms for the `percentile` (already validated) of a stream."""
  with jax.enable_x64(True):
    return Histograms(high=jnp.zeros((_BINS,), jnp.int64),
                      low=jnp.zeros((2, _BINS), jnp.int64),
                      bins=jnp.full((2,), -1, jnp.int32), percentile=percentile)


# XLA:CPU runs a scatter-add on one thread but independent ones side by
# side: four counts over quarters of the values, summed, beat one count on
# every core count tried. Below a million values one count is cheap enough.
_PARTS = 4
_SPLIT_FROM = 1 << 20


def _count(index: jax.Array, length: int) -> jax.Array:
  """`jnp.bincount(index, length=length)` of a flat int32 `index`, in parts."""
  size = index.shape[0]
  if size < _SPLIT_FROM:
    return jnp.bincount(index, length=length)
  edges = [size * i // _PARTS for i in range(_PARTS + 1)]
  return sum(jnp.bincount(index[a:b], length=length) for a, b in zip(edges[:-1], edges[1:]))


@jax.jit
def _add(acc: Histograms, x: jax.Array) -> Histograms:
  keys = _select.to_key(x.astype(jnp.float32)).ravel()
  high = (keys >> _BITS).astype(jnp.int32)
  first_pass = acc.bins[0] < 0

  def add_high(acc):
    return acc.replace(high=acc.high + _count(high, _BINS).astype(jnp.int64))

  def add_low(acc):
    # One scatter for both bins (XLA:CPU's scatter-add is the cost of a pass,
    # and one over twice the bins costs about what one does): keys of the
    # first bin count at their low 16 bits, keys
    # of the second 65,536 further on, the rest in a last slot that is
    # dropped. When both statistics lie in one bin, both rows count it.
    first, second = acc.bins[0], acc.bins[1]
    low = (keys & _LOW).astype(jnp.int32)
    index = jnp.where(high == first, low, jnp.where(high == second, low + _BINS, 2 * _BINS))
    counts = _count(index, 2 * _BINS + 1)[: 2 * _BINS].reshape(2, _BINS)
    counts = counts.at[1].set(jnp.where(first == second, counts[0], counts[1]))
    return acc.replace(low=acc.low + counts.astype(jnp.int64))

  return jax.lax.cond(first_pass, add_high, add_low, acc)


def update(acc: Histograms, x) -> Histograms:
  """Counts the float values of `x` (any shape, read as float32)."""
  with jax.enable_x64(True):
    return _add(acc, jnp.asarray(x))


def _ranks(acc: Histograms) -> tuple[int, int, float]:
  total = int(np.asarray(acc.high).sum())
  if total == 0:
    raise ValueError("batches is empty: no value to take a percentile of")
  return _percentile.numpy_position(total, acc.percentile)


def next_pass(acc: Histograms) -> Histograms:
  """After the first pass: which bins the second pass must resolve."""
  previous, following, _ = _ranks(acc)
  high = np.asarray(acc.high)
  bins = [_locate(high, rank)[0] for rank in (previous, following)]
  return acc.replace(bins=jnp.asarray(bins, jnp.int32))


def merge(a: Histograms, b: Histograms) -> Histograms:
  """Histograms of two disjoint parts of a pass, each started from the same
  accumulator: the current pass's counts add, the earlier pass's are `a`'s."""
  if int(np.asarray(a.bins)[0]) < 0:
    return a.replace(high=a.high + b.high)
  return a.replace(low=a.low + b.low)


def value(acc: Histograms) -> float:
  """The float64 percentile, after both passes: NumPy's `np.percentile`."""
  previous, following, gamma = _ranks(acc)
  high, low = np.asarray(acc.high), np.asarray(acc.low)
  total_low = [int(low[i].sum()) for i in range(2)]
  if int(np.asarray(acc.bins)[0]) < 0 or not any(total_low):
    raise ValueError("the second pass over the batches saw no value")

  def stat(rank: int, row: int) -> float:
    b, inside = _locate(high, rank)
    key_low, _ = _locate(low[row], inside)
    return _from_key((b << _BITS) | key_low)

  return float(_percentile.numpy_lerp(stat(previous, 0), stat(following, 1), gamma))
