"""Maximum softmax probability (MSP).

Hendrycks, Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from line_jax.scorers import _common

fit = _common.fit_head
fit_from_batches = _common.fit_head_from_batches


@jax.jit
def score(state: _common.HeadState, features: jax.Array) -> jax.Array:
  """`[batch]` largest softmax probabilities; higher = more ID.

  Args:
    state: from `fit` (the head).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.kernel.shape[0])
  z = _common.logits(state, features)
  # max softmax = exp(max z - logsumexp z): no [batch, classes] division.
  return jnp.exp(jnp.max(z, axis=-1) - _common.energy(z))
