"""Maximum logit (MaxLogit).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song,
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from line_jax import fold
from line_jax.scorers import _common


@flax.struct.dataclass
class MaxLogitState(_common.HeadState):
  """MaxLogit's fitted state: the head (`HeadState`)."""


FOLD = fold.head_fold(_common.head_init(MaxLogitState))


score = _common.logit_scorer(jnp.max, "`[batch]` largest logits; higher = more ID.")
