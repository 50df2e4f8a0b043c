"""The seeded row hash and subset of NNGuide, CFOOD and Relation (`_row_subset`).

The vectorised keys against a pure-Python computation of the same
definition (Python integers, one row and one word at a time), and the
properties the subsets rely on: every bit of a row moves its key, seeds give
independent orders, and the kept rows are a uniform sample.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from line_jax.scorers import _row_subset

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
  return z ^ (z >> 31)


def _fmix32(h: int) -> int:
  h = ((h ^ (h >> 16)) * 0x85EBCA6B) & M32
  h = ((h ^ (h >> 13)) * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def _reference_keys(rows: np.ndarray, seed: int) -> list[int]:
  """splitmix64 draws -> per-position salts, odd 32-bit multipliers and the
  salt; each word mixed; two multilinear sums mod 2^32; the finaliser. Plain
  Python integers throughout."""
  rows = np.asarray(rows, np.float32)
  m = rows.shape[1]
  draws = [_mix((seed + GOLDEN * i) & M64) for i in range(1, 3 * m + 2)]
  salts = [d >> 32 for d in draws[:m]]
  low_mult = [(d >> 32) | 1 for d in draws[m:2 * m]]
  high_mult = [(d >> 32) | 1 for d in draws[2 * m:3 * m]]
  salt = draws[-1]
  keys = []
  for row in rows:
    mixed = [_fmix32(int(w) ^ c) for w, c in zip(row.view(np.uint32), salts)]
    low = sum(v * a for v, a in zip(mixed, low_mult)) & M32
    high = sum(v * b for v, b in zip(mixed, high_mult)) & M32
    keys.append(_mix(((high << 32) | low) ^ salt))
  return keys


@pytest.mark.parametrize("seed", [0, 7, 2**63 + 5])
def test_keys_are_the_definition_computed_one_word_at_a_time(seed):
  rng = np.random.default_rng(seed % 1000)
  rows = rng.normal(size=(37, 19)).astype(np.float32)
  rows[3] = 0.0
  rows[4] = -0.0  # Other bytes than +0.0: another key.
  rows[5, 2] = np.inf
  rows[6] = np.finfo(np.float32).max
  got = _row_subset.row_keys(rows, seed)
  assert got.dtype == np.uint64
  assert got.tolist() == _reference_keys(rows, seed)
  assert got[3] != got[4]


def test_keys_do_not_depend_on_chunks_or_the_input_type(monkeypatch):
  rows = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
  whole = _row_subset.row_keys(rows, 3)
  monkeypatch.setattr(_row_subset, "_CHUNK", 7)
  np.testing.assert_array_equal(_row_subset.row_keys(rows, 3), whole)
  np.testing.assert_array_equal(_row_subset.row_keys(jnp.asarray(rows), 3), whole)
  np.testing.assert_array_equal(_row_subset.row_keys(rows[::-1], 3), whole[::-1])
  np.testing.assert_array_equal(_row_subset.row_keys(rows.astype(np.float64), 3), whole)


def test_every_bit_of_a_row_moves_its_key():
  row = np.random.default_rng(2).normal(size=(1, 6)).astype(np.float32)
  words = row.view(np.uint32)
  flipped = np.repeat(words, 6 * 32, axis=0)
  for j in range(6):
    for bit in range(32):
      flipped[32 * j + bit, j] ^= np.uint32(1 << bit)
  keys = _row_subset.row_keys(flipped.view(np.float32), 0)
  base = _row_subset.row_keys(row, 0)[0]
  assert len(set(keys.tolist()) | {int(base)}) == 6 * 32 + 1
  # The finaliser spreads a one-bit change over the whole key (about 32 bits).
  changed = [bin(int(k) ^ int(base)).count("1") for k in keys]
  assert 24 < np.mean(changed) < 40


def test_moving_a_sign_between_features_moves_the_key():
  # A float's sign is its word's top bit: unmixed, a product would carry it
  # to the top bit alone, the same for every feature.
  row = np.abs(np.random.default_rng(4).normal(size=(8,))).astype(np.float32)
  variants = np.repeat(row[None], 8, axis=0)
  variants[np.arange(8), np.arange(8)] *= -1  # One negated feature per row.
  keys = _row_subset.row_keys(variants, 0)
  assert len(set(keys.tolist())) == 8


def test_the_kept_rows_are_a_uniform_sample_and_seeds_differ():
  n, size = 20_000, 2_000
  rows = np.random.default_rng(3).normal(size=(n, 16)).astype(np.float32)
  # Row i's first entry is i: which rows are kept shows in it.
  rows[:, 0] = np.arange(n)
  kept = {}
  for seed in (0, 1):
    subset, keys = _row_subset.smallest(rows, _row_subset.row_keys(rows, seed), size)
    assert subset.shape == (size, 16) and np.all(np.diff(keys.astype(np.float64)) >= 0)
    index = subset[:, 0].astype(int)
    counts = np.bincount(index // (n // 10), minlength=10)  # 200 expected per tenth
    assert counts.min() > 140 and counts.max() < 260, counts
    kept[seed] = set(index.tolist())
  # Independent seeds share about size^2 / n = 200 rows.
  assert 120 < len(kept[0] & kept[1]) < 290


def test_smallest_keeps_the_rows_of_smallest_key_in_key_order():
  keys = np.array([9, 3, 7, 3, 1, 8], np.uint64)
  rows = np.arange(6.0)[:, None] * np.ones((1, 2))
  got_rows, got_keys = _row_subset.smallest(rows, keys, 3)
  assert got_keys.tolist() == [1, 3, 3]
  assert got_rows[:, 0].tolist() == [4.0, 1.0, 3.0]
  every_rows, every_keys = _row_subset.smallest(rows, keys, 10)
  assert every_keys.tolist() == [1, 3, 3, 7, 8, 9]
  assert every_rows[:, 0].tolist() == [4.0, 1.0, 3.0, 2.0, 5.0, 0.0]


def test_add_and_merge_keep_what_one_pass_over_all_rows_keeps():
  rows = np.random.default_rng(5).normal(size=(90, 4)).astype(np.float32)
  want_rows, want_keys = _row_subset.smallest(rows, _row_subset.row_keys(rows, 2), 25)
  parts = []
  for part in (rows[:40], rows[40:]):
    kept = (np.zeros((0, 4), np.float32), np.zeros((0,), np.uint64))
    for start in range(0, len(part), 7):
      batch = part[start:start + 7]
      kept = _row_subset.add(*kept, batch, batch, 2, 25)
      assert kept[0].shape[0] <= 25
    parts.append(kept)
  got_rows, got_keys = _row_subset.merge(*parts[0], *parts[1], 25)
  np.testing.assert_array_equal(got_rows, want_rows)
  np.testing.assert_array_equal(got_keys, want_keys)
  # The rows kept may be derived from the hashed ones (NNGuide keeps guidance rows).
  derived, _ = _row_subset.add(np.zeros((0, 4)), np.zeros((0,), np.uint64), 2 * rows, rows, 2, 25)
  np.testing.assert_array_equal(derived, 2 * want_rows)
