"""A seeded uniform subset of training rows, the same however the rows arrive.

NNGuide's bank, CFOOD's reference rows and Relation's bank keep the rows of
smallest `row_keys`: a 64-bit hash of each row's float32 bytes, seeded. The
kept set is then a function of the data and the seed alone, so a fit
streamed in any order, merged from parts or resumed keeps the same rows, in
memory bounded by the subset's size plus one batch.

The hash, per row of float32 words `w_1 .. w_m` (their bit patterns as
unsigned 32-bit integers):

    v_j  = fmix32(w_j XOR c_j)
    low  = sum_j v_j a_j  mod 2^32        high = sum_j v_j b_j  mod 2^32
    key  = mix64((high << 32 | low) XOR s)

with per-position salts `c_j`, odd multipliers `a_j`, `b_j` and the salt `s`
drawn from the seed by splitmix64 (Steele, Lea, Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014); `fmix32` is MurmurHash3's
32-bit finaliser and `mix64` splitmix64's. `fmix32` is a bijection that
spreads every bit of a word over all 32 (without it, a word's top bit, the
float's sign, would reach only the top bit of each product, and rows that
differ by moving a sign from one feature to another would collide). Each half
is then a multilinear hash of the mixed words (two rows that differ collide
with probability about 2^-32 per half), and the final mix spreads every bit
over the key, so ordering rows by key is ordering them by a uniform random
number. Sums modulo 2^32 do not depend on the order NumPy adds in, so the
keys are the same on every machine. Every step is a NumPy pass over a block
of rows, not a Python call per row (`benchmarks/results/cpu/nearest_neighbours.md`
times NNGuide's fit).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MASK64 = (1 << 64) - 1
# Rows hashed per step: bounds the `[rows, features]` uint32 temporaries.
_CHUNK = 1024


def mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser of uint64 `z` (elementwise, wrapping)."""
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream(seed: int, n: int) -> np.ndarray:
  """The first `n` outputs of splitmix64 seeded with `seed` (mod 2^64)."""
  steps = (seed + _GOLDEN * np.arange(1, n + 1, dtype=object)) & _MASK64
  return mix64(steps.astype(np.uint64))


def fmix32(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's 32-bit finaliser of uint32 `h` (elementwise, wrapping)."""
  with np.errstate(over="ignore"):
    h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _constants(seed: int, num_words: int):
  """`[num_words]` uint32 salts `c`, odd multipliers `a` and `b`; the uint64 salt `s`."""
  draws = _stream(seed, 3 * num_words + 1)
  high = (draws[:-1] >> np.uint64(32)).astype(np.uint32)
  salts, a, b = high[:num_words], high[num_words:2 * num_words], high[2 * num_words:]
  return salts, a | np.uint32(1), b | np.uint32(1), draws[-1]


def row_keys(features, seed: int) -> np.ndarray:
  """`[n]` uint64 seeded hashes of the float32 bytes of each row of `[n, m]`.

  `seed` counts modulo 2^64.
  """
  rows = np.ascontiguousarray(np.asarray(features, np.float32))
  words = rows.view(np.uint32).reshape(rows.shape[0], -1)
  salts, low_mult, high_mult, salt = _constants(int(seed) & _MASK64, words.shape[1])
  keys = np.empty((words.shape[0],), np.uint64)
  for start in range(0, words.shape[0], _CHUNK):
    mixed = fmix32(words[start:start + _CHUNK] ^ salts)
    low = (mixed * low_mult).sum(axis=1, dtype=np.uint32)
    high = (mixed * high_mult).sum(axis=1, dtype=np.uint32)
    keys[start:start + _CHUNK] = (high.astype(np.uint64) << np.uint64(32)) | low
  return mix64(keys ^ salt)


def smallest(rows: np.ndarray, keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The `size` rows of smallest key, ordered by key (all, if fewer).

  Equal keys keep their order in `rows`, as in a stable sort of all keys.
  """
  if keys.shape[0] > size:
    part = np.sort(np.argpartition(keys, size - 1)[:size])  # index order, then by key
    order = part[np.argsort(keys[part], kind="stable")]
  else:
    order = np.argsort(keys, kind="stable")
  return rows[order], keys[order]


def add(rows: np.ndarray, keys: np.ndarray, new_rows: np.ndarray, features, seed: int,
        size: int) -> tuple[np.ndarray, np.ndarray]:
  """A fold's update: the `size` smallest-key rows of the kept `rows` / `keys`
  and `new_rows`, whose keys hash the batch's `features` (`[batch, m]`; the
  rows kept may be derived from them, as NNGuide's are)."""
  return smallest(np.concatenate([rows, new_rows]),
                  np.concatenate([keys, row_keys(features, seed)]), size)


def merge(rows_a: np.ndarray, keys_a: np.ndarray, rows_b: np.ndarray, keys_b: np.ndarray,
          size: int) -> tuple[np.ndarray, np.ndarray]:
  """A fold's merge: the `size` smallest-key rows of two kept parts, what
  one fit over both would keep."""
  return smallest(np.concatenate([rows_a, rows_b]), np.concatenate([keys_a, keys_b]), size)
