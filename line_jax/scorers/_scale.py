"""SCALE: activation scaling without pruning, then energy.

Xu, Lian, Yang, Yang, "Scaling for Training Time and Post-hoc
Out-of-distribution Detection Enhancement", ICLR 2024. Like ASH-S, the factor
is `exp(sum_before / sum_after)` where `sum_after` sums the
`k = n - round(n p / 100)` largest activations of the sample, but SCALE keeps
every activation and only multiplies them all by it. Default p = 85, the
paper's ImageNet ResNet-50 setting.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _select
from line_jax.scorers import _shaping

PERCENTILE = 85.0
# The tuning grid (`python -m line_jax.tune`).
GRID = {"percentile": (50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0)}


@flax.struct.dataclass
class ScaleState(_shaping.ShapingState):
  """SCALE's fitted state (`ShapingState`)."""


FOLD = _shaping.shaping_fold(PERCENTILE, ScaleState)


@_common.score_jit
def score(state: _shaping.ShapingState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` energies of the scaled features; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
  """
  _common.check_width(features, state.weight.shape[1])
  h = features.astype(jnp.float32)
  kept = _shaping.top_k_sum(h, state.kept, unroll=_select.unrolled(layout))
  # All-zero row: 0 / 0. Any factor leaves it zero; 1 keeps the score finite.
  ratio = jnp.sum(h, axis=1) / jnp.where(kept == 0, 1.0, kept)
  factor = jnp.exp(jnp.where(kept == 0, 0.0, ratio))
  return _common.head_energy(state, h * factor[:, None], layout)
