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
import jax.numpy as jnp
import numpy as np

from line_jax import _validation
from line_jax.scorers import _common

SPARSITY = 70.0
# The tuning grid (`python -m line_jax.tune`).
GRID = {"p": (10.0, 30.0, 50.0, 70.0, 90.0)}


@flax.struct.dataclass
class DiceState(_common.HeadState):
  """A fitted DICE scorer: the sparsified head.

  Attributes:
    weight: `[classes, features]` float32 head weight (class-major, as
      `HeadState`) with the dropped weights set to zero; `kernel` is its
      `[features, classes]` transpose.
    bias: `[classes]` float32 head bias.
  """


def init(kernel, bias, *, p=SPARSITY) -> _common.MeanAcc:
  """Starts DICE's fit.

  Args:
    kernel: `[features, classes]` head kernel (Flax layout).
    bias: `[classes]` head bias or None.
    p: sparsity percentile in [0, 100].
  """
  _common.check_head(kernel, bias)
  return _common.mean_acc(kernel, bias, _validation.percentile("p", p))


def finalize(acc: _common.MeanAcc) -> DiceState:
  """The sparsified head: keep `kernel[j, c]` iff `mean[j] kernel[j, c]` is
  above the p-th percentile of all of them."""
  contrib = acc.mean[:, None] * np.asarray(acc.head.kernel, np.float64)
  # A percentile of features x classes values, once per fit: NumPy on the host.
  keep = contrib > np.percentile(contrib, float(acc.setting))
  return DiceState(jnp.where(jnp.asarray(keep).T, acc.head.weight, 0.0), acc.head.bias)


FOLD = _common.mean_fold(init, finalize)


# Energy under the sparsified head: the same scorer as Energy, over DiceState.
score = _common.logit_scorer(
    _common.energy, "`[batch]` energies under the sparsified head; higher = more ID.")
