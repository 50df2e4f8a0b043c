"""Maximum logit (MaxLogit).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song,
"Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

import jax.numpy as jnp

from line_jax.scorers import _common
from line_jax.scorers import _protocol

FOLD = _protocol.head_fold(_common.make_head)


score = _common.logit_scorer(jnp.max, "`[batch]` largest logits; higher = more ID.")
