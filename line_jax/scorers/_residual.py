"""Residual: minus the norm of a feature outside ViM's principal space.

The Residual baseline of Wang, Li, Feng, Zhang, "ViM: Out-Of-Distribution
with Virtual-logit Matching", CVPR 2022: ViM's virtual logit without the
logits. With ViM's origin `o = -(W^T)^+ b` and `R` the eigenvectors of the
`features - D` smallest eigenvalues of the training covariance around `o`
(`(h - o)^T (h - o) / n`, `EmpiricalCovariance(assume_centered=True)`),

    score(x) = -||(x - o) R||,

higher = more ID. The official code's `benchmark.py` (haoqiwang/vim,
method 'Residual', lines 263-281; the origin at line 149) and OpenOOD v1.5's
`residual_postprocessor.py` (lines 48-53, 63-64) agree with each other and
with the paper.

D (`dim`) is ViM's: `None` resolves on the head's width by the official
benchmark's rule (`_vim.default_dim`: 1000 for m >= 2048, 512 from 768,
m // 2 below), the rule `benchmark.py` applies to Residual as to ViM
(line 267); OpenOOD's `residual.yml` sets 512 and sweeps nothing. The grid is ViM's own,
the same subspace swept alike. An explicit `dim` at or above the feature
count leaves no residual and is refused.

Streaming: one pass sums `(h - o)^T (h - o)` in float64 (O(features^2)
memory, the scatter ViM's first pass sums, by the same code), then one
float64 eigendecomposition; the subspace is ViM's exactly.
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
from line_jax.scorers import _vim

DIM = None  # ViM's official rule, resolved on the head's width (`_vim.default_dim`).
# The tuning grid (`python -m line_jax.tune`): ViM's, over the same subspace.
GRID = dict(_vim.GRID)


@flax.struct.dataclass
class ResidualState:
  """A fitted Residual scorer.

  Attributes:
    origin: `[features]` float32, `-(W^T)^+ b`.
    residual: `[features, features - D]` float32 orthonormal basis of the
      complement of the principal space.
  """

  origin: jax.Array
  residual: jax.Array

  @property
  def dim(self) -> int:
    """The principal dimension D the fit used."""
    return self.residual.shape[0] - self.residual.shape[1]


@flax.struct.dataclass
class ResidualAcc:
  """Residual's accumulator (one pass).

  Attributes:
    origin: `[features]` float32, `-(W^T)^+ b`.
    scatter: `[features, features]` float64 sum of `(h - o)^T (h - o)`.
    count: int64 scalar, samples seen.
    dim: static principal dimension D.
  """

  origin: jax.Array
  scatter: jax.Array
  count: jax.Array
  dim: int = flax.struct.field(pytree_node=False)


def _dim(dim, num_features: int) -> int:
  if dim is None:
    return _vim.default_dim(num_features)
  dim = _common.integer("dim", dim)
  if dim >= num_features:
    raise ValueError(
        f"Residual's dim={dim} must be below the feature count {num_features}: the "
        f"residual space has features - dim dimensions (dim=None picks "
        f"{_vim.default_dim(num_features)})")
  return dim


def init(kernel, bias, *, dim=DIM) -> ResidualAcc:
  """Starts Residual's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None (then the origin is 0).
    dim: principal space dimension D, below the feature count; None: ViM's
      official rule (`_vim.default_dim`).
  """
  num_features, _ = _common.check_head(kernel, bias)
  dim = _dim(dim, num_features)
  with jax.enable_x64(True):
    return ResidualAcc(origin=_vim.origin(kernel, bias),
                       scatter=jnp.zeros((num_features, num_features), jnp.float64),
                       count=jnp.zeros((), jnp.int64), dim=dim)


@functools.partial(jax.jit, static_argnames=("layout",))
def _add(acc: ResidualAcc, features: jax.Array, layout: layout_lib.Layout) -> ResidualAcc:
  # `h - o` in float32, then float64 products: ViM's first pass, term for term.
  scatter = _mahalanobis.scatter(features, offset=acc.origin, layout=layout)
  return acc.replace(scatter=acc.scatter + scatter, count=acc.count + features.shape[0])


def update(acc: ResidualAcc, features, labels) -> ResidualAcc:
  """Adds a `[batch, features]` batch to the scatter around the origin."""
  del labels
  with jax.enable_x64(True):
    return _add(acc, features, layout_lib.for_arrays(acc.scatter))


def finalize(acc: ResidualAcc) -> ResidualState:
  """The residual basis (float64 eigendecomposition) and the state."""
  residual = _mahalanobis.float64_linalg(_vim.residual_basis, acc.scatter, acc.count, acc.dim,
                                         like=acc.scatter)
  return ResidualState(origin=jnp.asarray(acc.origin, jnp.float32), residual=residual)


FOLD = fold.Fold(init=init, update=update, finalize=finalize,
                 merge=fold.add_fields("scatter", "count"))


@_common.score_jit
def score(state: ResidualState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the norm of `(h - origin)` in the residual space; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  del layout  # One matrix product, the same on every device.
  _common.check_width(features, state.residual.shape[0])
  x = features.astype(jnp.float32) - state.origin
  return -jnp.linalg.norm(_matmul.dot(x, state.residual), axis=-1)
