"""Maximum softmax probability (MSP).

Hendrycks, Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import fold
from line_jax.scorers import _common


@flax.struct.dataclass
class MspState(_common.HeadState):
  """MSP's fitted state: the head (`HeadState`)."""


FOLD = fold.head_fold(_common.head_init(MspState))


def _max_softmax(z: jax.Array, axis: int) -> jax.Array:
  # max softmax = 1 / sum exp(z - max z): no per-logit division.
  return 1.0 / jnp.sum(jnp.exp(z - jnp.max(z, axis=axis, keepdims=True)), axis=axis)


score = _common.logit_scorer(
    _max_softmax, "`[batch]` largest softmax probabilities; higher = more ID.")
