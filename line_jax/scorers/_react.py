"""ReAct: rectified activations, then energy.

Sun, Guo, Li, "ReAct: Out-of-distribution Detection With Rectified
Activations", NeurIPS 2021. Features are clipped from above at the p-th
percentile of all training activations (every sample, every unit:
`np.percentile(train_features.ravel(), p)`), then scored by energy. Default
p = 90, the paper's choice for both CIFAR and ImageNet.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import _validation
from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _quantile

PERCENTILE = 90.0
# The tuning grid (`python -m line_jax.tune`).
GRID = {"percentile": (70.0, 80.0, 85.0, 90.0, 95.0, 99.0)}


@flax.struct.dataclass
class ReactState(_common.HeadState):
  """A fitted ReAct scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    threshold: float32 scalar; features are clipped at it.
  """

  threshold: jax.Array


@flax.struct.dataclass
class ReactAcc:
  """ReAct's accumulator: the head and the histograms of every activation."""

  head: _common.HeadState
  histograms: _quantile.Histograms


def init(kernel, bias, *, percentile=PERCENTILE) -> ReactAcc:
  """Starts the fit of the clipping threshold.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    percentile: in [0, 100]; 100 clips at the largest activation (Energy).
  """
  _common.check_head(kernel, bias)
  p = _validation.percentile("percentile", percentile)
  return ReactAcc(_common.head_state(kernel, bias), _quantile.init(p))


def update(acc: ReactAcc, features, labels) -> ReactAcc:
  """Counts every activation of a `[batch, features]` batch."""
  del labels
  return acc.replace(histograms=_quantile.update(acc.histograms, features))


def finalize(acc: ReactAcc) -> ReactState:
  """The state, with the exact `np.percentile` of all training activations."""
  threshold = _quantile.value(acc.histograms)
  return ReactState(acc.head.weight, acc.head.bias, jnp.asarray(threshold, jnp.float32))


# Two passes: the threshold is the exact percentile of every training
# activation, found with two 65,536-bin histograms of float32 bit patterns
# (see `_quantile`); memory stays O(1) in the number of samples.
FOLD = fold.Fold(
    init=init, update=update, finalize=finalize,
    merge=lambda a, b: a.replace(histograms=_quantile.merge(a.histograms, b.histograms)),
    passes=2,
    next_pass=lambda acc: acc.replace(histograms=_quantile.next_pass(acc.histograms)))


@_common.score_jit
def score(state: ReactState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` energies of the clipped features; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  return shaped_energy(state, features, lambda h: jnp.minimum(h, state.threshold), layout)


def shaped_energy(state, features: jax.Array, shape: Callable[[jax.Array], jax.Array],
                  layout: layout_lib.Layout | None) -> jax.Array:
  """`[batch]` energies under the head of `state` of `shape(features)`, an
  elementwise shaping (ReAct's clip, VRA's rectification), in `_CHUNK_ROWS`
  chunks where the logits go class-major."""
  layout = layout_lib.resolve(layout)
  features = features.astype(jnp.float32)
  batch = features.shape[0]
  if not layout.class_major(batch):  # One batch-major pass (any batch size, even symbolic).
    return _common.head_energy(state, shape(features), layout)
  return jnp.concatenate([
      _common.head_energy(state, shape(features[i:i + _CHUNK_ROWS]), layout)
      for i in range(0, max(batch, 1), _CHUNK_ROWS)])


# XLA:CPU runs a standalone clip of a batch as a fusion split over two
# threads, and the hand-off costs more than the clip. Clipping 64-row chunks,
# each followed by its own class-major matmul, keeps every fusion under the
# split size. Where `logits` goes batch-major (large CPU batches,
# accelerators) the batch stays whole.
_CHUNK_ROWS = 64
