"""What the feature-space scorers share: the head, input checks, energy.

Every check on arrays goes through `line_jax._validation`, so a scorer rejects
bad input with the same message as `line_jax.line.fit`. Score functions run
under jit, where only shapes are known; `check_width` is their (trace-time)
check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import functools
import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _matmul
from line_jax import _validation
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


def head_state(kernel, bias) -> HeadState:
  """`HeadState` of a validated `[features, classes]` kernel and bias (or None)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  if bias is None:
    bias = jnp.zeros((kernel.shape[1],), jnp.float32)
  return HeadState(weight=kernel.T, bias=jnp.asarray(bias, jnp.float32))


def head_init(cls: type) -> Callable[[Any, Any], HeadState]:
  """`init(kernel, bias) -> cls` of a scorer that fits nothing from data.

  The whole fit of MSP, MaxLogit, Energy, GradNorm and Entropy: checks a
  `[features, classes]` kernel and bias (or None); the accumulator is the
  state, of the scorer's own `HeadState` subclass (so a saved state says
  whose it is).
  """

  def init(kernel, bias) -> HeadState:
    check_head(kernel, bias)
    head = head_state(kernel, bias)
    return cls(head.weight, head.bias)
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


@jax.jit
def _add_feature_sums(sums: jax.Array, count: jax.Array, features: jax.Array):
  total = jnp.sum(features.astype(jnp.float32).astype(jnp.float64), axis=0)
  return sums + total, count + features.shape[0]


def add_feature_sums(acc, features, labels):
  """The `update` of a training-mean accumulator (DICE, fDBD, NCI).

  `acc` has `sums` (`[features]` float64) and `count` (int64 scalar); the
  `[batch, features]` batch is added in float64, labels unused.
  """
  del labels
  # Arrays in and out, the accumulator rebuilt outside the jit: DICE's, fDBD's
  # and NCI's accumulators flatten to equal tree structures, so a jit taking
  # them whole could hand one scorer's class back to another from its cache.
  with jax.enable_x64(True):
    sums, count = _add_feature_sums(acc.sums, acc.count, features)
  return acc.replace(sums=sums, count=count)


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
  if labels is None:
    if needs_labels:
      raise ValueError("labels are required: this scorer fits per-class statistics")
  else:
    _validation.labels(labels, features.shape[0], num_classes)
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
# backend's.
score_jit = functools.partial(jax.jit, static_argnames=("layout",))


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
    layout: `line_jax.layout.CPU` or `ACCELERATOR` (None: the default backend's).
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
