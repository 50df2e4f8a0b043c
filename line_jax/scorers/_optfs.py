"""OptFS: the piecewise-constant feature shaping found in closed form.

Zhao, Xu, Gupta, Asthana, Zheng, Gould, "Towards Optimal Feature-Shaping
Methods for Out-of-Distribution Detection", ICLR 2024. A shaped feature is
`f(h)_j = h_j theta_k` for `h_j` in interval k; outside every interval it
is 0. As the official code fits it (Qinyu-Allen-Zhao/OptFSOOD,
`detector/ours.py`):

* the range runs from the 0.1th to the 99.9th percentile of every training
  activation (lines 46-47, `np.quantile(feature, 1e-3)`, `1 - 1e-3`), cut
  into 100 intervals of equal width: lower edges `np.arange(left, right,
  width)`, interval k is `[lower_k, lower_k + width)` (lines 50-51, 102);
* with p the class the head predicts for a training sample (`utils/func.py`,
  `get_feature_train`) and `w_p` its class-major weight row, interval k's
  logit contribution is `I_k = mean over samples of sum_j [h_j in k] w_pj h_j`
  (lines 98-106), and `theta = 1000 I / ||I||_2` (line 77);
* `variant` "vanilla" (the code's default, line 15; "Ours (V)") scores
  `w_p . f(h)`, p predicted from the unshaped logits, without the bias;
  "energy" scores `logsumexp(f(h) @ kernel + bias)` (lines 115-128). The
  CADRef authors' re-implementation (LingAndZero/CADRef,
  `ood_methods/OptFS.py`) uses the energy one. `GRID` searches both.

Higher = more ID. `percentile` (0.1) and `intervals` (100) are the code's
constants, exposed. `np.arange`'s rounding makes `intervals + 1` lower edges
for some ranges (about 6 % of random ones); the code then shapes with that
extra interval too, and so do we: the state has `intervals + 1` slots, an
unused last one with edges at +inf and theta 0. Edges are compared in
float32, as PyTorch compares the code's float32 features with them; where
rounding makes two intervals share a value, it gets both thetas, as in the
code's sum over masks. The code's iterated refit (`dynamic_weight`, off,
line 23; the paper's appendix) is not implemented.

Streaming, exact: both percentiles by `_quantile`'s histograms (passes 1
and 2), then the intervals' float64 contribution sums (pass 3): three
passes, since the edges must be known before the sums. Memory is two sets
of `_quantile` histograms (3 MiB) and `intervals + 1` sums, whatever the
sample count.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _matmul
from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _quantile

PERCENTILE = 0.1
INTERVALS = 100
VARIANT = "vanilla"
VARIANTS = ("vanilla", "energy")
# The norm of theta (`ours.py` line 77): no effect on "vanilla", a temperature for "energy".
SCALE = 1000.0
# The tuning grid (`python -m line_jax.tune`): the official `--use_ood_score` choices.
GRID = {"variant": VARIANTS}


@flax.struct.dataclass
class OptfsState(_common.HeadState):
  """A fitted OptFS scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    lower: `[intervals + 1]` float32 lower edges, ascending (+inf: unused slot).
    upper: `[intervals + 1]` float32 upper edges (excluded), ascending.
    theta: `[intervals + 1]` float32 shaping value of each interval.
    variant: static; "vanilla" or "energy".
  """

  lower: jax.Array
  upper: jax.Array
  theta: jax.Array
  variant: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class OptfsAcc:
  """OptFS's accumulator over its three passes.

  Attributes:
    head: the `HeadState`.
    left: histograms of the lower percentile (passes 1 and 2).
    right: histograms of the upper percentile (passes 1 and 2).
    lower: `[intervals + 1]` float32 lower edges (set before pass 3; +inf before).
    upper: `[intervals + 1]` float32 upper edges.
    sums: `[intervals + 1]` float64 logit contributions (pass 3).
    count: int64 scalar, samples of pass 3.
    intervals: static, the number of intervals.
    variant: static, the score.
    stage: static, the pass being read (0, 1, 2); only the first pass's
      accumulators are ever saved mid-stream (`line_jax.resumable`).
  """

  head: _common.HeadState
  left: _quantile.Histograms
  right: _quantile.Histograms
  lower: jax.Array
  upper: jax.Array
  sums: jax.Array
  count: jax.Array
  intervals: int = flax.struct.field(pytree_node=False)
  variant: str = flax.struct.field(pytree_node=False)
  stage: int = flax.struct.field(pytree_node=False, default=0)


def init(kernel, bias, *, percentile=PERCENTILE, intervals=INTERVALS,
         variant=VARIANT) -> OptfsAcc:
  """Starts OptFS's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    percentile: in [0, 50): the range runs from this percentile of every
      training activation to `100 - percentile`.
    intervals: the number of equal intervals the range is cut into.
    variant: "vanilla" (`w_p . f(h)`) or "energy" (`logsumexp` of f(h)'s logits).
  """
  _common.check_head(kernel, bias)
  p = _validation.percentile("percentile", percentile)
  if p >= 50.0:
    raise ValueError(f"percentile must be below 50 (the range runs from it to "
                     f"100 - percentile), got {percentile}")
  intervals = _common.integer("intervals", intervals)
  if not isinstance(variant, str) or variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, "
                     f"got {variant!r}")
  slots = intervals + 1
  with jax.enable_x64(True):
    return OptfsAcc(_common.head_state(kernel, bias), _quantile.init(p),
                    _quantile.init(100.0 - p), jnp.full((slots,), jnp.inf, jnp.float32),
                    jnp.full((slots,), jnp.inf, jnp.float32), jnp.zeros((slots,), jnp.float64),
                    jnp.zeros((), jnp.int64), intervals, variant)


def slots(lower: jax.Array, upper: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The intervals holding each value of float32 `h`, as two index arrays of h's shape.

  Interval k holds `lower_k <= x < upper_k`. Both edge arrays ascend, so
  those k run from `#{upper_k <= x}` to `#{lower_k <= x} - 1`; adjacent
  intervals share at most one float32 value (rounding at a common edge),
  so a value lies in at most two. Returns `(first, second)`, each an
  interval index or `len(lower)` where there is none.
  """
  none = lower.shape[0]
  above = jnp.searchsorted(lower, h, side="right")
  below = jnp.searchsorted(upper, h, side="right")
  return (jnp.where(below < above, below, none),
          jnp.where(below + 1 < above, below + 1, none))


@jax.jit
def _add_contributions(acc: OptfsAcc, features: jax.Array) -> OptfsAcc:
  h = features.astype(jnp.float32)
  pred = jnp.argmax(_matmul.dot(h, acc.head.weight.T) + acc.head.bias, axis=1)
  # The float32 product, as the code's `w[pred] * feature`; summed in float64.
  contribution = (acc.head.weight[pred] * h).astype(jnp.float64).ravel()
  size = acc.sums.shape[0]
  sums = acc.sums
  for index in slots(acc.lower, acc.upper, h):
    sums = sums + jax.ops.segment_sum(contribution, index.ravel(), size + 1)[:size]
  return acc.replace(sums=sums, count=acc.count + h.shape[0])


def update(acc: OptfsAcc, features, labels) -> OptfsAcc:
  """Passes 1-2: counts every activation; pass 3: the intervals' contributions."""
  del labels
  if acc.stage < 2:
    return acc.replace(left=_quantile.update(acc.left, features),
                       right=_quantile.update(acc.right, features))
  with jax.enable_x64(True):
    return _add_contributions(acc, jnp.asarray(features))


def edges(left: float, right: float, intervals: int) -> tuple[np.ndarray, np.ndarray]:
  """Float64 `(lower, upper)` edges between `left` and `right`, as the code's
  `np.arange(left, right, width)` and `lower + width` (`intervals` or
  `intervals + 1` of them)."""
  width = (right - left) / intervals
  if not width > 0.0:
    raise ValueError(
        f"the training activations between the percentiles span no range ({left} to "
        f"{right}): OptFS has no interval to shape; use a smaller percentile")
  lower = np.arange(left, right, width)
  return lower, lower + width


def next_pass(acc: OptfsAcc) -> OptfsAcc:
  """After pass 1: the histogram bins to resolve; after pass 2: the edges."""
  if acc.stage == 0:
    return acc.replace(left=_quantile.next_pass(acc.left),
                       right=_quantile.next_pass(acc.right), stage=1)
  lower, upper = edges(_quantile.value(acc.left), _quantile.value(acc.right), acc.intervals)
  padded = [np.full(acc.lower.shape, np.inf, np.float32) for _ in range(2)]
  padded[0][:lower.size], padded[1][:upper.size] = lower, upper
  return acc.replace(lower=jnp.asarray(padded[0]), upper=jnp.asarray(padded[1]), stage=2)


def merge(a: OptfsAcc, b: OptfsAcc) -> OptfsAcc:
  """Two disjoint parts of one pass: histograms (passes 1-2), or sums (pass 3)."""
  if a.stage < 2:
    return a.replace(left=_quantile.merge(a.left, b.left),
                     right=_quantile.merge(a.right, b.right))
  with jax.enable_x64(True):
    return a.replace(sums=a.sums + b.sums, count=a.count + b.count)


def finalize(acc: OptfsAcc) -> OptfsState:
  """The state: theta, the contributions scaled to norm `SCALE`."""
  if acc.stage < 2 or int(acc.count) == 0:
    raise ValueError("OptFS reads the training batches 3 times: its third pass saw no sample")
  contributions = np.asarray(acc.sums, np.float64) / int(acc.count)
  norm = np.linalg.norm(contributions)
  if not norm > 0.0:
    raise ValueError("every interval's logit contribution on the training data is 0: "
                     "OptFS has no shaping to fit")
  return OptfsState(acc.head.weight, acc.head.bias, acc.lower, acc.upper,
                    jnp.asarray(contributions / norm * SCALE, jnp.float32), acc.variant)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge, passes=3,
                 next_pass=next_pass)


def shape(state: OptfsState, h: jax.Array) -> jax.Array:
  """`[batch, features]` shaped float32 features `h * theta_(interval of h)`."""
  theta = jnp.concatenate([state.theta, jnp.zeros((1,), jnp.float32)])
  first, second = slots(state.lower, state.upper, h)
  return h * (theta[first] + theta[second])


@_common.score_jit
def score(state: OptfsState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` scores of the shaped features ("vanilla": the predicted class's
  logit without bias; "energy": the energy); higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  shaped = shape(state, h)
  if state.variant == "energy":
    return _common.head_energy(state, shaped, layout)
  z, axis = _common.logits(state, h, layout)
  return jnp.sum(state.weight[_common.argmax(z, axis)] * shaped, axis=1)
