"""Maximum logit (MaxLogit).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song,
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from line_jax.scorers import _common

fit = _common.fit_head
fit_from_batches = _common.fit_head_from_batches


@jax.jit
def score(state: _common.HeadState, features: jax.Array) -> jax.Array:
  """`[batch]` largest logits; higher = more ID.

  Args:
    state: from `fit` (the head).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.kernel.shape[0])
  return jnp.max(_common.logits(state, features), axis=-1)
