"""DICE: directed sparsification of the head, then energy.

Sun, Li, "DICE: Leveraging Sparsification for Out-of-Distribution
Detection", ECCV 2022. The contribution of unit j to class c is
`mean_train(h)[j] * kernel[j, c]`; DICE keeps the head weights whose
contribution is above the p-th percentile of all `features x classes`
contributions (strict `>`, NumPy's default "linear" percentile, as the
official code) and scores by energy. p is the sparsity: p = 90 keeps 10 %.
Default p = 70, the paper's ImageNet setting (90 for CIFAR).

The only statistic is the training-mean feature, a float64 running sum, so
`fit_from_batches` streams in O(features) memory and gives the same state.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax.scorers import _common

SPARSITY = 70.0


@flax.struct.dataclass
class DiceState(_common.HeadState):
  """A fitted DICE scorer: the sparsified head.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`) with the dropped weights set to zero; `kernel` is its
      `[features, classes]` transpose.
    bias: `[classes]` float32 head bias.
  """


@flax.struct.dataclass
class MeanSums:
  """Running sum of features (streaming state of the training mean).

  Attributes:
    sums: `[features]` float64.
    count: int64 scalar, samples seen.
  """

  sums: jax.Array
  count: jax.Array


def init_sums(num_features: int) -> MeanSums:
  with jax.enable_x64(True):
    return MeanSums(jnp.zeros((num_features,), jnp.float64), jnp.zeros((), jnp.int64))


@jax.jit
def _add(acc: MeanSums, features: jax.Array) -> MeanSums:
  total = jnp.sum(features.astype(jnp.float32).astype(jnp.float64), axis=0)
  return MeanSums(acc.sums + total, acc.count + features.shape[0])


def update_sums(acc: MeanSums, features) -> MeanSums:
  """Adds a validated `[batch, features]` batch to the running sums."""
  with jax.enable_x64(True):
    return _add(acc, features)


def fit(features, labels, kernel, bias, *, p=SPARSITY) -> DiceState:
  """Fits DICE's weight mask from training features.

  Args:
    features: `[n, features]` training activations.
    labels: `[n]` integer labels or None (not used, validated if given).
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    p: sparsity percentile in [0, 100].

  Returns:
    A `DiceState`.
  """
  _common.check_train(features, labels, kernel, bias)
  p = _validation.percentile("p", p)
  acc = update_sums(init_sums(features.shape[1]), features)
  return _state(acc, kernel, bias, p)


def fit_from_batches(batches, kernel, bias, *, p=SPARSITY) -> DiceState:
  """`fit` over an iterable of `(features, labels)` batches, one pass."""
  num_features, num_classes = _common.check_head(kernel, bias)
  p = _validation.percentile("p", p)
  acc = init_sums(num_features)
  for features, labels in _common.batches_of(batches):
    _common.check_batch(features, labels, num_features, num_classes)
    acc = update_sums(acc, features)
  if int(acc.count) == 0:
    raise _common.no_batches()
  return _state(acc, kernel, bias, p)


def _state(acc: MeanSums, kernel, bias, p: float) -> DiceState:
  mean = np.asarray(acc.sums) / int(acc.count)
  head = _common.head_state(kernel, bias)
  contrib = mean[:, None] * np.asarray(head.kernel, np.float64)
  # A percentile of features x classes values, once per fit: NumPy on the host.
  keep = contrib > np.percentile(contrib, p)
  return DiceState(jnp.where(jnp.asarray(keep).T, head.weight, 0.0), head.bias)


# Energy under the sparsified head: the same scorer as Energy, over DiceState.
score = _common.logit_scorer(
    _common.energy, "`[batch]` energies under the sparsified head; higher = more ID.")
