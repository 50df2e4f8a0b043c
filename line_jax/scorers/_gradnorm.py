"""GradNorm: size of the last layer's gradient towards the uniform label.

Huang, Geng, Li, "On the Importance of Gradients for Detecting Distributional
Shifts in the Wild", NeurIPS 2021. The score is the L1 norm of the gradient of
`KL(uniform || softmax(logits / T))` with respect to the last layer's weights,
at T = 1 (the paper's choice).

For a linear head that gradient is an outer product, `h (softmax - 1/C)^T`,
whose entrywise L1 norm factorises as `||h||_1 * ||softmax - 1/C||_1`: one
matrix product per batch instead of a backward pass per sample (the official
code's loop). The official code uses all-ones targets, not `1/C`, which
multiplies every score by C and leaves every ranking unchanged; we follow the
paper's KL.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from line_jax import fold
from line_jax import layout as layout_lib
from line_jax.scorers import _common


@flax.struct.dataclass
class GradNormState(_common.HeadState):
  """GradNorm's fitted state: the head (`HeadState`)."""


FOLD = fold.head_fold(_common.head_init(GradNormState))


@_common.score_jit
def score(state: _common.HeadState, features: jax.Array,
          layout: layout_lib.Layout | None = None) -> jax.Array:
  """`[batch]` gradient norms `||h||_1 * ||softmax - 1/C||_1`; higher = more ID.

  Args:
    state: from `fit` (the head).
    features: `[batch, features]` penultimate activations.
  """
  num_classes, num_features = state.weight.shape
  _common.check_width(features, num_features)
  h = features.astype(jnp.float32)
  logits, axis = _common.logits(state, h, layout)
  # ||softmax - 1/C||_1 = ||e - s/C||_1 / s with e = exp(z - max z), s = sum e:
  # one division per sample instead of one per logit (fewer, smaller fusions
  # than the softmax form).
  e = jnp.exp(logits - jnp.max(logits, axis=axis, keepdims=True))
  total = jnp.sum(e, axis=axis, keepdims=True)
  deviation = jnp.sum(jnp.abs(e - total / num_classes), axis=axis) / jnp.squeeze(total, axis)
  return jnp.sum(jnp.abs(h), axis=-1) * deviation
