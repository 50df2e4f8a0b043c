"""Energy score: `logsumexp` of the logits.

Liu, Wang, Owens, Li, "Energy-based Out-of-distribution Detection",
NeurIPS 2020. Temperature 1, as the paper uses for pretrained models.
"""

from __future__ import annotations


from line_jax.scorers import _common

fit = _common.fit_head
fit_from_batches = _common.fit_head_from_batches


score = _common.logit_scorer(
    _common.energy, "`[batch]` energies `logsumexp(h @ kernel + bias)`; higher = more ID.")
