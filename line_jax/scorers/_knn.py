"""KNN: distance to the k-th nearest training feature, L2-normalised.

Sun, Ming, Zhu, Li, "Out-of-Distribution Detection with Deep Nearest
Neighbors", ICML 2022. Features are normalised, `z = h / (||h|| + 1e-10)` as
in the official code; the score is minus the Euclidean distance from `z` to
its k-th nearest normalised training feature (the paper's
`-||z - z_(k)||`; the official code's faiss returns its square, the same
ranking). The paper's k grows with the bank: k = 50 for CIFAR-10's 50,000
training images, k = 1000 for ImageNet's 1.28 M (k = 10 with a 1 %
subsample, `bank_fraction=0.01`). A fixed k fits one bank size only (k = 1000
cannot even run on a bank of 999 rows), so the default `k=None` is the
CIFAR-10 ratio, one neighbour per 1,000 bank rows: `default_k(size) =
max(1, round(size / 1000))`, resolved when the bank is complete and kept in
the state (the ImageNet protocol sets its k = 1000 itself).

`||z - b||^2 = ||z||^2 - (2 z.b - ||b||^2)`, so the k-th nearest row is the
one with the k-th largest `2 z.b - ||b||^2`: one matrix product per bank block
and an exact selection (`||b||^2` is 1 except for all-zero features).

The rank k is data (an int32 leaf of the state), so states at several k stack
under `vmap` (`line_jax.runs.tune`); the static `k_max` (k by default) fixes the
width of the top-k a score call keeps, and the k-th nearest is entry k - 1 of
those `k_max` best.

Scale: the bank lives on the device as `[blocks, block_rows, features]`
float32 (ImageNet: 1.28 M x 2048 = 10.5 GB; 105 MB at `bank_fraction=0.01`).
A score call walks the blocks with `lax.scan`, merging each block's
similarities into a running exact top-k (`[batch, k]`), so its temporaries
are `[batch, block_rows]` floats whatever the bank size. Work is
`2 x batch x bank x features` flops for the products plus one top-k per
block (timings: `benchmarks/results/`). A bank of one block skips the merge.
The bank's blocks are equal, at most `block_rows` each, so a bank pads less
than one block.

The bank subsample is seeded and counter-based: sample i of the training
stream is kept iff `uniform(fold_in(key(seed), i)) < bank_fraction`, so the
in-memory and the streamed fit keep the same samples.
"""

from __future__ import annotations

import functools
import weakref

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common

K = None  # One neighbour per 1,000 bank rows (`default_k`), resolved at finalize.
ROWS_PER_NEIGHBOUR = 1000
BLOCK_ROWS = 32768
_EPS = 1e-10
# Near neighbours have dot products close to 1; TF32 would blur them.
_PRECISION = jax.lax.Precision.HIGHEST
# The tuning grid (`python -m line_jax.tune`). One top-k width for every k, so
# the grid's states stack and one selection serves them all.
_GRID_K = (1, 5, 10, 20, 50, 100, 200)
GRID = {"k": _GRID_K, "k_max": (max(_GRID_K),)}



@flax.struct.dataclass
class KnnState:
  """A fitted KNN scorer.

  Attributes:
    bank: `[blocks, block_rows, features]` float32 normalised training
      features; rows past `size` are zero padding.
    sq_norms: `[blocks, block_rows]` float32 squared norms of the bank rows.
    k: int32 scalar, the neighbour rank, in `[1, k_max]`.
    size: static number of real rows in the bank.
    k_max: static width of the top-k selection, at least k and at most
      `size` (fit caps it there).
  """

  bank: jax.Array
  sq_norms: jax.Array
  k: jax.Array
  size: int = flax.struct.field(pytree_node=False)
  k_max: int = flax.struct.field(pytree_node=False)


def default_k(size: int) -> int:
  """The paper's CIFAR-10 ratio, 50 neighbours for 50,000 rows, at `size` rows."""
  return max(1, round(size / ROWS_PER_NEIGHBOUR))


def _hparams(k, bank_fraction, seed, block_rows, k_max):
  k = None if k is None else _common.integer("k", k)
  k_max = k if k_max is None else _common.integer("k_max", k_max)
  if k is not None and k_max < k:
    raise ValueError(f"k_max must be at least k = {k}, got {k_max}")
  fraction = _validation.positive("bank_fraction", bank_fraction)
  if fraction > 1.0:
    raise ValueError(f"bank_fraction must lie in (0, 1], got {bank_fraction}")
  seed = _common.integer("seed", seed, low=0)
  return k, fraction, seed, _common.integer("block_rows", block_rows), k_max


@jax.jit
def _normalise(features: jax.Array) -> jax.Array:
  h = features.astype(jnp.float32)
  return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + _EPS)


def _kept(start: int, count: int, fraction: float, seed: int) -> np.ndarray:
  """Which of samples `start .. start + count - 1` the subsample keeps."""
  if fraction >= 1.0:
    return np.ones(count, bool)
  key = jax.random.key(seed)
  index = jnp.arange(start, start + count, dtype=jnp.uint32)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(index)
  return np.asarray(u < fraction)


@flax.struct.dataclass
class KnnAcc:
  """KNN's accumulator: the kept normalised training rows so far.

  Attributes:
    rows: `[kept, features]` float32 normalised rows (host memory).
    seen: int64 scalar, training samples read (the subsample's counter).
    k, bank_fraction, seed, block_rows, k_max: static hyperparameters.
  """

  rows: np.ndarray
  seen: np.ndarray
  k: int = flax.struct.field(pytree_node=False)
  bank_fraction: float = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  block_rows: int = flax.struct.field(pytree_node=False)
  k_max: int = flax.struct.field(pytree_node=False)


def init(kernel, bias, *, k=K, bank_fraction=1.0, seed=0, block_rows=BLOCK_ROWS,
         k_max=None) -> KnnAcc:
  """Starts the bank of normalised training features.

  Args:
    kernel: `[features, classes]` head kernel (validated; fixes the width).
    bias: `[classes]` head bias or None (validated only).
    k: neighbour rank, at least 1 and at most the bank size; None: one per
      1,000 bank rows (`default_k`), resolved when the bank is complete.
    bank_fraction: share of training samples kept in the bank, in (0, 1].
    seed: seed of the subsample.
    block_rows: bank rows per block of a score call (memory vs. speed).
    k_max: width of the top-k selection, at least k (None: k), capped at the
      bank size. Any k_max >= k gives the same scores; states that share it
      stack under `vmap` whatever their k.
  """
  num_features, _ = _common.check_head(kernel, bias)
  k, fraction, seed, block_rows, k_max = _hparams(k, bank_fraction, seed, block_rows, k_max)
  return KnnAcc(np.zeros((0, num_features), np.float32), np.zeros((), np.int64),
                k, fraction, seed, block_rows, k_max)


def update(acc: KnnAcc, features, labels) -> KnnAcc:
  """Keeps the subsampled, normalised rows of a `[batch, features]` batch.

  Only kept rows are held, on the host, until `finalize` moves the bank to
  the device in one piece; the full training set never is.
  """
  del labels
  n = int(np.shape(features)[0])
  # On the CPU a view of the jitted result's buffer, not a copy.
  new = np.asarray(_normalise(features))
  if acc.bank_fraction < 1.0:
    new = new[_kept(int(acc.seen), n, acc.bank_fraction, acc.seed)]
  rows = _appended(acc.rows, new) if len(new) else acc.rows
  return acc.replace(rows=rows, seen=np.asarray(int(acc.seen) + n, np.int64))


# id(buffer) -> (a weak reference to it, the row count of its newest view):
# only that view may append in place. Entries leave with their buffer.
_TIPS: dict[int, tuple[weakref.ref, int]] = {}


def _tip(buffer: np.ndarray) -> int | None:
  ref, count = _TIPS.get(id(buffer), (None, None))
  return count if ref is not None and ref() is buffer else None


def _set_tip(buffer: np.ndarray, count: int) -> None:
  key = id(buffer)
  if _tip(buffer) is None:
    ref = weakref.ref(buffer, lambda _, key=key: _TIPS.pop(key, None))
  else:
    ref = _TIPS[key][0]
  _TIPS[key] = (ref, count)


def _appended(rows: np.ndarray, new: np.ndarray) -> np.ndarray:
  """`concatenate([rows, new])` in amortised O(len(new)).

  The bank is a prefix view of a buffer that doubles when full, so a fit of
  n rows copies O(n) rows in all, not O(n^2) as concatenating every batch
  would. The view is the
  accumulator's leaf: it has the bank's exact shape, saves and merges as
  before. An update appends in place only from the buffer's newest view, so
  an older accumulator that is updated again gets a copy, and neither sees
  the other's rows.
  """
  n, r = rows.shape[0], new.shape[0]
  if n == 0:
    return new  # The first batch's rows as they are: a one-batch fit copies none.
  buffer = rows.base
  in_place = (isinstance(buffer, np.ndarray) and buffer.ndim == 2
              and buffer.dtype == new.dtype and buffer.shape[1] == rows.shape[1]
              and buffer.shape[0] >= n + r and rows.ctypes.data == buffer.ctypes.data
              and _tip(buffer) == n)
  if not in_place:
    buffer = np.empty((max(n + r, 2 * n, 1024), new.shape[1]), new.dtype)
    buffer[:n] = rows
  buffer[n:n + r] = new
  _set_tip(buffer, n + r)
  return buffer[:n + r]


def merge(a: KnnAcc, b: KnnAcc) -> KnnAcc:
  """`a`'s rows, then `b`'s (the bank of `a`'s samples followed by `b`'s)."""
  return a.replace(rows=np.concatenate([a.rows, b.rows]),
                   seen=np.asarray(int(a.seen) + int(b.seen), np.int64))


def finalize(acc: KnnAcc) -> KnnState:
  """The bank on the device, `[blocks, block_rows, features]`."""
  size = acc.rows.shape[0]
  k = default_k(size) if acc.k is None else acc.k
  k_max = k if acc.k_max is None else acc.k_max
  if size < k:
    raise ValueError(
        f"k = {k} needs at least {k} bank rows, but the bank has {size} "
        f"({int(acc.seen)} training samples, bank_fraction {acc.bank_fraction}); "
        "k=None picks one neighbour per 1,000 rows"
    )
  bank = blocked(acc.rows, acc.block_rows)
  # A top-k as wide as the bank already holds every neighbour.
  return KnnState(bank, _sq_norms(bank), jnp.asarray(k, jnp.int32), size, min(k_max, size))


def blocked(rows: np.ndarray, block_rows: int) -> jax.Array:
  """`[blocks, rows per block, features]` on the device: `[n, features]` host
  `rows` in equal blocks of at most `block_rows` (the least padding for that
  block count), zero rows at the end."""
  size, num_features = rows.shape
  blocks = -(-size // block_rows)
  block_rows = -(-size // blocks)
  # On the CPU `device_put` takes a 64-byte-aligned host array (the view
  # `update` keeps of a one-batch fit) as it is, without a copy.
  if blocks * block_rows == size:
    return jax.device_put(rows.reshape(blocks, block_rows, num_features))
  return _padded(jax.device_put(rows), blocks, block_rows)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _padded(rows: jax.Array, blocks: int, block_rows: int) -> jax.Array:
  """`[blocks, block_rows, features]`: `rows`, then zero rows."""
  padding = blocks * block_rows - rows.shape[0]
  return jnp.pad(rows, ((0, padding), (0, 0))).reshape(blocks, block_rows, rows.shape[1])


@jax.jit
def _sq_norms(bank: jax.Array) -> jax.Array:
  return jnp.sum(bank * bank, axis=-1)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge)


def _affinity(z: jax.Array, block: jax.Array, sq_norms: jax.Array) -> jax.Array:
  """`[batch, rows]` `2 z.b - ||b||^2`: larger means nearer."""
  return 2.0 * jnp.matmul(z, block.T, precision=_PRECISION) - sq_norms


def merged_top_k(best: jax.Array, values: jax.Array, k: int) -> jax.Array:
  """`[batch, k]` the k largest of `best` `[batch, k]` and `values` `[batch, n]`,
  largest first. The block's own top-k first: merging those copies
  `[batch, 2k]`, not the whole block."""
  block_best = jax.lax.top_k(values, min(k, values.shape[1]))[0]
  return jax.lax.top_k(jnp.concatenate([best, block_best], axis=1), k)[0]


def top_k_over_blocks(similarity, blocks: tuple, size: int, k_max: int) -> jax.Array:
  """`[batch, k_max]` the k_max largest similarities to a blocked bank, largest first.

  Args:
    similarity: `similarity(*block) -> [batch, rows per block]`, larger = nearer.
    blocks: arrays with a leading `[blocks, rows per block]`: the bank (`blocked`)
      and any per-row values `similarity` takes with it.
    size: real rows of the bank (the padding rows of the last block are dropped).
    k_max: static width of the selection.

  A one-block bank is one `lax.top_k`; several run it over each block in a
  scan, merged into the running best. The caller reads its traced k from
  the result: a static slice of the top-k values would make XLA:CPU sort
  every row instead, and radix selection over the rows ran 2-3x slower
  than `top_k` on CPU (`benchmarks/kernel_variants.py`).
  """
  num_blocks, block_rows = blocks[0].shape[:2]
  first = tuple(b[0] for b in blocks)
  if num_blocks == 1:
    return jax.lax.top_k(similarity(*first), k_max)[0]
  batch = jax.eval_shape(similarity, *first).shape[0]
  rows = jnp.arange(block_rows)

  def step(best, inputs):
    start, block = inputs[0], inputs[1:]
    values = similarity(*block)
    if num_blocks * block_rows > size:  # Only the last block holds padding rows.
      values = jnp.where(start + rows < size, values, -jnp.inf)
    return merged_top_k(best, values, k_max), None

  best = jnp.full((batch, k_max), -jnp.inf, jnp.float32)
  best, _ = jax.lax.scan(step, best, (jnp.arange(num_blocks) * block_rows, *blocks))
  return best


def kth_affinity(state: KnnState, z: jax.Array) -> jax.Array:
  """`[batch]` the k-th largest affinity of normalised `z` to the bank."""
  best = top_k_over_blocks(lambda block, sq_norms: _affinity(z, block, sq_norms),
                           (state.bank, state.sq_norms), state.size, state.k_max)
  return jax.lax.dynamic_index_in_dim(best, state.k - 1, axis=1, keepdims=False)


@_common.score_jit
def score(state: KnnState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the distance to the k-th nearest bank row; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.bank.shape[2])
  z = _normalise(features)
  kth = kth_affinity(state, z)
  sq_distance = jnp.sum(z * z, axis=1) - kth
  return -jnp.sqrt(jnp.maximum(sq_distance, 0.0))
