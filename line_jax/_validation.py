"""Host-side input checks shared by every scorer's `fit` and `score`.

Each check runs once, outside jit, and raises an error whose message names the
argument and the problem. Nothing here is traced. `as_array` comes first: it
turns what a user may hold (NumPy, JAX, a list, a PyTorch tensor) into an
array the checks and the scorers take, and names anything else.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ACCEPTED = "a NumPy or JAX array, a (nested) list or a PyTorch tensor"


def _type_name(x: Any) -> str:
  cls = type(x)
  if cls.__module__ == "builtins":
    return cls.__qualname__
  return f"{cls.__module__}.{cls.__qualname__}"


def _is_torch_tensor(x: Any) -> bool:
  # By module name: line_jax never imports torch for a check.
  return (type(x).__module__.partition(".")[0] == "torch"
          and callable(getattr(x, "detach", None)))


def _from_torch(x: Any):
  tensor = x.detach()
  if tensor.device.type != "cpu":
    tensor = tensor.cpu()
  tensor = tensor.resolve_conj().resolve_neg()
  if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; DLPack keeps it.
    return jnp.from_dlpack(tensor.contiguous())
  return tensor.numpy()


def as_array(name: str, x: Any, *, allow_none: bool = False):
  """`x` as a NumPy or JAX array, from any input `fit` and `score` accept.

  NumPy and JAX arrays (tracers included) pass unchanged; a PyTorch tensor is
  detached and brought to the CPU (`.numpy()`, or DLPack for bfloat16, which
  NumPy lacks), without importing torch; a (nested) list or tuple of numbers
  becomes NumPy, float32 for floats.

  Args:
    name: the argument's name, for error messages.
    x: the input.
    allow_none: whether None passes (labels, bias).

  Raises:
    TypeError: for anything else, naming its type; for a list of non-numbers.
    ValueError: for a ragged list.
  """
  if x is None and allow_none:
    return None
  if isinstance(x, (np.ndarray, jax.Array)):
    return x
  if _is_torch_tensor(x):
    return _from_torch(x)
  if isinstance(x, (list, tuple)):
    try:
      array = np.asarray(x)
    except ValueError as e:
      raise ValueError(f"{name} is a ragged {type(x).__name__}: its rows differ in "
                       f"length ({e})") from None
    if array.dtype.kind not in "biuf":
      raise TypeError(f"{name} must hold numbers, got a {type(x).__name__} of "
                      f"{array.dtype} values")
    return array.astype(np.float32) if array.dtype.kind == "f" else array
  raise TypeError(f"{name} must be {ACCEPTED}, got {_type_name(x)}")


def train_arrays(features, labels, kernel, bias, *, features_name: str = "features"
                 ) -> tuple[Any, Any, Any, Any]:
  """A fit's four inputs through `as_array`; labels and bias may be None."""
  return (as_array(features_name, features), as_array("labels", labels, allow_none=True),
          as_array("kernel", kernel), as_array("bias", bias, allow_none=True))


def _shape_of(name: str, x) -> tuple[int, ...]:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  return tuple(x.shape)


# Arrays of up to this many entries are checked on the host: cheaper than a
# compiled reduction's dispatch and wait (on the CPU a JAX array's host view
# is not a copy; from an accelerator it is at most a 1 MB copy).
_HOST_CHECK_MAX = 1 << 18


def _host_view(x) -> np.ndarray | None:
  """`x` as a NumPy array where it is checked on the host, else None."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.size <= _HOST_CHECK_MAX and x.is_fully_addressable:
    return np.asarray(x)
  return None


@jax.jit
def _sum_is_finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(jnp.sum(x, dtype=jnp.promote_types(x.dtype, jnp.float32)))


def all_finite(x) -> bool:
  """Whether a floating-point array holds no NaN or Inf.

  A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum (one fused
  read, no `[n, features]` mask) proves every entry finite; only a sum that
  is not finite (a bad entry, or finite entries that overflow it) takes the
  entry-by-entry check. A JAX array is reduced where it lives and only one
  bool comes back; a NumPy array (a memmap too) and a small JAX array are
  read on the host, never copied to the device for it.
  """
  host = _host_view(x)
  if host is None:
    # A float64 array (made under `enable_x64`) is summed in float64 too.
    with jax.enable_x64(True) if x.dtype == np.float64 else contextlib.nullcontext():
      return bool(_sum_is_finite(x)) or bool(jnp.all(jnp.isfinite(x)))
  x = host
  total_dtype = np.float64 if x.dtype == np.float64 else np.float32
  with np.errstate(over="ignore", invalid="ignore"):
    if np.isfinite(np.sum(x, dtype=total_dtype)):
      return True
  return bool(np.isfinite(x).all())


def _check_finite(name: str, x) -> None:
  if not all_finite(x):
    raise ValueError(f"{name} contains NaN or Inf")


def _check_float(name: str, x) -> None:
  dtype = np.dtype(x.dtype)
  if not (np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
    raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")


def finite_float_array(name: str, x) -> None:
  """Checks any floating-point array (e.g. images) for dtype and NaN / Inf."""
  _shape_of(name, x)
  _check_float(name, x)
  _check_finite(name, x)


def features(x, *, name: str = "features", width: int | None = None) -> None:
  """Checks `[batch, features]`: 2-D, non-empty, floating, finite, right width."""
  shape = _shape_of(name, x)
  if len(shape) != 2:
    raise ValueError(f"{name} must be 2-D [batch, features], got shape {shape}")
  if shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {shape}")
  if width is not None and shape[1] != width:
    raise ValueError(
        f"{name} has {shape[1]} features per sample but the head expects {width}"
    )
  _check_float(name, x)
  _check_finite(name, x)


def feature_shape(shape: tuple[int, ...], width: int) -> None:
  """Checks `[batch, features]` from shapes alone: usable at trace time in jit."""
  shape = tuple(shape)
  if len(shape) != 2:
    raise ValueError(f"features must be 2-D [batch, features], got shape {shape}")
  if shape[1] != width:
    raise ValueError(
        f"features have {shape[1]} features per sample but the fitted head "
        f"expects {width}"
    )


def kernel(k) -> tuple[int, int]:
  """Checks a Flax Dense kernel `[features, classes]`; returns its shape."""
  shape = _shape_of("kernel", k)
  if len(shape) != 2:
    raise ValueError(f"kernel must be 2-D [features, classes], got shape {shape}")
  if shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"kernel is empty: shape {shape}")
  _check_float("kernel", k)
  _check_finite("kernel", k)
  return shape


def head(kernel_, bias_, num_features: int) -> int:
  """Checks a head `kernel: [features, classes]`, `bias: [classes]` (or None).

  Returns:
    The number of classes.
  """
  k_shape = kernel(kernel_)
  if k_shape[0] != num_features:
    raise ValueError(
        f"kernel has {k_shape[0]} input features but features have "
        f"{num_features} (kernel is [features, classes]; PyTorch's weight is "
        "its transpose)"
    )
  if bias_ is not None:
    bias(bias_, k_shape[1])
  return k_shape[1]


def bias(b, num_classes: int) -> None:
  """Checks a head bias `[classes]`: shape, floating, finite."""
  b_shape = _shape_of("bias", b)
  if b_shape != (num_classes,):
    raise ValueError(
        f"bias must have shape ({num_classes},) to match kernel, got {b_shape}"
    )
  _check_float("bias", b)
  _check_finite("bias", b)


def labels(y, num_samples: int, num_classes: int, *, name: str = "labels") -> None:
  """Checks integer labels `[batch]` in `[0, num_classes)`."""
  shape = _shape_of(name, y)
  if len(shape) != 1:
    raise ValueError(f"{name} must be 1-D [batch], got shape {shape}")
  if shape[0] != num_samples:
    raise ValueError(
        f"{name} has {shape[0]} entries but features have {num_samples} samples"
    )
  if not np.issubdtype(np.dtype(y.dtype), np.integer):
    raise TypeError(f"{name} must be integers, got dtype {np.dtype(y.dtype)}")
  host = _host_view(y)
  if host is None:
    lo, hi = int(jnp.min(y)), int(jnp.max(y))
  else:
    lo, hi = int(host.min()), int(host.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(
        f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
    )


def nonempty_classes(counts) -> None:
  """Raises if any class has no training sample (its mean would be 0/0)."""
  counts = np.asarray(counts)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    shown = ", ".join(str(c) for c in empty[:10]) + (" ..." if empty.size > 10 else "")
    raise ValueError(
        f"{empty.size} class(es) have no training sample: {shown}; every class "
        "needs at least one to estimate its contributions"
    )


def _real_number(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jnp.ndarray)):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
  if getattr(value, "shape", ()) != ():
    raise TypeError(f"{name} must be a scalar, got shape {value.shape}")
  return float(value)


def percentile(name: str, value, *, allow_none: bool = False) -> float | None:
  """Checks a percentile in [0, 100] (or None where that switches a part off)."""
  if value is None and allow_none:
    return None
  v = _real_number(name, value)
  if not 0.0 <= v <= 100.0:
    raise ValueError(f"{name} must be a percentile in [0, 100], got {value}")
  return v


def positive(name: str, value, *, allow_none: bool = False) -> float | None:
  """Checks a positive finite number (or None where that switches a part off)."""
  if value is None and allow_none:
    return None
  v = _real_number(name, value)
  if not (math.isfinite(v) and v > 0.0):
    raise ValueError(f"{name} must be a positive finite number, got {value}")
  return v


def train_batch(features_, labels_, num_features: int, num_classes: int, *,
                needs_labels: bool = False) -> None:
  """Checks one streamed `(features, labels)` training batch against the head."""
  features(features_, width=num_features)
  train_labels(labels_, features_.shape[0], num_classes, needs_labels=needs_labels)


def train_labels(labels_, num_samples: int, num_classes: int, *,
                 needs_labels: bool = False) -> None:
  """Checks training labels, or their absence where a scorer needs none."""
  if labels_ is None:
    if needs_labels:
      raise ValueError("labels are required: this scorer fits per-class statistics")
  else:
    labels(labels_, num_samples, num_classes)
