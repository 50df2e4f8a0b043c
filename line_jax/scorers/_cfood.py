"""CFOOD: the smallest neighbourhood share at which reference rows hold the input.

Angiulli, Fassetti, Zupi, "CF-OOD: Concentration-Free Density Estimation for
Reliable Out-of-Distribution Detection", SISAP 2025. As the authors' own
port to OpenOOD (Jingkang50/OpenOOD pull request 302,
`openood/postprocessors/cfood_postprocessor.py`;
`configs/postprocessors/cfood.yml`); the paper itself was not consulted.
Features are normalised, `z = h / (||h|| + 1e-10)` (lines 94-95 and 151).
A reference set of n training rows is drawn (lines 97-107: `n =
int(alpha N)`, all N at alpha = 1). For a grid of neighbourhood shares
kappa_j (lines 109-122: 100 values in [0.001, 0.1], 81 in [0.105, 0.5], 49
in [0.51, 0.99], kept where their rank `int(kappa_j n - 1)` grows), each
reference row i holds `R_ij`, its squared distance to its
`(int(kappa_j n - 1) + 1)`-th nearest other reference row (lines 124-132:
the sorted distances at position `kpos + 1`, position 0 being the row
itself). A test row at squared distances `d_i` from the reference rows
scores (lines 160-178)

    count_j = #{i : R_ij >= d_i} / n      (the share of reference rows whose
                                           kappa_j-neighbourhood holds it)
    score(h) = -min{kappa_j : count_j >= k}   (-1 where there is none);

higher = more ID: an ID row lies in the small neighbourhoods of many
reference rows, an outlier only in large ones. Defaults `alpha = 0.1`,
`k = 0.01` (lines 30-33 and the config's `postprocessor_args`); the config's
sweep is every pair of alpha in {0.1, 0.5, 1} and k in {0.001, 0.005, 0.01,
0.05}, `GRID` here. The score is one of at most 231 values (the grid's
shares and 1): ties are common. `count_j` is compared as the code does, a
float32 share against float32 k; it grows with j, so the first j that
reaches k is the number of j that do not.

Departures, both for bounded memory and reproducibility. (1) The official
reference set is an unseeded `torch.randperm` subset of all extracted
features, held in memory; here it is the n rows of smallest seeded 64-bit
hash of the feature row's bytes (`_row_subset.row_keys`), a uniform random
subset fixed by the data and `seed`, so a streamed, merged or re-ordered fit
keeps the same rows; and n is at most `bank_size` (default 50,000: every
alpha of the sweep is exact on CIFAR-10 and CIFAR-100's 50,000 training
images; on ImageNet-1k alpha = 0.1 would keep 128,116 rows, capped here).
The accumulator holds at most `bank_size` raw rows plus one batch (host
memory). (2) The official precompute sorts n distances for each of the n
rows one at a time (O(n^2) time); here it runs in blocks of reference
rows (distances on the device; sorted there on an accelerator, by NumPy on
the CPU, 6x faster than XLA:CPU's sort), so its temporaries are `[block, n]`,
and its result is `R`, `n x 230` at most, computed once for all the k of one
alpha (the last radii are kept by a hash of the reference rows). Distances
are `||a||^2 + ||b||^2 - 2 a.b` at full float32 precision, clamped at 0 (a
row's distance to itself is exactly 0, as the official difference gives).

A score call walks the reference rows in blocks of `block_rows` with
`lax.scan`. Since row i's radii grow with the share, the shares at which it
holds a test row are those from the first, found by binary search; sorted
per test row, these firsts give the block's `[batch, shares]` counts by a
second binary search. Temporaries are `[batch, block_rows]` and the counts
(comparing every radius with every distance would form `[batch, block_rows,
shares]`, which XLA on CPU materialises: 1 GB at 2048 x 512 x 230). Work is
`batch x n x (2 features + log shares + log block_rows)`.

`k` enters the state only as the reference count it needs (an int32 leaf),
so states at several k and one alpha stack under `vmap`.
"""

from __future__ import annotations

import hashlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _progress
from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _row_subset

ALPHA = 0.1
K = 0.01
BANK_SIZE = 50_000
BLOCK_ROWS = 1024
_EPS = 1e-10
# Distances of near neighbours are differences of numbers near 2.
_PRECISION = jax.lax.Precision.HIGHEST
# Reference rows per block of the self-distance precompute: bounds `[block, n]`.
_PRECOMPUTE_FLOATS = 1 << 24
# The precompute shows progress from this many reference rows (seconds of work).
_PROGRESS_ROWS = 10_000
GRID = {"alpha": (0.1, 0.5, 1.0), "k": (0.001, 0.005, 0.01, 0.05)}


def shares(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The official grid of neighbourhood shares for n reference rows.

  Returns:
    `(kval, kpos)`: float64 shares and their int ranks `int(kval n - 1)`,
    only where the rank grows (cfood_postprocessor.py lines 109-122).
  """
  kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81),
                         np.linspace(0.51, 0.99, 49)))
  kpos = np.array(kval * n - 1, dtype=int)
  keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
  return kval[keep], kpos[keep]


def needed(k: float, n: int) -> int:
  """The fewest of n reference rows whose float32 share `c / n` is >= float32 k."""
  share = np.arange(n + 1, dtype=np.float32) / np.float32(n)
  return int(np.argmax(share >= np.float32(k)))


@flax.struct.dataclass
class CfoodState:
  """A fitted CFOOD scorer.

  Attributes:
    bank: `[blocks, block_rows, features]` float32 normalised reference rows;
      rows past `size` are zero padding.
    sq_norms: `[blocks, block_rows]` float32 squared norms of the bank rows.
    radii: `[blocks, block_rows, shares]` float32 squared distance of each
      reference row to its neighbour at each share's rank; padding rows
      hold -inf (they never hold a test row).
    kappas: `[shares + 1]` float32 neighbourhood shares, then 1.0 (the score
      where no share reaches k).
    count: int32 scalar, reference rows needed: `needed(k, size)`.
    size: static number of reference rows, n.
  """

  bank: jax.Array
  sq_norms: jax.Array
  radii: jax.Array
  kappas: jax.Array
  count: jax.Array
  size: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class CfoodAcc:
  """CFOOD's accumulator: the training rows of smallest hash so far (host).

  Attributes:
    rows: `[kept, features]` float32 raw training features, ordered by `keys`.
    keys: `[kept]` uint64 seeded hashes of those rows (ascending).
    seen: int64 scalar, training samples read (N, of which alpha is taken).
    alpha, k, bank_size, seed, block_rows: static hyperparameters.
  """

  rows: np.ndarray
  keys: np.ndarray
  seen: np.ndarray
  alpha: float = flax.struct.field(pytree_node=False)
  k: float = flax.struct.field(pytree_node=False)
  bank_size: int = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  block_rows: int = flax.struct.field(pytree_node=False)


def _share(name: str, value) -> float:
  v = _validation.positive(name, value)
  if v > 1.0:
    raise ValueError(f"{name} must lie in (0, 1], got {value}")
  return v


def init(kernel, bias, *, alpha=ALPHA, k=K, bank_size=BANK_SIZE, seed=0,
         block_rows=BLOCK_ROWS) -> CfoodAcc:
  """Starts the reference set.

  Args:
    kernel: `[features, classes]` head kernel (validated; fixes the width).
    bias: `[classes]` head bias or None (validated only).
    alpha: share of the training samples in the reference set, in (0, 1].
    k: share of the reference rows that must hold a test row, in (0, 1].
    bank_size: most reference rows (a seeded uniform subset).
    seed: seed of the subset.
    block_rows: reference rows per block of a score call (memory vs. speed).
  """
  num_features, _ = _common.check_head(kernel, bias)
  alpha, k = _share("alpha", alpha), _share("k", k)
  bank_size = _common.integer("bank_size", bank_size, low=2)
  seed = _common.integer("seed", seed, low=0)
  block_rows = _common.integer("block_rows", block_rows)
  return CfoodAcc(np.zeros((0, num_features), np.float32), np.zeros((0,), np.uint64),
                  np.zeros((), np.int64), alpha, k, bank_size, seed, block_rows)


def update(acc: CfoodAcc, features, labels) -> CfoodAcc:
  """Adds a `[batch, features]` batch; keeps the `bank_size` smallest keys."""
  del labels
  features = np.asarray(features, np.float32)
  rows, keys = _row_subset.add(acc.rows, acc.keys, features, features, acc.seed,
                               acc.bank_size)
  return acc.replace(rows=rows, keys=keys,
                     seen=np.asarray(int(acc.seen) + features.shape[0], np.int64))


def merge(a: CfoodAcc, b: CfoodAcc) -> CfoodAcc:
  """The smallest keys of both parts, and both counts."""
  rows, keys = _row_subset.merge(a.rows, a.keys, b.rows, b.keys, a.bank_size)
  return a.replace(rows=rows, keys=keys,
                   seen=np.asarray(int(a.seen) + int(b.seen), np.int64))


@jax.jit
def normalise(features: jax.Array) -> jax.Array:
  """`h / (||h|| + 1e-10)` per row (the official normalisation), float32."""
  h = features.astype(jnp.float32)
  return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + _EPS)


def _sq_distances(z: jax.Array, sq_z: jax.Array, bank: jax.Array, sq_bank: jax.Array
                  ) -> jax.Array:
  """`[rows, bank rows]` squared distances, clamped at 0."""
  dot = jnp.matmul(z, bank.T, precision=_PRECISION)
  return jnp.maximum(sq_z[:, None] + sq_bank[None, :] - 2.0 * dot, 0.0)


@jax.jit
def _self_distances(z: jax.Array, start: jax.Array, ref: jax.Array) -> jax.Array:
  """`[block, n]` squared distances of rows `start ..` of `ref` to every
  reference row, a row's own distance exactly 0."""
  sq = jnp.sum(ref * ref, axis=1)
  d = _sq_distances(z, jnp.sum(z * z, axis=1), ref, sq)
  own = (start + jnp.arange(z.shape[0]))[:, None] == jnp.arange(ref.shape[0])[None, :]
  return jnp.where(own, 0.0, d)


@jax.jit
def _radii_block(z: jax.Array, start: jax.Array, ref: jax.Array, ranks: jax.Array
                 ) -> jax.Array:
  """`[block, shares]` sorted squared distances (`_self_distances`) at `ranks`
  (position 0: the row itself, at 0)."""
  return jnp.take(jnp.sort(_self_distances(z, start, ref), axis=1), ranks, axis=1)


def _radii(ref: jax.Array, ranks: np.ndarray) -> np.ndarray:
  """`[n, shares]` `R`: each reference row's squared k-NN distances at `ranks`,
  in blocks of rows whose `[block, n]` distances stay bounded.

  The sorted values are the same whichever sort runs, so where the layout
  says so the device computes the distances and NumPy sorts them.
  """
  digest = hashlib.blake2b(digest_size=16)
  digest.update(np.ascontiguousarray(np.asarray(ref)))  # read in place, not copied
  digest.update(np.ascontiguousarray(ranks))
  key = digest.digest()
  if _last_radii is not None and _last_radii[0] == key:
    return _last_radii[1]
  n = ref.shape[0]
  block = max(1, min(n, _PRECOMPUTE_FLOATS // n))
  padded = jnp.concatenate([ref, jnp.zeros((-(-n // block) * block - n, ref.shape[1]),
                                           ref.dtype)])
  on_host = layout_lib.for_arrays(ref).sorts_on_host()
  ranks_device = jnp.asarray(ranks, jnp.int32)
  parts = []
  for s, _ in _progress.iterate(range(0, n, block), "CFOOD reference radii",
                                enabled=n >= _PROGRESS_ROWS):
    if on_host:
      d = np.asarray(_self_distances(padded[s:s + block], jnp.int32(s), ref))
      parts.append(np.sort(d, axis=1)[:, ranks])
    else:
      parts.append(np.asarray(_radii_block(padded[s:s + block], jnp.int32(s), ref,
                                           ranks_device)))
  radii = np.concatenate(parts)[:n]
  _remember_radii(key, radii)
  return radii


# The last radii computed, by a hash of the reference rows and ranks: `tune`
# fits CFOOD at every k of one alpha from the same reference rows, and at
# 50,000 rows the radii take a minute or more; k changes only the count.
_last_radii: tuple[bytes, np.ndarray] | None = None


def _remember_radii(key: bytes, radii: np.ndarray) -> None:
  global _last_radii  # pylint: disable=global-statement
  radii.setflags(write=False)
  _last_radii = (key, radii)


def finalize(acc: CfoodAcc) -> CfoodState:
  """The reference set and its k-NN radii on the device."""
  total = int(acc.seen)
  n = min(int(acc.alpha * total) if acc.alpha < 1.0 else total, acc.rows.shape[0])
  if n < 2:
    raise ValueError(
        f"CFOOD needs at least 2 reference rows, but alpha = {acc.alpha} of "
        f"{total} training samples gives {n} (bank_size {acc.bank_size})")
  num_features = acc.rows.shape[1]
  kval, kpos = shares(n)
  ref = normalise(jnp.asarray(acc.rows[:n]))
  radii = _radii(ref, kpos + 1)
  block_rows = min(acc.block_rows, n)
  blocks = -(-n // block_rows)
  bank = np.zeros((blocks * block_rows, num_features), np.float32)
  bank[:n] = np.asarray(ref)
  padded_radii = np.full((blocks * block_rows, kval.size), -np.inf, np.float32)
  padded_radii[:n] = radii
  bank = jnp.asarray(bank.reshape(blocks, block_rows, num_features))
  return CfoodState(bank, jnp.sum(bank * bank, axis=-1),
                    jnp.asarray(padded_radii.reshape(blocks, block_rows, kval.size)),
                    jnp.asarray(np.append(kval, 1.0), jnp.float32),
                    jnp.asarray(needed(acc.k, n), jnp.int32), n)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge)


@_common.score_jit
def score(state: CfoodState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the smallest share kappa whose neighbourhoods of at
  least the share k of the reference rows hold the row; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  del layout  # One layout: every product is `[batch, bank block]`.
  _common.check_width(features, state.bank.shape[2])
  z = normalise(features)
  sq_z = jnp.sum(z * z, axis=1)

  shares_ = jnp.arange(state.kappas.shape[0] - 1)

  def step(counts, block):
    rows, sq_rows, radii = block
    d = _sq_distances(z, sq_z, rows, sq_rows)  # [batch, block]
    # first[b, i]: the first share at which row i's neighbourhood holds b
    # (its radii grow with the share); `shares` where none does.
    first = jax.vmap(lambda r, q: jnp.searchsorted(r, q, side="left"))(radii, d.T)
    ordered = jnp.sort(first.T, axis=1)  # [batch, block]
    inside = jax.vmap(lambda f: jnp.searchsorted(f, shares_, side="right"))(ordered)
    return counts + inside.astype(jnp.int32), None

  counts = jnp.zeros((z.shape[0], state.kappas.shape[0] - 1), jnp.int32)
  counts, _ = jax.lax.scan(step, counts, (state.bank, state.sq_norms, state.radii))
  first = jnp.sum(counts < state.count, axis=1)
  return -state.kappas[first]
