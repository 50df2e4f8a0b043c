"""Exact order statistics by radix selection over float32 bit patterns.

Each finite float32 maps to a uint32 key with the same order (flip all bits
of negatives, the sign bit of the rest). The k-th largest key is then built
bit by bit from the top: 32 fused compare-and-count passes and no sort. On
CPU this beats XLA's sort-based `top_k` (and `torch.topk` at wide rows) when
only the k-th value is needed (`benchmarks/kernel_variants.py`).

The counts run down the leading axis, so each pass is a column reduction that
vectorises across the other axis; `kth_largest` takes rows and transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from line_jax import layout as layout_lib

_SIGN = np.uint32(1 << 31)
# From this many columns the rolled (CPU) passes count by a product of the
# comparisons with a ones vector rather than by XLA:CPU's column reduction,
# which writes the comparisons out and sums them in a tree of reductions:
# 1.2-1.7x faster from 1,024 columns (of 342-2,048 keys), 0.7-1.1x at 256
# and 512 (`benchmarks/kernel_variants.py`).
COUNT_BY_PRODUCT_COLUMNS = 1024


def to_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (finite values; -0.0 < +0.0)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | _SIGN)


def from_key(key: jax.Array) -> jax.Array:
  """Inverse of `to_key`."""
  bits = jnp.where(key >> 31 == 1, key & ~_SIGN, ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def unrolled(layout: layout_lib.Layout | None = None) -> bool:
  """Whether the 32 passes are unrolled (trace time): on accelerators, yes.

  Unrolled passes are one kernel each on a GPU, far faster there than the
  rolled loop; on the CPU they are many times slower
  (`benchmarks/kernel_variants.py`, `benchmarks/results/<device>/variants.md`).
  """
  return not layout_lib.resolve(layout).cpu


def kth_largest_key_per_column(keys: jax.Array, k: int, *, unroll: bool | None = None,
                               count_by_product: bool | None = None) -> jax.Array:
  """The k-th largest of each column of `keys` (`[n, columns]` uint32).

  A bit of the answer stays set when at least k keys are >= the prefix with
  that bit set. Requires 1 <= k <= n. `unroll` defaults to `unrolled()`;
  `count_by_product` (how each pass counts; the same answer) defaults to
  rolled passes over at least `COUNT_BY_PRODUCT_COLUMNS` columns.
  """
  unroll = unrolled() if unroll is None else unroll
  n, columns = keys.shape
  if count_by_product is None:
    count_by_product = not unroll and columns >= COUNT_BY_PRODUCT_COLUMNS
  by_product = count_by_product and n < 2**24

  def step(i, prefix):
    candidate = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    above = keys >= candidate[None, :]
    if by_product:  # float32 sums of 0 and 1 are exact below 2^24
      count = jnp.matmul(jnp.ones((n,), jnp.float32), above.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    else:
      count = jnp.sum(above, axis=0, dtype=jnp.int32)
    return jnp.where(count >= k, candidate, prefix)

  return jax.lax.fori_loop(0, 32, step, jnp.zeros(keys.shape[1:], jnp.uint32), unroll=unroll)


def kth_largest_per_column(x: jax.Array, k: int, **options) -> jax.Array:
  """The k-th largest value of each column of float32 `[n, columns]`
  (`options`: `kth_largest_key_per_column`'s)."""
  return from_key(kth_largest_key_per_column(to_key(x), k, **options))


def kth_largest(x: jax.Array, k: int, **options) -> jax.Array:
  """The k-th largest value of each row of float32 `[rows, n]`
  (`options`: `kth_largest_key_per_column`'s)."""
  return kth_largest_per_column(x.T, k, **options)
