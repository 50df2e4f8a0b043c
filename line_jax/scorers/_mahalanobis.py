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

from line_jax import _validation
from line_jax.scorers import _common
from line_jax.scorers import _protocol

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


def init(kernel, bias) -> ClassMoments:
  """Empty moments for the head's classes and features (head validated only)."""
  num_features, num_classes = _common.check_head(kernel, bias)
  return init_moments(num_classes, num_features)


def init_moments(num_classes: int, num_features: int) -> ClassMoments:
  with jax.enable_x64(True):
    return ClassMoments(
        counts=jnp.zeros((num_classes,), jnp.int64),
        means=jnp.zeros((num_classes, num_features), jnp.float64),
        scatter=jnp.zeros((num_features, num_features), jnp.float64),
    )


def _chan(acc: ClassMoments, batch_counts, batch_means, batch_scatter) -> ClassMoments:
  # Chan et al.: merging two groups of one class adds, besides each group's
  # own scatter, n_a n_b / n (mean_b - mean_a)(mean_b - mean_a)^T.
  counts = acc.counts + batch_counts
  total = jnp.maximum(counts, 1).astype(jnp.float64)
  delta = batch_means - acc.means
  weight = acc.counts.astype(jnp.float64) * batch_counts / total
  scatter = acc.scatter + batch_scatter + (delta.T * weight) @ delta
  means = acc.means + delta * (batch_counts / total)[:, None]
  return ClassMoments(counts=counts, means=means, scatter=scatter)


@jax.jit
def _merge_batch(acc: ClassMoments, features: jax.Array, labels: jax.Array) -> ClassMoments:
  num_classes = acc.counts.shape[0]
  x = features.astype(jnp.float32).astype(jnp.float64)
  batch_counts = jnp.bincount(labels, length=num_classes).astype(jnp.int64)
  sums = jax.ops.segment_sum(x, labels, num_classes)
  batch_means = sums / jnp.maximum(batch_counts, 1).astype(jnp.float64)[:, None]
  centred = x - batch_means[labels]
  return _chan(acc, batch_counts, batch_means, centred.T @ centred)


def update(acc: ClassMoments, features, labels) -> ClassMoments:
  """Adds a validated batch (`[batch, features]`, `[batch]` labels)."""
  with jax.enable_x64(True):
    return _merge_batch(acc, features, labels)


update_moments = update
_merge_moments = jax.jit(_chan)


def merge(a: ClassMoments, b: ClassMoments) -> ClassMoments:
  """The moments of the union of the samples `a` and `b` saw (Chan et al.)."""
  with jax.enable_x64(True):
    return _merge_moments(a, b.counts, b.means, b.scatter)


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


FOLD = _protocol.Fold(init=init, update=update, finalize=from_moments, merge=merge,
                      needs_labels=True)


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
