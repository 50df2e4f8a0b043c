"""NumPy-exact percentiles for LINe's masks, without sorting what is large.

The official code thresholds with `np.percentile` (method "linear") in float64
and compares with a strict `>`. A mask only depends on where that threshold
falls among the values, so we need the two order statistics NumPy would
interpolate between, and NumPy's own interpolation of them.

For the weight mask the values of class c are the float64 products
`|contrib[c, j]| * W[k, j]` over all C x m entries. Sorting C*m values per class
is C^2 m log(C m) work (hours for ImageNet on a CPU). Instead we sort each column
of `W` once; scaling a column by a non-negative number keeps its order (IEEE
rounding is monotone), so "how many products are <= v" is a binary search per
column, and an order statistic is a binary search over float64 bit patterns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_SIGN = np.uint64(1 << 63)


def numpy_position(n: int, p: float) -> tuple[int, int, float]:
  """Where `np.percentile(x, p)` reads a sorted array of `n` values.

  Returns:
    `(previous, next, gamma)`: indices of the two order statistics NumPy
    interpolates between and its float64 weight, exactly as NumPy computes
    them for the default method ("linear": virtual index `(n - 1) * p / 100`).
  """
  virtual = (n - 1) * np.true_divide(p, 100)
  if virtual >= n - 1:
    return n - 1, n - 1, 0.0
  previous = math.floor(virtual)
  return previous, previous + 1, float(virtual - np.floor(virtual))


def numpy_lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
  """NumPy's percentile interpolation between order statistics, in float64.

  Done on the host on purpose: XLA may contract `a + d * g` into a fused
  multiply-add, which rounds differently from NumPy.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  diff = b - a
  if gamma >= 0.5:
    return b - diff * (1 - gamma)
  return a + diff * gamma


def _to_key(x: jax.Array) -> jax.Array:
  """float64 -> uint64 with the same order (for finite values)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint64)
  return jnp.where(bits >> 63 == 1, ~bits, bits | _SIGN)


def _from_key(k: jax.Array) -> jax.Array:
  bits = jnp.where(k >> 63 == 1, k & ~_SIGN, ~k)
  return jax.lax.bitcast_convert_type(bits, jnp.float64)


def count_at_most(scale: jax.Array, sorted_cols: jax.Array, v: jax.Array) -> jax.Array:
  """Per column j, how many of `scale[j] * sorted_cols[:, j]` are <= v.

  Args:
    scale: `[m]` float64, non-negative.
    sorted_cols: `[C, m]` float32, each column ascending.
    v: float64 scalar.

  Returns:
    `[m]` int32 counts (the first index whose product exceeds `v`).
  """
  num_rows, m = sorted_cols.shape
  lo = jnp.zeros((m,), jnp.int32)
  hi = jnp.full((m,), num_rows, jnp.int32)

  def step(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    w = jnp.take_along_axis(sorted_cols, jnp.minimum(mid, num_rows - 1)[None], 0)[0]
    le = (scale * w.astype(jnp.float64) <= v) & (lo < hi)
    return jnp.where(le, mid + 1, lo), jnp.where(le | (lo >= hi), hi, mid)

  steps = max(1, math.ceil(math.log2(num_rows + 1)))
  lo, _ = jax.lax.fori_loop(0, steps, step, (lo, hi))
  return lo


def order_statistics(scale: jax.Array, sorted_cols: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Values at sorted positions `rank` and `rank + 1` of all products.

  The products are `scale[j] * sorted_cols[k, j]` in float64 over all k, j.
  Position `rank + 1` is clamped to the last one.

  Returns:
    Two float64 scalars.
  """
  num_rows, _ = sorted_cols.shape
  cols = sorted_cols.astype(jnp.float64)
  lo = _to_key(jnp.min(scale * cols[0]))
  hi = _to_key(jnp.max(scale * cols[-1]))

  # Smallest key whose value has more than `rank` products at or below it.
  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(count_at_most(scale, sorted_cols, _from_key(mid))) > rank
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  key, _ = jax.lax.fori_loop(0, 64, step, (lo, hi))
  below = count_at_most(scale, sorted_cols, _from_key(key))
  # Snap to the product itself: XLA may flush a subnormal search key to zero,
  # so the key's own value is not always one of the products.
  last_le = jnp.take_along_axis(cols, jnp.maximum(below - 1, 0)[None], 0)[0]
  value = jnp.max(jnp.where(below > 0, scale * last_le, -jnp.inf))
  # Next distinct product above `value`, unless `value` repeats past `rank`.
  first_above = jnp.take_along_axis(cols, jnp.minimum(below, num_rows - 1)[None], 0)[0]
  first_above = jnp.where(below < num_rows, scale * first_above, jnp.inf)
  following = jnp.where(jnp.sum(below) > rank + 1, value, jnp.min(first_above))
  total = cols.size
  following = jnp.where(rank + 1 >= total, value, following)
  return value, following
