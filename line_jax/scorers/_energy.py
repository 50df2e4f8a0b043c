"""Energy score: `logsumexp` of the logits.

Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection",
NeurIPS 2020. Temperature 1, as the paper uses for pretrained models.
"""

from __future__ import annotations

import jax

from line_jax.scorers import _common

fit = _common.fit_head
fit_from_batches = _common.fit_head_from_batches


@jax.jit
def score(state: _common.HeadState, features: jax.Array) -> jax.Array:
  """`[batch]` energies `logsumexp(h @ kernel + bias)`; higher = more ID.

  Args:
    state: from `fit` (the head).
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.kernel.shape[0])
  return _common.energy(_common.logits(state, features))
