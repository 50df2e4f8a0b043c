"""Float32 matrix products at float32 precision, on every backend.

JAX's default precision runs float32 products on NVIDIA GPUs in TF32 (10-bit
mantissa): on an H200 a MaxLogit head's scores then differed from PyTorch's
float32 `linear` by up to 9.4e-4 (4.7e-4 relative), enough to change LINe's
predicted class at near ties. Scores must not depend on the device, so
line_jax's head products ask for full float32 (`Precision.HIGHEST`), as
PyTorch's default does. On CPU this changes nothing. A user who chose a
default precision (`jax.default_matmul_precision(...)` or the
`jax_default_matmul_precision` option) gets that one instead: the choice of
TF32 speed is theirs to make. KNN and Mahalanobis keep `HIGHEST` whatever the
default: their products are near-cancelling quadratic forms that TF32 would
ruin, not logits it would only blur.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def precision() -> jax.lax.Precision | None:
  """`HIGHEST`, or None (JAX's configured default) when the user set one (trace time)."""
  if jax.config.jax_default_matmul_precision is not None:
    return None
  return jax.lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` at `precision()`."""
  return jnp.matmul(a, b, precision=precision())
