"""LINe: Out-of-Distribution Detection by Leveraging Important Neurons (CVPR 2023).

Sign convention for every score in line_jax: higher = more in-distribution.
"""

from line_jax.line._contributions import ContributionSums
from line_jax.line._contributions import contributions
from line_jax.line._contributions import contributions_from_batches
from line_jax.line._contributions import contributions_from_head
from line_jax.line._contributions import finalize as finalize_sums
from line_jax.line._contributions import init_sums
from line_jax.line._contributions import update_sums
from line_jax.line._fit import LineState
from line_jax.line._fit import fit
from line_jax.line._fit import fit_from_contributions
from line_jax.line._score import STRATEGIES
from line_jax.line._score import score

__all__ = (
    "ContributionSums",
    "LineState",
    "STRATEGIES",
    "contributions",
    "contributions_from_batches",
    "contributions_from_head",
    "finalize_sums",
    "fit",
    "fit_from_contributions",
    "init_sums",
    "score",
    "update_sums",
)
