"""Entropy: the negative Shannon entropy of the softmax.

    score(x) = sum_c p_c log p_c,    p = softmax(h @ kernel + bias)

A uniform softmax (log C) is the least in-distribution, a one-hot one (0)
the most. The baseline that GEN generalises: Liu, Lochman, Zach, "GEN:
Pushing the Limits of Softmax-Based Out-of-Distribution Detection", CVPR
2023, whose official code (XixiLiu95/GEN, `benchmark.py`,
`shannon_entropy`) scores by `sum(p * log(p))`, as here. That code takes the
log of the softmax itself, which is -inf (and the score NaN) once a
probability underflows to 0; here `log p` is the log-softmax, always finite,
and such a class adds its exact limit 0.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import fold
from line_jax.scorers import _common


@flax.struct.dataclass
class EntropyState(_common.HeadState):
  """Entropy's fitted state: the head (`HeadState`)."""


FOLD = fold.head_fold(_common.head_init(EntropyState))


def negative_entropy(z: jax.Array, axis: int) -> jax.Array:
  """`sum p log p` of the softmax of logits `z` over their class `axis`."""
  log_p = jax.nn.log_softmax(z, axis=axis)
  return jnp.sum(jnp.exp(log_p) * log_p, axis=axis)


score = _common.logit_scorer(
    negative_entropy, "`[batch]` negative softmax entropies `sum p log p`; higher = more ID.")
