"""ViM: virtual-logit matching.

Wang, Li, Feng, Zhang, "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR 2022. With the head `logits = h @ W^T + b` (`W` = kernel^T):

* origin `o = -(W^T)^+ b` (pseudo-inverse), where the logits of the origin
  vanish in the least-squares sense;
* principal space: the top-D eigenvectors of the training covariance around
  `o`, `(h - o)^T (h - o) / n` (centred at `o`, not at the mean, as the
  official code's `EmpiricalCovariance(assume_centered=True)`); the residual
  of `h` is its part `(h - o) R` in the other `features - D` eigenvectors `R`;
* `alpha = mean_train(max logit) / mean_train(||(h - o) R||)`;
* score = `logsumexp(logits) - alpha ||(h - o) R||` (the log of the paper's
  ID probability against the virtual logit, up to a monotone map; the official
  code's `energy - vlogit`). Higher = more ID.

Default D = 512 (`dim`). The official benchmark script uses D = 1000 for
features of 2048 or more and 512 below; pass `dim=1000` to match it on a
2048-feature ResNet-50. With `features <= dim`, D is capped at
`features - 1`, so the residual keeps at least one dimension.

Streaming: pass 1 sums `(h - o)^T (h - o)` in float64 (O(features^2) memory)
and the max logits; the eigenvectors need all of it, and `alpha` needs the
residual norms under them, so pass 2 re-reads the batches for those. The
batches must be re-iterable.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax.scorers import _common

DIM = 512


@flax.struct.dataclass
class VimState:
  """A fitted ViM scorer.

  Scoring needs `h @ kernel` and `(h - origin) @ residual`; both come out of
  one matrix product with `projection = [kernel | residual]`, the second as
  `h @ residual - origin @ residual`.

  Attributes:
    projection: `[features, classes + features - D]` float32: the head kernel
      next to an orthonormal basis of the complement of the principal space.
    bias: `[classes]` float32 head bias.
    origin: `[features]` float32, `-(W^T)^+ b`.
    residual_offset: `[features - D]` float32, `origin @ residual`.
    alpha: float32 scalar matching the virtual logit to the real ones.
  """

  projection: jax.Array
  bias: jax.Array
  origin: jax.Array
  residual_offset: jax.Array
  alpha: jax.Array

  @property
  def kernel(self) -> jax.Array:
    return self.projection[:, : self.bias.shape[0]]

  @property
  def residual(self) -> jax.Array:
    return self.projection[:, self.bias.shape[0] :]


def _dim(dim, num_features: int) -> int:
  return min(_common.integer("dim", dim), num_features - 1)


def _origin(kernel, bias) -> jax.Array:
  kernel = jnp.asarray(kernel, jnp.float32)
  if bias is None:
    return jnp.zeros((kernel.shape[0],), jnp.float32)
  with jax.enable_x64(True):
    # PyTorch's weight W is K^T: o = -pinv(K^T) b, the least-squares point
    # whose logits o K + b vanish.
    o = -jnp.linalg.pinv(kernel.T.astype(jnp.float64)) @ jnp.asarray(bias, jnp.float64)
  return o.astype(jnp.float32)


@jax.jit
def _scatter(features, origin, kernel, bias):
  h = features.astype(jnp.float32)
  centred = (h - origin).astype(jnp.float64)
  max_logits = jnp.max(_matmul.dot(h, kernel) + bias, axis=-1).astype(jnp.float64)
  return centred.T @ centred, jnp.sum(max_logits)


@jax.jit
def _residual_norms(features, origin, residual):
  return jnp.linalg.norm(_matmul.dot(features.astype(jnp.float32) - origin, residual), axis=-1)


def fit(features, labels, kernel, bias, *, dim=DIM) -> VimState:
  """Fits the principal space and alpha on training features.

  Args:
    features: `[n, features]` training activations.
    labels: `[n]` integer labels or None (not used, validated if given).
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None (then the origin is 0).
    dim: principal space dimension D (capped at `features - 1`).

  Returns:
    A `VimState`.
  """
  _common.check_train(features, labels, kernel, bias)
  _dim(dim, features.shape[1])
  return fit_from_batches([(features, labels)], kernel, bias, dim=dim)


def fit_from_batches(batches, kernel, bias, *, dim=DIM) -> VimState:
  """`fit` over a re-iterable of `(features, labels)` batches, two passes."""
  num_features, num_classes = _common.check_head(kernel, bias)
  dim = _dim(dim, num_features)
  batches = _common.batches_of(batches, passes=2)
  head = _common.head_state(kernel, bias)
  origin = _origin(kernel, bias)

  count, max_logit_sum = 0, 0.0
  with jax.enable_x64(True):
    scatter = jnp.zeros((num_features, num_features), jnp.float64)
    for features, labels in batches:
      _common.check_batch(features, labels, num_features, num_classes)
      s, m = _scatter(features, origin, head.kernel, head.bias)
      scatter, max_logit_sum = scatter + s, max_logit_sum + float(m)
      count += features.shape[0]
    if count == 0:
      raise _common.no_batches()
    # eigh sorts eigenvalues ascending: the first features - D span the residual.
    _, vectors = jnp.linalg.eigh(scatter / count)
  residual = vectors[:, : num_features - dim].astype(jnp.float32)

  norm_sum, seen = 0.0, 0
  for features, _ in batches:
    norms = _residual_norms(features, origin, residual)
    norm_sum += float(np.sum(np.asarray(norms, np.float64)))
    seen += features.shape[0]
  if seen != count:
    raise ValueError(
        f"the second pass over the batches saw {seen} samples, the first "
        f"{count}: batches must yield the same data each time"
    )
  alpha = (max_logit_sum / count) / (norm_sum / count)
  return VimState(
      projection=jnp.concatenate([head.kernel, residual], axis=1),
      bias=head.bias,
      origin=origin,
      residual_offset=_matmul.dot(origin, residual),
      alpha=jnp.asarray(alpha, jnp.float32),
  )


@jax.jit
def score(state: VimState, features: jax.Array) -> jax.Array:
  """`[batch]` `logsumexp(logits) - alpha * ||residual||`; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.projection.shape[0])
  z = _matmul.dot(features.astype(jnp.float32), state.projection)
  num_classes = state.bias.shape[0]
  logits = z[:, :num_classes] + state.bias
  norms = jnp.linalg.norm(z[:, num_classes:] - state.residual_offset, axis=-1)
  return _common.energy(logits) - state.alpha * norms
