"""VRA: variational rectified activation, then energy.

Xu, Lian, Liu, Tao, "VRA: Variational Rectified Activation for
Out-of-distribution Detection", NeurIPS 2023. Its VRA-P rectifier, with
thresholds `low <= high`,

    g(x) = 0    if x < low,
           x    if low <= x <= high,
           high if x > high,

is applied to every unit of the features, which are then scored by energy
(`logsumexp` of the head's logits); higher = more ID. The piecewise
function is the official code's (zeroQiaoba/VRA, `quick_ood.py` lines
223-226, `f(feat)`; `models/resnet.py`, `ResNet.forward`, case `clip2`
with `lamb = 0`) and the paper's.

The thresholds are percentiles of every training activation (every
sample, every unit: `np.percentile(train.ravel(), p)`), as OpenOOD v1.5's
`vra_postprocessor.py` (lines 41-44) computes them; found exactly in two
passes by `_quantile` (ReAct's machinery). Defaults and grid are OpenOOD's
`configs/postprocessors/vra.yml`: `percentile_high = 90`,
`percentile_low = 10`, swept over {85, 90, 95, 99} x {1, 5, 10, 15}.

Where the sources differ: OpenOOD clips values below the lower threshold
*to* it (`clip(min=low, max=high)`, lines 49-50); the official code and the
paper set them to zero, which is followed here. The official CIFAR script
takes per-unit quantiles (`torch.quantile(Feat, q, dim=0)`, `quick_ood.py`
lines 197-202; README: q1 = 0.6, q2 = 0.9), its ImageNet runs fixed
thresholds in feature units (`--featmin 0.5 --featmax 1`); the percentiles
of all activations here are OpenOOD's, which mean the same on any network.
OpenOOD takes them over its ID validation split; here over the data the
fold reads (the training set).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _react
from line_jax.scorers import _quantile

PERCENTILE_HIGH = 90.0
PERCENTILE_LOW = 10.0
# The tuning grid (`python -m line_jax.tune`): OpenOOD v1.5's sweep.
GRID = {"percentile_high": (85.0, 90.0, 95.0, 99.0), "percentile_low": (1.0, 5.0, 10.0, 15.0)}


@flax.struct.dataclass
class VraState(_common.HeadState):
  """A fitted VRA scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    low: float32 scalar; features below it become 0.
    high: float32 scalar; features above it become `high`.
  """

  low: jax.Array
  high: jax.Array


@flax.struct.dataclass
class VraAcc:
  """VRA's accumulator: the head and one exact-percentile histogram per threshold.

  The first pass counts into `high` only (one count serves both);
  `next_pass` copies those counts to `low`, and the second pass resolves
  each threshold's own bins.

  Attributes:
    head: the `HeadState`.
    high, low: `_quantile.Histograms` of the upper and lower percentile.
    second: static; whether the second pass has begun.
  """

  head: _common.HeadState
  high: _quantile.Histograms
  low: _quantile.Histograms
  second: bool = flax.struct.field(pytree_node=False, default=False)


def init(kernel, bias, *, percentile_high=PERCENTILE_HIGH,
         percentile_low=PERCENTILE_LOW) -> VraAcc:
  """Starts the fit of the two thresholds.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    percentile_high: in [0, 100], the upper threshold's percentile.
    percentile_low: in [0, percentile_high], the lower threshold's.
  """
  _common.check_head(kernel, bias)
  high = _validation.percentile("percentile_high", percentile_high)
  low = _validation.percentile("percentile_low", percentile_low)
  if low > high:
    raise ValueError(f"percentile_low={percentile_low} must not exceed "
                     f"percentile_high={percentile_high}")
  return VraAcc(_common.head_state(kernel, bias), _quantile.init(high), _quantile.init(low))


def update(acc: VraAcc, features, labels) -> VraAcc:
  """Counts every activation of a `[batch, features]` batch."""
  del labels
  if not acc.second:
    return acc.replace(high=_quantile.update(acc.high, features))
  return acc.replace(high=_quantile.update(acc.high, features),
                     low=_quantile.update(acc.low, features))


def next_pass(acc: VraAcc) -> VraAcc:
  """Between the passes: the bins each threshold's second pass resolves."""
  low = acc.low.replace(high=acc.high.high)
  return acc.replace(high=_quantile.next_pass(acc.high), low=_quantile.next_pass(low),
                     second=True)


def merge(a: VraAcc, b: VraAcc) -> VraAcc:
  """Two disjoint parts of a pass, each started from the same accumulator."""
  return a.replace(high=_quantile.merge(a.high, b.high), low=_quantile.merge(a.low, b.low))


def finalize(acc: VraAcc) -> VraState:
  """The state, with both exact `np.percentile`s of all training activations."""
  return VraState(acc.head.weight, acc.head.bias,
                  jnp.asarray(_quantile.value(acc.low), jnp.float32),
                  jnp.asarray(_quantile.value(acc.high), jnp.float32))


# Two passes, as ReAct: each threshold is the exact percentile of every
# training activation; memory stays O(1) in the number of samples.
FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge, passes=2,
                 next_pass=next_pass)


def rectify(features: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """VRA-P's `g`: 0 below `low`, `high` above `high`, the value between."""
  return jnp.where(features < low, 0.0, jnp.minimum(features, high))


@_common.score_jit
def score(state: VraState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` energies of the rectified features; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  # ReAct's chunked layout on small CPU batches, for the same reason.
  return _react.shaped_energy(state, features,
                              lambda h: rectify(h, state.low, state.high), layout)
