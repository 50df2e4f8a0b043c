"""Maximum logit (MaxLogit).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song,
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

import jax.numpy as jnp

from line_jax.scorers import _common

fit = _common.fit_head
fit_from_batches = _common.fit_head_from_batches


score = _common.logit_scorer(jnp.max, "`[batch]` largest logits; higher = more ID.")
