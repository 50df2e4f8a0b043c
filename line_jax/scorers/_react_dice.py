"""DICE + ReAct: DICE's sparsified head on ReAct-clipped features.

Sun, Li, "DICE: Leveraging Sparsification for Out-of-Distribution
Detection", ECCV 2022, the combination with ReAct (Sun, Guo, Li, NeurIPS
2021) that the DICE paper reports and the LINe paper takes as its strongest
baseline:

    score(h) = logsumexp(min(h, t) @ (kernel * mask) + bias),

with `mask` DICE's (keep `kernel[j, c]` iff `mean_train(h)[j] kernel[j, c]`
is above the p-th percentile of all of them) and `t` ReAct's threshold (the
`percentile`-th percentile of every training activation). As in the official
DICE code (deeplearning-wisc/dice: `precompute.py` averages the unclipped
features; `models/resnet.py` clips before the `RouteDICE` head), the mean
that ranks the contributions is of the unclipped features. That code's
ImageNet demo (`demo-imagenet.sh`, "DICE + ReACT") uses p = 15 with the
clip given as an absolute value, 1.5, for its ResNet-50; here both thresholds
come from the training data: p = 15 and `percentile` = 90, ReAct's default
(set `percentile` so that t matches a fixed clip).

The fold is DICE's and ReAct's together, through their own functions: pass 1
sums the features (DICE) and counts every activation's top 16 bits
(`_quantile`); pass 2 resolves the exact `np.percentile` (ReAct's second
histogram pass). Memory is O(features + 2^16) whatever the sample count.
"""

from __future__ import annotations

import flax.struct
import jax

from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _dice
from line_jax.scorers import _react

P = 15.0
PERCENTILE = 90.0
# The tuning grid (`python -m line_jax.tune`).
GRID = {"p": (10.0, 15.0, 30.0, 50.0, 70.0, 90.0), "percentile": (80.0, 85.0, 90.0, 95.0, 99.0)}


@flax.struct.dataclass
class ReactDiceState(_react.ReactState):
  """A fitted DICE + ReAct scorer: a ReAct state over DICE's sparsified head.

  Attributes:
    weight: `[classes, features]` float32 sparsified head weight
      (class-major; `kernel` is its `[features, classes]` transpose).
    bias: `[classes]` float32 head bias.
    threshold: float32 scalar; features are clipped at it.
  """


@flax.struct.dataclass
class ReactDiceAcc:
  """The two accumulators, DICE's and ReAct's.

  Attributes:
    dice: DICE's running feature sum (first pass only).
    react: ReAct's activation histograms (both passes).
    second: static; whether the second pass has begun.
  """

  dice: _common.MeanAcc
  react: _react.ReactAcc
  second: bool = flax.struct.field(pytree_node=False, default=False)


def init(kernel, bias, *, p=P, percentile=PERCENTILE) -> ReactDiceAcc:
  """Starts both fits (each checks the head and its own hyperparameter).

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    p: DICE's sparsity percentile in [0, 100] (p = 90 keeps 10 %).
    percentile: ReAct's clipping percentile in [0, 100].
  """
  return ReactDiceAcc(_dice.init(kernel, bias, p=p),
                      _react.init(kernel, bias, percentile=percentile))


def update(acc: ReactDiceAcc, features, labels) -> ReactDiceAcc:
  """Pass 1: DICE's sums and ReAct's first histogram; pass 2: ReAct's second."""
  react = _react.update(acc.react, features, labels)
  if acc.second:
    return acc.replace(react=react)
  return acc.replace(dice=_dice.FOLD.update(acc.dice, features, labels), react=react)


def next_pass(acc: ReactDiceAcc) -> ReactDiceAcc:
  """ReAct's histogram bins to resolve; DICE's sums are complete."""
  return acc.replace(react=_react.FOLD.next_pass(acc.react), second=True)


def merge(a: ReactDiceAcc, b: ReactDiceAcc) -> ReactDiceAcc:
  """Two disjoint parts of a pass: ReAct's merge, and DICE's in pass 1 (in
  pass 2 both parts carry the same, complete sums)."""
  react = _react.FOLD.merge(a.react, b.react)
  if a.second:
    return a.replace(react=react)
  return a.replace(dice=_dice.FOLD.merge(a.dice, b.dice), react=react)


def finalize(acc: ReactDiceAcc) -> ReactDiceState:
  """DICE's sparsified head and ReAct's exact threshold."""
  head = _dice.finalize(acc.dice)
  return ReactDiceState(head.weight, head.bias, _react.finalize(acc.react).threshold)


FOLD = fold.Fold(init=init, update=update, finalize=finalize, merge=merge,
                 passes=2, next_pass=next_pass)


@_common.score_jit
def score(state: ReactDiceState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` energies of the clipped features under the sparsified head;
  higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  return _react.score(state, features, layout)
