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
The float64 products, most of the fit's cost, run in row chunks on CPU
(`scatter`; `line_jax.layout`), over the whole batch on accelerators.
"""

from __future__ import annotations

import contextlib
import functools

import flax.struct
import jax
import jax.numpy as jnp
import jax.scipy.linalg

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
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


# Rows per chunk of the float64 products on CPU: each chunk is transposed,
# centred and multiplied while it is still in cache (2,048 x 342 float64 is
# 5.6 MB; larger chunks fall out of it).
_CHUNK_ROWS = 2048
_MINOR = (((1,), (1,)), ((), ()))  # dot_general contracting the minor axes
# Up to this many classes a one-hot product picks each row's class mean
# faster than a gather on CPU; above it the gather wins.
_ONE_HOT_CLASSES = 32


def _by_chunks(fn, init, num_rows: int, layout: layout_lib.Layout | None):
  """`fn(carry, start, size)` over consecutive row chunks `[start, start + size)`
  of `num_rows` rows (trace time): full chunks in a `fori_loop`, a shorter
  last one after it. Accelerators run one chunk of every row."""
  rows = layout_lib.resolve(layout).rows_per_chunk(num_rows, _CHUNK_ROWS)
  full, tail = divmod(num_rows, rows)
  carry = jax.lax.fori_loop(0, full, lambda i, c: fn(c, i * rows, rows), init) if full else init
  return fn(carry, full * rows, tail) if tail else carry


def _columns(x: jax.Array, start, size: int, offset=None) -> jax.Array:
  """Rows `[start, start + size)` of `x`, read as float32 (minus the float32
  `[features]` `offset`, in float32, if given), as float64 columns
  `[features, size]`.

  The transposed chunk is its own array (transposed in float32, in cache):
  XLA:CPU then hands float64 products contracting the rows, the minor axis
  of both operands, to YNNPACK, faster there than Eigen's product over the
  leading axis.
  """
  chunk = jax.lax.dynamic_slice_in_dim(x, start, size).astype(jnp.float32)
  if offset is not None:
    chunk = chunk - offset
  return jax.lax.optimization_barrier(chunk.T).astype(jnp.float64)


def scatter(x: jax.Array, shift=None, offset=None, *,
            layout: layout_lib.Layout | None = None) -> jax.Array:
  """`(x - shift)^T (x - shift)`, float64 `[features, features]` (trace time, x64 on).

  Args:
    x: `[rows, features]`, read as float32 (as the scorers read features),
      then float64.
    shift: None, or `shift(start, size)` giving the float64
      `[features, size]` (transposed) to subtract from rows
      `[start, start + size)` of `x`.
    offset: None, or a float32 `[features]` subtracted from every row in
      float32 first, chunk by chunk (no `[rows, features]` copy).
    layout: where the chunks are (`line_jax.layout`; None: the default's).

  The product is symmetric: its blocks `[a; b]^T [a b]` at half the features
  are three products, `a^T a`, `a^T b`, `b^T b`, 3/4 of the full one's work.
  """
  num_features = x.shape[1]
  h = num_features // 2
  init = (jnp.zeros((h, h), jnp.float64), jnp.zeros((h, num_features - h), jnp.float64),
          jnp.zeros((num_features - h, num_features - h), jnp.float64))

  def add(carry, start, size):
    c = _columns(x, start, size, offset)
    if shift is not None:
      c = c - shift(start, size)
    top, bottom = c[:h], c[h:]
    return (carry[0] + jax.lax.dot_general(top, top, _MINOR),
            carry[1] + jax.lax.dot_general(top, bottom, _MINOR),
            carry[2] + jax.lax.dot_general(bottom, bottom, _MINOR))

  aa, ab, bb = _by_chunks(add, init, x.shape[0], layout)
  return jnp.concatenate([jnp.concatenate([aa, ab], axis=1),
                          jnp.concatenate([ab.T, bb], axis=1)], axis=0)


def _one_hot_t(labels: jax.Array, start, size: int, num_classes: int, dtype) -> jax.Array:
  """`[classes, size]` one-hot of labels `[start, start + size)`."""
  chunk = jax.lax.dynamic_slice_in_dim(labels, start, size)
  return (chunk[None, :] == jnp.arange(num_classes)[:, None]).astype(dtype)


def class_sums(x: jax.Array, labels: jax.Array, num_classes: int, *,
               layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[classes, features]` float64 sums of the rows of `x` (read as float32)
  per label (trace time, x64 on).

  A one-hot float64 product per chunk (every term and product exact), on
  CPU faster than XLA's scatter-add.
  """
  def add(sums, start, size):
    one_hot = _one_hot_t(labels, start, size, num_classes, jnp.float64)
    return sums + jax.lax.dot_general(one_hot, _columns(x, start, size), _MINOR)

  return _by_chunks(add, jnp.zeros((num_classes, x.shape[1]), jnp.float64), x.shape[0],
                    layout)


@functools.partial(jax.jit, static_argnames=("layout",))
def _merge_batch(acc: ClassMoments, features: jax.Array, labels: jax.Array,
                 layout: layout_lib.Layout) -> ClassMoments:
  num_classes = acc.counts.shape[0]
  batch_counts = jnp.bincount(labels, length=num_classes).astype(jnp.int64)
  sums = class_sums(features, labels, num_classes, layout=layout)
  batch_means = sums / jnp.maximum(batch_counts, 1).astype(jnp.float64)[:, None]
  # Rows are centred at their class mean as the sum of two float32 parts
  # (48 bits of it), picked exactly by a one-hot float32 product up to
  # `_ONE_HOT_CLASSES` classes, by a gather of float32 rows above (gathering
  # float64 rows took a third of the fit on CPU). Around a point d_c off the
  # mean a class's scatter gains exactly n_c d_c d_c^T (the cross terms sum
  # to zero), taken off below. One float32 part alone left several times
  # the rounding error of exact centring in the products.
  high = batch_means.astype(jnp.float32)
  low = (batch_means - high.astype(jnp.float64)).astype(jnp.float32)
  parts = jnp.concatenate([high, low], axis=1)  # [classes, 2 features]
  num_features = high.shape[1]

  def shift_of(start, size):
    if num_classes <= _ONE_HOT_CLASSES:
      picked = jnp.matmul(parts.T, _one_hot_t(labels, start, size, num_classes, jnp.float32),
                          precision=_PRECISION)
    else:
      picked = parts[jax.lax.dynamic_slice_in_dim(labels, start, size)].T
    return (picked[:num_features].astype(jnp.float64)
            + picked[num_features:].astype(jnp.float64))

  offset = batch_means - (high.astype(jnp.float64) + low.astype(jnp.float64))
  batch_scatter = (scatter(features, shift_of, layout=layout)
                   - (offset.T * batch_counts) @ offset)
  return _chan(acc, batch_counts, batch_means, batch_scatter)


def update(acc: ClassMoments, features, labels) -> ClassMoments:
  """Adds a validated batch (`[batch, features]`, `[batch]` labels)."""
  with jax.enable_x64(True):
    return _merge_batch(acc, features, labels, layout_lib.for_arrays(acc.scatter))


update_moments = update
_merge_moments = jax.jit(_chan)


def merge(a: ClassMoments, b: ClassMoments) -> ClassMoments:
  """The moments of the union of the samples `a` and `b` saw (Chan et al.)."""
  with jax.enable_x64(True):
    return _merge_moments(a, b.counts, b.means, b.scatter)


def from_moments(acc: ClassMoments) -> MahalanobisState:
  """The scorer from accumulated moments (pseudo-inverse in float64)."""
  _validation.nonempty_classes(acc.counts)
  return float64_linalg(_state, acc, like=acc.scatter)


def float64_linalg(fn, *args, like: jax.Array):
  """`fn(*args)` with float64 on and its host LAPACK calls on one BLAS thread
  (`_one_blas_thread` on `like`'s device), blocked on before it returns."""
  with jax.enable_x64(True), _one_blas_thread(layout_lib.for_arrays(like)):
    return jax.block_until_ready(fn(*args))


@contextlib.contextmanager
def _one_blas_thread(layout: layout_lib.Layout | None = None):
  """Host LAPACK calls (eigh, pinv, Cholesky) inside run on one BLAS thread.

  On CPU, jaxlib's LAPACK kernels run on scipy's OpenBLAS, whose idle
  threads spin for a while after each call; on 2 cores that slowed the
  XLA computation right after it by up to half, and a few-hundred-wide
  factorisation gains little from a second thread. threadpoolctl (a
  scikit-learn dependency) sets the limit where it is installed; elsewhere,
  and off the CPU (`layout`), nothing changes. Block on the results inside.
  """
  try:
    import threadpoolctl  # pylint: disable=g-import-not-at-top
  except ImportError:
    threadpoolctl = None
  if threadpoolctl is None or not layout_lib.resolve(layout).cpu:
    yield
    return
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


def pinv_covariance(covariance: jax.Array) -> jax.Array:
  """NumPy's `pinv(covariance, hermitian=True)` of a float64 covariance (trace time).

  `pinv` drops the eigenvalues at most `rcond = 10 * features * eps` times
  the largest; when none is that small it is the inverse, which a Cholesky
  factorisation gives for a fraction of the eigendecomposition's work.
  `||A||_F ||A^-1||_F` bounds the
  condition number from above, so the inverse is taken only where that
  bound stays 100x below `1 / rcond` (condition numbers up to about
  `1 / (100 rcond features)`, 4e7 at 342 features); otherwise, or where
  the factorisation fails (a singular covariance: dead units), `pinv`.
  """
  size = covariance.shape[0]
  rcond = 10.0 * size * jnp.finfo(covariance.dtype).eps
  factor = jax.scipy.linalg.cho_factor(covariance, lower=True)
  inverse = jax.scipy.linalg.cho_solve(factor, jnp.eye(size, dtype=covariance.dtype))
  inverse = 0.5 * (inverse + inverse.T)
  bound = jnp.linalg.norm(covariance) * jnp.linalg.norm(inverse)
  certain = jnp.all(jnp.isfinite(inverse)) & (bound * rcond < 0.01)
  return jax.lax.cond(certain, lambda: inverse,
                      lambda: jnp.linalg.pinv(covariance, hermitian=True))


# One compiled call: op by op, the dispatches cost more than the arithmetic
# at 342 features.
@jax.jit
def _state(acc: ClassMoments) -> MahalanobisState:
  covariance = acc.scatter / jnp.sum(acc.counts).astype(jnp.float64)
  precision = pinv_covariance(covariance)
  center = jnp.mean(acc.means, axis=0)
  means = acc.means - center
  norms = jnp.sum((means @ precision) * means, axis=1)
  return MahalanobisState(
      center=center.astype(jnp.float32),
      means=means.astype(jnp.float32),
      precision=precision.astype(jnp.float32),
      mean_norms=norms.astype(jnp.float32),
  )


FOLD = fold.Fold(init=init, update=update, finalize=from_moments, merge=merge,
                 needs_labels=True)


@_common.score_jit
def score(state: MahalanobisState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
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
