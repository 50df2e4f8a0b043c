"""Tests for the IDX reader/writer."""

import gzip

import numpy as np
import pytest

from line_jax.data import read_idx
from line_jax.data import write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32,
                                   np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
  array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
  path = tmp_path / f"x-idx3{suffix}"
  write_idx(path, array)
  back = read_idx(path)
  assert back.dtype == np.dtype(dtype) and back.dtype.isnative
  np.testing.assert_array_equal(back, array)


def test_header_bytes_follow_the_idx_spec(tmp_path):
  path = tmp_path / "labels-idx1-ubyte"
  write_idx(path, np.array([7, 1, 255], np.uint8))
  # 0, 0, type 0x08 (ubyte), 1 dimension, then big-endian 3, then payload.
  assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 255])


def test_bad_magic(tmp_path):
  path = tmp_path / "bad.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
  with pytest.raises(ValueError, match="bad magic"):
    read_idx(path)


def test_truncated_payload(tmp_path):
  path = tmp_path / "short"
  path.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]))
  with pytest.raises(ValueError, match=r"shape \(2, 2\).*payload has 3 bytes"):
    read_idx(path)
