"""RMDS: relative Mahalanobis distance.

Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan, "A Simple Fix to Mahalanobis
Distance for Improving Near-OOD Detection", arXiv:2106.09022 (2021):
besides the class-conditional Gaussians of `mahalanobis` (class means `mu_k`,
one shared covariance `Sigma`), one background Gaussian `N(mu_0, Sigma_0)` of
all training features, labels ignored, and

    RMD_k(x) = MD_k(x) - MD_0(x),    score(x) = -min_k RMD_k(x)
             = -min_k (x - mu_k)^T Sigma^+ (x - mu_k) + (x - mu_0)^T Sigma_0^+ (x - mu_0),

squared distances, higher = more ID. Both covariances are maximum-likelihood
(over n) with pseudo-inverses, as sklearn's `EmpiricalCovariance` in
OpenOOD's `rmds_postprocessor` (the implementation OpenOOD v1.5 benchmarks);
paper and code agree. No hyperparameters.

Streaming: the fold is Mahalanobis's (per-class Chan-merged moments in
float64). The background needs nothing more: `mu_0` is the count-weighted
mean of the class means and the total scatter is the within-class scatter
plus `sum_k n_k (mu_k - mu_0)(mu_k - mu_0)^T`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _mahalanobis

# Quadratic forms, as Mahalanobis's: TF32 would cost digits the distances need.
_PRECISION = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class RmdsState(_mahalanobis.MahalanobisState):
  """A fitted RMDS scorer: Mahalanobis's state plus the background Gaussian.

  Attributes:
    center, means, precision, mean_norms: the class-conditional part, as
      `MahalanobisState`.
    background_mean: `[features]` float32 mean of all training features.
    background_precision: `[features, features]` float32 pseudo-inverse of
      their covariance.
  """

  background_mean: jax.Array
  background_precision: jax.Array


def init(kernel, bias) -> _mahalanobis.ClassMoments:
  """Empty class moments for the head's classes and features (head validated)."""
  return _mahalanobis.init(kernel, bias)


@jax.jit
def _background(acc: _mahalanobis.ClassMoments) -> tuple[jax.Array, jax.Array]:
  """Mean of all samples and the pseudo-inverse of their covariance, float64
  (x64 on), from the class moments.

  Jitted, so a restored accumulator of NumPy arrays runs the same XLA
  program as a fresh one (NumPy's own `@` would round differently).
  """
  counts = acc.counts.astype(jnp.float64)
  total = jnp.sum(counts)
  mean = counts @ acc.means / total
  between = acc.means - mean
  covariance = (acc.scatter + (between.T * counts) @ between) / total
  return mean, _mahalanobis.pinv_covariance(covariance)


def finalize(acc: _mahalanobis.ClassMoments) -> RmdsState:
  """Both Gaussians from the class moments (float64 pseudo-inverses)."""
  classes = _mahalanobis.from_moments(acc)  # checks that every class has a sample
  mean, precision = _mahalanobis.float64_linalg(_background, acc, like=acc.scatter)
  return RmdsState(classes.center, classes.means, classes.precision, classes.mean_norms,
                   mean.astype(jnp.float32), precision.astype(jnp.float32))


FOLD = fold.Fold(init=init, update=_mahalanobis.update, finalize=finalize,
                 merge=_mahalanobis.merge, needs_labels=True)


@_common.score_jit
def score(state: RmdsState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the smallest relative Mahalanobis distance; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.background_precision.shape[0])
  x = features.astype(jnp.float32) - state.background_mean
  xp = jnp.matmul(x, state.background_precision, precision=_PRECISION)
  return _mahalanobis.score(state, features, layout) + jnp.sum(xp * x, axis=1)
