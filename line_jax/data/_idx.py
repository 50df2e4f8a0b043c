"""Reads IDX files (the MNIST / Fashion-MNIST container) with NumPy only.

IDX layout (LeCun et al.'s MNIST page): two zero bytes, one byte naming the
element type, one byte giving the number of dimensions, then one big-endian
int32 per dimension, then the elements in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

# Element-type byte -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file, gzipped (`.gz`) or raw.

  Args:
    path: e.g. `/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz`.

  Returns:
    The array with the shape the header declares, e.g. uint8 `[N, 28, 28]`
    for an `idx3-ubyte` image file or uint8 `[N]` for labels, in native
    byte order.

  Raises:
    ValueError: if the header is malformed or the payload has the wrong size.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an IDX file: bad magic number")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
  header_end = 4 + 4 * ndim
  if len(data) < header_end:
    raise ValueError(f"{path}: truncated IDX header")
  shape = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, offset=4))
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header_end != expected:
    raise ValueError(
        f"{path}: header declares shape {shape} ({expected} bytes) but the "
        f"payload has {len(data) - header_end} bytes"
    )
  array = np.frombuffer(data, dtype, offset=header_end).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes `array` as an IDX file (gzipped when `path` ends in `.gz`).

  The inverse of `read_idx`; used to make small fixtures in tests.

  Args:
    path: where to write.
    array: any shape; dtype one of uint8, int8, int16, int32, float32, float64.
  """
  array = np.asarray(array)
  codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
  native = array.dtype.newbyteorder("=")
  if native not in codes:
    raise ValueError(f"IDX cannot store dtype {array.dtype}")
  code = codes[native]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  payload = np.ascontiguousarray(array, _IDX_DTYPES[code]).tobytes()
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + payload)
