"""NECO: neural-collapse-based OOD detection.

Ammar, Belkhir, Popescu, Manzanera, Franchi, "NECO: NEural Collapse Based
Out-of-distribution detection", ICLR 2024. Under neural collapse the ID
features span a low-dimensional (simplex ETF) subspace, which the top-d
principal components of the training features estimate; OOD features lie
mostly outside it. With `z(x) = (x - mu) / sigma` the features standardised
by the training mean and standard deviation of each unit, and `P_d` the top-d
principal axes of the standardised training features,

    score(x) = ||P_d^T z(x)|| / ||z(x)||  (x max_c logit_c(x) with `max_logit`),

higher = more ID. This is the official code's `neco()` (gitlab.com/drti/neco,
linked from pytorch-ood's `detector/neco.py`): sklearn's `StandardScaler`
(ddof 0; a constant unit keeps scale 1), then `PCA` fitted on the scaled
training features, the norm of the first `neco_dim` PCA coordinates over
the norm of the scaled feature, times the max logit of the raw features
for every architecture but ResNets (`model_architecture_type != 'resnet'`).
The PCA centring is the scaled training mean, zero. The paper's printed
formula does not show the centring (pytorch-ood's note); the code's scaler
and centring are followed. Its DeiT / Swin branch, which divides by the
norm of the unscaled feature, is not reproduced.

Defaults: `dim = 100`, the official scripts' `--neco_dim`, capped at
the feature count (pytorch-ood clamps alike; at the cap the ratio is 1 and
NECO is MaxLogit); `max_logit = True`, the official code's path for its
default ViT (pass False for ResNets, as that code does). No official sweep
exists; the grid is pytorch-ood's `hyperparameter_space` for `d`. A zero
`||z||` (a feature equal to the training mean) divides by 1e-12, as
pytorch-ood does, not 0 / 0.

Streaming: one pass of Mahalanobis's Chan-merged float64 moments (one
class: the mean and the scatter around it); the scaled covariance is the
scatter over `sigma sigma^T`, whose float64 eigenvectors are the principal
axes (each signed so its largest entry is positive, as sklearn's
`svd_flip` does, so a state does not depend on LAPACK's sign).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _mahalanobis

DIM = 100
MAX_LOGIT = True
# The tuning grid (`python -m line_jax.tune`): pytorch-ood's space for `d`.
GRID = {"dim": (16, 32, 64, 100, 128, 256, 512, 768)}
# The floor of `||z||` (pytorch-ood's `clamp(min=1e-12)`).
_TINY = 1e-12


@flax.struct.dataclass
class NecoState(_common.HeadState):
  """A fitted NECO scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    mean: `[features]` float32 training mean of each unit.
    inv_scale: `[features]` float32, one over each unit's training standard
      deviation (1 for a constant unit).
    components: `[features, D]` float32 principal axes of the standardised
      training features, by decreasing variance.
    max_logit: static; whether the ratio is multiplied by the max logit.
  """

  mean: jax.Array
  inv_scale: jax.Array
  components: jax.Array
  max_logit: bool = flax.struct.field(pytree_node=False, default=MAX_LOGIT)

  @property
  def dim(self) -> int:
    """The subspace dimension D the fit used (after the cap)."""
    return self.components.shape[1]


@flax.struct.dataclass
class NecoAcc:
  """NECO's accumulator: the head and one class's moments (`ClassMoments`).

  Attributes:
    head: the `HeadState`.
    moments: `_mahalanobis.ClassMoments` of a single class: count, float64
      mean and scatter around it.
    dim: static subspace dimension D (capped at the feature count).
    max_logit: static, as in `NecoState`.
  """

  head: _common.HeadState
  moments: _mahalanobis.ClassMoments
  dim: int = flax.struct.field(pytree_node=False)
  max_logit: bool = flax.struct.field(pytree_node=False, default=MAX_LOGIT)


def init(kernel, bias, *, dim=DIM, max_logit=MAX_LOGIT) -> NecoAcc:
  """Starts NECO's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    dim: positive subspace dimension, capped at the feature count.
    max_logit: multiply the ratio by the max logit (True or False).
  """
  num_features, _ = _common.check_head(kernel, bias)
  dim = min(_common.integer("dim", dim), num_features)
  if not isinstance(max_logit, (bool, np.bool_)):
    raise TypeError(f"max_logit must be True or False, got {max_logit!r}")
  return NecoAcc(_common.head_state(kernel, bias), _mahalanobis.init_moments(1, num_features),
                 dim=dim, max_logit=bool(max_logit))


def update(acc: NecoAcc, features, labels) -> NecoAcc:
  """Adds a `[batch, features]` batch to the moments (labels unused: one class)."""
  del labels
  one_class = np.zeros((np.shape(features)[0],), np.int32)
  return acc.replace(moments=_mahalanobis.update_moments(acc.moments, features, one_class))


def merge(a: NecoAcc, b: NecoAcc) -> NecoAcc:
  """The moments of both parts (Chan et al.)."""
  return a.replace(moments=_mahalanobis.merge(a.moments, b.moments))


@functools.partial(jax.jit, static_argnums=1)
def _principal(moments: _mahalanobis.ClassMoments, dim: int):
  """Mean, inverse scale and the top-`dim` axes, float64 (x64 on)."""
  n = moments.counts[0].astype(jnp.float64)
  mean = moments.means[0]
  variance = jnp.diagonal(moments.scatter) / n
  # sklearn's `_is_constant_feature`: a variance within rounding of zero.
  eps = jnp.finfo(jnp.float64).eps
  constant = variance <= n * eps * variance + (n * mean * eps) ** 2
  scale = jnp.where(constant, 1.0, jnp.sqrt(variance))
  _, vectors = jnp.linalg.eigh(moments.scatter / n / jnp.outer(scale, scale))
  top = vectors[:, ::-1][:, :dim]  # eigh sorts ascending
  largest = jnp.argmax(jnp.abs(top), axis=0)
  top = top * jnp.sign(top[largest, jnp.arange(dim)])
  return mean, 1.0 / scale, top


def finalize(acc: NecoAcc) -> NecoState:
  """The scaler and the principal axes (float64), and the state."""
  mean, inv_scale, components = _mahalanobis.float64_linalg(
      _principal, acc.moments, acc.dim, like=acc.moments.scatter)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return NecoState(acc.head.weight, acc.head.bias, f32(mean), f32(inv_scale), f32(components),
                   max_logit=acc.max_logit)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge)


@_common.score_jit
def score(state: NecoState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` share of the standardised feature's norm in the principal subspace
  (times the max logit with `max_logit`); higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  z = (h - state.mean) * state.inv_scale
  inside = jnp.linalg.norm(_matmul.dot(z, state.components), axis=1)
  ratio = inside / jnp.maximum(jnp.linalg.norm(z, axis=1), _TINY)
  if not state.max_logit:
    return ratio
  logits, axis = _common.logits(state, h, layout)
  return ratio * jnp.max(logits, axis=axis)
