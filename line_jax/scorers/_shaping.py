"""What ASH and SCALE share: their state and per-sample top-k masks.

ASH and SCALE keep the `k = n - round(n p / 100)` largest activations of each
sample, as their code does with `torch.topk`. XLA's `top_k` sorts on CPU
(slower than `torch.topk` at wide features); only the k-th largest value is
needed, which `_select` finds by radix selection. A mask then keeps every
entry above it plus the first tied entries until exactly k are kept (lowest
index first, the order a stable sort gives).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax import fold
from line_jax.scorers import _common
from line_jax.scorers import _select

def kept_count(num_features: int, percentile: float) -> int:
  """`k = n - round(n p / 100)` as ASH's code computes it (`np.round`)."""
  return num_features - int(np.round(num_features * percentile / 100.0))


def check_percentile(percentile, num_features: int) -> float:
  """Validates a shaping percentile; at least one activation must survive."""
  p = _validation.percentile("percentile", percentile)
  if kept_count(num_features, p) < 1:
    raise ValueError(
        f"percentile {percentile} keeps no activation of {num_features} "
        "features; use a smaller one"
    )
  return p


@flax.struct.dataclass
class ShapingState(_common.HeadState):
  """A head and a shaping percentile (ASH and SCALE fit nothing else).

  The percentile and the kept count it gives are data (pytree leaves), not
  static fields, so states at several percentiles stack under `vmap`.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    percentile: float32 scalar, the share of activations ASH prunes.
    kept: int32 scalar, `kept_count(features, percentile)`.
  """

  percentile: jax.Array
  kept: jax.Array


def shaping_state(kernel, bias, *, percentile, cls: type = ShapingState) -> ShapingState:
  """Checks the head and the percentile; the state of ASH or SCALE."""
  num_features, _ = _common.check_head(kernel, bias)
  p = check_percentile(percentile, num_features)
  head = _common.head_state(kernel, bias)
  return cls(head.weight, head.bias, jnp.asarray(p, jnp.float32),
                      jnp.asarray(kept_count(num_features, p), jnp.int32))


def shaping_fold(default_percentile: float, cls: type) -> fold.Fold:
  """The `Fold` of ASH or SCALE at `default_percentile`: nothing from data;
  its state is `cls`, the scorer's own `ShapingState` subclass."""

  def init(kernel, bias, *, percentile=default_percentile) -> ShapingState:
    return shaping_state(kernel, bias, percentile=percentile, cls=cls)

  return fold.head_fold(init)


def top_k_sum(x: jax.Array, k, *, unroll: bool | None = None) -> jax.Array:
  """`[batch]` sums of the k largest entries of each row of float32 `x`.

  `k` is an int or a traced int32 scalar.

  No mask needed: with t the k-th largest value, the k largest are every
  entry above t plus as many copies of t as it takes to make k. `unroll` is
  `_select`'s (speed only).
  """
  t = _select.kth_largest(x, k, unroll=unroll)[:, None]
  above = x > t
  count = jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)
  return (jnp.sum(jnp.where(above, x, 0.0), axis=1, keepdims=True) + (k - count) * t)[:, 0]


def top_k_mask(x: jax.Array, k, *, branch: bool = True,
               unroll: bool | None = None) -> jax.Array:
  """`[batch, n]` bool: the k largest entries of each row of float32 `x`.

  `branch=False` always takes the tie-breaking cumsum, which the default
  skips when no tie spills; `unroll` is `_select`'s. Both only change the speed.
  """
  keys = _select.to_key(x)
  kth = _select.kth_largest_key_per_column(keys.T, k, unroll=unroll)[:, None]
  above = keys > kth
  tied = keys == kth
  missing = k - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)

  def first_ties(_):
    return above | (tied & (jnp.cumsum(tied, axis=1, dtype=jnp.int32) <= missing))

  # Ties at the k-th value are rare off zero; skip the cumsum when none spill:
  # faster than always taking it, on CPU and GPU (benchmarks/kernel_variants.py).
  if not branch:
    return first_ties(None)
  spill = jnp.any(jnp.sum(tied, axis=1, keepdims=True, dtype=jnp.int32) > missing)
  return jax.lax.cond(spill, first_ties, lambda _: above | tied, None)
