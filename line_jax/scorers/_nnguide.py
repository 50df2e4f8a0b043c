"""NNGuide: classifier energy guided by nearest neighbours in a bounded bank.

Park, Jung, Teoh, "Nearest Neighbor Guidance for Out-of-Distribution
Detection", ICCV 2023. With `z = h / max(||h||, 1e-12)` (PyTorch's
`F.normalize`) and `E(h) = logsumexp(h @ kernel + bias)`, the guidance bank
holds each bank sample's normalised feature scaled by its own energy,
`b_i = z_i E(h_i)`, and

    score(h) = E(h) * mean of the k largest z . b_i,

the classifier score guided by the confidence-weighted similarity to its
nearest bank rows; higher = more ID. As the official code
(roomo7time/nnguide: `ood_detectors/nnguide.py`, faiss inner products,
`knn_k: 10`; `dataloaders/datasets_large.py`, `bankset_ratio=0.01`): default
k = 10 over a bank of 1 % of ImageNet-1k's training set, a uniform random
subset. Paper and code agree. (OpenOOD's port normalises by `x / ||x|| +
1e-10`, adding the epsilon outside the division, and uses k = 100; we follow
the authors' code.) The paper's ResNet-50 results clip features with ReAct
first (the code's `resnet50-react` model); clip the features given to `fit`
and `score` to reproduce them.

Bounded memory: the bank holds at most `bank_size` rows (default 12,811 =
1 % of ImageNet's 1,281,167 training images, the official bank's size): the
rows whose seeded 64-bit hash of the feature row's bytes is smallest
(`_row_subset.row_keys`), a uniform random subset fixed by the data and
`seed` alone, so a streamed, merged or re-ordered fit keeps the same rows.
The accumulator holds at most `bank_size` rows plus one batch (host memory);
the fitted bank `bank_size x features` float32 on the device (105 MB at 2048
features); a score call walks it in blocks of `block_rows` with a running
top-k, so its temporaries are `[batch, block_rows]` whatever the bank. (A
bank of the whole training set, as pytorch-ood's NNGuide keeps, was reported
at 34 GiB on ImageNet.) A training set smaller than `bank_size` is kept
whole.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _knn
from line_jax.scorers import _row_subset

K = 10
BANK_SIZE = 12_811
BLOCK_ROWS = 32768
_EPS = 1e-12
# The tuning grid (`python -m line_jax.tune`). One top-k width for every k, so
# the grid's states stack and one selection serves them all.
_GRID_K = (1, 5, 10, 20, 50, 100)
GRID = {"k": _GRID_K, "k_max": (max(_GRID_K),)}


@flax.struct.dataclass
class NnguideState(_common.HeadState):
  """A fitted NNGuide scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    bank: `[blocks, block_rows, features]` float32 guidance rows `z_i E_i`;
      rows past `size` are zero padding.
    k: int32 scalar, the neighbour count, in `[1, k_max]` (data, so states
      at several k stack under `vmap`).
    size: static number of real bank rows.
    k_max: static width of the running top-k of a bank of several blocks,
      at least k and at most `size`.
  """

  bank: jax.Array
  k: jax.Array
  size: int = flax.struct.field(pytree_node=False)
  k_max: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class NnguideAcc:
  """NNGuide's accumulator: the bank rows kept so far (host memory).

  Attributes:
    head: the `HeadState`.
    rows: `[kept, features]` float32 guidance rows, ordered by `keys`.
    keys: `[kept]` uint64 hashes of their feature rows (ascending).
    k, bank_size, seed, block_rows, k_max: static hyperparameters.
  """

  head: _common.HeadState
  rows: np.ndarray
  keys: np.ndarray
  k: int = flax.struct.field(pytree_node=False)
  bank_size: int = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  block_rows: int = flax.struct.field(pytree_node=False)
  k_max: int = flax.struct.field(pytree_node=False)


def init(kernel, bias, *, k=K, bank_size=BANK_SIZE, seed=0, block_rows=BLOCK_ROWS,
         k_max=None) -> NnguideAcc:
  """Starts the guidance bank.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    k: neighbours averaged, at least 1 and at most the bank size.
    bank_size: most training rows the bank keeps (a seeded uniform subset).
    seed: seed of the subset.
    block_rows: bank rows per block of a score call (memory vs. speed).
    k_max: width of the running top-k over several blocks (None: k), capped
      at the bank size. Any k_max >= k gives the same scores; states that
      share it stack under `vmap` whatever their k.
  """
  num_features, _ = _common.check_head(kernel, bias)
  k = _common.integer("k", k)
  k_max = k if k_max is None else _common.integer("k_max", k_max)
  if k_max < k:
    raise ValueError(f"k_max must be at least k = {k}, got {k_max}")
  bank_size = _common.integer("bank_size", bank_size)
  seed = _common.integer("seed", seed, low=0)
  block_rows = _common.integer("block_rows", block_rows)
  return NnguideAcc(_common.head_state(kernel, bias), np.zeros((0, num_features), np.float32),
                    np.zeros((0,), np.uint64), k, bank_size, seed, block_rows, k_max)


def normalise(features: jax.Array) -> jax.Array:
  """`h / max(||h||, 1e-12)` per row (PyTorch's `F.normalize`), float32."""
  h = features.astype(jnp.float32)
  return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), _EPS)


@jax.jit
def _guidance_rows(head: _common.HeadState, features: jax.Array) -> jax.Array:
  h = features.astype(jnp.float32)
  energy = _common.energy(_matmul.dot(h, head.weight.T) + head.bias)
  return normalise(h) * energy[:, None]


def update(acc: NnguideAcc, features, labels) -> NnguideAcc:
  """Adds a `[batch, features]` batch's guidance rows; keeps the smallest keys."""
  del labels
  rows, keys = _row_subset.add(acc.rows, acc.keys,
                               np.asarray(_guidance_rows(acc.head, features)), features,
                               acc.seed, acc.bank_size)
  return acc.replace(rows=rows, keys=keys)


def merge(a: NnguideAcc, b: NnguideAcc) -> NnguideAcc:
  """The smallest keys of both parts: what one fit over both would keep."""
  rows, keys = _row_subset.merge(a.rows, a.keys, b.rows, b.keys, a.bank_size)
  return a.replace(rows=rows, keys=keys)


def finalize(acc: NnguideAcc) -> NnguideState:
  """The bank on the device, `[blocks, block_rows, features]`."""
  size, num_features = acc.rows.shape
  if size < acc.k:
    raise ValueError(
        f"k = {acc.k} needs at least {acc.k} bank rows, but the bank has {size} "
        f"(bank_size {acc.bank_size})")
  return NnguideState(acc.head.weight, acc.head.bias, _knn.blocked(acc.rows, acc.block_rows),
                      jnp.asarray(acc.k, jnp.int32), size, min(acc.k_max, size))


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge)


@_common.score_jit
def score(state: NnguideState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` energy times the mean of the k largest bank similarities;
  higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.bank.shape[2])
  h = features.astype(jnp.float32)
  z = normalise(h)
  # The k_max largest `z . b`, of which the first k count.
  best = _knn.top_k_over_blocks(lambda block: _matmul.dot(z, block.T), (state.bank,),
                                state.size, state.k_max)
  top = jnp.sum(jnp.where(jnp.arange(state.k_max) < state.k, best, 0.0), axis=1)
  return _common.head_energy(state, h, layout) * (top / state.k.astype(jnp.float32))
