"""Energy score: `logsumexp` of the logits.

Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection",
NeurIPS 2020. Temperature 1, as the paper uses for pretrained models.
"""

from __future__ import annotations


from line_jax.scorers import _common
from line_jax.scorers import _protocol

FOLD = _protocol.head_fold(_common.make_head)


score = _common.logit_scorer(
    _common.energy, "`[batch]` energies `logsumexp(h @ kernel + bias)`; higher = more ID.")
