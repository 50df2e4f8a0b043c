"""Relation: the sum of strong relation-graph edges to a bounded training bank.

Kim, Yun, Song, "Neural Relation Graph: A Unified Framework for Identifying
Label Noise and Outlier Data", NeurIPS 2023. With `z = h / sqrt(||h||^2 +
1e-10)` and `p = softmax(h @ kernel + bias)`, the relation of a test row to
bank row i is its feature similarity times the agreement of the two
predictions,

    r_i = max(z . z_i, 0) * (p . p_i),

and the score sums the strong ones, raised to a power:

    score(h) = sum over i with r_i > threshold of r_i ** power;

higher = more ID (an outlier relates to few training samples, and weakly).
As OpenOOD's port of the authors' code (Jingkang50/OpenOOD,
`openood/postprocessors/relation_postprocessor.py`, "borrowed from
snu-mllab/Neural-Relation-Graph": `normalize` lines 14-22, the epsilon
inside the square root; `kernel` lines 25-44, the dot product clamped at 0
times the probability product; `get_relation` lines 47-81, `thres=0.03` and
`sign(r) |r| ** pow` (lines 73-75), which is `r ** pow` since r >= 0;
`setup` lines 93-113, the bank of the whole training set and its softmax
outputs; `configs/postprocessors/relation.yml`: `pow: 1`, sweep
`pow_list: [1, 2, 4, 6, 8]`). `threshold` is the code's fixed `thres`,
exposed here with the same default. The one departure is the bounded bank.

Bounded memory: OpenOOD keeps every training row (ImageNet-1k: 1.28 M x
(2048 + 1000) floats, 15.6 GB). The bank here holds at most `bank_size`
rows (default 50,000: CIFAR-10's and CIFAR-100's whole training sets, so
OpenOOD's CIFAR benchmarks are exact; 3.9 % of ImageNet-1k): the rows whose
seeded 64-bit hash of the feature row's bytes is smallest
(`_row_subset.row_keys`), a uniform random subset fixed by the data and `seed`
alone, so a streamed, merged or re-ordered fit keeps the same rows. On a
subsample the score is the edge sum over the kept rows, which estimates
`bank / training` times the full sum: the same ranking in expectation, not
row for row. The accumulator holds at most `bank_size` raw rows plus one
batch (host memory); the fitted bank is `bank_size x (features + classes)`
float32 on the device, and a score call walks it in blocks of `block_rows`
with `lax.scan`, so its temporaries are `[batch, block_rows]` whatever the
bank.

`power` and `threshold` are data (float32 leaves of the state), so the grid's
states stack under `vmap` and share one bank.
"""

from __future__ import annotations

import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _row_subset

POWER = 1
THRESHOLD = 0.03
BANK_SIZE = 50_000
BLOCK_ROWS = 8192
_EPS = 1e-10
GRID = {"power": (1, 2, 4, 6, 8)}


@flax.struct.dataclass
class RelationState(_common.HeadState):
  """A fitted Relation scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    bank: `[blocks, block_rows, features]` float32 normalised training
      features; rows past `size` are zero (their relation is 0, never above
      a threshold >= 0).
    probs: `[blocks, block_rows, classes]` float32 softmax outputs of the
      bank rows (zero padding alike).
    power: float32 scalar, the exponent of each kept relation.
    threshold: float32 scalar, relations at or below it are dropped.
    size: static number of real bank rows.
  """

  bank: jax.Array
  probs: jax.Array
  power: jax.Array
  threshold: jax.Array
  size: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class RelationAcc:
  """Relation's accumulator: the training rows kept so far (host memory).

  Attributes:
    head: the `HeadState`.
    rows: `[kept, features]` float32 raw training features, ordered by `keys`.
    keys: `[kept]` uint64 seeded hashes of those rows (ascending).
    power, threshold, bank_size, seed, block_rows: static hyperparameters.
  """

  head: _common.HeadState
  rows: np.ndarray
  keys: np.ndarray
  power: float = flax.struct.field(pytree_node=False)
  threshold: float = flax.struct.field(pytree_node=False)
  bank_size: int = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  block_rows: int = flax.struct.field(pytree_node=False)


def _non_negative(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
  if not (math.isfinite(value) and value >= 0.0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value}")
  return float(value)


def init(kernel, bias, *, power=POWER, threshold=THRESHOLD, bank_size=BANK_SIZE, seed=0,
         block_rows=BLOCK_ROWS) -> RelationAcc:
  """Starts the relation bank.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    power: positive exponent of each kept relation (OpenOOD's `pow`).
    threshold: relations at or below it are dropped (the code's `thres`), >= 0.
    bank_size: most training rows the bank keeps (a seeded uniform subset).
    seed: seed of the subset.
    block_rows: bank rows per block of a score call (memory vs. speed).
  """
  num_features, _ = _common.check_head(kernel, bias)
  power = _validation.positive("power", power)
  threshold = _non_negative("threshold", threshold)
  bank_size = _common.integer("bank_size", bank_size)
  seed = _common.integer("seed", seed, low=0)
  block_rows = _common.integer("block_rows", block_rows)
  return RelationAcc(_common.head_state(kernel, bias), np.zeros((0, num_features), np.float32),
                     np.zeros((0,), np.uint64), power, threshold, bank_size, seed, block_rows)


def update(acc: RelationAcc, features, labels) -> RelationAcc:
  """Adds a `[batch, features]` batch's rows; keeps the `bank_size` smallest keys."""
  del labels
  features = np.asarray(features, np.float32)
  rows, keys = _row_subset.add(acc.rows, acc.keys, features, features, acc.seed,
                               acc.bank_size)
  return acc.replace(rows=rows, keys=keys)


def merge(a: RelationAcc, b: RelationAcc) -> RelationAcc:
  """The smallest keys of both parts: what one fit over both would keep."""
  rows, keys = _row_subset.merge(a.rows, a.keys, b.rows, b.keys, a.bank_size)
  return a.replace(rows=rows, keys=keys)


def normalise(features: jax.Array) -> jax.Array:
  """`h / sqrt(||h||^2 + 1e-10)` per row (the official `normalize`), float32."""
  h = features.astype(jnp.float32)
  return h / jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True) + _EPS)


def _probs(head: _common.HeadState, h: jax.Array) -> jax.Array:
  """`[batch, classes]` softmax of the head's logits."""
  return jax.nn.softmax(_matmul.dot(h, head.weight.T) + head.bias, axis=-1)


@jax.jit
def _bank_rows(head: _common.HeadState, features: jax.Array) -> tuple[jax.Array, jax.Array]:
  h = features.astype(jnp.float32)
  return normalise(h), _probs(head, h)


def finalize(acc: RelationAcc) -> RelationState:
  """The bank and its softmax outputs on the device, `[blocks, block_rows, *]`."""
  size, num_features = acc.rows.shape
  num_classes = acc.head.bias.shape[0]
  block_rows = min(acc.block_rows, size)
  blocks = -(-size // block_rows)
  z, p = (np.asarray(x) for x in _bank_rows(acc.head, jnp.asarray(acc.rows)))
  bank = np.zeros((blocks * block_rows, num_features), np.float32)
  probs = np.zeros((blocks * block_rows, num_classes), np.float32)
  bank[:size], probs[:size] = z, p
  return RelationState(acc.head.weight, acc.head.bias,
                       jnp.asarray(bank.reshape(blocks, block_rows, num_features)),
                       jnp.asarray(probs.reshape(blocks, block_rows, num_classes)),
                       jnp.asarray(acc.power, jnp.float32),
                       jnp.asarray(acc.threshold, jnp.float32), size)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge)


@_common.score_jit
def score(state: RelationState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` sums of the relations above the threshold, each to the power;
  higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  del layout  # One layout: every product is `[batch, bank block]`.
  _common.check_width(features, state.bank.shape[2])
  h = features.astype(jnp.float32)
  z, p = normalise(h), _probs(state, h)

  def step(total, block):
    rows, probs = block
    relation = jnp.maximum(_matmul.dot(z, rows.T), 0.0) * _matmul.dot(p, probs.T)
    kept = relation > state.threshold
    edges = jnp.where(kept, jnp.power(jnp.where(kept, relation, 1.0), state.power), 0.0)
    return total + jnp.sum(edges, axis=1), None

  total, _ = jax.lax.scan(step, jnp.zeros((h.shape[0],), jnp.float32),
                          (state.bank, state.probs))
  return total
