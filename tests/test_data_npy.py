"""Tests for `load_ood_npy` and `parse_extra_ood`."""

import numpy as np
import pytest

from line_jax.data import load_ood_npy
from line_jax.data import parse_extra_ood


def _save(tmp_path, array, name="x.npy"):
  path = tmp_path / name
  np.save(path, array)
  return path


@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 28, 28, 1)])
def test_accepts_both_layouts(tmp_path, shape):
  array = np.arange(np.prod(shape)).reshape(shape).astype(np.uint8)
  got = load_ood_npy(_save(tmp_path, array))
  assert got.shape == (3, 28, 28, 1) and got.dtype == np.uint8
  np.testing.assert_array_equal(got.reshape(shape), array)


def test_rgb_shape(tmp_path):
  path = _save(tmp_path, np.zeros((2, 32, 32, 3), np.uint8))
  assert load_ood_npy(path, (32, 32, 3)).shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match=r"expected \[N, 32, 32, 3\]$"):
    load_ood_npy(_save(tmp_path, np.zeros((2, 32, 32), np.uint8)), (32, 32, 3))


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 28, 28), np.float32), "dtype float32; expected uint8"),
    (np.zeros((2, 28, 27), np.uint8), r"shape \(2, 28, 27\); expected"),
    (np.zeros((2, 28, 28, 3), np.uint8), r"shape \(2, 28, 28, 3\); expected"),
    (np.zeros((28, 28), np.uint8), r"shape \(28, 28\); expected"),
    (np.zeros((0, 28, 28), np.uint8), "holds no image"),
    (np.uint8(3), "0-d scalar"),
])
def test_errors_name_the_problem(tmp_path, array, message):
  with pytest.raises(ValueError, match=message):
    load_ood_npy(_save(tmp_path, array))


def test_object_array_is_refused_without_unpickling(tmp_path):
  # A header declaring object dtype; no pickled payload is ever written.
  path = tmp_path / "obj.npy"
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(
        f, {"descr": "|O", "fortran_order": False, "shape": (2,)})
  with pytest.raises(ValueError, match="readable without pickle"):
    load_ood_npy(path)
  junk = tmp_path / "junk.npy"
  junk.write_text("not an array")
  with pytest.raises(ValueError, match="not a plain .npy array"):
    load_ood_npy(junk)


def test_npz_and_missing_file(tmp_path):
  path = tmp_path / "x.npz"
  np.savez(path, a=np.zeros((1, 28, 28), np.uint8))
  with pytest.raises(ValueError, match="npz"):
    load_ood_npy(path)
  with pytest.raises(FileNotFoundError):
    load_ood_npy(tmp_path / "missing.npy")


def test_parse_extra_ood():
  assert parse_extra_ood("mine=/data/x.npy") == ("mine", "/data/x.npy")
  assert parse_extra_ood("a=b=c.npy") == ("a", "b=c.npy")
  for bad in ("x.npy", "=x.npy", "name=", ""):
    with pytest.raises(ValueError, match="NAME=PATH"):
      parse_extra_ood(bad)
