"""Mahalanobis: distance to the closest class mean under a tied covariance.

Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018, Eq. 2:
class means and one covariance shared by all classes (the pooled
within-class scatter over n, sklearn's `EmpiricalCovariance` of the
class-centred features), and

    score(x) = max_c -(x - mu_c)^T Sigma^+ (x - mu_c),

minus the smallest squared Mahalanobis distance (the paper's form; any
ranking metric is the same as for the unsquared distance). This is the
feature-space score on the penultimate layer, without the paper's input
perturbation and per-layer ensemble.

Streaming: per-class means and the pooled scatter are merged batch by batch
in float64 with Chan et al.'s update (no `sum x x^T - n mu mu^T` cancellation),
so memory is O(classes x features + features^2), work per batch
O((batch + classes) x features^2), and the result equals the in-memory fit.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax.scorers import _common

# Expanded quadratic forms cancel; TF32 or bf16 passes on accelerators would
# cost digits that the distances need.
_PRECISION = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class ClassMoments:
  """Running class means and pooled within-class scatter (streaming state).

  Attributes:
    counts: `[classes]` int64 samples seen per class.
    means: `[classes, features]` float64 class means so far.
    scatter: `[features, features]` float64, sum over samples of
      `(x - mu_y)(x - mu_y)^T` around their own class mean.
  """

  counts: jax.Array
  means: jax.Array
  scatter: jax.Array


@flax.struct.dataclass
class MahalanobisState:
  """A fitted Mahalanobis scorer.

  Attributes:
    center: `[features]` float32, the average class mean; distances are
      shift-invariant, and centring keeps the float32 expansion small.
    means: `[classes, features]` float32 class means minus `center`.
    precision: `[features, features]` float32 pseudo-inverse of the tied
      covariance.
    mean_norms: `[classes]` float32 `mu_c^T precision mu_c` (centred means).
  """

  center: jax.Array
  means: jax.Array
  precision: jax.Array
  mean_norms: jax.Array


def init_moments(num_classes: int, num_features: int) -> ClassMoments:
  with jax.enable_x64(True):
    return ClassMoments(
        counts=jnp.zeros((num_classes,), jnp.int64),
        means=jnp.zeros((num_classes, num_features), jnp.float64),
        scatter=jnp.zeros((num_features, num_features), jnp.float64),
    )


@jax.jit
def _merge(acc: ClassMoments, features: jax.Array, labels: jax.Array) -> ClassMoments:
  num_classes = acc.counts.shape[0]
  x = features.astype(jnp.float32).astype(jnp.float64)
  batch_counts = jnp.bincount(labels, length=num_classes).astype(jnp.int64)
  sums = jax.ops.segment_sum(x, labels, num_classes)
  safe = jnp.maximum(batch_counts, 1).astype(jnp.float64)[:, None]
  batch_means = sums / safe
  centred = x - batch_means[labels]
  counts = acc.counts + batch_counts
  total = jnp.maximum(counts, 1).astype(jnp.float64)
  # Chan et al.: merging two groups of one class adds, besides each group's
  # own scatter, n_a n_b / n (mean_b - mean_a)(mean_b - mean_a)^T.
  delta = batch_means - acc.means
  weight = acc.counts.astype(jnp.float64) * batch_counts / total
  scatter = (acc.scatter + centred.T @ centred + (delta.T * weight) @ delta)
  means = acc.means + delta * (batch_counts / total)[:, None]
  return ClassMoments(counts=counts, means=means, scatter=scatter)


def update_moments(acc: ClassMoments, features, labels) -> ClassMoments:
  """Adds a validated batch (`[batch, features]`, `[batch]` labels)."""
  with jax.enable_x64(True):
    return _merge(acc, features, labels)


def fit(features, labels, kernel, bias) -> MahalanobisState:
  """Fits class means and the tied covariance on training features.

  Args:
    features: `[n, features]` training activations.
    labels: `[n]` integer labels in `[0, classes)`; every class needs a sample.
    kernel: `[features, classes]` head kernel (validated; fixes the classes).
    bias: `[classes]` head bias or None (validated only).

  Returns:
    A `MahalanobisState`.
  """
  num_classes = _common.check_train(features, labels, kernel, bias, needs_labels=True)
  acc = update_moments(init_moments(num_classes, features.shape[1]), features, labels)
  return from_moments(acc)


def fit_from_batches(batches, kernel, bias) -> MahalanobisState:
  """`fit` over an iterable of `(features, labels)` batches, one pass."""
  num_features, num_classes = _common.check_head(kernel, bias)
  acc = init_moments(num_classes, num_features)
  for features, labels in _common.batches_of(batches):
    _common.check_batch(features, labels, num_features, num_classes, needs_labels=True)
    acc = update_moments(acc, features, labels)
  if not np.asarray(acc.counts).any():
    raise _common.no_batches()
  return from_moments(acc)


def from_moments(acc: ClassMoments) -> MahalanobisState:
  """The scorer from accumulated moments (pseudo-inverse in float64)."""
  _validation.nonempty_classes(acc.counts)
  with jax.enable_x64(True):
    covariance = acc.scatter / jnp.sum(acc.counts).astype(jnp.float64)
    precision = jnp.linalg.pinv(covariance, hermitian=True)
    center = jnp.mean(acc.means, axis=0)
    means = acc.means - center
    norms = jnp.sum((means @ precision) * means, axis=1)
  return MahalanobisState(
      center=center.astype(jnp.float32),
      means=means.astype(jnp.float32),
      precision=precision.astype(jnp.float32),
      mean_norms=norms.astype(jnp.float32),
  )


@jax.jit
def score(state: MahalanobisState, features: jax.Array) -> jax.Array:
  """`[batch]` minus the smallest squared Mahalanobis distance; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.precision.shape[0])
  x = features.astype(jnp.float32) - state.center
  xp = jnp.matmul(x, state.precision, precision=_PRECISION)
  cross = jnp.matmul(xp, state.means.T, precision=_PRECISION)
  # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu for all c at once.
  distances = jnp.sum(xp * x, axis=1, keepdims=True) - 2.0 * cross + state.mean_norms
  return -jnp.min(distances, axis=1)
