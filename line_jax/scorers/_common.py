"""What the feature-space scorers share: the head, input checks, energy.

Every check on arrays goes through `line_jax._validation`, so a scorer rejects
bad input with the same message as `line_jax.line.fit`. Score functions run
under jit, where only shapes are known; `check_width` is their (trace-time)
check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import _scoring
from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib


@flax.struct.dataclass
class HeadState:
  """The state of a scorer that fits nothing: only the classification head.

  The head is stored class-major (PyTorch layout), the operand with which
  `logits` multiplies fastest on CPU; `kernel` gives the Flax layout back.

  Attributes:
    weight: `[classes, features]` float32 head weight (the kernel transposed).
    bias: `[classes]` float32 head bias (zeros when the head has none).
  """

  weight: jax.Array
  bias: jax.Array

  @property
  def kernel(self) -> jax.Array:
    """`[features, classes]` head kernel (Flax layout), `weight` transposed."""
    return self.weight.T


def head_state(kernel, bias, cls: type = HeadState) -> HeadState:
  """`HeadState` (or its subclass `cls`) of a validated `[features, classes]`
  kernel and bias (or None)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  if bias is None:
    bias = jnp.zeros((kernel.shape[1],), jnp.float32)
  return cls(weight=kernel.T, bias=jnp.asarray(bias, jnp.float32))


def head_init(cls: type) -> Callable[[Any, Any], HeadState]:
  """`init(kernel, bias) -> cls` of a scorer that fits nothing from data.

  The whole fit of MSP, MaxLogit, Energy, GradNorm and Entropy: checks a
  `[features, classes]` kernel and bias (or None); the accumulator is the
  state, of the scorer's own `HeadState` subclass (so a saved state says
  whose it is).
  """

  def init(kernel, bias) -> HeadState:
    check_head(kernel, bias)
    return head_state(kernel, bias, cls)
  init.__name__ = f"init_{cls.__name__}"
  return init


# --- inputs: NumPy, JAX, lists, PyTorch tensors -> arrays (`_validation.as_array`) -----------


def head_arrays(kernel, bias) -> tuple[Any, Any]:
  """The head `(kernel, bias)` as arrays; bias may be None."""
  return (_validation.as_array("kernel", kernel),
          _validation.as_array("bias", bias, allow_none=True))


def _batch_arrays(batch) -> tuple[Any, Any]:
  features, labels = batch
  return (_validation.as_array("features", features),
          _validation.as_array("labels", labels, allow_none=True))


class _ArrayBatches:
  """A re-iterable of `(features, labels)` whose batches come back as arrays."""

  def __init__(self, batches: Iterable):
    self._batches = batches

  def __iter__(self) -> Iterator[tuple[Any, Any]]:
    return map(_batch_arrays, self._batches)


def array_batches(batches: Iterable) -> Iterable:
  """`(features, labels)` batches converted one by one as they are read.

  One-shot stays one-shot (so the fold still tells a generator from a
  re-iterable), re-iterable stays re-iterable.
  """
  if isinstance(batches, Iterator):
    return map(_batch_arrays, batches)
  return _ArrayBatches(batches)


@flax.struct.dataclass
class MeanAcc:
  """The accumulator of a scorer fitted from the training mean (DICE, fDBD, NCI).

  Attributes:
    head: the `HeadState`.
    sums: `[features]` float64 sum of the training features.
    count: int64 scalar, samples seen.
    setting: float64 scalar, the scorer's hyperparameter (DICE's p, fDBD's
      centring, NCI's alpha).
  """

  head: HeadState
  sums: jax.Array
  count: jax.Array
  setting: jax.Array

  @property
  def mean(self) -> np.ndarray:
    """`[features]` float64 training mean, on the host."""
    return np.asarray(self.sums) / int(self.count)


@jax.jit
def _add_feature_sums(acc: MeanAcc, features: jax.Array) -> MeanAcc:
  total = jnp.sum(features.astype(jnp.float32).astype(jnp.float64), axis=0)
  return acc.replace(sums=acc.sums + total, count=acc.count + features.shape[0])


def mean_fold(init: Callable[..., MeanAcc], finalize: Callable[[MeanAcc], Any]) -> fold.Fold:
  """The `Fold` of a scorer fitted from the training mean: `init` checks its
  hyperparameter and calls `mean_acc`, `finalize` builds its state."""

  def update(acc: MeanAcc, features, labels) -> MeanAcc:
    del labels
    with jax.enable_x64(True):
      return _add_feature_sums(acc, features)

  return fold.Fold(init=init, update=update, finalize=finalize,
                   merge=fold.add_fields("sums", "count"))


def mean_acc(kernel, bias, setting: float) -> MeanAcc:
  """An empty `MeanAcc` for a head the scorer's `init` has checked."""
  num_features = np.shape(kernel)[0]
  with jax.enable_x64(True):
    return MeanAcc(head_state(kernel, bias), jnp.zeros((num_features,), jnp.float64),
                   jnp.zeros((), jnp.int64), jnp.asarray(setting, jnp.float64))


def check_train(features, labels, kernel, bias, *, needs_labels: bool = False) -> int:
  """Validates in-memory training data and the head; returns the class count.

  Args:
    features: `[n, features]` training activations.
    labels: `[n]` integer labels, or None where the scorer does not use them.
    kernel: `[features, classes]` head kernel.
    bias: `[classes]` head bias or None.
    needs_labels: whether None labels are an error.
  """
  _validation.features(features)
  num_classes = _validation.head(kernel, bias, features.shape[1])
  _validation.train_labels(labels, features.shape[0], num_classes, needs_labels=needs_labels)
  return num_classes


def check_head(kernel, bias) -> tuple[int, int]:
  """Validates a head on its own; returns `(features, classes)`."""
  num_features, num_classes = _validation.kernel(kernel)
  _validation.head(kernel, bias, num_features)
  return num_features, num_classes


def integer(name: str, value, *, low: int = 1) -> int:
  """Checks an integer hyperparameter (a count, a dimension, a seed) >= `low`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
  if value < low:
    raise ValueError(f"{name} must be at least {low}, got {value}")
  return int(value)


def check_width(features: jax.Array, num_features: int) -> None:
  """Trace-time check of `[batch, features]` (shapes are static under jit)."""
  _validation.feature_shape(features.shape, num_features)


# Every score is `score(state, features, layout=None)`, jitted once per
# layout: the layout (`line_jax.layout`) is static, None meaning the default
# backend's. `_scoring.jit` adds what every score does alike: the dtype check,
# the empty batch, NaN for a row holding NaN or Inf.
score_jit = _scoring.jit


def logits(state, features: jax.Array, layout: layout_lib.Layout | None = None
           ) -> tuple[jax.Array, int]:
  """Float32 logits of the head held by `state`, and their class axis.

  Args:
    state: holds `weight` `[classes, features]` and `bias` `[classes]`.
    features: `[batch, features]`.
    layout: where `layout.class_major(batch)` (CPU batches up to a few
      thousand rows, whose fused reductions run faster over class-major
      logits), `z` is `[classes, batch]` and `axis` is 0; otherwise `z` is
      `[batch, classes]` and `axis` is 1 (accelerators, where both are one
      GEMM). Reduce over `axis`.
  """
  h = features.astype(jnp.float32)
  if layout_lib.resolve(layout).class_major(h.shape[0]):
    return _matmul.dot(state.weight, h.T) + state.bias[:, None], 0
  return _matmul.dot(h, state.weight.T) + state.bias, 1


def argmax(z: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
  """`jnp.argmax(z, axis)` for rows without NaN: the first index of the largest value.

  Two plain reductions (the largest value, then the least index holding it,
  counted in float32: exact below 2^24 classes). XLA:CPU's argmax is one
  reduction over (value, index) pairs, which does not vectorise: 4-6x slower
  at 100 to 1000 classes. A row with NaN (a non-finite input, whose score
  the guard sets to NaN) gets some index in range.
  """
  n = z.shape[axis]
  top = jnp.max(z, axis=axis, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, z.shape, axis % z.ndim)
  first = jnp.min(jnp.where(z == top, index, float(n - 1)), axis=axis, keepdims=keepdims)
  return first.astype(jnp.int32)


def logit_scorer(of_logits, doc: str):
  """A jitted `score(state, features, layout=None)` that is `of_logits(*logits(...))`.

  For the scorers that only read the logits of the head their state holds
  (MSP, MaxLogit, Energy; DICE's sparsified head); `of_logits(z, axis)`
  reduces the logits over their class `axis`, and `doc` says what the
  `[batch]` scores are.
  """

  @score_jit
  def score(state, features: jax.Array, layout: layout_lib.Layout | None = None) -> jax.Array:
    check_width(features, state.weight.shape[1])
    return of_logits(*logits(state, features, layout))

  score.__doc__ = doc + """

  Args:
    state: from `fit` (the head).
    features: `[batch, features]` penultimate activations.
  """
  return score


def energy(logits_: jax.Array, axis: int = -1) -> jax.Array:
  """Negative free energy at temperature 1, `logsumexp` over the class `axis`.

  Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection",
  NeurIPS 2020.
  """
  return jax.nn.logsumexp(logits_, axis=axis)


def head_energy(state, features: jax.Array, layout: layout_lib.Layout | None = None
                ) -> jax.Array:
  """`[batch]` energies of `features` under the head held by `state`."""
  return energy(*logits(state, features, layout))
