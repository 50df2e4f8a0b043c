"""ASH: activation shaping, three variants (ASH-P, ASH-B, ASH-S), then energy.

Djurisic, Bozanic, Ashok, Liu, "Extremely Simple Activation Shaping for
Out-of-Distribution Detection", ICLR 2023. Per sample, keep the
`k = n - round(n p / 100)` largest activations and zero the rest, then

* ASH-P: score the pruned features;
* ASH-B: set every kept one to `sum_before / k` (binarised, same sum);
* ASH-S: scale the kept ones by `exp(sum_before / sum_after)`;

and score by energy. Defaults are the paper's ImageNet ResNet-50 settings
(its Table 1): ASH-P p = 60, ASH-B p = 65, ASH-S p = 90. The paper's code
shapes the last convolutional feature map before global average pooling; a
feature-space scorer sees the pooled vector, so the activations shaped here
are the pooled features.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import layout as layout_lib
from line_jax.scorers import _common
from line_jax.scorers import _select
from line_jax.scorers import _shaping

PERCENTILE_P = 60.0
PERCENTILE_B = 65.0
PERCENTILE_S = 90.0
# The tuning grid of every variant (`python -m line_jax.tune`).
GRID = {"percentile": (50.0, 60.0, 70.0, 80.0, 90.0, 95.0)}


@flax.struct.dataclass
class AshPState(_shaping.ShapingState):
  """ASH-P's fitted state (`ShapingState`)."""


@flax.struct.dataclass
class AshBState(_shaping.ShapingState):
  """ASH-B's fitted state (`ShapingState`)."""


@flax.struct.dataclass
class AshSState(_shaping.ShapingState):
  """ASH-S's fitted state (`ShapingState`)."""


FOLD_P = _shaping.shaping_fold(PERCENTILE_P, AshPState)
FOLD_B = _shaping.shaping_fold(PERCENTILE_B, AshBState)
FOLD_S = _shaping.shaping_fold(PERCENTILE_S, AshSState)


def shape(features: jax.Array, k, variant: str, *, unroll: bool | None = None) -> jax.Array:
  """ASH-`variant` keeping the `k` largest of `[batch, features]` float32 rows.

  `k` (from `_shaping.kept_count`) is an int or a traced int32 scalar;
  `unroll` is `_select`'s (speed only).
  """
  mask = _shaping.top_k_mask(features, k, unroll=unroll)
  before = jnp.sum(features, axis=1, keepdims=True)
  if variant == "b":
    return jnp.where(mask, before / jnp.asarray(k, jnp.float32), 0.0)
  pruned = jnp.where(mask, features, 0.0)
  if variant == "p":
    return pruned
  after = jnp.sum(pruned, axis=1, keepdims=True)
  # An all-zero row has before = after = 0; any factor leaves it zero, and 1
  # (ratio 0) keeps 0 / 0 from turning the score into NaN.
  ratio = jnp.where(after == 0, 0.0, before / jnp.where(after == 0, 1.0, after))
  return pruned * jnp.exp(ratio)


def _score(state: _shaping.ShapingState, features: jax.Array,
           layout: layout_lib.Layout | None = None, *, variant: str) -> jax.Array:
  """`[batch]` energies of the shaped features; higher = more ID.

  Args:
    state: from `fit`.
    features: `[batch, features]` penultimate activations.
    variant: "p", "b" or "s".
  """
  _common.check_width(features, state.weight.shape[1])
  shaped = shape(features.astype(jnp.float32), state.kept, variant,
                 unroll=_select.unrolled(layout))
  return _common.head_energy(state, shaped, layout)


score_p = _common.score_jit(functools.partial(_score, variant="p"))
score_b = _common.score_jit(functools.partial(_score, variant="b"))
score_s = _common.score_jit(functools.partial(_score, variant="s"))
