"""SHE: simplified Hopfield energy against stored class patterns.

Zhang, Fu, Liu, Chen, Xu, Zhu, Li, "Out-of-distribution Detection based on
In-distribution Data Patterns Memorization with Modern Hopfield Energy",
ICLR 2023. The stored pattern of class c is the mean penultimate feature of
the training samples of class c that the model classifies correctly
(label = prediction = c); a test feature h predicted as c scores

    score(h) = h . S_c,    c = argmax(h @ kernel + bias),

the simplified Hopfield energy with one stored pattern per class (the
log-sum-exp of a single inner product is the inner product); higher = more
ID. This is the official code's default (zjs975584714/SHE_ood_detection,
`generate_stored_pattern.py` for the patterns, `simple_compute_score_HE`
with `--metric inner_product`), which OpenOOD's `she_postprocessor` follows;
paper and code agree. No hyperparameters. (The official ImageNet script
averages per-batch means pairwise, a running approximation of this mean; the
exact mean here is the CIFAR script's.)

A class with no correctly classified training sample has no pattern (the
official code fails on it); here its pattern is zero, so samples predicted
as it score 0, the lowest score of a post-ReLU feature. `patterns_count`
records how many samples each pattern averages.
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


@flax.struct.dataclass
class SheState(_common.HeadState):
  """A fitted SHE scorer.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`; `kernel` is its transpose).
    bias: `[classes]` float32 head bias.
    patterns: `[classes, features]` float32 stored patterns (zero for a
      class without a correctly classified training sample).
    patterns_count: `[classes]` int32 samples averaged into each pattern.
  """

  patterns: jax.Array
  patterns_count: jax.Array


@flax.struct.dataclass
class SheAcc:
  """SHE's accumulator: per-class float64 sums of correctly classified features.

  Attributes:
    head: the `HeadState`.
    sums: `[classes, features]` float64.
    counts: `[classes]` int64.
  """

  head: _common.HeadState
  sums: jax.Array
  counts: jax.Array


def init(kernel, bias) -> SheAcc:
  """Starts the stored patterns of the head's classes (head validated)."""
  num_features, num_classes = _common.check_head(kernel, bias)
  with jax.enable_x64(True):
    return SheAcc(_common.head_state(kernel, bias),
                  jnp.zeros((num_classes, num_features), jnp.float64),
                  jnp.zeros((num_classes,), jnp.int64))


@jax.jit
def _add(acc: SheAcc, features: jax.Array, labels: jax.Array) -> SheAcc:
  h = features.astype(jnp.float32)
  pred = jnp.argmax(_matmul.dot(h, acc.head.weight.T) + acc.head.bias, axis=1)
  num_classes = acc.counts.shape[0]
  # A misclassified sample goes to an extra segment that is dropped.
  segment = jnp.where(pred == labels, labels, num_classes)
  sums = jax.ops.segment_sum(h.astype(jnp.float64), segment, num_classes + 1)[:num_classes]
  counts = jnp.bincount(segment, length=num_classes + 1)[:num_classes].astype(jnp.int64)
  return acc.replace(sums=acc.sums + sums, counts=acc.counts + counts)


def update(acc: SheAcc, features, labels) -> SheAcc:
  """Adds the correctly classified samples of a labelled batch to their class."""
  with jax.enable_x64(True):
    return _add(acc, features, labels)


def finalize(acc: SheAcc) -> SheState:
  """The stored patterns: per-class means (zero where a class has none)."""
  counts = np.asarray(acc.counts)
  patterns = np.asarray(acc.sums) / np.maximum(counts, 1)[:, None]
  return SheState(acc.head.weight, acc.head.bias, jnp.asarray(patterns, jnp.float32),
                  jnp.asarray(counts, jnp.int32))


FOLD = fold.Fold(init=init, update=update, finalize=finalize,
                 merge=fold.add_fields("sums", "counts"), needs_labels=True)


@_common.score_jit
def score(state: SheState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` inner products with the predicted class's stored pattern; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  z, axis = _common.logits(state, h, layout)
  pred = _common.argmax(z, axis)
  return jnp.sum(h * state.patterns[pred], axis=1)
