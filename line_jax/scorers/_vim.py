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

D (`dim`) defaults to `None`, the rule of the official benchmark script,
resolved on the head's width m: D = 1000 for m >= 2048 and 512 below (its
only other case, where m >= 768 keeps it meaningful); for narrower features,
which that script never meets, D = m // 2 (the carry-over several later
re-implementations of that script use). The fitted state's residual has
m - D columns, so the resolved D is `features - residual.shape[1]`. An
explicit `dim` at or above m leaves no residual: a ValueError says so.

Streaming: pass 1 sums `(h - o)^T (h - o)` in float64 (O(features^2) memory)
and the max logits; the eigenvectors need all of it, and `alpha` needs the
residual norms under them, so pass 2 re-reads the batches for those. The
batches must be re-iterable.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _mahalanobis

DIM = None  # The official rule, resolved on the head's width (`default_dim`).
# The tuning grid (`python -m line_jax.tune`).
GRID = {"dim": (16, 32, 64, 96)}



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
  def dim(self) -> int:
    """The principal dimension D the fit used."""
    return self.projection.shape[0] - (self.projection.shape[1] - self.bias.shape[0])

  @property
  def residual(self) -> jax.Array:
    return self.projection[:, self.bias.shape[0] :]


def default_dim(num_features: int) -> int:
  """The official benchmark script's D for `num_features`, halved below 768."""
  if num_features >= 2048:
    return 1000
  if num_features >= 768:
    return 512
  return max(1, num_features // 2)


def _dim(dim, num_features: int) -> int:
  if dim is None:
    return default_dim(num_features)
  dim = _common.integer("dim", dim)
  if dim >= num_features:
    raise ValueError(
        f"ViM's dim={dim} must be below the feature count {num_features}: the residual "
        f"space has features - dim dimensions (dim=None picks {default_dim(num_features)})")
  return dim


def origin(kernel, bias) -> jax.Array:
  kernel = jnp.asarray(kernel, jnp.float32)
  if bias is None:
    return jnp.zeros((kernel.shape[0],), jnp.float32)
  return _mahalanobis.float64_linalg(_origin_of, kernel, jnp.asarray(bias, jnp.float32),
                                     like=kernel)


@jax.jit
def _origin_of(kernel: jax.Array, bias: jax.Array) -> jax.Array:
  # PyTorch's weight W is K^T: o = -pinv(K^T) b, the least-squares point
  # whose logits o K + b vanish. One compiled call (op by op, the
  # pseudo-inverse's dispatches cost more than its arithmetic).
  o = -jnp.linalg.pinv(kernel.T.astype(jnp.float64)) @ bias.astype(jnp.float64)
  return o.astype(jnp.float32)


@flax.struct.dataclass
class VimAcc:
  """ViM's accumulator over its two passes.

  Attributes:
    head: the `HeadState`.
    origin: `[features]` float32, `-(W^T)^+ b`.
    scatter: `[features, features]` float64 sum of `(h - o)^T (h - o)`.
    max_logit_sum: float64 scalar; count: int64 scalar (first pass).
    residual: `[features, features - D]` float32 basis of the residual
      space (set between the passes; zeros before).
    norm_sum: float64 scalar, sum of residual norms (second pass).
    dim: static principal dimension D.
    second: static; whether the second pass has begun.
  """

  head: _common.HeadState
  origin: jax.Array
  scatter: jax.Array
  max_logit_sum: jax.Array
  count: jax.Array
  residual: jax.Array
  norm_sum: jax.Array
  dim: int = flax.struct.field(pytree_node=False)
  second: bool = flax.struct.field(pytree_node=False, default=False)


def init(kernel, bias, *, dim=DIM) -> VimAcc:
  """Starts ViM's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None (then the origin is 0).
    dim: principal space dimension D, below the feature count; None: the
      official rule (`default_dim`).
  """
  num_features, _ = _common.check_head(kernel, bias)
  dim = _dim(dim, num_features)
  with jax.enable_x64(True):
    zero = jnp.zeros((), jnp.float64)
    return VimAcc(
        head=_common.head_state(kernel, bias), origin=origin(kernel, bias),
        scatter=jnp.zeros((num_features, num_features), jnp.float64),
        max_logit_sum=zero, count=jnp.zeros((), jnp.int64),
        residual=jnp.zeros((num_features, num_features - dim), jnp.float32),
        norm_sum=zero, dim=dim)


@functools.partial(jax.jit, static_argnames=("layout",))
def _first(acc: VimAcc, features: jax.Array, layout: layout_lib.Layout) -> VimAcc:
  h = features.astype(jnp.float32)
  # `h - o` rounded to float32 as the official code's NumPy computes it,
  # then float64 products (in row chunks on CPU, as Mahalanobis').
  scatter = _mahalanobis.scatter(h, offset=acc.origin, layout=layout)
  max_logits = jnp.max(_matmul.dot(h, acc.head.kernel) + acc.head.bias, axis=-1)
  return acc.replace(scatter=acc.scatter + scatter,
                     max_logit_sum=acc.max_logit_sum + jnp.sum(max_logits.astype(jnp.float64)),
                     count=acc.count + h.shape[0])


@jax.jit
def _second(acc: VimAcc, features: jax.Array) -> VimAcc:
  norms = jnp.linalg.norm(
      _matmul.dot(features.astype(jnp.float32) - acc.origin, acc.residual), axis=-1)
  return acc.replace(norm_sum=acc.norm_sum + jnp.sum(norms.astype(jnp.float64)))


def update(acc: VimAcc, features, labels) -> VimAcc:
  """Pass 1: the scatter around the origin and the max logits; pass 2: the
  residual norms."""
  del labels
  with jax.enable_x64(True):
    if acc.second:
      return _second(acc, features)
    return _first(acc, features, layout_lib.for_arrays(acc.scatter))


def next_pass(acc: VimAcc) -> VimAcc:
  """The residual basis: eigenvectors of the `features - D` smallest
  eigenvalues of the covariance around the origin (float64)."""
  residual = _mahalanobis.float64_linalg(residual_basis, acc.scatter, acc.count, acc.dim,
                                         like=acc.scatter)
  return acc.replace(residual=residual, second=True)


@functools.partial(jax.jit, static_argnums=2)
def residual_basis(scatter: jax.Array, count: jax.Array, dim: int) -> jax.Array:
  # eigh sorts eigenvalues ascending: the first features - D span the residual.
  _, vectors = jnp.linalg.eigh(scatter / count.astype(jnp.float64))
  return vectors[:, : scatter.shape[0] - dim].astype(jnp.float32)


def merge(a: VimAcc, b: VimAcc) -> VimAcc:
  """Two disjoint parts of a pass, each started from the same accumulator:
  the current pass's sums add."""
  if a.second:
    return a.replace(norm_sum=a.norm_sum + b.norm_sum)
  return a.replace(scatter=a.scatter + b.scatter, max_logit_sum=a.max_logit_sum + b.max_logit_sum,
                   count=a.count + b.count)


def finalize(acc: VimAcc) -> VimState:
  """`alpha = mean(max logit) / mean(residual norm)` and the state."""
  alpha = float(acc.max_logit_sum) / float(acc.norm_sum)
  return VimState(
      projection=jnp.concatenate([acc.head.kernel, acc.residual], axis=1),
      bias=acc.head.bias,
      origin=acc.origin,
      residual_offset=_matmul.dot(acc.origin, acc.residual),
      alpha=jnp.asarray(alpha, jnp.float32),
  )


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge,
                 passes=2, next_pass=next_pass)


@_common.score_jit
def score(state: VimState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
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
