"""Energy score: `logsumexp` of the logits.

Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection",
NeurIPS 2020. Temperature 1, as the paper uses for pretrained models.
"""

from __future__ import annotations

import flax.struct

from line_jax import fold
from line_jax.scorers import _common


@flax.struct.dataclass
class EnergyState(_common.HeadState):
  """Energy's fitted state: the head (`HeadState`)."""


FOLD = fold.head_fold(_common.head_init(EnergyState))


score = _common.logit_scorer(
    _common.energy, "`[batch]` energies `logsumexp(h @ kernel + bias)`; higher = more ID.")
