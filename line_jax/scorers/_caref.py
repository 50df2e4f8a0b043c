"""CARef and CADRef: relative error to the predicted class's mean feature.

Ling, Chang, Zhao, Zhao, Chow, Deng, "CADRef: Robust Out-of-Distribution
Detection via Class-Aware Decoupled Relative Feature Leveraging", CVPR 2025
(arXiv:2503.00325). Fitted on training features grouped by the class the
model PREDICTS (`argmax` of the head's logits), not by their label: the
official code (LingAndZero/CADRef, `utils/get_stat.py` line 35,
`p_labels = output.argmax(1)`) files each training feature under its
predicted class, and `mu_c` is that group's mean. With `p = argmax z`,
`z = h @ kernel + bias`, and `w_p` the class-major weight row of p:

* CARef (`ood_methods/CARef.py` lines 34-37):

      score(h) = -||h - mu_p||_1 / ||h||_1;

* CADRef (`ood_methods/CADRef.py` lines 60-75) splits the relative feature
  `d = (h - mu_p) * sign(w_p)` into the part that raises the logit of p and
  the part that lowers it,

      E+ = sum(max(d, 0)),  E- = sum(max(-d, 0)),
      score(h) = -(E+ / S(z) + E- / mean S) / ||h||_1,

  with `S` a logit score of the test sample and `mean S` its mean over every
  training sample (`get_global_mean_logit_score`, lines 29-34). `logit`
  chooses S as the official `--logit_method` does (`ood_eval.py` line 30,
  default Energy): "energy" (`logsumexp z`), "maxlogit" (`max z`), "msp"
  (`max softmax z`) or "gen" (`1 / sum_j p_j^0.1 (1 - p_j)^0.1` over the
  `max(C // 10, 10)` largest softmax probabilities, capped at C; lines
  83-89). `GRID_CADREF` searches the four, the paper's ablation.

Higher = more ID, as the official code's `-score`. Where the paper and the
code differ we follow the code: as pytorch-ood's CADRef notes, Eqs. (7)-(8)
of the paper split on the sign of `w_p * h` and take the l1 norm of a sum,
while the code splits on the sign of `w_p * (h - mu_p)` and sums absolute
parts (so `E+ + E-` is CARef's error where no weight is zero), as the
paper's text and abstract describe the decoupling. The code picks p by
`argmax softmax z`, the same class as `argmax z` here. A weight
of exactly 0 drops its unit from both parts (`sign(0) = 0`), as in the code,
and S divides as it is: the code assumes it positive (a negative energy or
max logit flips the first part's sign, there and here).

A class that no training sample is predicted as has no mean in the official
code (it fails); here its mean is the mean of every training feature, as
pytorch-ood's CARef does, and `counts` records how many samples each mean
averages. Training sums and the mean logit score are float64 running sums;
memory is O(classes x features). The official code divides by `||h||_1`
as it is, so an all-zero feature (a dead post-ReLU row) scores -inf or NaN;
here, as in pytorch-ood, the norm is at least `NORM_FLOOR` (1e-12), so it
scores a finite value far below any real feature's.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common

LOGIT = "energy"
LOGITS = ("energy", "maxlogit", "msp", "gen")
# The tuning grid of CADRef (`python -m line_jax.tune`): the official
# `--logit_method` choices. CARef has no hyperparameter.
GRID_CADREF = {"logit": LOGITS}
# GEN's exponent and its least number of probabilities (`CADRef.py` lines 83-85).
_GEN_GAMMA = 0.1
_GEN_MIN_TOP = 10
# The least `||h||_1` divided by (pytorch-ood's): only an all-zero row reaches it.
NORM_FLOOR = 1e-12


@flax.struct.dataclass
class CarefState(_common.HeadState):
  """A fitted CARef scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    means: `[classes, features]` float32 mean training feature of each
      predicted class (the mean of all of them for a class never predicted).
    counts: `[classes]` int32 training samples predicted as each class.
  """

  means: jax.Array
  counts: jax.Array


@flax.struct.dataclass
class CadrefState(_common.HeadState):
  """A fitted CADRef scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major).
    bias: `[classes]` float32 head bias.
    means: `[classes, features]` float32, as `CarefState.means`.
    counts: `[classes]` int32, as `CarefState.counts`.
    mean_confidence: float32 scalar, the mean logit score of the training set.
    logit: static; which logit score (one of `LOGITS`).
  """

  means: jax.Array
  counts: jax.Array
  mean_confidence: jax.Array
  logit: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class CarefAcc:
  """The accumulator of both: per-predicted-class float64 feature sums.

  Attributes:
    head: the `HeadState`.
    sums: `[classes, features]` float64.
    counts: `[classes]` int64.
    confidence: float64 scalar, the sum of the logit scores (CADRef; 0 for CARef).
    logit: static; CADRef's logit score, None for CARef.
  """

  head: _common.HeadState
  sums: jax.Array
  counts: jax.Array
  confidence: jax.Array
  logit: str | None = flax.struct.field(pytree_node=False)


def confidence(z: jax.Array, axis: int, logit: str) -> jax.Array:
  """`[batch]` logit score S of float32 logits `z` over their class `axis`.

  Args:
    z: `[batch, classes]` (axis 1) or `[classes, batch]` (axis 0).
    axis: the class axis.
    logit: one of `LOGITS`.
  """
  if logit == "energy":
    return _common.energy(z, axis)
  if logit == "maxlogit":
    return jnp.max(z, axis=axis)
  if logit == "msp":
    return jnp.max(jax.nn.softmax(z, axis=axis), axis=axis)
  probs = jax.nn.softmax(z, axis=axis)
  if axis == 0:
    probs = probs.T
  classes = probs.shape[1]
  top = min(max(classes // 10, _GEN_MIN_TOP), classes)
  if top < classes:
    probs = jax.lax.top_k(probs, top)[0]
  return 1.0 / jnp.sum(probs ** _GEN_GAMMA * (1.0 - probs) ** _GEN_GAMMA, axis=1)


def _check_logit(value) -> str:
  if not isinstance(value, str) or value not in LOGITS:
    raise ValueError(f"logit must be one of {', '.join(map(repr, LOGITS))}, got {value!r}")
  return value


def _acc(kernel, bias, logit: str | None) -> CarefAcc:
  num_features, num_classes = _common.check_head(kernel, bias)
  with jax.enable_x64(True):
    return CarefAcc(_common.head_state(kernel, bias),
                    jnp.zeros((num_classes, num_features), jnp.float64),
                    jnp.zeros((num_classes,), jnp.int64), jnp.zeros((), jnp.float64), logit)


def init_caref(kernel, bias) -> CarefAcc:
  """Starts CARef's fit (head validated; no hyperparameter)."""
  return _acc(kernel, bias, None)


def init_cadref(kernel, bias, *, logit=LOGIT) -> CarefAcc:
  """Starts CADRef's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    logit: the logit score S, one of `LOGITS` ("energy", the official default).
  """
  return _acc(kernel, bias, _check_logit(logit))


@jax.jit
def _add(acc: CarefAcc, features: jax.Array) -> CarefAcc:
  h = features.astype(jnp.float32)
  z = _matmul.dot(h, acc.head.weight.T) + acc.head.bias
  pred = jnp.argmax(z, axis=1)
  num_classes = acc.counts.shape[0]
  sums = jax.ops.segment_sum(h.astype(jnp.float64), pred, num_classes)
  counts = jnp.bincount(pred, length=num_classes).astype(jnp.int64)
  total = acc.confidence
  if acc.logit is not None:
    total = total + jnp.sum(confidence(z, 1, acc.logit).astype(jnp.float64))
  return acc.replace(sums=acc.sums + sums, counts=acc.counts + counts, confidence=total)


def update(acc: CarefAcc, features, labels) -> CarefAcc:
  """Adds a `[batch, features]` batch to the classes the head predicts (labels unused)."""
  del labels
  with jax.enable_x64(True):
    return _add(acc, jnp.asarray(features))


def _means(acc: CarefAcc) -> tuple[np.ndarray, np.ndarray, int]:
  """`[classes, features]` float64 means (the overall mean where a class is
  empty), int counts, and the sample count."""
  sums, counts = np.asarray(acc.sums, np.float64), np.asarray(acc.counts)
  total = int(counts.sum())
  means = sums / np.maximum(counts, 1)[:, None]
  means[counts == 0] = sums.sum(axis=0) / total
  return means, counts, total


def finalize_caref(acc: CarefAcc) -> CarefState:
  """CARef's state: the class means."""
  means, counts, _ = _means(acc)
  return CarefState(acc.head.weight, acc.head.bias, jnp.asarray(means, jnp.float32),
                    jnp.asarray(counts, jnp.int32))


def finalize_cadref(acc: CarefAcc) -> CadrefState:
  """CADRef's state: the class means and the mean training logit score."""
  means, counts, total = _means(acc)
  return CadrefState(acc.head.weight, acc.head.bias, jnp.asarray(means, jnp.float32),
                     jnp.asarray(counts, jnp.int32),
                     jnp.asarray(float(acc.confidence) / total, jnp.float32), acc.logit)


_MERGE = fold.add_fields("sums", "counts", "confidence")
FOLD_CAREF = fold.Fold(init=init_caref, update=update, finalize=finalize_caref, merge=_MERGE)
FOLD_CADREF = fold.Fold(init=init_cadref, update=update, finalize=finalize_cadref,
                        merge=_MERGE)


def _relative(state, features: jax.Array, layout: layout_lib.Layout | None):
  """Logits, their class axis, predictions, `h - mu_p` and `||h||_1` (floored)."""
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  z, axis = _common.logits(state, h, layout)
  pred = _common.argmax(z, axis)
  norm = jnp.maximum(jnp.sum(jnp.abs(h), axis=1), NORM_FLOOR)
  return z, axis, pred, h - state.means[pred], norm


@_common.score_jit
def score_caref(state: CarefState, features: jax.Array,
                layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the l1 error relative to the predicted class's mean; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _, _, _, relative, norm = _relative(state, features, layout)
  return -jnp.sum(jnp.abs(relative), axis=1) / norm


@_common.score_jit
def score_cadref(state: CadrefState, features: jax.Array,
                 layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` minus the decoupled relative errors, each over its logit score;
  higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  z, axis, pred, relative, norm = _relative(state, features, layout)
  aligned = relative * jnp.sign(state.weight[pred])
  raising = jnp.sum(jnp.maximum(aligned, 0.0), axis=1)
  lowering = jnp.sum(jnp.maximum(-aligned, 0.0), axis=1)
  # One division by ||h||_1 for both parts: the code's two give the same value.
  error = raising / confidence(z, axis, state.logit) + lowering / state.mean_confidence
  return -error / norm
