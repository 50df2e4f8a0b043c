"""pNML: the predictive normalized maximum likelihood regret of the last layer.

Bibas, Feder, Hassner, "Single Layer Predictive Normalized Maximum
Likelihood for Out-of-Distribution Detection", NeurIPS 2021. Features are
L2-normalised, `z = x / ||x||`; with `X` the normalised training features
(rows), `p = softmax(W z + b)` the head's probabilities of the *normalised*
feature, and

    g(z) = z^T (X^T X)^+ z / (1 + z^T (X^T X)^+ z),
    regret(z) = log( sum_c p_c / (p_c + (1 - p_c) p_c^g) ) / log C,

the score is `-regret`, in [-1, 0]; higher = more ID (a feature in the
training span's well-covered directions has g near 0 and regret near 0).
This is the official code's `LitBaseline` (kobybibas/pnml_ood_detection,
`src/lit_utils/baseline_lit_utils.py`: normalisation lines 66-67, the head
on the normalised feature line 70, `X^T X` and its inverse lines 93-96, the
regret lines 144-157, scored as `1 - regret` line 136) and pytorch-ood's
`PNML`; `X^T X` is the plain sum over the training set, not divided by n.
No hyperparameters (temperature 1, as the code's).

Numerics, where line_jax departs from the code's float32 arithmetic:
`X^T X` is summed in float64; its pseudo-inverse is kept as a factor
`F = V S^-1/2` over the eigenvalues above `10 m eps` times the largest (JAX's
`pinv` cut-off; the code inverts outright unless the smallest singular value
is below 1e-16), so `z^T (X^T X)^+ z = ||z F||^2` is a sum of squares,
never the cancelling quadratic form. Each term is
`sigmoid(-(log(1 - p_c) + (g - 1) log p_c))`, the same ratio from the
log-softmax, so a probability that underflows float32 gives its limit, not
0 / 0; the regret is floored at 0, its exact lower bound (each term is at
least its p_c), against the rounding of the probabilities' sum. The norm
is floored at 1e-12 (pytorch-ood's `F.normalize`): an all-zero feature
normalises to zero and scores 0 (g = 0, regret 0), where the official code
divides 0 by 0.
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

# The floor of `||x||` in the normalisation (pytorch-ood's `F.normalize`).
_TINY = 1e-12


@flax.struct.dataclass
class PnmlState(_common.HeadState):
  """A fitted pNML scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    factor: `[features, features]` float32 `F` with `F F^T = (X^T X)^+`
      over the normalised training features (zero columns for the
      eigenvalues the pseudo-inverse drops).
  """

  factor: jax.Array


@flax.struct.dataclass
class PnmlAcc:
  """pNML's accumulator (one pass).

  Attributes:
    head: the `HeadState`.
    gram: `[features, features]` float64 sum of `z z^T` over the normalised
      training features.
  """

  head: _common.HeadState
  gram: jax.Array


def init(kernel, bias) -> PnmlAcc:
  """Checks the head (at least two classes: the regret divides by log C)."""
  num_features, num_classes = _common.check_head(kernel, bias)
  if num_classes < 2:
    raise ValueError(f"pNML needs at least 2 classes (its regret is over log C), got "
                     f"{num_classes}")
  with jax.enable_x64(True):
    return PnmlAcc(_common.head_state(kernel, bias),
                   jnp.zeros((num_features, num_features), jnp.float64))


def normalise(features: jax.Array) -> jax.Array:
  """`[batch, features]` float32 rows over their norms (floored at 1e-12)."""
  h = features.astype(jnp.float32)
  return h / jnp.maximum(jnp.linalg.norm(h, axis=1, keepdims=True), _TINY)


@functools.partial(jax.jit, static_argnames=("layout",))
def _add(acc: PnmlAcc, features: jax.Array, layout: layout_lib.Layout) -> PnmlAcc:
  # Rows normalised in float32, as the code's; their products in float64.
  return acc.replace(gram=acc.gram + _mahalanobis.scatter(normalise(features), layout=layout))


def update(acc: PnmlAcc, features, labels) -> PnmlAcc:
  """Adds a `[batch, features]` batch's normalised rows to `X^T X`."""
  del labels
  with jax.enable_x64(True):
    return _add(acc, features, layout_lib.for_arrays(acc.gram))


@jax.jit
def _factor(gram: jax.Array) -> jax.Array:
  """`V S^-1/2` over the eigenvalues above the pseudo-inverse's cut-off (x64 on)."""
  values, vectors = jnp.linalg.eigh(gram)
  cutoff = 10.0 * gram.shape[0] * jnp.finfo(gram.dtype).eps * jnp.max(values)
  kept = values > cutoff
  # Each eigenvector signed so its largest entry is positive: one state
  # whatever sign LAPACK returns.
  largest = jnp.argmax(jnp.abs(vectors), axis=0)
  vectors = vectors * jnp.sign(vectors[largest, jnp.arange(gram.shape[0])])
  return vectors * jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, values, 1.0)), 0.0)


def finalize(acc: PnmlAcc) -> PnmlState:
  """The pseudo-inverse's factor (float64 eigendecomposition) and the state."""
  factor = _mahalanobis.float64_linalg(_factor, acc.gram, like=acc.gram)
  return PnmlState(acc.head.weight, acc.head.bias, jnp.asarray(factor, jnp.float32))


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=fold.add_fields("gram"))


def _log_one_minus_softmax(z: jax.Array, log_p: jax.Array, axis: int) -> jax.Array:
  """`log(1 - p)` for logits `z` (classes along `axis`) and `log_p = log_softmax(z)`.

  The top class's `1 - p` is the other classes' share, their own
  log-sum-exp, so a confident sample's is not the 0 that float32 `1 - p`
  rounds to; every other class has p <= 1/2, where `log1p(-p)` is exact.
  """
  index = jnp.arange(z.shape[axis])
  first_top = jnp.expand_dims(index, 1 - axis) == _common.argmax(z, axis, keepdims=True)
  top = jnp.max(z, axis=axis, keepdims=True)
  log_total = jax.nn.logsumexp(z - top, axis=axis, keepdims=True)
  rest = jax.nn.logsumexp(jnp.where(first_top, -jnp.inf, z - top), axis=axis, keepdims=True)
  return jnp.where(first_top, rest - log_total, jnp.log1p(-jnp.exp(log_p)))


@_common.score_jit
def score(state: PnmlState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the normalised pNML regret; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  z = normalise(features)
  projected = jnp.sum(jnp.square(_matmul.dot(z, state.factor)), axis=1)
  g = projected / (1.0 + projected)
  logits, axis = _common.logits(state, z, layout)
  log_p = jax.nn.log_softmax(logits, axis=axis)
  log_odds = _log_one_minus_softmax(logits, log_p, axis) + (jnp.expand_dims(g, axis) - 1.0) * log_p
  normaliser = jnp.sum(jax.nn.sigmoid(-log_odds), axis=axis)
  # Each term is at least its p_c (g >= 0), so the sum is at least 1: a log
  # below 0 is float32 rounding of the probabilities' sum.
  regret = jnp.maximum(jnp.log(normaliser), 0.0) / jnp.log(float(logits.shape[axis]))
  return -regret
